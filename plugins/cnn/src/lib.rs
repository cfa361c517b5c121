//! The cnn engine: feed-forward super-resolution networks in candle, on any CPU, with real
//! trained weights from the model store. Every model is ×4 and returns the layer contract's
//! three layers (DESIGN.md §3); `base` is always the classic engine's bicubic ×4, and alpha is
//! upscaled by the classic engine, never by a network.
//!
//! - `srgan-pair`: two networks of one architecture, SRResNet trained with pixel (MSE) loss
//!   and SRGAN fine-tuned from it with perceptual and adversarial loss:
//!   `pixel_detail` = SRResNet − base, `semantic_detail` = SRGAN − SRResNet.
//! - `realesrgan-x4plus`, `realesrgan-x4plus-anime`: one GAN (RRDBNet), split by frequency
//!   band (`layers_out::BandSplit`): `pixel_detail` = U(D(y)) − base, what changed at the
//!   input's own resolution; `semantic_detail` = y − U(D(y)), what lies above it.
//!
//! srgan-pair's `dni` parameter takes semantic detail from SRResNet and SRGAN's weights
//! interpolated at λ (deep network interpolation). Every 3×3 convolution runs by Winograd on
//! channels-last activations ([`winograd`]); images are tiled from a memory budget (`tiled`).

#[macro_use]
extern crate tessera_kernels;

mod conv_few;
pub mod layers;
mod layers_out;
pub mod lora;
pub mod rrdbnet;
pub mod srresnet;
mod tiled;
pub use tessera_kernels::winograd;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use tessera_plugin_abi::pixels::ImageRef;
use tessera_plugin_abi::{export_plugin, Engine, EngineError, Job};
use tessera_protocol::PluginInfo;

use rrdbnet::RrdbNet;
use srresnet::SrResNet;

pub const SRGAN_PAIR: &str = "srgan-pair";
pub const REALESRGAN_X4PLUS: &str = "realesrgan-x4plus";
pub const REALESRGAN_X4PLUS_ANIME: &str = "realesrgan-x4plus-anime";
const SCALE: usize = 4;

/// A network the tiler can run: (1, 3, h, w) RGB in [0, 1] → (1, 3, 4h, 4w).
pub trait Network: Sync {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor>;
}

impl Network for SrResNet {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        SrResNet::forward(self, x)
    }
}

impl Network for RrdbNet {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Real-ESRGAN overshoots [0, 1] a little; its apps clamp, and so does the layer maths.
        RrdbNet::forward(self, x)?.clamp(0f32, 1f32)
    }
}

/// A model's networks, loaded (one value per engine, so its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Loaded {
    /// SRResNet, SRGAN, and the last network interpolated between them (with its λ).
    Pair(SrResNet, SrResNet, Option<(f64, SrResNet)>),
    Single(RrdbNet),
}

impl Loaded {
    fn load(model: &str, dir: &Path, device: &Device) -> Result<Loaded, String> {
        let fail = |name: &str, e: candle_core::Error| {
            format!("cannot load {}: {e}; run `tessera models fetch {model}`", dir.join(name).display())
        };
        let srresnet = |name: &str| SrResNet::load_file(&dir.join(name), device).map_err(|e| fail(name, e));
        match model {
            SRGAN_PAIR => Ok(Loaded::Pair(srresnet("srresnet.safetensors")?, srresnet("srgan.safetensors")?, None)),
            _ => {
                let name = "rrdbnet.safetensors";
                Ok(Loaded::Single(RrdbNet::load_file(&dir.join(name), device).map_err(|e| fail(name, e))?))
            }
        }
    }

    /// Makes sure the network interpolated at `lambda` is loaded (srgan-pair only).
    fn interpolate(&mut self, dir: &Path, lambda: f64, device: &Device) -> Result<(), String> {
        if let Loaded::Pair(_, _, dni) = self {
            if lambda != 1.0 && dni.as_ref().is_none_or(|(l, _)| *l != lambda) {
                *dni = None;
                let net = SrResNet::load_interpolated(&dir.join("srresnet.safetensors"), &dir.join("srgan.safetensors"), lambda, device)
                    .map_err(|e| format!("cannot interpolate the srgan-pair weights: {e}"))?;
                *dni = Some((lambda, net));
            }
        }
        Ok(())
    }

    /// The networks a job runs, with their progress stage names.
    fn networks(&self, lambda: f64) -> Vec<(&dyn Network, &'static str)> {
        match self {
            Loaded::Pair(pix, _, Some((l, dni))) if *l == lambda => vec![(pix as &dyn Network, "srresnet"), (dni, "interpolated")],
            Loaded::Pair(pix, gan, _) => vec![(pix as &dyn Network, "srresnet"), (gan, "srgan")],
            Loaded::Single(net) => vec![(net as &dyn Network, "rrdbnet")],
        }
    }
}

pub struct Cnn {
    store: PathBuf,
    device: Device,
    /// The last model used; one at a time, so memory holds one model's weights.
    loaded: Option<(String, Loaded)>,
}

/// How a model's jobs are tiled unless its parameters say otherwise.
struct TileDefaults {
    /// Overlap of neighbouring tiles, in input pixels, for tiled output to match untiled
    /// output to ≥ 50 dB PSNR: RRDBNet reaches further than SRResNet (measured at 40/48/64:
    /// 47, 53, 62 dB on the semantic detail of x4plus).
    overlap: usize,
    /// The budget for a tile's pass, in MiB: the smallest at which the model runs at full
    /// speed. srgan-pair's 512 gives 1024×768 tiles of 256² in 12.4 s at a 974 MiB peak (f32
    /// layers included), where 1024 gave tiles of 362² in the same time at 1199 MiB; RRDBNet's
    /// tiles carry 48 pixels of overlap, and halving its 1024 would take 10 % more work.
    memory_mb: usize,
    /// Peak memory of a tile's pass per input pixel, rounded up: the slope of a fresh worker's
    /// high-water mark over single-tile jobs of 128², 256² and 384² (session 4, u8 layers):
    /// srgan-pair (both networks) 204 → 545 → 1076 MiB, 6.6-7.1 KiB a pixel; RRDBNet, whose
    /// blocks and tail run in strips, 408 → 478 → 562 MiB, 1.0-1.5 KiB a pixel (4 KiB leaves
    /// room for f32 result layers and the tiler's strips).
    bytes_per_pixel: usize,
}

fn tile_defaults(model: &str) -> TileDefaults {
    match model {
        SRGAN_PAIR => TileDefaults { overlap: 32, memory_mb: 512, bytes_per_pixel: 8 << 10 },
        _ => TileDefaults { overlap: 48, memory_mb: 1024, bytes_per_pixel: 4 << 10 },
    }
}

fn model(id: &str, name: &str, description: &str) -> Value {
    let tiling = tile_defaults(id);
    let bytes_per_pixel_kib = tiling.bytes_per_pixel >> 10;
    let mut m = json!({
        "id": id,
        "name": name,
        "description": format!("{description} Install with `tessera models fetch {id}`."),
        "scales": [4],
        "layers": ["base", "pixel_detail", "semantic_detail"],
        "parameters": [
            {"name": "tile", "kind": "int", "default": 0, "min": 0, "max": 4096,
             "description": "Tile side in input pixels; 0 sizes tiles from memory_mb (the whole image in one tile when it fits)."},
            {"name": "memory_mb", "kind": "int", "default": tiling.memory_mb, "min": 64, "max": 65536,
             "description": format!("Memory budget for one tile's network pass, in MiB (about {bytes_per_pixel_kib} KiB per input pixel).")},
            {"name": "overlap", "kind": "int", "default": tiling.overlap, "min": 8, "max": 256,
             "description": "Overlap of neighbouring tiles in input pixels, cross-faded."}
        ],
        "exact_render": false
    });
    if id == SRGAN_PAIR {
        m["parameters"].as_array_mut().expect("a list").push(json!(
            {"name": "dni", "kind": "float", "default": 1.0, "min": 0.0, "max": 1.0,
             "description": "Semantic detail from the network whose weights are interpolated between SRResNet (0) and SRGAN (1), deep network interpolation; at opacity 1 the picture is that network's. 1 is SRGAN itself."}
        ));
    }
    m
}

impl Engine for Cnn {
    fn describe() -> PluginInfo {
        serde_json::from_value(json!({
            "id": "cnn",
            "version": env!("CARGO_PKG_VERSION"),
            "name": "CNN super-resolution",
            "description": "Feed-forward super-resolution networks on the CPU, with real trained weights from the model store.",
            "models": [
                model(SRGAN_PAIR, "SRResNet + SRGAN ×4",
                      "Pixel detail from SRResNet (pixel loss), semantic detail from its SRGAN fine-tune (perceptual + adversarial loss)."),
                model(REALESRGAN_X4PLUS, "Real-ESRGAN x4plus",
                      "One GAN for degraded real photos (noise, blur, JPEG), split by band: pixel detail is what it changed at the input's resolution, semantic detail the texture it invented above it."),
                model(REALESRGAN_X4PLUS_ANIME, "Real-ESRGAN x4plus anime",
                      "Real-ESRGAN's 6-block model for illustrations and anime, split by band like x4plus."),
            ]
        }))
        .expect("static description is valid")
    }

    fn create(config: &Value) -> Result<Self, String> {
        let store = config
            .get("model_store")
            .and_then(Value::as_str)
            .map(PathBuf::from)
            .ok_or("the host passed no model_store directory")?;
        // Its convolutions are CPU kernels (Winograd on channels-last activations), so its
        // description lists the CPU alone and a GPU worker never loads it.
        match config.get("device").and_then(Value::as_str).unwrap_or("cpu") {
            "cpu" => Ok(Cnn { store, device: Device::Cpu, loaded: None }),
            other => Err(format!("the cnn engine runs on the CPU only, not on `{other}`")),
        }
    }

    fn process(&mut self, job: &mut Job<'_>) -> Result<(), EngineError> {
        let known = [SRGAN_PAIR, REALESRGAN_X4PLUS, REALESRGAN_X4PLUS_ANIME];
        if !known.contains(&job.model.as_str()) || job.scale as usize != SCALE {
            return Err(EngineError::Failed(format!("cnn has no model `{}` at ×{}", job.model, job.scale)));
        }
        let int = |name: &str, default: u64| job.params.get(name).and_then(Value::as_u64).unwrap_or(default) as usize;
        let tiling = tile_defaults(&job.model);
        let overlap = int("overlap", tiling.overlap as u64);
        let tile = match int("tile", 0) {
            0 => tile_for_budget(job.input.width(), job.input.height(), int("memory_mb", tiling.memory_mb as u64), overlap, tiling.bytes_per_pixel),
            t => t,
        };
        if self.loaded.as_ref().is_none_or(|(id, _)| *id != job.model) {
            self.loaded = None; // free the old model before loading the new one
            job.calls.progress(0, 1, "loading");
            let loaded = Loaded::load(&job.model, &self.store.join(&job.model), &self.device).map_err(EngineError::Failed)?;
            self.loaded = Some((job.model.clone(), loaded));
        }
        let lambda = job.params.get("dni").and_then(Value::as_f64).unwrap_or(1.0).clamp(0.0, 1.0);
        let (_, loaded) = self.loaded.as_mut().expect("loaded above");
        if lambda != 1.0 {
            job.calls.progress(0, 1, "interpolating weights");
        }
        loaded.interpolate(&self.store.join(&job.model), lambda, &self.device).map_err(EngineError::Failed)?;
        let rgb = to_rgb_planes(&job.input);
        let (w, h) = (job.input.width(), job.input.height());
        let tiles = tiled::Tiled { width: w, height: h, tile, overlap, scale: SCALE };
        let mut out: Box<dyn layers_out::LayerSink> = match loaded {
            Loaded::Pair(..) => Box::new(layers_out::PairDifference::new(job, SCALE)),
            Loaded::Single(_) => Box::new(layers_out::BandSplit::new(job, SCALE)),
        };
        tiles.run(&loaded.networks(lambda), &rgb, &self.device, out.as_mut(), job)
    }
}

export_plugin!(Cnn);

/// The largest tile side whose pass fits `memory_mb`: the whole image when it fits.
fn tile_for_budget(width: usize, height: usize, memory_mb: usize, overlap: usize, bytes_per_pixel: usize) -> usize {
    let pixels = (memory_mb << 20) / bytes_per_pixel;
    if width * height <= pixels {
        return width.max(height);
    }
    ((pixels as f64).sqrt() as usize).max(2 * overlap + 16)
}

/// The input's colour as three f32 planes (grey is repeated; alpha is not the network's).
fn to_rgb_planes(input: &ImageRef<'_>) -> Vec<f32> {
    let (w, h, c) = (input.width(), input.height(), input.channels());
    let colour = c - input.layout.alpha as usize;
    let mut planes = vec![0f32; 3 * w * h];
    let mut row = vec![0f32; w * c];
    for y in 0..h {
        input.read_row(y, &mut row);
        for x in 0..w {
            for ch in 0..3 {
                planes[ch * w * h + y * w + x] = row[x * c + ch.min(colour - 1)];
            }
        }
    }
    planes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_follow_the_memory_budget() {
        // At 28 KiB a pixel 1 GiB holds 37449 tile pixels: a 160×120 image goes in one tile,
        // a large one in 193².
        let b = 28 << 10;
        assert_eq!(tile_for_budget(160, 120, 1024, 32, b), 160);
        assert_eq!(tile_for_budget(4000, 3000, 1024, 32, b), 193);
        assert_eq!(tile_for_budget(4000, 3000, 64, 32, b), 80);
    }
}
