//! PiSA-SR's maths from a bicubic image to finished images (`research/reference-models.md`
//! §1): pad to a multiple of 8, encode to the VAE posterior mean × scaling factor, predict ε at
//! t = 1, `z_H = z_L − ε`, decode, clamp, crop, colour-fix against the bicubic image.
//!
//! The adjustable form `ε = λ_pix·ε_pix + λ_sem·(ε_full − ε_pix)` needs both predictions:
//! they come from one batch of two through the UNet, whose pixel LoRA is merged into its
//! weights and whose semantic LoRA runs at scale 0 for the first item and 1 for the second.
//! The [`Latents`] are small (an eighth of the image per side, 4 channels) and are kept so an
//! exact render at other λ needs only a decode.

use candle_core::{Device, Tensor};
use tessera_pisa_model::nn::Ctx;
use tessera_pisa_model::store::PisaModel;

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
    let (w, h) = (bicubic.width, bicubic.height);
    let (pw, ph) = (w.next_multiple_of(8), h.next_multiple_of(8));
    let mut data = Vec::with_capacity(3 * pw * ph);
    for ch in 0..3 {
        for y in 0..ph {
            for x in 0..pw {
                data.push(bicubic.at(ch, x.min(w - 1), y.min(h - 1)) * 2.0 - 1.0);
            }
        }
    }
    Tensor::from_vec(data, (1, 3, ph, pw), device)
}

pub struct Pipeline<'a> {
    pub model: &'a PisaModel,
    pub ctx: Ctx,
}

impl Pipeline<'_> {
    /// `z_L` = the posterior mean of the padded image × the VAE's scaling factor.
    pub fn encode(&self, bicubic: &Planes) -> candle_core::Result<Tensor> {
        let x = model_input(bicubic, self.model.embedding.device())?;
        self.model.vae.encode_mean(&x, &self.ctx)? * self.model.vae.config.scaling_factor
    }

    /// ε_pix and ε_full in one batch of two (`adjustable`), or ε_full alone.
    pub fn predict(&self, z_l: &Tensor, adjustable: bool) -> candle_core::Result<(Option<Tensor>, Tensor)> {
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
    pub fn render(&self, latents: &Latents, lambda_pix: f64, lambda_sem: f64, fix: ColourFix, bicubic: &Planes) -> candle_core::Result<Planes> {
        let z_h = (&latents.z_l - latents.eps(lambda_pix, lambda_sem)?)?;
        let mut x = self.decode(&z_h, latents.width, latents.height)?;
        fix.apply(&mut x, bicubic);
        Ok(x)
    }

    /// `D(z / scaling factor)` clamped to [-1, 1], mapped to [0, 1] and cropped to `w × h`.
    pub fn decode(&self, z: &Tensor, width: usize, height: usize) -> candle_core::Result<Planes> {
        let x = self.model.vae.decode(&(z / self.model.vae.config.scaling_factor)?, &self.ctx)?;
        let x = ((x.clamp(-1f32, 1f32)? * 0.5)? + 0.5)?.narrow(2, 0, height)?.narrow(3, 0, width)?;
        Ok(Planes { width, height, data: x.flatten_all()?.to_vec1()? })
    }
}
