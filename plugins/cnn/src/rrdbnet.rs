//! RRDBNet ×4 (ESRGAN, Wang et al. 2018; Real-ESRGAN's generator), keyed like BasicSR's
//! `RRDBNet`: conv_first, N residual-in-residual dense blocks (three dense blocks of five 3×3
//! convolutions each, LeakyReLU 0.2 after the first four, residuals scaled by 0.2), conv_body
//! (+ the first features), two nearest ×2 upsamplers each with a conv and LeakyReLU, conv_hr
//! with LeakyReLU, conv_last. Feature and growth widths and the block count are read from the
//! weights. Every convolution runs on channels-last padded activations ([`Padded`]).

use candle_core::{Device, Module, Result, Tensor};

use crate::layers::{ConvCl, Padded, Weights};
use crate::winograd::Activation;

const LEAKY: Activation<'static> = Activation::LeakyRelu(SLOPE as f32);

const SLOPE: f64 = 0.2;
const RESIDUAL_SCALE: f64 = 0.2;

/// A dense block: each conv sees the block input and every earlier conv's output.
struct Rdb {
    convs: Vec<ConvCl>,
}

impl Rdb {
    /// The concatenation is one buffer, pixels `feat + 4·grow` values apart, that each conv
    /// reads the start of and appends its output to: no concatenation is copied again.
    fn forward(&self, x: &Padded) -> Result<Padded> {
        let (h, w) = (x.h, x.w);
        let feat = x.t.dim(1)?;
        let grow = (self.convs[4].in_channels() - feat) / 4;
        let stride = feat + 4 * grow;
        let pixels = (h + 3) * (w + 2);
        let mut cat = vec![0f32; pixels * stride];
        let input = crate::winograd::with_slice(&x.t, |x| {
            for (dst, src) in cat.chunks_exact_mut(stride).zip(x.chunks_exact(feat)) {
                dst[..feat].copy_from_slice(src);
            }
            x.to_vec()
        })?;
        for (k, conv) in self.convs[..4].iter().enumerate() {
            let y = conv.forward_slice(&cat, stride, h, w, LEAKY);
            let at = feat + k * grow;
            for (dst, src) in cat.chunks_exact_mut(stride).zip(y.chunks_exact(grow)) {
                dst[at..at + grow].copy_from_slice(src);
            }
        }
        let mut y = self.convs[4].forward_slice(&cat, stride, h, w, Activation::None);
        for (y, x) in y.iter_mut().zip(&input) {
            *y = *y * RESIDUAL_SCALE as f32 + x;
        }
        Ok(Padded { t: Tensor::from_vec(y, (pixels, feat), x.t.device())?, h, w })
    }
}

pub struct RrdbNet {
    conv_first: ConvCl,
    body: Vec<[Rdb; 3]>,
    conv_body: ConvCl,
    conv_up1: ConvCl,
    conv_up2: ConvCl,
    conv_hr: ConvCl,
    conv_last: ConvCl,
}

impl RrdbNet {
    pub fn load(weights: &Weights) -> Result<RrdbNet> {
        let conv = |name: &str| ConvCl::fast(&weights.conv(name, None)?);
        let num_block = (0..).take_while(|b| weights.0.contains_key(&format!("body.{b}.rdb1.conv1.weight"))).count();
        let body = (0..num_block)
            .map(|b| {
                let rdb = |r: usize| -> Result<Rdb> {
                    Ok(Rdb { convs: (1..=5).map(|c| conv(&format!("body.{b}.rdb{r}.conv{c}"))).collect::<Result<_>>()? })
                };
                Ok([rdb(1)?, rdb(2)?, rdb(3)?])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RrdbNet {
            conv_first: conv("conv_first")?,
            body,
            conv_body: conv("conv_body")?,
            conv_up1: conv("conv_up1")?,
            conv_up2: conv("conv_up2")?,
            conv_hr: conv("conv_hr")?,
            conv_last: conv("conv_last")?,
        })
    }

    pub fn load_file(path: &std::path::Path, device: &Device) -> Result<RrdbNet> {
        RrdbNet::load(&Weights(candle_core::safetensors::load(path, device)?))
    }

    pub fn num_block(&self) -> usize {
        self.body.len()
    }

    /// (1, 3, h, w) RGB in [0, 1] → (1, 3, 4h, 4w), not clamped (the trained network
    /// overshoots [0, 1] a little).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_timed(x, &mut |_, _| {})
    }

    /// `forward`, telling `stage(name, seconds)` how long each part took (for profiling).
    pub fn forward_timed(&self, x: &Tensor, stage: &mut dyn FnMut(&str, f64)) -> Result<Tensor> {
        let mut lap = crate::layers::stopwatch(stage);
        let p = Padded::from_nchw(x)?;
        let feat = self.conv_first.forward(&p)?;
        let mut h = feat.clone();
        for rrdb in &self.body {
            let mut y = h.clone();
            for rdb in rrdb {
                y = rdb.forward(&y)?;
            }
            h = y.scale_add(RESIDUAL_SCALE, &h)?;
        }
        let feat = feat.add(&self.conv_body.forward(&h)?)?;
        lap("body");
        let u = self.conv_up1.forward_act(&feat.upsample2()?, LEAKY)?.upsample2()?;
        lap("up1");
        let u = self.conv_up2.forward_act(&u, LEAKY)?;
        lap("up2");
        let u = self.conv_hr.forward_act(&u, LEAKY)?;
        lap("hr");
        let y = self.conv_last.forward(&u)?.to_nchw()?;
        lap("last");
        Ok(y)
    }
}

impl Module for RrdbNet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        RrdbNet::forward(self, x)
    }
}
