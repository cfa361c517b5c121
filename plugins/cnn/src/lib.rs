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
        tiles.run([pix_net, gan_net], &rgb, &self.device, job)
    }
}

export_plugin!(Cnn);

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

/// Output rows `y0 .. y0 + rows` still being accumulated: both networks' RGB planes and the
/// tiles' weight sum. It spans one row of tiles, so memory follows the tile size and the image
/// width, never the image's area.
struct Strip {
    y0: usize,
    rows: usize,
    width: usize,
    nets: [Vec<f32>; 2],
    wsum: Vec<f32>,
}

impl Strip {
    /// Grows the strip to end at output row `end`.
    fn extend_to(&mut self, end: usize) {
        if end <= self.y0 + self.rows {
            return;
        }
        let rows = end - self.y0;
        for net in &mut self.nets {
            // Planes are row-major per channel: re-lay them for the new height.
            let mut grown = vec![0f32; 3 * rows * self.width];
            for ch in 0..3 {
                let old = &net[ch * self.rows * self.width..(ch + 1) * self.rows * self.width];
                grown[ch * rows * self.width..ch * rows * self.width + old.len()].copy_from_slice(old);
            }
            *net = grown;
        }
        self.wsum.resize(rows * self.width, 0.0);
        self.rows = rows;
    }

    /// Drops the first `n` rows (already written out).
    fn advance(&mut self, n: usize) {
        let rows = self.rows - n;
        for net in &mut self.nets {
            let mut kept = vec![0f32; 3 * rows * self.width];
            for ch in 0..3 {
                let from = ch * self.rows * self.width + n * self.width;
                kept[ch * rows * self.width..(ch + 1) * rows * self.width].copy_from_slice(&net[from..from + rows * self.width]);
            }
            *net = kept;
        }
        self.wsum.drain(..n * self.width);
        self.y0 += n;
        self.rows = rows;
    }
}

impl Tiled {
    /// Runs both networks tile by tile, cross-fading the tiles, and writes the layers a row of
    /// tiles at a time, as soon as no later tile can touch them. Progress counts network
    /// passes; cancel is checked before each.
    fn run(&self, nets: [&SrResNet; 2], rgb: &[f32], device: &Device, job: &mut Job<'_>) -> Result<(), EngineError> {
        let (w, h) = (self.width, self.height);
        let ow = w * SCALE;
        let xs = tiling::windows(w, self.tile, self.overlap);
        let ys = tiling::windows(h, self.tile, self.overlap);
        let total = 2 * (xs.len() * ys.len()) as u64;
        let mut done = 0u64;
        let mut strip = Strip { y0: 0, rows: 0, width: ow, nets: [Vec::new(), Vec::new()], wsum: Vec::new() };
        let mut writer = LayerWriter::new(job);
        const STAGES: [&str; 2] = ["srresnet", "srgan"];
        for (j, wy) in ys.iter().enumerate() {
            let weights_y = tiling::weights(&ys, j, SCALE);
            strip.extend_to(wy.end * SCALE);
            for (i, wx) in xs.iter().enumerate() {
                let (tw, th) = (wx.end - wx.start, wy.end - wy.start);
                let mut crop = Vec::with_capacity(3 * tw * th);
                for ch in 0..3 {
                    for y in wy.start..wy.end {
                        let row = ch * w * h + y * w;
                        crop.extend_from_slice(&rgb[row + wx.start..row + wx.end]);
                    }
                }
                let weights_x = tiling::weights(&xs, i, SCALE);
                let (tow, toh) = (tw * SCALE, th * SCALE);
                for (n, net) in nets.iter().enumerate() {
                    job.calls.check_cancel()?;
                    job.calls.progress(done, total, STAGES[n]);
                    let fail = |e: candle_core::Error| EngineError::Failed(format!("{}: {e}", STAGES[n]));
                    let x = Tensor::from_vec(crop.clone(), (1, 3, th, tw), device).map_err(fail)?;
                    let y = net.forward(&x).map_err(fail)?.flatten_all().map_err(fail)?.to_vec1::<f32>().map_err(fail)?;
                    let acc = &mut strip.nets[n];
                    let plane = strip.rows * ow;
                    for ty in 0..toh {
                        let sy = wy.start * SCALE + ty - strip.y0;
                        for tx in 0..tow {
                            let wgt = weights_x[tx] * weights_y[ty];
                            let sx = wx.start * SCALE + tx;
                            if n == 0 {
                                strip.wsum[sy * ow + sx] += wgt;
                            }
                            for ch in 0..3 {
                                acc[ch * plane + sy * ow + sx] += wgt * y[ch * toh * tow + ty * tow + tx];
                            }
                        }
                    }
                    done += 1;
                }
            }
            // Rows above the next tile row's first are final.
            let final_end = ys.get(j + 1).map_or(h * SCALE, |next| next.start * SCALE);
            let n = final_end - strip.y0;
            writer.write(job, &strip, n)?;
            strip.advance(n);
        }
        job.calls.progress(total, total, "done");
        Ok(())
    }
}

/// Writes base, pixel detail and semantic detail into the host's outputs, strip by strip.
struct LayerWriter {
    resampler: Resampler,
    scratch: Scratch,
}

impl LayerWriter {
    fn new(job: &Job<'_>) -> LayerWriter {
        let l = job.input.layout;
        let resampler = Resampler::new(&l, l.width as usize * SCALE, l.height as usize * SCALE, Filter::Bicubic);
        LayerWriter { resampler, scratch: Scratch::default() }
    }

    /// Writes the strip's first `rows` rows (normalising the tiles' weights).
    fn write(&mut self, job: &mut Job<'_>, strip: &Strip, rows: usize) -> Result<(), EngineError> {
        let Job { input, outputs, .. } = job;
        let layout = input.layout;
        let c = layout.channels as usize;
        let colour = c - layout.alpha as usize;
        let ow = strip.width;
        let plane = strip.rows * ow;
        let mut pix_row = vec![0f32; ow * c];
        let mut sem_row = vec![0f32; ow * c];
        self.resampler.band(input, strip.y0, rows, &mut self.scratch, |dy, base| {
            let y = strip.y0 + dy;
            for x in 0..ow {
                let at = dy * ow + x;
                let wsum = strip.wsum[at];
                // The network's RGB; a grey document takes its mean.
                let sample = |src: &[f32], ch: usize| {
                    let v = if colour >= 3 {
                        src[ch * plane + at]
                    } else {
                        (src[at] + src[plane + at] + src[2 * plane + at]) / 3.0
                    };
                    v / wsum
                };
                for ch in 0..colour {
                    let (p, g) = (sample(&strip.nets[0], ch), sample(&strip.nets[1], ch));
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
        Ok(())
    }
}

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
