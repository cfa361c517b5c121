//! SRResNet / SRGAN generator (Ledig et al. 2017, as trained by krasserm/super-resolution):
//! conv 9×9 → PReLU, 16 residual blocks (conv → BN → PReLU → conv → BN, + input), conv → BN
//! (+ the first features), two ×2 pixel-shuffle upsamplers with PReLU, conv 9×9 → tanh.
//! BatchNorm (Keras ε = 1e-3, inference statistics) is folded into the convolution before
//! it at load, so a forward pass is convolutions and activations only.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor};

/// Keras's BatchNormalization default.
pub const BN_EPS: f64 = 1e-3;

struct Conv {
    weight: Tensor,
    /// (1, O, 1, 1), ready to broadcast.
    bias: Tensor,
    padding: usize,
    /// For a wide kernel with very few outputs, the same convolution as a 1×1 convolution to
    /// O·k² channels and k² shifted adds (see [`Conv::shift_add`]).
    pointwise: Option<Tensor>,
}

impl Conv {
    fn new(weight: Tensor, bias: Tensor) -> Result<Conv> {
        let (o, i, k, _) = weight.dims4()?;
        // im2col turns a k×k convolution with a handful of outputs into a GEMM only a few
        // columns wide, which runs at a tenth of the speed of the others (SRResNet's final
        // 9×9 64→3 convolution at output resolution took 5.3 of 7.2 s at 128² input).
        let pointwise = if o <= 4 && k >= 5 {
            Some(weight.permute((0, 2, 3, 1))?.reshape((o * k * k, i, 1, 1))?.contiguous()?)
        } else {
            None
        };
        Ok(Conv { bias: bias.reshape((1, o, 1, 1))?, padding: k / 2, weight, pointwise })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.pointwise {
            Some(pw) => self.shift_add(x, pw)?,
            None => x.conv2d(&self.weight, self.padding, 1, 1, 1)?,
        };
        y.broadcast_add(&self.bias)
    }

    /// out[o](y, x) = Σ_{ky,kx} Σ_c w[o,c,ky,kx] · in[c](y + ky − p, x + kx − p)
    ///              = Σ_{ky,kx} z[o·k² + ky·k + kx](y + ky − p, x + kx − p), with z = pointwise(in).
    fn shift_add(&self, x: &Tensor, pointwise: &Tensor) -> Result<Tensor> {
        let (n, _, h, w) = x.dims4()?;
        let (o, _, k, _) = self.weight.dims4()?;
        let p = self.padding as isize;
        let mut out = vec![0f32; n * o * h * w];
        let plane = h * w;
        // One output channel at a time: k² planes of intermediate instead of o·k².
        for oc in 0..o {
            let z = x.conv2d(&pointwise.narrow(0, oc * k * k, k * k)?, 0, 1, 1, 1)?.flatten_all()?.to_vec1::<f32>()?;
            for b in 0..n {
                let dst = &mut out[(b * o + oc) * plane..][..plane];
                for ky in 0..k {
                    for kx in 0..k {
                        let src = &z[(b * k * k + ky * k + kx) * plane..][..plane];
                        let dy = ky as isize - p;
                        let dx = kx as isize - p;
                        // Rows and columns where (y + dy, x + dx) is inside the image.
                        let y_lo = (-dy).max(0) as usize;
                        let y_hi = (h as isize - dy).min(h as isize).max(0) as usize;
                        let x_lo = (-dx).max(0) as usize;
                        let x_hi = (w as isize - dx).min(w as isize).max(0) as usize;
                        for y in y_lo..y_hi {
                            let sy = (y as isize + dy) as usize;
                            let d = &mut dst[y * w + x_lo..y * w + x_hi];
                            let s = &src[sy * w + (x_lo as isize + dx) as usize..][..x_hi - x_lo];
                            for (a, b) in d.iter_mut().zip(s) {
                                *a += b;
                            }
                        }
                    }
                }
            }
        }
        Tensor::from_vec(out, (n, o, h, w), x.device())
    }
}

struct PRelu {
    /// (1, C, 1, 1)
    alpha: Tensor,
}

impl PRelu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let zeros = x.zeros_like()?;
        x.maximum(&zeros)? + x.minimum(&zeros)?.broadcast_mul(&self.alpha)?
    }
}

/// Activations kept channels-last and zero-padded between the residual body's 3×3
/// convolutions: a (h+3)·(w+2) × C matrix (one pixel of padding around, plus a spare row), so a
/// 3×3 convolution is nine matmuls over contiguous row ranges, about three times as fast as
/// candle's conv2d on this shape (56-73 vs 23 GMAC/s on 2 threads: examples/conv_nhwc.rs).
#[derive(Clone)]
struct Padded {
    t: Tensor,
    h: usize,
    w: usize,
}

impl Padded {
    fn from_nchw(x: &Tensor) -> Result<Padded> {
        let (_, c, h, w) = x.dims4()?;
        let t = x.pad_with_zeros(2, 1, 2)?.pad_with_zeros(3, 1, 1)?.permute((0, 2, 3, 1))?.contiguous()?.reshape(((h + 3) * (w + 2), c))?;
        Ok(Padded { t, h, w })
    }

    fn to_nchw(&self) -> Result<Tensor> {
        let c = self.t.dim(1)?;
        self.t
            .reshape((self.h + 3, self.w + 2, c))?
            .narrow(0, 1, self.h)?
            .narrow(1, 1, self.w)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()
    }

    fn add(&self, other: &Padded) -> Result<Padded> {
        Ok(Padded { t: (&self.t + &other.t)?, h: self.h, w: self.w })
    }
}

/// A 3×3 convolution on [`Padded`] activations: nine (C × O) matrices and a bias.
struct ConvCl {
    taps: Vec<Tensor>,
    bias: Tensor,
}

impl ConvCl {
    fn from(conv: &Conv) -> Result<ConvCl> {
        let (o, _, k, _) = conv.weight.dims4()?;
        if k != 3 {
            candle_core::bail!("channels-last path is for 3×3 convolutions");
        }
        let taps = (0..9)
            .map(|t| conv.weight.narrow(2, t / 3, 1)?.narrow(3, t % 3, 1)?.squeeze(3)?.squeeze(2)?.t()?.contiguous())
            .collect::<Result<Vec<_>>>()?;
        Ok(ConvCl { taps, bias: conv.bias.reshape((1, o))? })
    }

    /// `mask` (h·(w+2) × 1) zeroes the two junk columns each output row computes.
    fn forward(&self, x: &Padded, mask: &Tensor) -> Result<Padded> {
        let (h, w) = (x.h, x.w);
        let m = h * (w + 2);
        let mut acc: Option<Tensor> = None;
        for (t, tap) in self.taps.iter().enumerate() {
            let part = x.t.narrow(0, (t / 3) * (w + 2) + t % 3, m)?.matmul(tap)?;
            acc = Some(match acc {
                Some(a) => (a + part)?,
                None => part,
            });
        }
        let out = acc.expect("nine taps").broadcast_add(&self.bias)?.broadcast_mul(mask)?;
        // Output pixel (y, x) sits at row y·(w+2) + x; in the padded layout it belongs at
        // (y+1)·(w+2) + x + 1, so the whole block moves down by w + 3 rows.
        let o = out.dim(1)?;
        let dev = &out.device().clone();
        let t = Tensor::cat(
            &[Tensor::zeros((w + 3, o), DType::F32, dev)?, out, Tensor::zeros((2 * w + 3, o), DType::F32, dev)?],
            0,
        )?;
        Ok(Padded { t, h, w })
    }
}

/// PReLU on channels-last rows: α (1 × C); zero padding stays zero.
fn prelu_cl(x: &Padded, alpha: &Tensor) -> Result<Padded> {
    let zeros = x.t.zeros_like()?;
    let t = (x.t.maximum(&zeros)? + x.t.minimum(&zeros)?.broadcast_mul(alpha)?)?;
    Ok(Padded { t, h: x.h, w: x.w })
}

struct Block {
    conv1: ConvCl,
    /// (1, C)
    alpha: Tensor,
    conv2: ConvCl,
}

pub struct SrResNet {
    conv_first: Conv,
    prelu_first: PRelu,
    body: Vec<Block>,
    conv_body: ConvCl,
    conv_up1: Conv,
    prelu_up1: PRelu,
    conv_up2: Conv,
    prelu_up2: PRelu,
    conv_last: Conv,
}

/// Tensors by PyTorch-style key, as the model store holds them.
pub struct Weights(pub HashMap<String, Tensor>);

impl Weights {
    fn get(&self, key: &str) -> Result<&Tensor> {
        self.0.get(key).ok_or_else(|| candle_core::Error::Msg(format!("weight `{key}` is missing")))
    }

    fn conv(&self, name: &str, bn: Option<&str>) -> Result<Conv> {
        let mut weight = self.get(&format!("{name}.weight"))?.to_dtype(DType::F32)?;
        let mut bias = self.get(&format!("{name}.bias"))?.to_dtype(DType::F32)?;
        if let Some(bn) = bn {
            let gamma = self.get(&format!("{bn}.weight"))?;
            let beta = self.get(&format!("{bn}.bias"))?;
            let mean = self.get(&format!("{bn}.running_mean"))?;
            let var = self.get(&format!("{bn}.running_var"))?;
            // y = γ (conv(x) − μ) / √(σ² + ε) + β  =  conv'(x) with w' = w·s, b' = (b − μ)·s + β.
            let scale = (gamma / (var + BN_EPS)?.sqrt()?)?;
            weight = weight.broadcast_mul(&scale.reshape((scale.dim(0)?, 1, 1, 1))?)?;
            bias = ((bias - mean)? * &scale)?.add(beta)?;
        }
        Conv::new(weight, bias)
    }

    fn prelu(&self, name: &str) -> Result<PRelu> {
        let a = self.get(&format!("{name}.weight"))?.to_dtype(DType::F32)?;
        let c = a.elem_count();
        Ok(PRelu { alpha: a.reshape((1, c, 1, 1))? })
    }
}

/// 1 for the w real pixels of each padded-width row, 0 for its two junk columns.
fn junk_column_mask(h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let row: Vec<f32> = (0..w + 2).map(|x| if x < w { 1.0 } else { 0.0 }).collect();
    Tensor::from_vec(row.repeat(h), (h * (w + 2), 1), device)
}

impl SrResNet {
    pub fn load(weights: &Weights) -> Result<SrResNet> {
        let body = (0..16)
            .map(|i| {
                let alpha = weights.prelu(&format!("body.{i}.prelu"))?.alpha;
                let c = alpha.elem_count();
                Ok(Block {
                    conv1: ConvCl::from(&weights.conv(&format!("body.{i}.conv1"), Some(&format!("body.{i}.bn1")))?)?,
                    alpha: alpha.reshape((1, c))?,
                    conv2: ConvCl::from(&weights.conv(&format!("body.{i}.conv2"), Some(&format!("body.{i}.bn2")))?)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SrResNet {
            conv_first: weights.conv("conv_first", None)?,
            prelu_first: weights.prelu("prelu_first")?,
            body,
            conv_body: ConvCl::from(&weights.conv("conv_body", Some("bn_body"))?)?,
            conv_up1: weights.conv("conv_up1", None)?,
            prelu_up1: weights.prelu("prelu_up1")?,
            conv_up2: weights.conv("conv_up2", None)?,
            prelu_up2: weights.prelu("prelu_up2")?,
            conv_last: weights.conv("conv_last", None)?,
        })
    }

    pub fn load_file(path: &std::path::Path, device: &Device) -> Result<SrResNet> {
        SrResNet::load_adapted(path, &[], device)
    }

    /// Loads the weights and merges LoRA adapters (each with a strength) into them before
    /// BatchNorm is folded: the adapted network costs nothing extra at run time.
    pub fn load_adapted(path: &std::path::Path, adapters: &[(&crate::lora::LoraAdapter, f64)], device: &Device) -> Result<SrResNet> {
        let mut weights = candle_core::safetensors::load(path, device)?;
        crate::lora::merge(&mut weights, adapters)?;
        SrResNet::load(&Weights(weights))
    }

    /// (N, 3, h, w) RGB in [0, 1] → (N, 3, 4h, 4w) in [0, 1].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_timed(x, &mut |_, _| {})
    }

    /// `forward`, telling `stage(name, seconds)` how long each part took (for profiling).
    pub fn forward_timed(&self, x: &Tensor, stage: &mut dyn FnMut(&str, f64)) -> Result<Tensor> {
        let mut t = std::time::Instant::now();
        let mut lap = |name: &str| {
            stage(name, t.elapsed().as_secs_f64());
            t = std::time::Instant::now();
        };
        let x1 = self.prelu_first.forward(&self.conv_first.forward(x)?)?;
        lap("conv_first");
        let p1 = Padded::from_nchw(&x1)?;
        let mask = junk_column_mask(p1.h, p1.w, x.device())?;
        let mut h = p1.clone();
        for b in &self.body {
            let t = prelu_cl(&b.conv1.forward(&h, &mask)?, &b.alpha)?;
            h = h.add(&b.conv2.forward(&t, &mask)?)?;
        }
        let h = self.conv_body.forward(&h, &mask)?.add(&p1)?.to_nchw()?;
        lap("body");
        let h = self.conv_up1.forward(&h)?;
        lap("conv_up1");
        let h = self.prelu_up1.forward(&candle_nn::ops::pixel_shuffle(&h, 2)?)?;
        lap("shuffle+prelu_up1");
        let h = self.conv_up2.forward(&h)?;
        lap("conv_up2");
        let h = self.prelu_up2.forward(&candle_nn::ops::pixel_shuffle(&h, 2)?)?;
        lap("shuffle+prelu_up2");
        let y = self.conv_last.forward(&h)?;
        lap("conv_last");
        // The network ends in tanh on [−1, 1]; the trained model maps that to 0..255.
        let out = ((y.tanh()? + 1.0)? * 0.5)?;
        lap("tanh");
        Ok(out)
    }
}

impl Module for SrResNet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        SrResNet::forward(self, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_add_equals_the_direct_convolution() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1f32, (3, 5, 9, 9), &dev)?;
        let b = Tensor::randn(0f32, 1f32, (3,), &dev)?;
        let x = Tensor::randn(0f32, 1f32, (1, 5, 13, 17), &dev)?;
        let conv = Conv::new(w.clone(), b.clone())?;
        assert!(conv.pointwise.is_some());
        let fast = conv.forward(&x)?;
        let direct = x.conv2d(&w, 4, 1, 1, 1)?.broadcast_add(&b.reshape((1, 3, 1, 1))?)?;
        let diff = (fast - direct)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "{diff}");
        Ok(())
    }
}
