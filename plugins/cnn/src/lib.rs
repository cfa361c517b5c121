//! The cnn engine: feed-forward super-resolution networks in candle, on any CPU, with real
//! trained weights from the model store.
//!
//! `srgan-pair` splits a ×4 upscale by the layer contract (DESIGN.md §3) with two networks of
//! one architecture: SRResNet trained with pixel (MSE) loss, and SRGAN, the same network
//! fine-tuned from it with perceptual and adversarial loss:
//! `base` = bicubic ×4 (the classic engine's), `pixel_detail` = SRResNet − base,
//! `semantic_detail` = SRGAN − SRResNet. Alpha is upscaled by the classic engine, never by a
//! network.

pub mod lora;
pub mod srresnet;
pub mod tiling;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use tessera_resample::{Filter, Resampler, Scratch};
use tessera_plugin_abi::pixels::ImageRef;
use tessera_plugin_abi::{export_plugin, Engine, EngineError, Job};
use tessera_protocol::{LayerRole, PluginInfo};

use srresnet::SrResNet;

pub const SRGAN_PAIR: &str = "srgan-pair";
const SCALE: usize = 4;

pub struct Cnn {
    store: PathBuf,
    device: Device,
    pair: Option<(SrResNet, SrResNet)>,
}

impl Engine for Cnn {
    fn describe() -> PluginInfo {
        serde_json::from_value(json!({
            "id": "cnn",
            "version": env!("CARGO_PKG_VERSION"),
            "name": "CNN super-resolution",
            "description": "Feed-forward super-resolution networks on the CPU, with real trained weights from the model store.",
            "models": [{
                "id": SRGAN_PAIR,
                "name": "SRResNet + SRGAN ×4",
                "description": "Pixel detail from SRResNet (pixel loss), semantic detail from its SRGAN fine-tune (perceptual + adversarial loss). Install with `tessera models fetch srgan-pair`.",
                "scales": [4],
                "layers": ["base", "pixel_detail", "semantic_detail"],
                "parameters": [
                    {"name": "tile", "kind": "int", "default": 0, "min": 0, "max": 4096,
                     "description": "Tile side in input pixels; 0 sizes tiles from memory_mb (the whole image in one tile when it fits)."},
                    {"name": "memory_mb", "kind": "int", "default": 1024, "min": 64, "max": 65536,
                     "description": "Memory budget for one tile's network pass, in MiB (about 28 KiB per input pixel)."},
                    {"name": "overlap", "kind": "int", "default": 32, "min": 8, "max": 256,
                     "description": "Overlap of neighbouring tiles in input pixels, cross-faded."}
                ],
                "exact_render": false
            }]
        }))
        .expect("static description is valid")
    }

    fn create(config: &Value) -> Result<Self, String> {
        let store = config
            .get("model_store")
            .and_then(Value::as_str)
            .map(PathBuf::from)
            .ok_or("the host passed no model_store directory")?;
        Ok(Cnn { store, device: Device::Cpu, pair: None })
    }

    fn process(&mut self, job: &mut Job<'_>) -> Result<(), EngineError> {
        if job.model != SRGAN_PAIR || job.scale as usize != SCALE {
            return Err(EngineError::Failed(format!("cnn has no model `{}` at ×{}", job.model, job.scale)));
        }
        let int = |name: &str, default: u64| job.params.get(name).and_then(Value::as_u64).unwrap_or(default) as usize;
        let overlap = int("overlap", 32);
        let tile = match int("tile", 0) {
            0 => tile_for_budget(job.input.width(), job.input.height(), int("memory_mb", 1024), overlap),
            t => t,
        };
        if self.pair.is_none() {
            job.calls.progress(0, 1, "loading");
            self.pair = Some(load_pair(&self.store.join(SRGAN_PAIR), &self.device).map_err(EngineError::Failed)?);
        }
        let (pix_net, gan_net) = self.pair.as_ref().expect("loaded above");
        let rgb = to_rgb_planes(&job.input);
        let (w, h) = (job.input.width(), job.input.height());
        let tiles = Tiled { width: w, height: h, tile, overlap };
        let sr_pix = tiles.run(pix_net, &rgb, &self.device, &job.calls, 0, "srresnet")?;
        let sr_gan = tiles.run(gan_net, &rgb, &self.device, &job.calls, 1, "srgan")?;
        write_layers(job, &sr_pix, &sr_gan)
    }
}

export_plugin!(Cnn);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_follow_the_memory_budget() {
        // 1 GiB holds 37449 tile pixels: a 160×120 image goes in one tile, a large one in 193².
        assert_eq!(tile_for_budget(160, 120, 1024, 32), 160);
        assert_eq!(tile_for_budget(4000, 3000, 1024, 32), 193);
        assert_eq!(tile_for_budget(4000, 3000, 64, 32), 80);
    }
}

/// Peak memory of one network pass per input pixel of a tile, measured on SRResNet ×4 with
/// the worker's high-water mark (tests/bench/cnn.py: 490 MiB at 128², 159 MiB at 64²).
const BYTES_PER_TILE_PIXEL: usize = 28 << 10;

/// The largest tile side whose pass fits `memory_mb`: the whole image when it fits.
fn tile_for_budget(width: usize, height: usize, memory_mb: usize, overlap: usize) -> usize {
    let pixels = (memory_mb << 20) / BYTES_PER_TILE_PIXEL;
    if width * height <= pixels {
        return width.max(height);
    }
    ((pixels as f64).sqrt() as usize).max(2 * overlap + 16)
}

fn load_pair(dir: &Path, device: &Device) -> Result<(SrResNet, SrResNet), String> {
    let load = |name: &str| {
        SrResNet::load_file(&dir.join(name), device)
            .map_err(|e| format!("cannot load {}: {e}; run `tessera models fetch {SRGAN_PAIR}`", dir.join(name).display()))
    };
    Ok((load("srresnet.safetensors")?, load("srgan.safetensors")?))
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

struct Tiled {
    width: usize,
    height: usize,
    tile: usize,
    overlap: usize,
}

impl Tiled {
    /// Runs `net` tile by tile over RGB planes (3 × h × w) and returns the ×4 planes, the tiles
    /// cross-faded. Progress counts tiles of both passes; cancel is checked before each tile.
    fn run(
        &self,
        net: &SrResNet,
        rgb: &[f32],
        device: &Device,
        calls: &tessera_plugin_abi::plugin::HostCalls<'_>,
        pass: u64,
        stage: &str,
    ) -> Result<Vec<f32>, EngineError> {
        let (w, h) = (self.width, self.height);
        let (ow, oh) = (w * SCALE, h * SCALE);
        let xs = tiling::windows(w, self.tile, self.overlap);
        let ys = tiling::windows(h, self.tile, self.overlap);
        let total = 2 * (xs.len() * ys.len()) as u64;
        let mut acc = vec![0f32; 3 * ow * oh];
        let mut wsum = vec![0f32; ow * oh];
        let fail = |e: candle_core::Error| EngineError::Failed(format!("{stage}: {e}"));
        for (j, wy) in ys.iter().enumerate() {
            let weights_y = tiling::weights(&ys, j, SCALE);
            for (i, wx) in xs.iter().enumerate() {
                calls.check_cancel()?;
                let done = pass * total / 2 + (j * xs.len() + i) as u64;
                calls.progress(done, total, stage);
                let (tw, th) = (wx.end - wx.start, wy.end - wy.start);
                let mut crop = Vec::with_capacity(3 * tw * th);
                for ch in 0..3 {
                    for y in wy.start..wy.end {
                        let row = ch * w * h + y * w;
                        crop.extend_from_slice(&rgb[row + wx.start..row + wx.end]);
                    }
                }
                let x = Tensor::from_vec(crop, (1, 3, th, tw), device).map_err(fail)?;
                let y = net.forward(&x).map_err(fail)?.flatten_all().map_err(fail)?.to_vec1::<f32>().map_err(fail)?;
                let weights_x = tiling::weights(&xs, i, SCALE);
                let (tow, toh) = (tw * SCALE, th * SCALE);
                for ty in 0..toh {
                    let oy = wy.start * SCALE + ty;
                    for tx in 0..tow {
                        let wgt = weights_x[tx] * weights_y[ty];
                        let ox = wx.start * SCALE + tx;
                        wsum[oy * ow + ox] += wgt;
                        for ch in 0..3 {
                            acc[ch * ow * oh + oy * ow + ox] += wgt * y[ch * toh * tow + ty * tow + tx];
                        }
                    }
                }
            }
        }
        for ch in 0..3 {
            for (a, s) in acc[ch * ow * oh..(ch + 1) * ow * oh].iter_mut().zip(&wsum) {
                *a /= s;
            }
        }
        Ok(acc)
    }
}

/// Writes base, pixel detail and semantic detail, row by row, into the host's outputs.
fn write_layers(job: &mut Job<'_>, sr_pix: &[f32], sr_gan: &[f32]) -> Result<(), EngineError> {
    let Job { input, outputs, calls, .. } = job;
    let layout = input.layout;
    let c = layout.channels as usize;
    let colour = c - layout.alpha as usize;
    let (ow, oh) = (input.width() * SCALE, input.height() * SCALE);
    let plane = ow * oh;
    let resampler = Resampler::new(&layout, ow, oh, Filter::Bicubic);
    let mut scratch = Scratch::default();
    let mut pix_row = vec![0f32; ow * c];
    let mut sem_row = vec![0f32; ow * c];
    let band = 64;
    for y0 in (0..oh).step_by(band) {
        calls.check_cancel()?;
        let rows = band.min(oh - y0);
        resampler.band(input, y0, rows, &mut scratch, |dy, base| {
            let y = y0 + dy;
            for x in 0..ow {
                let at = y * ow + x;
                // The network's RGB; a grey document takes its mean.
                let sample = |src: &[f32], ch: usize| {
                    if colour >= 3 {
                        src[ch * plane + at]
                    } else {
                        (src[at] + src[plane + at] + src[2 * plane + at]) / 3.0
                    }
                };
                for ch in 0..colour {
                    let (p, g) = (sample(sr_pix, ch), sample(sr_gan, ch));
                    pix_row[x * c + ch] = p - base[x * c + ch];
                    sem_row[x * c + ch] = g - p;
                }
                if layout.alpha {
                    pix_row[x * c + c - 1] = base[x * c + c - 1];
                    sem_row[x * c + c - 1] = base[x * c + c - 1];
                }
            }
            for (role, img) in outputs.iter_mut() {
                match role {
                    LayerRole::Base => img.write_row(y, base),
                    LayerRole::PixelDetail => img.write_row(y, &pix_row),
                    LayerRole::SemanticDetail => img.write_row(y, &sem_row),
                }
            }
        });
    }
    Ok(())
}
