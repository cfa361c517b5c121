//! diffusers' `AutoencoderKL` (Stable Diffusion's VAE), built from its `config.json`, with the
//! encoder's posterior mean exposed (deterministic encoding) and single-head mid-block
//! attention whose score matrix stays within the context's budget.

use candle_core::Tensor;

use crate::config::VaeConfig;
use crate::error::Result;
use crate::nn::{self, Conv2d, Ctx, Linear};
use crate::unet::{ResnetBlock, ResnetSpec};
use crate::weights::{Vb, Weights};

/// The mid block's attention: GroupNorm, one head over all pixels, output projection, plus
/// the input.
struct VaeAttention {
    norm: nn::GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    fn load(vb: &Vb, c: &VaeConfig, dim: usize) -> Result<VaeAttention> {
        Ok(VaeAttention {
            norm: nn::group_norm(&vb.pp("group_norm"), c.norm_num_groups, dim, VaeConfig::NORM_EPS)?,
            to_q: Linear::load(&vb.pp("to_q"), None, dim, dim, true)?,
            to_k: Linear::load(&vb.pp("to_k"), None, dim, dim, true)?,
            to_v: Linear::load(&vb.pp("to_v"), None, dim, dim, true)?,
            to_out: Linear::load(&vb.pp("to_out.0"), None, dim, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self.norm.forward(x, ctx.norm.as_ref())?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let (q, mut k, mut v) = (self.to_q.forward(&t, ctx)?, self.to_k.forward(&t, ctx)?, self.to_v.forward(&t, ctx)?);
        // A tile of a tiled pass attends over the whole image's keys and values where the pass
        // has them (see `norm::SharedNorm::attention_kv`).
        if let Some(shared) = &ctx.norm {
            (k, v) = shared.attention_kv(&k, &v)?;
        }
        let out = self.to_out.forward(&nn::attention(&q, &k, &v, 1, None, ctx)?, ctx)?;
        out.transpose(1, 2)?.reshape((b, c, h, w))? + x
    }
}

struct Mid {
    resnet0: ResnetBlock,
    attention: Option<VaeAttention>,
    resnet1: ResnetBlock,
}

impl Mid {
    fn load(vb: &Vb, c: &VaeConfig) -> Result<Mid> {
        let dim = *c.block_out_channels.last().expect("validated");
        let spec = spec(c, dim, dim);
        Ok(Mid {
            resnet0: ResnetBlock::load(&vb.pp("resnets.0"), None, &spec)?,
            attention: if c.mid_block_add_attention { Some(VaeAttention::load(&vb.pp("attentions.0"), c, dim)?) } else { None },
            resnet1: ResnetBlock::load(&vb.pp("resnets.1"), None, &spec)?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let mut h = self.resnet0.forward(x, None, ctx)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h, ctx)?;
        }
        self.resnet1.forward(&h, None, ctx)
    }
}

fn spec(c: &VaeConfig, input: usize, output: usize) -> ResnetSpec {
    ResnetSpec { input, output, temb: None, groups: c.norm_num_groups, eps: VaeConfig::NORM_EPS, output_scale: 1.0 }
}

struct Stage {
    resnets: Vec<ResnetBlock>,
    sampler: Option<Conv2d>,
}

pub struct Encoder {
    conv_in: Conv2d,
    down: Vec<Stage>,
    mid: Mid,
    norm_out: nn::GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    latent: usize,
}

pub struct Decoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: Mid,
    up: Vec<Stage>,
    norm_out: nn::GroupNorm,
    conv_out: Conv2d,
}

pub struct Vae {
    pub config: VaeConfig,
    pub encoder: Encoder,
    pub decoder: Decoder,
}

/// Old diffusers and original SD checkpoints name the mid-block attention's projections
/// `query`, `key`, `value` and `proj_attn`; diffusers renames them on load, and so does this.
pub fn rename_legacy_attention(weights: &mut Weights) {
    let renames = [("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")];
    let keys: Vec<String> = weights.keys().cloned().collect();
    for key in keys {
        for (old, new) in renames {
            for suffix in ["weight", "bias"] {
                if let Some(prefix) = key.strip_suffix(&format!(".attentions.0.{old}.{suffix}")) {
                    weights.rename(&key, format!("{prefix}.attentions.0.{new}.{suffix}"));
                }
            }
        }
    }
    // Some of those store the projections as 1×1 convolutions.
    let keys: Vec<String> = weights.keys().filter(|k| k.contains(".attentions.0.to_") && k.ends_with(".weight")).cloned().collect();
    for key in keys {
        if let Some(t) = weights.get(&key).filter(|t| t.rank() == 4).cloned() {
            if let Ok(t) = t.flatten_from(1) {
                weights.insert(key, t);
            }
        }
    }
}

impl Vae {
    pub fn load(vb: &Vb, config: &VaeConfig) -> Result<Vae> {
        let c = config;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let last = ch[n - 1];
        let lat = c.latent_channels;
        let e = vb.pp("encoder");
        let mut down = Vec::with_capacity(n);
        let mut input = ch[0];
        for (i, &output) in ch.iter().enumerate() {
            let vb = e.pp(format!("down_blocks.{i}"));
            let resnets = (0..c.layers_per_block)
                .map(|j| ResnetBlock::load(&vb.pp(format!("resnets.{j}")), None, &spec(c, if j == 0 { input } else { output }, output)))
                .collect::<Result<_>>()?;
            // The encoder's downsamplers pad themselves asymmetrically (padding 0).
            let sampler = if i + 1 < n { Some(Conv2d::load(&vb.pp("downsamplers.0.conv"), None, output, output, 3, 2, 0)?) } else { None };
            down.push(Stage { resnets, sampler });
            input = output;
        }
        let encoder = Encoder {
            conv_in: Conv2d::load(&e.pp("conv_in"), None, c.in_channels, ch[0], 3, 1, 1)?,
            down,
            mid: Mid::load(&e.pp("mid_block"), c)?,
            norm_out: nn::group_norm(&e.pp("conv_norm_out"), c.norm_num_groups, last, VaeConfig::NORM_EPS)?,
            conv_out: Conv2d::load(&e.pp("conv_out"), None, last, 2 * lat, 3, 1, 1)?,
            quant_conv: if c.use_quant_conv { Some(Conv2d::load(&vb.pp("quant_conv"), None, 2 * lat, 2 * lat, 1, 1, 0)?) } else { None },
            latent: lat,
        };
        let d = vb.pp("decoder");
        let mut up = Vec::with_capacity(n);
        let mut prev = last;
        for i in 0..n {
            let vb = d.pp(format!("up_blocks.{i}"));
            let output = ch[n - 1 - i];
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| ResnetBlock::load(&vb.pp(format!("resnets.{j}")), None, &spec(c, if j == 0 { prev } else { output }, output)))
                .collect::<Result<_>>()?;
            let sampler = if i + 1 < n { Some(Conv2d::load(&vb.pp("upsamplers.0.conv"), None, output, output, 3, 1, 1)?) } else { None };
            up.push(Stage { resnets, sampler });
            prev = output;
        }
        let decoder = Decoder {
            post_quant_conv: if c.use_post_quant_conv { Some(Conv2d::load(&vb.pp("post_quant_conv"), None, lat, lat, 1, 1, 0)?) } else { None },
            conv_in: Conv2d::load(&d.pp("conv_in"), None, lat, last, 3, 1, 1)?,
            mid: Mid::load(&d.pp("mid_block"), c)?,
            up,
            norm_out: nn::group_norm(&d.pp("conv_norm_out"), c.norm_num_groups, ch[0], VaeConfig::NORM_EPS)?,
            conv_out: Conv2d::load(&d.pp("conv_out"), None, ch[0], c.out_channels, 3, 1, 1)?,
        };
        Ok(Vae { config: c.clone(), encoder, decoder })
    }

    /// How many GroupNorms and mid-block attentions the encoder and the decoder run: the
    /// barriers of a tiled pass (`norm::SharedNorm`).
    pub fn barriers(&self) -> (usize, usize) {
        let c = &self.config;
        let n = c.block_out_channels.len();
        let mid = 4 + if c.mid_block_add_attention { 2 } else { 0 };
        (n * c.layers_per_block * 2 + mid + 1, n * (c.layers_per_block + 1) * 2 + mid + 1)
    }

    /// The mean of the posterior q(z | x) for images `x` `[batch, 3, h, w]` in [-1, 1] (h, w
    /// multiples of 8), unscaled: multiply by `scaling_factor` for the UNet's latents.
    pub fn encode_mean(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let e = &self.encoder;
        let mut h = e.conv_in.forward(x, ctx)?;
        for stage in &e.down {
            for r in &stage.resnets {
                h = r.forward(&h, None, ctx)?;
            }
            if let Some(conv) = &stage.sampler {
                h = conv.forward(&nn::pad_for_downsample(&h, 0)?, ctx)?;
            }
        }
        h = e.mid.forward(&h, ctx)?;
        h = e.conv_out.forward(&nn::norm_silu(&e.norm_out, &h, ctx)?, ctx)?;
        if let Some(q) = &e.quant_conv {
            h = q.forward(&h, ctx)?;
        }
        h.narrow(1, 0, e.latent)
    }

    /// Images in (about) [-1, 1] from unscaled latents `z` `[batch, latent, h, w]`.
    pub fn decode(&self, z: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let d = &self.decoder;
        let mut h = match &d.post_quant_conv {
            Some(q) => q.forward(z, ctx)?,
            None => z.clone(),
        };
        h = d.conv_in.forward(&h, ctx)?;
        h = d.mid.forward(&h, ctx)?;
        for stage in &d.up {
            for r in &stage.resnets {
                h = r.forward(&h, None, ctx)?;
            }
            if let Some(conv) = &stage.sampler {
                let (_, _, hh, ww) = h.dims4()?;
                h = conv.forward(&h.upsample_nearest2d(2 * hh, 2 * ww)?, ctx)?;
            }
        }
        d.conv_out.forward(&nn::norm_silu(&d.norm_out, &h, ctx)?, ctx)
    }
}
