//! diffusers' `UNet2DConditionModel` as Stable Diffusion 2.1 uses it (cross-attention down and
//! up blocks, a cross-attention mid block, linear or convolutional attention projections),
//! built from its `config.json`, so SD2.1-base and small test models run the same code.
//! Written after diffusers' modules (Apache-2.0) and candle-transformers' port of them.

use candle_core::{Module, Tensor};

use crate::config::UNetConfig;
use crate::error::Result;
use crate::nn::{self, Conv2d, Ctx, Linear, LoraPlan};
use crate::weights::Vb;

/// A ResNet block: GroupNorm, SiLU, conv, time embedding added per channel, GroupNorm, SiLU,
/// conv, plus the input (through a 1×1 conv when the channel count changes).
pub struct ResnetBlock {
    norm1: nn::GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: nn::GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    output_scale: f64,
}

pub struct ResnetSpec {
    pub input: usize,
    pub output: usize,
    pub temb: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale: f64,
}

impl ResnetBlock {
    pub fn load(vb: &Vb, lora: Option<&LoraPlan>, s: &ResnetSpec) -> Result<ResnetBlock> {
        let shortcut = if s.input != s.output { Some(Conv2d::load(&vb.pp("conv_shortcut"), lora, s.input, s.output, 1, 1, 0)?) } else { None };
        Ok(ResnetBlock {
            norm1: nn::group_norm(&vb.pp("norm1"), s.groups, s.input, s.eps)?,
            conv1: Conv2d::load(&vb.pp("conv1"), lora, s.input, s.output, 3, 1, 1)?,
            time_emb_proj: match s.temb {
                Some(t) => Some(Linear::load(&vb.pp("time_emb_proj"), lora, t, s.output, true)?),
                None => None,
            },
            norm2: nn::group_norm(&vb.pp("norm2"), s.groups, s.output, s.eps)?,
            conv2: Conv2d::load(&vb.pp("conv2"), lora, s.output, s.output, 3, 1, 1)?,
            shortcut,
            output_scale: s.output_scale,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let mut h = self.conv1.forward(&nn::norm_silu(&self.norm1, x, ctx)?, ctx)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&t.silu()?, ctx)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.conv2.forward(&nn::norm_silu(&self.norm2, &h, ctx)?, ctx)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x, ctx)?,
            None => x.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale
        }
    }
}

/// Multi-head attention with separate q, k, v projections (no bias) and a biased output.
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    fn load(vb: &Vb, lora: Option<&LoraPlan>, dim: usize, context_dim: usize, heads: usize) -> Result<Attention> {
        Ok(Attention {
            to_q: Linear::load(&vb.pp("to_q"), lora, dim, dim, false)?,
            to_k: Linear::load(&vb.pp("to_k"), lora, context_dim, dim, false)?,
            to_v: Linear::load(&vb.pp("to_v"), lora, context_dim, dim, false)?,
            to_out: Linear::load(&vb.pp("to_out.0"), lora, dim, dim, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, context: Option<&Tensor>, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x, ctx)?;
        let k = self.to_k.forward(context, ctx)?;
        let v = self.to_v.forward(context, ctx)?;
        self.to_out.forward(&nn::attention(&q, &k, &v, self.heads, None, ctx)?, ctx)
    }
}

/// Self-attention, cross-attention to the text embedding, and a GEGLU feed-forward, each
/// after a LayerNorm and added to its input.
struct TransformerBlock {
    norm1: candle_nn::LayerNorm,
    attn1: Attention,
    norm2: candle_nn::LayerNorm,
    attn2: Attention,
    norm3: candle_nn::LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn load(vb: &Vb, lora: Option<&LoraPlan>, dim: usize, context_dim: usize, heads: usize) -> Result<TransformerBlock> {
        let inner = 4 * dim;
        Ok(TransformerBlock {
            norm1: nn::layer_norm(&vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&vb.pp("attn1"), lora, dim, dim, heads)?,
            norm2: nn::layer_norm(&vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&vb.pp("attn2"), lora, dim, context_dim, heads)?,
            norm3: nn::layer_norm(&vb.pp("norm3"), dim, 1e-5)?,
            ff_in: Linear::load(&vb.pp("ff.net.0.proj"), lora, dim, 2 * inner, true)?,
            ff_out: Linear::load(&vb.pp("ff.net.2"), lora, inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None, ctx)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context), ctx)? + &x)?;
        let h = nn::geglu(&self.ff_in.forward(&self.norm3.forward(&x)?, ctx)?)?;
        self.ff_out.forward(&h, ctx)? + x
    }
}

enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

/// diffusers' `Transformer2DModel`: GroupNorm, projection in, transformer blocks over the
/// pixels as tokens, projection out, plus the input.
struct SpatialTransformer {
    norm: nn::GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    #[allow(clippy::too_many_arguments)]
    fn load(vb: &Vb, lora: Option<&LoraPlan>, c: &UNetConfig, dim: usize, heads: usize, layers: usize) -> Result<SpatialTransformer> {
        let proj = |name: &str| -> Result<Projection> {
            Ok(if c.use_linear_projection {
                Projection::Linear(Linear::load(&vb.pp(name), lora, dim, dim, true)?)
            } else {
                Projection::Conv(Conv2d::load(&vb.pp(name), lora, dim, dim, 1, 1, 0)?)
            })
        };
        Ok(SpatialTransformer {
            norm: nn::group_norm(&vb.pp("norm"), c.norm_num_groups, dim, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks: (0..layers)
                .map(|t| TransformerBlock::load(&vb.pp(format!("transformer_blocks.{t}")), lora, dim, c.cross_attention_dim, heads))
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_tokens = |t: Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let mut t = self.norm.forward(x, ctx.norm.as_ref())?;
        t = match &self.proj_in {
            Projection::Linear(l) => l.forward(&to_tokens(t)?, ctx)?,
            Projection::Conv(k) => to_tokens(k.forward(&t, ctx)?)?,
        };
        for block in &self.blocks {
            t = block.forward(&t, context, ctx)?;
        }
        let to_image = |t: Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
        let out = match &self.proj_out {
            Projection::Linear(l) => to_image(l.forward(&t, ctx)?)?,
            Projection::Conv(k) => k.forward(&to_image(t)?, ctx)?,
        };
        out + x
    }
}

struct Block {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    /// The down- or upsampling convolution after the block (none in the last).
    sampler: Option<Conv2d>,
}

pub struct UNet {
    pub config: UNetConfig,
    conv_in: Conv2d,
    time_1: Linear,
    time_2: Linear,
    down: Vec<Block>,
    mid_resnets: Vec<ResnetBlock>,
    mid_attentions: Vec<SpatialTransformer>,
    up: Vec<Block>,
    norm_out: nn::GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// Builds the UNet from `config`, taking every tensor from `vb` (diffusers' key names) and
    /// adapting the layers `lora` names.
    pub fn load(vb: &Vb, lora: Option<&LoraPlan>, config: &UNetConfig) -> Result<UNet> {
        let c = config;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb = 4 * ch[0];
        let resnet = |input, output, scale| ResnetSpec { input, output, temb: Some(temb), groups: c.norm_num_groups, eps: c.norm_eps, output_scale: scale };
        let transformers = |vb: &Vb, count: usize, dim: usize, block: usize| -> Result<Vec<SpatialTransformer>> {
            (0..count).map(|j| SpatialTransformer::load(&vb.pp(format!("attentions.{j}")), lora, c, dim, c.heads(block), c.transformer_layers_per_block.get(block))).collect()
        };
        let k_in = c.conv_in_kernel;
        let conv_in = Conv2d::load(&vb.pp("conv_in"), lora, c.in_channels, ch[0], k_in, 1, k_in / 2)?;
        let mut down = Vec::with_capacity(n);
        let mut input = ch[0];
        for (i, kind) in c.down_block_types.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let output = ch[i];
            let resnets = (0..c.layers_per_block)
                .map(|j| ResnetBlock::load(&vb.pp(format!("resnets.{j}")), lora, &resnet(if j == 0 { input } else { output }, output, 1.0)))
                .collect::<Result<_>>()?;
            let attentions = if kind == "CrossAttnDownBlock2D" { transformers(&vb, c.layers_per_block, output, i)? } else { Vec::new() };
            let sampler = if i + 1 < n { Some(Conv2d::load(&vb.pp("downsamplers.0.conv"), lora, output, output, 3, 2, c.downsample_padding)?) } else { None };
            down.push(Block { resnets, attentions, sampler });
            input = output;
        }
        let mid = vb.pp("mid_block");
        let last = ch[n - 1];
        let mid_resnets = (0..2).map(|j| ResnetBlock::load(&mid.pp(format!("resnets.{j}")), lora, &resnet(last, last, c.mid_block_scale_factor))).collect::<Result<_>>()?;
        let mid_attentions = transformers(&mid, 1, last, n - 1)?;
        let mut up = Vec::with_capacity(n);
        let mut prev = last;
        for (i, kind) in c.up_block_types.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let down_index = n - 1 - i;
            let output = ch[down_index];
            let skip_in = ch[down_index.saturating_sub(1)];
            let layers = c.layers_per_block + 1;
            let resnets = (0..layers)
                .map(|j| {
                    let skip = if j == layers - 1 { skip_in } else { output };
                    let res_in = if j == 0 { prev } else { output };
                    ResnetBlock::load(&vb.pp(format!("resnets.{j}")), lora, &resnet(res_in + skip, output, 1.0))
                })
                .collect::<Result<_>>()?;
            let attentions = if kind == "CrossAttnUpBlock2D" { transformers(&vb, layers, output, down_index)? } else { Vec::new() };
            let sampler = if i + 1 < n { Some(Conv2d::load(&vb.pp("upsamplers.0.conv"), lora, output, output, 3, 1, 1)?) } else { None };
            up.push(Block { resnets, attentions, sampler });
            prev = output;
        }
        let k_out = c.conv_out_kernel;
        Ok(UNet {
            config: c.clone(),
            conv_in,
            time_1: Linear::load(&vb.pp("time_embedding.linear_1"), lora, ch[0], temb, true)?,
            time_2: Linear::load(&vb.pp("time_embedding.linear_2"), lora, temb, temb, true)?,
            down,
            mid_resnets,
            mid_attentions,
            up,
            norm_out: nn::group_norm(&vb.pp("conv_norm_out"), c.norm_num_groups, ch[0], c.norm_eps)?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), lora, ch[0], c.out_channels, k_out, 1, k_out / 2)?,
        })
    }

    /// The sinusoidal embedding of `timestep` for a batch of `batch`, computed in f32 as
    /// diffusers does (`[cos, sin]` with `flip_sin_to_cos`).
    fn time_embedding(&self, timestep: f64, batch: usize, device: &candle_core::Device) -> candle_core::Result<Tensor> {
        let dim = self.config.block_out_channels[0];
        let half = dim / 2;
        let shift = self.config.freq_shift;
        let freqs: Vec<f32> = (0..half).map(|i| (-(10000f32.ln()) * i as f32 / (half as f32 - shift as f32)).exp()).collect();
        let args: Vec<f32> = freqs.iter().map(|f| timestep as f32 * f).collect();
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
        let mut emb = if self.config.flip_sin_to_cos { [cos, sin].concat() } else { [sin, cos].concat() };
        emb.resize(dim, 0.0);
        Tensor::from_vec(emb, (1, dim), device)?.repeat((batch, 1))
    }

    /// The noise prediction ε for latents `x` `[batch, in, h, w]` at `timestep`, conditioned
    /// on `context` `[batch, tokens, cross_attention_dim]`.
    pub fn forward(&self, x: &Tensor, timestep: f64, context: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let batch = x.dim(0)?;
        let t = self.time_embedding(timestep, batch, x.device())?;
        let temb = self.time_2.forward(&self.time_1.forward(&t, ctx)?.silu()?, ctx)?;
        let temb = Some(&temb);
        let mut h = self.conv_in.forward(x, ctx)?;
        let mut skips = vec![h.clone()];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                h = resnet.forward(&h, temb, ctx)?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, context, ctx)?;
                }
                skips.push(h.clone());
            }
            if let Some(conv) = &block.sampler {
                h = conv.forward(&nn::pad_for_downsample(&h, self.config.downsample_padding)?, ctx)?;
                skips.push(h.clone());
            }
        }
        h = self.mid_resnets[0].forward(&h, temb, ctx)?;
        for (attn, resnet) in self.mid_attentions.iter().zip(&self.mid_resnets[1..]) {
            h = attn.forward(&h, context, ctx)?;
            h = resnet.forward(&h, temb, ctx)?;
        }
        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("a skip per up resnet");
                h = resnet.forward(&Tensor::cat(&[&h, &skip], 1)?, temb, ctx)?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, context, ctx)?;
                }
            }
            if let Some(conv) = &block.sampler {
                // To the size of the skip it meets next: ×2, or what odd sizes were halved from.
                let (_, _, sh, sw) = skips.last().expect("skips remain before the last block").dims4()?;
                h = conv.forward(&h.upsample_nearest2d(sh, sw)?, ctx)?;
            }
        }
        self.conv_out.forward(&nn::norm_silu(&self.norm_out, &h, ctx)?, ctx)
    }
}
