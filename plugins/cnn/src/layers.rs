//! Building blocks shared by the networks: convolutions (with BatchNorm folded at load), and
//! channels-last zero-padded activations on which a 3×3 convolution is nine matmuls.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

/// Keras's BatchNormalization default (the SRGAN weights were trained with it).
pub const BN_EPS: f64 = 1e-3;

pub struct Conv {
    pub weight: Tensor,
    /// (1, O, 1, 1), ready to broadcast.
    pub bias: Tensor,
    padding: usize,
    /// For a wide kernel with very few outputs, the same convolution as a 1×1 convolution to
    /// O·k² channels and k² shifted adds (see [`Conv::shift_add`]).
    pub pointwise: Option<Tensor>,
}

impl Conv {
    pub fn new(weight: Tensor, bias: Tensor) -> Result<Conv> {
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

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
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

/// Activations kept channels-last and zero-padded between the residual body's 3×3
/// convolutions: a (h+3)·(w+2) × C matrix (one pixel of padding around, plus a spare row), so a
/// 3×3 convolution is nine matmuls over contiguous row ranges, about three times as fast as
/// candle's conv2d on this shape (56-73 vs 23 GMAC/s on 2 threads: examples/conv_nhwc.rs).
#[derive(Clone)]
pub struct Padded {
    pub t: Tensor,
    pub h: usize,
    pub w: usize,
}

impl Padded {
    pub fn from_nchw(x: &Tensor) -> Result<Padded> {
        let (_, c, h, w) = x.dims4()?;
        let t = x.pad_with_zeros(2, 1, 2)?.pad_with_zeros(3, 1, 1)?.permute((0, 2, 3, 1))?.contiguous()?.reshape(((h + 3) * (w + 2), c))?;
        Ok(Padded { t, h, w })
    }

    pub fn to_nchw(&self) -> Result<Tensor> {
        let c = self.t.dim(1)?;
        self.t
            .reshape((self.h + 3, self.w + 2, c))?
            .narrow(0, 1, self.h)?
            .narrow(1, 1, self.w)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()
    }

    /// (h, w, C) → padded.
    pub fn from_hwc(x: &Tensor) -> Result<Padded> {
        let (h, w, c) = x.dims3()?;
        let t = x.pad_with_zeros(0, 1, 2)?.pad_with_zeros(1, 1, 1)?.contiguous()?.reshape(((h + 3) * (w + 2), c))?;
        Ok(Padded { t, h, w })
    }

    pub fn add(&self, other: &Padded) -> Result<Padded> {
        Ok(Padded { t: (&self.t + &other.t)?, h: self.h, w: self.w })
    }

    /// `scale · self + other` (zero padding stays zero).
    pub fn scale_add(&self, scale: f64, other: &Padded) -> Result<Padded> {
        Ok(Padded { t: (self.t.affine(scale, 0.0)? + &other.t)?, h: self.h, w: self.w })
    }

    /// LeakyReLU with a slope below 1: max(x, slope·x).
    pub fn leaky_relu(&self, slope: f64) -> Result<Padded> {
        Ok(Padded { t: self.t.maximum(&self.t.affine(slope, 0.0)?)?, h: self.h, w: self.w })
    }

    /// Nearest-neighbour ×2 upsampling.
    pub fn upsample2(&self) -> Result<Padded> {
        let (h, w, c) = (self.h, self.w, self.t.dim(1)?);
        let inner = self.t.reshape((h + 3, w + 2, c))?.narrow(0, 1, h)?.narrow(1, 1, w)?;
        let up = inner.unsqueeze(1)?.unsqueeze(3)?.broadcast_as((h, 2, w, 2, c))?.contiguous()?.reshape((2 * h, 2 * w, c))?;
        Padded::from_hwc(&up)
    }
}

/// A 3×3 convolution on [`Padded`] activations: nine (C × O) matrices and a bias.
pub struct ConvCl {
    taps: Vec<Tensor>,
    bias: Tensor,
}

impl ConvCl {
    pub fn from(conv: &Conv) -> Result<ConvCl> {
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
    pub fn forward(&self, x: &Padded, mask: &Tensor) -> Result<Padded> {
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

/// Tensors by PyTorch-style key, as the model store holds them.
pub struct Weights(pub HashMap<String, Tensor>);

impl Weights {
    pub fn get(&self, key: &str) -> Result<&Tensor> {
        self.0.get(key).ok_or_else(|| candle_core::Error::Msg(format!("weight `{key}` is missing")))
    }

    pub fn conv(&self, name: &str, bn: Option<&str>) -> Result<Conv> {
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
}

/// 1 for the w real pixels of each padded-width row, 0 for its two junk columns.
pub fn junk_column_mask(h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let row: Vec<f32> = (0..w + 2).map(|x| if x < w { 1.0 } else { 0.0 }).collect();
    Tensor::from_vec(row.repeat(h), (h * (w + 2), 1), device)
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
