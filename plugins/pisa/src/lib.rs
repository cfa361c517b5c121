//! The pisa engine: PiSA-SR one-step diffusion super-resolution (Stable Diffusion 2.1-base with
//! a pixel-level and a semantic-level LoRA, `z_H = z_L − ε` at t = 1) returning the layer
//! contract's layers (DESIGN.md §3): `base` = bicubic ×4, `pixel_detail` = x(1, 0) − base,
//! `semantic_detail` = x(1, 1) − x(1, 0), each x colour-fixed on its own, so that
//! base + pixel + semantic = x_full. Alpha is the base's (upscaled, never generated).
//!
//! The networks and the model store's files are `tessera-pisa-model`'s; the maths from
//! bicubic image to images is [`pipeline`]; colour correction is [`colour`].

pub mod budget;
pub mod colour;
pub mod pipeline;

use std::path::PathBuf;

use candle_core::Device;
use serde_json::{json, Value};
use tessera_pisa_model::store::PisaModel;
use tessera_pisa_model::weights::Precision;
use tessera_plugin_abi::pixels::ImageMut;
use tessera_plugin_abi::{export_plugin, Engine, EngineError, Job};
use tessera_protocol::{LayerRole, PluginInfo};
use tessera_resample::{Filter, Resampler, Scratch};

use colour::ColourFix;
use pipeline::{Latents, Pipeline, Planes, Tiling};

pub const MODEL: &str = "pisa";
const SCALE: usize = 4;
/// The command that installs the model, for errors.
pub const IMPORT_COMMAND: &str = "tessera models import pisa --base SD21_BASE_DIR --checkpoint pisa_sr.pkl";

/// Finished jobs' latents kept for exact renders, newest last; the daemon keeps up to 16 jobs
/// for renders, and a job whose latents were dropped here is run again.
const KEPT_LATENTS: usize = 16;

pub struct Pisa {
    store: PathBuf,
    device: Device,
    loaded: Option<(String, Precision, PisaModel)>,
    kept: std::collections::VecDeque<(u64, Latents)>,
}

/// What a render request (`params.render`, set by the daemon) asks for.
struct RenderRequest {
    job: u64,
    lambda_pix: f64,
    lambda_sem: f64,
}

impl RenderRequest {
    fn from_params(params: &serde_json::Map<String, Value>) -> Result<Option<RenderRequest>, EngineError> {
        let Some(r) = params.get("render") else { return Ok(None) };
        let num = |k: &str| r.get(k).and_then(Value::as_f64).ok_or_else(|| EngineError::Failed(format!("render request without `{k}`")));
        Ok(Some(RenderRequest { job: r.get("job").and_then(Value::as_u64).unwrap_or(0), lambda_pix: num("lambda_pix")?, lambda_sem: num("lambda_sem")? }))
    }
}

fn describe_model() -> Value {
    json!({
        "id": MODEL,
        "name": "PiSA-SR ×4 (one-step diffusion)",
        "description": format!("Stable Diffusion 2.1-base with PiSA-SR's pixel- and semantic-level LoRA: pixel detail from the pixel LoRA alone, semantic detail from adding the semantic LoRA. Install with `{IMPORT_COMMAND}`."),
        "scales": [4],
        "layers": ["base", "pixel_detail", "semantic_detail"],
        "layers_when": [{"param": "mode", "value": "default", "layers": ["base", "pixel_detail"]}],
        "exact_render": true,
        "parameters": [
            {"name": "mode", "kind": "choice", "default": "adjustable", "choices": ["adjustable", "default"],
             "description": "adjustable: one UNet batch of two (ε_pix and ε_full) and the pixel and semantic layers; default: PiSA-SR's one pass (ε_full), faster: base and one detail layer (x_full − base)."},
            {"name": "color_fix", "kind": "choice", "default": "adain", "choices": ["adain", "wavelet", "none"],
             "description": "Colour correction of each decoded image against the bicubic image, with whole-image statistics (PiSA-SR's default: adain)."},
            {"name": "memory_mb", "kind": "int", "default": 0, "min": 0, "max": 1048576,
             "description": "Working memory for one tile's pass, in MiB, besides the model's weights and the images (about 60 bytes an output pixel); it sets the VAE's tiles and caps the UNet's. 0: half the memory free when the job starts."},
            {"name": "tile", "kind": "int", "default": 96, "min": 16, "max": 4096,
             "description": "The UNet's latent window in latent pixels (an eighth of the output's), blended with Gaussian weights (PiSA-SR: 96); the memory budget may make it smaller."},
            {"name": "tile_overlap", "kind": "int", "default": 32, "min": 0, "max": 2048,
             "description": "Overlap of neighbouring UNet windows in latent pixels (PiSA-SR: 32)."},
            {"name": "vae_tile", "kind": "int", "default": 0, "min": 0, "max": 4096,
             "description": "The VAE's tile in latent pixels, context excluded; 0 sizes it from memory_mb (the whole image in one piece when it fits)."},
            {"name": "vae_norm", "kind": "choice", "default": "estimate", "choices": ["estimate", "estimate:2", "estimate:3", "exact"],
             "description": "How a tiled VAE's tiles share GroupNorm statistics over the whole image, so they cannot drift in tone: estimate gathers them in one extra pass over the tiles (estimate:N in N); exact gives the untiled network's own, one pass per GroupNorm (about 15 times the VAE's time)."},
            {"name": "precision", "kind": "choice", "default": "f32", "choices": ["f32", "bf16"],
             "description": "f32: the reference's numbers to float rounding. bf16: the layers' weights in bfloat16 (half the memory) and their products in bf16, summed in f32; on CPUs with AMX (Intel Xeon from Sapphire Rapids on) several times faster, elsewhere about as fast. On the test model the result is about 39 dB PSNR from f32's (at most 7 % of the range at a pixel); changing it reloads the model."},
            {"name": "attention_mb", "kind": "int", "default": 256, "min": 1, "max": 65536,
             "description": "The most memory one attention score matrix may take, in MiB; larger images run their attention in more chunks."}
        ]
    })
}

impl Engine for Pisa {
    fn describe() -> PluginInfo {
        serde_json::from_value(json!({
            "id": "pisa",
            "version": env!("CARGO_PKG_VERSION"),
            "name": "PiSA-SR diffusion super-resolution",
            "description": "One-step diffusion super-resolution with adjustable pixel and semantic detail (PiSA-SR on Stable Diffusion 2.1-base).",
            "models": [describe_model()],
            "devices": tessera_kernels::device::kinds(),
        }))
        .expect("static description is valid")
    }

    fn create(config: &Value) -> Result<Self, String> {
        let store = config.get("model_store").and_then(Value::as_str).map(PathBuf::from).ok_or("the host passed no model_store directory")?;
        let device = tessera_kernels::device::open(config.get("device").and_then(Value::as_str).unwrap_or("cpu"))?;
        Ok(Pisa { store, device, loaded: None, kept: Default::default() })
    }

    fn process(&mut self, job: &mut Job<'_>) -> Result<(), EngineError> {
        // Any model id the daemon routes here is a store entry imported as PiSA-SR (`pisa`, or
        // a fine-tune imported with --id).
        if job.scale as usize != SCALE {
            return Err(EngineError::Failed(format!("pisa runs at ×4, not ×{}", job.scale)));
        }
        let adjustable = job.param_str("mode") != Some("default");
        let fix = job.param_str("color_fix").and_then(ColourFix::parse).unwrap_or(ColourFix::AdaIn);
        let int = |name: &str, default: usize| job.params.get(name).and_then(Value::as_u64).map_or(default, |v| v as usize);
        let attention_mb = int("attention_mb", 256);
        let request = budget::Request {
            memory_mb: match int("memory_mb", 0) {
                0 => budget::default_memory_mb(&self.device),
                mb => mb,
            },
            unet_tile: int("tile", 96).max(16),
            unet_overlap: int("tile_overlap", 32),
            vae_tile: int("vae_tile", 0),
            vae_norm: match job.param_str("vae_norm") {
                None => pipeline::VaeNorm::Estimate(1),
                Some(v) => pipeline::VaeNorm::parse(v).ok_or_else(|| EngineError::Failed(format!("vae_norm `{v}`: use estimate, estimate:N or exact")))?,
            },
        };
        let precision = match job.param_str("precision") {
            None => Precision::F32,
            Some(p) => Precision::parse(p).ok_or_else(|| EngineError::Failed(format!("precision `{p}`: use f32 or bf16")))?,
        };
        if self.loaded.as_ref().is_none_or(|(id, p, _)| *id != job.model || *p != precision) {
            self.loaded = None;
            job.calls.progress(0, 1, "loading");
            let dir = self.store.join(&job.model);
            let model = PisaModel::load(&dir, &self.device, precision)
                .map_err(|e| EngineError::Failed(format!("cannot load the PiSA-SR model `{}` from {}: {e}; import it again (`{IMPORT_COMMAND}`)", job.model, dir.display())))?;
            self.loaded = Some((job.model.clone(), precision, model));
        }
        // A tile pass that runs out of device memory (a GPU's: the CPU's allocator aborts
        // instead) runs again with half the budget, so smaller tiles, before the job fails.
        let (mut request, mut attention_mb) = (request, attention_mb);
        loop {
            match self.run(job, &request, attention_mb, adjustable, fix) {
                Err(EngineError::Failed(why)) => match budget::after_out_of_memory(&request, &why) {
                    Some(smaller) => {
                        let say = format!("out of device memory with a {} MiB budget ({why}); retrying with {} MiB", request.memory_mb, smaller.memory_mb);
                        job.calls.log(tessera_plugin_abi::ffi::LOG_WARN, &say);
                        (request, attention_mb) = (smaller, (attention_mb / 2).max(1));
                    }
                    None => return Err(EngineError::Failed(why)),
                },
                other => return other,
            }
        }
    }
}

impl Pisa {
    /// The job's passes with the tiles `request` settles on.
    fn run(&mut self, job: &mut Job<'_>, request: &budget::Request, attention_mb: usize, adjustable: bool, fix: ColourFix) -> Result<(), EngineError> {
        let (_, _, model) = self.loaded.as_ref().expect("loaded above");
        let render = RenderRequest::from_params(&job.params)?;

        let base = base_image(job);
        let bicubic = base.rgb();
        let (ctx, tiling) = budget::settle(&model.unet.config, &model.vae.config, bicubic.width, bicubic.height, request, attention_mb);
        let pipe = Pipeline { model, ctx, tiling };
        // An exact render starts from the job's kept latents; a job, or a render whose
        // latents are gone (or lack ε_pix), runs the encoder and the UNet.
        let kept = render.as_ref().and_then(|r| self.kept.iter().find(|(id, _)| *id == r.job)).map(|(_, l)| l.clone());
        let needs_pix = render.as_ref().is_some_and(|r| r.lambda_pix != 1.0 || r.lambda_sem != 1.0);
        let kept = kept.filter(|l| l.eps_pix.is_some() || !needs_pix);
        let decodes = if render.is_none() && adjustable { 2 } else { 1 };
        let mut progress = Progress::new(&job.calls, &pipe.tiling, &model.vae, bicubic.width, bicubic.height, kept.is_none(), decodes);
        let (latents, fresh) = match kept {
            Some(l) => (l, false),
            None => {
                let z_l = pipe.encode(&bicubic, &mut |s| progress.step(s))?;
                let (eps_pix, eps_full) = pipe.predict(&z_l, adjustable || render.is_some(), &mut |s| progress.step(s))?;
                (Latents { width: bicubic.width, height: bicubic.height, z_l, eps_pix, eps_full }, true)
            }
        };
        let mut decode = |lp, ls| pipe.render(&latents, lp, ls, ColourFix::None, &bicubic, &mut |s| progress.step(s));
        if let Some(r) = &render {
            let mut x = decode(r.lambda_pix, r.lambda_sem)?;
            progress.step("colour fix")?;
            fix.apply(&mut x, &bicubic);
            progress.step("layers")?;
            write_exact(&mut job.outputs, &base, &x);
        } else {
            let mut x_full = decode(1.0, 1.0)?;
            let mut x_pix = if adjustable { Some(decode(1.0, 0.0)?) } else { None };
            progress.step("colour fix")?;
            fix.apply(&mut x_full, &bicubic);
            if let Some(x) = &mut x_pix {
                fix.apply(x, &bicubic);
            }
            progress.step("layers")?;
            write_layers(&mut job.outputs, &base, x_pix.as_ref(), &x_full);
        }
        let stages = progress.total;
        // A job's latents, or those a render had to compute again, serve the next renders.
        if fresh {
            let id = render.as_ref().map_or(job.id, |r| r.job);
            self.keep(id, latents);
        }
        job.calls.progress(stages, stages, "done");
        Ok(())
    }
}

/// A job's progress in steps: a tile of a stage (or the stage, untiled), then colour fix and
/// layers; cancel is checked before each.
struct Progress<'j, 'a> {
    calls: &'j tessera_plugin_abi::plugin::HostCalls<'a>,
    done: u64,
    total: u64,
    counts: std::collections::HashMap<&'static str, (usize, usize)>,
}

impl<'j, 'a> Progress<'j, 'a> {
    fn new(calls: &'j tessera_plugin_abi::plugin::HostCalls<'a>, tiling: &Tiling, vae: &tessera_pisa_model::vae::Vae, width: usize, height: usize, fresh: bool, decodes: usize) -> Self {
        let (encode, unet, decode) = tiling.steps(vae, width, height);
        let mut counts = std::collections::HashMap::new();
        if fresh {
            counts.insert("encode", (0, encode));
            counts.insert("unet", (0, unet));
        }
        counts.insert("decode", (0, decode * decodes));
        let total = counts.values().map(|c| c.1 as u64).sum::<u64>() + 2;
        Progress { calls, done: 0, total, counts }
    }

    fn step(&mut self, stage: &'static str) -> Result<(), EngineError> {
        self.calls.check_cancel()?;
        let label = match self.counts.get_mut(stage) {
            Some((n, of)) if *of > 1 => {
                *n += 1;
                format!("{stage} {n}/{of}")
            }
            _ => stage.to_string(),
        };
        self.calls.progress(self.done, self.total, &label);
        self.done += 1;
        Ok(())
    }
}

impl Pisa {
    fn keep(&mut self, job: u64, latents: Latents) {
        self.kept.retain(|(id, _)| *id != job);
        self.kept.push_back((job, latents));
        while self.kept.len() > KEPT_LATENTS {
            self.kept.pop_front();
        }
    }
}

export_plugin!(Pisa);

/// The bicubic ×4 of the input in its own channels (alpha included), interleaved.
pub struct Base {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub alpha: bool,
    pub data: Vec<f32>,
}

impl Base {
    /// Its colour as RGB planes (grey repeated), the model's input and colour reference.
    pub fn rgb(&self) -> Planes {
        let (w, h, c) = (self.width, self.height, self.channels);
        let colour = c - self.alpha as usize;
        let mut data = vec![0f32; 3 * w * h];
        for i in 0..w * h {
            for ch in 0..3 {
                data[ch * w * h + i] = self.data[i * c + ch.min(colour - 1)];
            }
        }
        Planes { width: w, height: h, data }
    }
}

/// The classic engine's bicubic ×4, its colour clamped to [0, 1]: the image the model starts
/// from (PiSA-SR's is 8-bit), so that base + pixel + semantic detail is the model's picture
/// also where bicubic overshoots.
pub fn base_image(job: &Job<'_>) -> Base {
    let l = job.input.layout;
    let (ow, oh) = (l.width as usize * SCALE, l.height as usize * SCALE);
    let c = l.channels as usize;
    let colour = c - l.alpha as usize;
    let resampler = Resampler::new(&l, ow, oh, Filter::Bicubic);
    let mut data = vec![0f32; ow * oh * c];
    resampler.band(&job.input, 0, oh, &mut Scratch::default(), |dy, row| {
        let out = &mut data[dy * ow * c..(dy + 1) * ow * c];
        out.copy_from_slice(row);
        for px in out.chunks_exact_mut(c) {
            for v in &mut px[..colour] {
                *v = v.clamp(0.0, 1.0);
            }
        }
    });
    Base { width: ow, height: oh, channels: c, alpha: l.alpha, data }
}

/// Writes base, `x_pix − base` and `x_full − x_pix` into the job's outputs, or without `x_pix`
/// (one-pass mode: base and one detail layer) `x_full − base`; grey documents get the mean of
/// the model's RGB.
fn write_layers(outputs: &mut [(LayerRole, ImageMut<'_>)], base: &Base, x_pix: Option<&Planes>, x_full: &Planes) {
    let (w, c) = (base.width, base.channels);
    let colour = c - base.alpha as usize;
    let value = |x: &Planes, ch: usize, px: usize, y: usize| {
        if colour >= 3 {
            x.at(ch, px, y)
        } else {
            (x.at(0, px, y) + x.at(1, px, y) + x.at(2, px, y)) / 3.0
        }
    };
    let mut pix = vec![0f32; w * c];
    let mut sem = vec![0f32; w * c];
    for y in 0..base.height {
        let row = &base.data[y * w * c..(y + 1) * w * c];
        for px in 0..w {
            for ch in 0..colour {
                let b = row[px * c + ch];
                let full = value(x_full, ch, px, y);
                match x_pix {
                    Some(xp) => {
                        let p = value(xp, ch, px, y);
                        pix[px * c + ch] = p - b;
                        sem[px * c + ch] = full - p;
                    }
                    None => {
                        pix[px * c + ch] = full - b;
                        sem[px * c + ch] = 0.0;
                    }
                }
            }
            if base.alpha {
                pix[px * c + c - 1] = row[px * c + c - 1];
                sem[px * c + c - 1] = row[px * c + c - 1];
            }
        }
        for (role, img) in outputs.iter_mut() {
            match role {
                LayerRole::Base => img.write_row(y, row),
                LayerRole::PixelDetail => img.write_row(y, &pix),
                LayerRole::SemanticDetail => img.write_row(y, &sem),
                LayerRole::Exact => {}
            }
        }
    }
}

/// The exact render `x` as the job's one `exact` output: its colour (grey documents get the
/// mean of the model's RGB), the base's alpha.
fn write_exact(outputs: &mut [(LayerRole, ImageMut<'_>)], base: &Base, x: &Planes) {
    let (w, c) = (base.width, base.channels);
    let colour = c - base.alpha as usize;
    let mut row = vec![0f32; w * c];
    for y in 0..base.height {
        for px in 0..w {
            for ch in 0..colour {
                row[px * c + ch] = if colour >= 3 { x.at(ch, px, y) } else { (x.at(0, px, y) + x.at(1, px, y) + x.at(2, px, y)) / 3.0 };
            }
            if base.alpha {
                row[px * c + c - 1] = base.data[(y * w + px) * c + c - 1];
            }
        }
        if let Some((_, img)) = outputs.iter_mut().find(|(r, _)| *r == LayerRole::Exact) {
            img.write_row(y, &row);
        }
    }
}
