//! PiSA-SR's maths from a bicubic image to finished images (`research/reference-models.md`
//! §1): pad to a multiple of 8, encode to the VAE posterior mean × scaling factor, predict ε at
//! t = 1, `z_H = z_L − ε`, decode, clamp, crop, colour-fix against the bicubic image.
//!
//! The adjustable form `ε = λ_pix·ε_pix + λ_sem·(ε_full − ε_pix)` needs both predictions:
//! they come from one batch of two through the UNet, whose pixel LoRA is merged into its
//! weights and whose semantic LoRA runs at scale 0 for the first item and 1 for the second.
//! The [`Latents`] are small (an eighth of the image per side, 4 channels) and are kept so an
//! exact render at other λ needs only a decode.
//!
//! Large images run in tiles ([`Tiling`]): the UNet over overlapping latent windows blended
//! in ε-space with PiSA-SR's Gaussian weights, the VAE over tiles that carry a halo of context
//! and share their GroupNorm statistics ([`tessera_pisa_model::norm`]): a first pass gathers
//! every GroupNorm's statistics over the whole image, and the pass that makes the pixels
//! normalises every tile with them.

use candle_core::{Device, Tensor};
use tessera_pisa_model::nn::Ctx;
use tessera_pisa_model::norm::{self, Barriers, Core, SharedNorm};
use tessera_pisa_model::store::PisaModel;
use tessera_plugin_abi::EngineError;
use tessera_tiling::{self as tiling, Window};

use crate::colour::ColourFix;

/// PiSA-SR feeds the UNet this timestep, and no other scheduler maths.
pub const TIMESTEP: f64 = 1.0;

/// An RGB image as three planes of f32, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Planes {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl Planes {
    pub fn plane(&self, ch: usize) -> &[f32] {
        let n = self.width * self.height;
        &self.data[ch * n..(ch + 1) * n]
    }
    pub fn plane_mut(&mut self, ch: usize) -> &mut [f32] {
        let n = self.width * self.height;
        &mut self.data[ch * n..(ch + 1) * n]
    }
    pub fn at(&self, ch: usize, x: usize, y: usize) -> f32 {
        self.data[(ch * self.height + y) * self.width + x]
    }
}

/// What one UNet pass over an image leaves: enough for an image at any (λ_pix, λ_sem).
#[derive(Clone, Debug)]
pub struct Latents {
    /// The image's size in pixels (the latents cover it padded to a multiple of 8).
    pub width: usize,
    pub height: usize,
    /// `[1, 4, h/8, w/8]`, scaled by the VAE's scaling factor.
    pub z_l: Tensor,
    /// ε with the pixel LoRA alone; `None` when only the default (one-pass) ε was computed.
    pub eps_pix: Option<Tensor>,
    /// ε with both LoRA families.
    pub eps_full: Tensor,
}

impl Latents {
    /// `ε` at (λ_pix, λ_sem).
    pub fn eps(&self, lambda_pix: f64, lambda_sem: f64) -> candle_core::Result<Tensor> {
        match &self.eps_pix {
            Some(pix) => (pix * lambda_pix)? + ((&self.eps_full - pix)? * lambda_sem)?,
            None if lambda_pix == 1.0 && lambda_sem == 1.0 => Ok(self.eps_full.clone()),
            None => candle_core::bail!("only the default ε was computed; run the job in adjustable mode to render at other λ"),
        }
    }
}

/// The model's input: the bicubic image padded at the bottom and right to a multiple of 8 by
/// repeating its last row and column, in [-1, 1], `[1, 3, H8, W8]`.
pub fn model_input(bicubic: &Planes, device: &Device) -> candle_core::Result<Tensor> {
    model_input_box(bicubic, &Box2 { y: 0..bicubic.height.div_ceil(8), x: 0..bicubic.width.div_ceil(8) }, device)
}

/// The part of [`model_input`] under `latent`, a box of the latent grid (8 pixels a latent
/// pixel): a tiled encoder makes each tile's input from the bicubic image as it goes, so no
/// second copy of the whole image is made.
fn model_input_box(bicubic: &Planes, latent: &Box2, device: &Device) -> candle_core::Result<Tensor> {
    let (w, h) = (bicubic.width, bicubic.height);
    let (ys, xs) = (8 * latent.y.start..8 * latent.y.end, 8 * latent.x.start..8 * latent.x.end);
    let mut data = Vec::with_capacity(3 * ys.len() * xs.len());
    for ch in 0..3 {
        let plane = bicubic.plane(ch);
        for y in ys.clone() {
            let row = &plane[y.min(h - 1) * w..][..w];
            data.extend(xs.clone().map(|x| row[x.min(w - 1)] * 2.0 - 1.0));
        }
    }
    Tensor::from_vec(data, (1, 3, ys.len(), xs.len()), device)
}

/// How the tiles of a tiled VAE come to normalise with the same statistics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum VaeNorm {
    /// The untiled network's own: one pass per GroupNorm (and one for the mid-block
    /// attention's keys and values), each running the tiles up to it with every statistic
    /// before it known, so tiles equal the whole image wherever their halo covers the
    /// network's reach. It costs about half as many VAE passes as the network has GroupNorms.
    Exact,
    /// This many passes that gather every GroupNorm's statistics (the first from tiles
    /// normalised on their own, each next from tiles normalised with the last pass's) before
    /// the pass that makes the pixels; 0 normalises every tile on its own (tiling without
    /// shared statistics, for comparison). Tiles share their statistics, so they cannot drift
    /// apart, but how near those come to the whole image's depends on the network.
    Estimate(usize),
}

impl VaeNorm {
    /// `exact`, `estimate` (one gathering pass) or `estimate:N`.
    pub fn parse(s: &str) -> Option<VaeNorm> {
        match s.split_once(':') {
            None if s == "exact" => Some(VaeNorm::Exact),
            None if s == "estimate" => Some(VaeNorm::Estimate(1)),
            Some(("estimate", n)) => n.parse().ok().map(VaeNorm::Estimate),
            _ => None,
        }
    }
}

/// The default of [`Tiling::global_attention_tokens`].
pub const GLOBAL_ATTENTION_TOKENS: usize = 65_536;

/// How an image is cut into tiles, in latent pixels (an eighth of the image's).
#[derive(Clone, Debug, PartialEq)]
pub struct Tiling {
    /// The UNet's window and the overlap of neighbouring windows (PiSA-SR: 96 and 32).
    pub unet_tile: usize,
    pub unet_overlap: usize,
    /// The VAE encoder's and decoder's tile cores (0: the whole image in one piece), and the
    /// context each tile carries on every side (PiSA-SR: 4 and 11 latent pixels).
    pub encoder_tile: usize,
    pub encoder_halo: usize,
    pub decoder_tile: usize,
    pub decoder_halo: usize,
    /// How a tiled VAE's tiles share their GroupNorm statistics and attention.
    pub vae_norm: VaeNorm,
    /// A tiled VAE's mid-block attention attends over the whole image (keys and values
    /// gathered with the statistics) up to this many latent pixels, and within each tile above
    /// (its cost grows with the square of the image's area: at 65 536, a 2048² picture, it is
    /// about a fifth of the decoder's).
    pub global_attention_tokens: usize,
}

impl Tiling {
    /// No tiles: every network sees the whole image.
    pub fn untiled() -> Tiling {
        Tiling { unet_tile: usize::MAX, unet_overlap: 0, encoder_tile: 0, encoder_halo: 0, decoder_tile: 0, decoder_halo: 0, vae_norm: VaeNorm::Estimate(1), global_attention_tokens: GLOBAL_ATTENTION_TOKENS }
    }

    fn vae_cores(tile: usize, h: usize, w: usize) -> Option<(Vec<Window>, Vec<Window>)> {
        (tile > 0 && (h > tile || w > tile)).then(|| (tiling::cores(h, tile), tiling::cores(w, tile)))
    }

    fn vae_steps(&self, tile: usize, h: usize, w: usize, barriers: usize) -> usize {
        let passes = match self.vae_norm {
            VaeNorm::Exact => barriers + 1,
            VaeNorm::Estimate(n) => n + 1,
        };
        Tiling::vae_cores(tile, h, w).map_or(1, |(ys, xs)| ys.len() * xs.len() * passes)
    }

    /// How many steps (tiles and passes) each stage takes for an image of `width × height`
    /// pixels: encode, UNet, one decode.
    pub fn steps(&self, vae: &tessera_pisa_model::vae::Vae, width: usize, height: usize) -> (usize, usize, usize) {
        let (h, w) = (height.div_ceil(8), width.div_ceil(8));
        let unet = tiling::windows(h, self.unet_tile, self.unet_overlap).len() * tiling::windows(w, self.unet_tile, self.unet_overlap).len();
        let (enc, dec) = vae.barriers();
        (self.vae_steps(self.encoder_tile, h, w, enc), unet, self.vae_steps(self.decoder_tile, h, w, dec))
    }
}

/// Called before each step of a stage (a tile, or the whole image): reports progress, and
/// stops the work with its error (a cancel).
pub type Tick<'t> = &'t mut dyn FnMut(&'static str) -> Result<(), EngineError>;

/// A stage's candle error, named.
fn fail(stage: &'static str) -> impl Fn(candle_core::Error) -> EngineError {
    move |e| EngineError::Failed(format!("{stage}: {e}"))
}

pub struct Pipeline<'a> {
    pub model: &'a PisaModel,
    pub ctx: Ctx,
    pub tiling: Tiling,
}

impl Pipeline<'_> {
    /// `z_L` = the posterior mean of the padded image × the VAE's scaling factor.
    pub fn encode(&self, bicubic: &Planes, tick: Tick) -> Result<Tensor, EngineError> {
        let f = fail("encode");
        let (h, w) = (bicubic.height.div_ceil(8), bicubic.width.div_ceil(8));
        let vae = &self.model.vae;
        let device = self.model.embedding.device();
        // Tiles are cut on the latent grid, so every pixel box starts at a multiple of 8 and
        // the encoder's downsamplings line up with the untiled image's.
        let z = self.vae_tiled("encode", (h, w), self.tiling.encoder_tile, self.tiling.encoder_halo, 1, tick, &mut |core, ctx| {
            vae.encode_mean(&model_input_box(bicubic, core, device)?, ctx)
        })?;
        (Tensor::from_vec(z.data, (1, z.channels, h, w), device).map_err(&f)? * vae.config.scaling_factor).map_err(f)
    }

    /// ε_pix and ε_full in one batch of two (`adjustable`), or ε_full alone; over windows of
    /// the latents blended with Gaussian weights when they are larger than a window.
    pub fn predict(&self, z_l: &Tensor, adjustable: bool, tick: Tick) -> Result<(Option<Tensor>, Tensor), EngineError> {
        let f = fail("unet");
        let (_, ch, h, w) = z_l.dims4().map_err(&f)?;
        let ys = tiling::windows(h, self.tiling.unet_tile, self.tiling.unet_overlap);
        let xs = tiling::windows(w, self.tiling.unet_tile, self.tiling.unet_overlap);
        if ys.len() * xs.len() == 1 {
            tick("unet")?;
            return self.predict_window(z_l, adjustable).map_err(f);
        }
        let outputs = if adjustable { 2 } else { 1 };
        let mut sum = vec![vec![0f32; ch * h * w]; outputs];
        let mut wsum = vec![0f32; h * w];
        for wy in &ys {
            let gy = tiling::gaussian(wy);
            for wx in &xs {
                tick("unet")?;
                let gx = tiling::gaussian(wx);
                let tile = z_l.narrow(2, wy.start, wy.len()).and_then(|t| t.narrow(3, wx.start, wx.len())).map_err(&f)?;
                let (pix, full) = self.predict_window(&tile, adjustable).map_err(&f)?;
                for (k, eps) in pix.iter().chain([&full]).enumerate() {
                    let v: Vec<f32> = eps.flatten_all().and_then(|t| t.to_vec1()).map_err(&f)?;
                    for c in 0..ch {
                        for (dy, y) in (wy.start..wy.end).enumerate() {
                            for (dx, x) in (wx.start..wx.end).enumerate() {
                                sum[k][(c * h + y) * w + x] += v[(c * wy.len() + dy) * wx.len() + dx] * gy[dy] * gx[dx];
                            }
                        }
                    }
                }
                for (dy, y) in (wy.start..wy.end).enumerate() {
                    for (dx, x) in (wx.start..wx.end).enumerate() {
                        wsum[y * w + x] += gy[dy] * gx[dx];
                    }
                }
            }
        }
        let mut eps = sum.into_iter().map(|mut s| {
            for (i, v) in s.iter_mut().enumerate() {
                *v /= wsum[i % (h * w)];
            }
            Tensor::from_vec(s, (1, ch, h, w), z_l.device())
        });
        let first = eps.next().expect("one output").map_err(&f)?;
        match eps.next() {
            Some(full) => Ok((Some(first), full.map_err(&f)?)),
            None => Ok((None, first)),
        }
    }

    fn predict_window(&self, z_l: &Tensor, adjustable: bool) -> candle_core::Result<(Option<Tensor>, Tensor)> {
        let device = z_l.device();
        let batch = if adjustable { 2 } else { 1 };
        let scales: &[f32] = if adjustable { &[0.0, 1.0] } else { &[1.0] };
        let z = if adjustable { Tensor::cat(&[z_l, z_l], 0)? } else { z_l.clone() };
        let context = self.model.embedding.repeat((batch, 1, 1))?;
        let ctx = Ctx { lora: Some(Tensor::new(scales, device)?), ..self.ctx.clone() };
        let eps = self.model.unet.forward(&z, TIMESTEP, &context, &ctx)?;
        if adjustable {
            Ok((Some(eps.narrow(0, 0, 1)?), eps.narrow(0, 1, 1)?))
        } else {
            Ok((None, eps))
        }
    }

    /// The image at (λ_pix, λ_sem): `z_L − ε` decoded, clamped, cropped and colour-fixed.
    pub fn render(&self, latents: &Latents, lambda_pix: f64, lambda_sem: f64, fix: ColourFix, bicubic: &Planes, tick: Tick) -> Result<Planes, EngineError> {
        let z_h = latents.eps(lambda_pix, lambda_sem).and_then(|eps| &latents.z_l - eps).map_err(fail("decode"))?;
        let mut x = self.decode(&z_h, latents.width, latents.height, tick)?;
        fix.apply(&mut x, bicubic);
        Ok(x)
    }

    /// `D(z / scaling factor)` clamped to [-1, 1], mapped to [0, 1] and cropped to `w × h`.
    pub fn decode(&self, z: &Tensor, width: usize, height: usize, tick: Tick) -> Result<Planes, EngineError> {
        let f = fail("decode");
        let vae = &self.model.vae;
        let z = (z / vae.config.scaling_factor).map_err(&f)?;
        let (_, _, h, w) = z.dims4().map_err(&f)?;
        let x = self.vae_tiled("decode", (h, w), self.tiling.decoder_tile, self.tiling.decoder_halo, 8, tick, &mut |core, ctx| {
            vae.decode(&z.narrow(2, core.y.start, core.y.len())?.narrow(3, core.x.start, core.x.len())?, ctx)
        })?;
        // In place: at 8192² each copy of the picture would be 768 MiB.
        let (pw, mut data) = (8 * w, x.data);
        let mut to = 0;
        for ch in 0..x.channels {
            for y in 0..height {
                let from = (ch * 8 * h + y) * pw;
                data.copy_within(from..from + width, to);
                to += width;
            }
        }
        data.truncate(to);
        for v in &mut data {
            *v = v.clamp(-1.0, 1.0) * 0.5 + 0.5;
        }
        Ok(Planes { width, height, data })
    }

    /// Runs `net` over the latent grid `h × w`, whole or in tiles of `tile` with `halo`
    /// latent pixels of context, sharing GroupNorm statistics across tiles (see [`Tiling`]);
    /// `net` maps a box of the latent grid to its output, `scale` output pixels per latent one.
    #[allow(clippy::too_many_arguments)]
    fn vae_tiled(
        &self,
        stage: &'static str,
        (h, w): (usize, usize),
        tile: usize,
        halo: usize,
        scale: usize,
        tick: Tick,
        net: &mut dyn FnMut(&Box2, &Ctx) -> candle_core::Result<Tensor>,
    ) -> Result<Channels, EngineError> {
        let f = fail(stage);
        let Some((ys, xs)) = Tiling::vae_cores(tile, h, w) else {
            tick(stage)?;
            let y = net(&Box2 { y: 0..h, x: 0..w }, &self.ctx).map_err(&f)?;
            let channels = y.dim(1).map_err(&f)?;
            return Ok(Channels { channels, data: y.flatten_all().and_then(|t| t.to_vec1()).map_err(f)? });
        };
        let global = h * w <= self.tiling.global_attention_tokens;
        let mut known = Barriers::default();
        let mut out: Option<Channels> = None;
        for pass in 0.. {
            // (gather from, stop after) for this pass; None, None makes the pixels.
            let (gather_from, stop_after) = match self.tiling.vae_norm {
                VaeNorm::Exact => (Some(pass), Some(pass)),
                VaeNorm::Estimate(n) if pass < n => (Some(0), None),
                VaeNorm::Estimate(_) => (None, None),
            };
            let shared = SharedNorm::new(known.clone(), gather_from, stop_after, global);
            let ctx = Ctx { norm: Some(shared.clone()), ..self.ctx.clone() };
            let mut finished = false;
            for cy in &ys {
                for cx in &xs {
                    tick(stage)?;
                    let boxed = Box2 { y: cy.start.saturating_sub(halo)..(cy.end + halo).min(h), x: cx.start.saturating_sub(halo)..(cx.end + halo).min(w) };
                    shared.begin_tile(Core {
                        input: (boxed.y.len(), boxed.x.len()),
                        rows: (cy.start - boxed.y.start, cy.end - boxed.y.start),
                        cols: (cx.start - boxed.x.start, cx.end - boxed.x.start),
                        origin: (boxed.y.start, boxed.x.start),
                        grid: (h, w),
                    });
                    let y = match net(&boxed, &ctx) {
                        Err(e) if norm::is_stop(&e) => continue,
                        r => r.map_err(&f)?,
                    };
                    if gather_from.is_some() && stop_after.is_none() {
                        continue; // an estimating pass: its pixels are not the result
                    }
                    finished = true;
                    // The tile's own pixels into the image.
                    let (_, c, th, tw) = y.dims4().map_err(&f)?;
                    let (oh, ow) = (h * scale, w * scale);
                    let buf = &mut out.get_or_insert_with(|| Channels { channels: c, data: vec![0f32; c * oh * ow] }).data;
                    let v: Vec<f32> = y.flatten_all().and_then(|t| t.to_vec1()).map_err(&f)?;
                    let (y0, x0) = ((cy.start - boxed.y.start) * scale, (cx.start - boxed.x.start) * scale);
                    for ch in 0..c {
                        for dy in 0..cy.len() * scale {
                            let from = (ch * th + y0 + dy) * tw + x0;
                            let to = (ch * oh + cy.start * scale + dy) * ow + cx.start * scale;
                            buf[to..to + cx.len() * scale].copy_from_slice(&v[from..from + cx.len() * scale]);
                        }
                    }
                }
            }
            if finished {
                break;
            }
            let got = shared.gathered();
            match self.tiling.vae_norm {
                VaeNorm::Exact => {
                    if known.norms.len() <= pass {
                        known.norms.resize(pass + 1, None);
                    }
                    known.norms[pass] = got.norms.get(pass).cloned().flatten();
                    known.kv = known.kv.take().or(got.kv);
                }
                VaeNorm::Estimate(_) => known = Barriers { norms: got.norms, kv: got.kv.filter(|_| global) },
            }
            if !global {
                known.kv = None;
            }
        }
        Ok(out.expect("the last pass writes"))
    }
}

/// A network's output over the whole grid, channel-major, as plain memory.
struct Channels {
    channels: usize,
    data: Vec<f32>,
}

/// A box of the latent grid.
pub struct Box2 {
    pub y: std::ops::Range<usize>,
    pub x: std::ops::Range<usize>,
}
