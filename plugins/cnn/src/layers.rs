//! Building blocks shared by the networks: convolutions (with BatchNorm folded at load), and
//! channels-last zero-padded activations on which a 3×3 convolution is nine matmuls.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

use crate::winograd::{Activation, Winograd};

/// Keras's BatchNormalization default (the SRGAN weights were trained with it).
pub const BN_EPS: f64 = 1e-3;

pub struct Conv {
    pub weight: Tensor,
    /// (1, O, 1, 1), ready to broadcast.
    pub bias: Tensor,
    padding: usize,
}

impl Conv {
    pub fn new(weight: Tensor, bias: Tensor) -> Result<Conv> {
        let (o, _, k, _) = weight.dims4()?;
        Ok(Conv { bias: bias.reshape((1, o, 1, 1))?, padding: k / 2, weight })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv2d(&self.weight, self.padding, 1, 1, 1)?.broadcast_add(&self.bias)
    }
}

/// A k×k convolution to a handful of outputs (an RGB image) from channels-last activations:
/// per output pixel, k² dot products over the contiguous channels for each output. im2col
/// would make this a GEMM a few columns wide, which ran SRResNet's final 9×9 64→3 convolution
/// at 0.8 GMAC/s.
pub struct ConvFew {
    /// [ky][kx][o][c]
    taps: Vec<f32>,
    bias: Vec<f32>,
    k: usize,
    c: usize,
    o: usize,
}

const FEW_LANES: usize = 16;

/// `acc[i] += Σ_j a[j·16 + i]·b[j·16 + i]`: a dot product kept in 16 lanes.
#[inline(always)]
fn fma_lanes(acc: &mut [f32; FEW_LANES], a: &[f32], b: &[f32]) {
    let (ac, bc) = (a.chunks_exact(FEW_LANES), b.chunks_exact(FEW_LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (a, b) in ac.zip(bc) {
        let a: &[f32; FEW_LANES] = a.try_into().expect("exact chunk");
        let b: &[f32; FEW_LANES] = b.try_into().expect("exact chunk");
        for i in 0..FEW_LANES {
            acc[i] += a[i] * b[i];
        }
    }
    for (i, (a, b)) in ar.iter().zip(br).enumerate() {
        acc[i] += a * b;
    }
}

impl ConvFew {
    pub fn new(conv: &Conv) -> Result<ConvFew> {
        let (o, c, k, _) = conv.weight.dims4()?;
        if o > 4 {
            candle_core::bail!("ConvFew is for at most 4 outputs, not {o}");
        }
        let taps = conv.weight.permute((2, 3, 0, 1))?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        Ok(ConvFew { taps, bias: conv.bias.flatten_all()?.to_vec1::<f32>()?, k, c, o })
    }

    /// (h, w, C) → (1, O, h, w), zero padding of k/2.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        use rayon::prelude::*;
        let (h, w, c) = x.dims3()?;
        if c != self.c {
            candle_core::bail!("ConvFew expects {} channels, got {c}", self.c);
        }
        let (k, o, p) = (self.k, self.o, self.k / 2);
        let x = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; h * w * o];
        let arch = pulp::Arch::new();
        out.par_chunks_mut(w * o).enumerate().for_each(|(y, row)| arch.dispatch(|| {
            for xo in 0..w {
                let mut acc = [[0f32; FEW_LANES]; 4];
                for ky in 0..k {
                    let sy = y as isize + ky as isize - p as isize;
                    if sy < 0 || sy >= h as isize {
                        continue;
                    }
                    for kx in 0..k {
                        let sx = xo as isize + kx as isize - p as isize;
                        if sx < 0 || sx >= w as isize {
                            continue;
                        }
                        let src = &x[(sy as usize * w + sx as usize) * c..][..c];
                        let wt = &self.taps[(ky * k + kx) * o * c..][..o * c];
                        for (oc, acc) in acc.iter_mut().enumerate().take(o) {
                            fma_lanes(acc, src, &wt[oc * c..][..c]);
                        }
                    }
                }
                for oc in 0..o {
                    row[xo * o + oc] = acc[oc].iter().sum::<f32>() + self.bias[oc];
                }
            }
        }));
        Tensor::from_vec(out, (h, w, o), &Device::Cpu)?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()
    }
}

/// Activations kept channels-last and zero-padded between 3×3 convolutions: a (h+3)·(w+2) × C
/// matrix (one pixel of padding around, plus a spare row). Channels are contiguous, so the
/// Winograd transforms vectorise over them and the products are plain matmuls; candle's conv2d
/// ran these layers at 23 GMAC/s on 2 threads, the Winograd path at 84-123 (examples/winograd_bench.rs).
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

    /// The interior as (h, w, C).
    fn interior(&self) -> Result<Tensor> {
        let c = self.t.dim(1)?;
        self.t.reshape((self.h + 3, self.w + 2, c))?.narrow(0, 1, self.h)?.narrow(1, 1, self.w)
    }

    /// torch's pixel_shuffle ×2 (channel `c·4 + dy·2 + dx` → sub-pixel (dy, dx) of channel c).
    pub fn pixel_shuffle2(&self) -> Result<Padded> {
        Padded::from_hwc(&self.shuffled()?)
    }

    /// The same, unpadded: (2h, 2w, C/4).
    pub fn shuffled(&self) -> Result<Tensor> {
        let (h, w, c) = (self.h, self.w, self.t.dim(1)? / 4);
        self.interior()?.reshape((h, w, c, 2, 2))?.permute((0, 3, 1, 4, 2))?.contiguous()?.reshape((2 * h, 2 * w, c))
    }

    /// Nearest-neighbour ×2 upsampling.
    pub fn upsample2(&self) -> Result<Padded> {
        let (h, w, c) = (self.h, self.w, self.t.dim(1)?);
        let up = self.interior()?.unsqueeze(1)?.unsqueeze(3)?.broadcast_as((h, 2, w, 2, c))?.contiguous()?.reshape((2 * h, 2 * w, c))?;
        Padded::from_hwc(&up)
    }
}

/// A 3×3 convolution on [`Padded`] activations, by Winograd ([`crate::winograd`]).
pub struct ConvCl {
    wino: Winograd,
}

impl ConvCl {
    /// By F(2,3): within float rounding of the direct convolution. SRResNet is held to
    /// TensorFlow within 1e-5: with F(4,3) everywhere it came to 9.4e-6 on noise input, with
    /// F(4,3) in its residual blocks only and F(2,3) after them, 6.6e-6.
    pub fn from(conv: &Conv) -> Result<ConvCl> {
        Ok(ConvCl { wino: Winograd::f2(&conv.weight, &conv.bias.flatten_all()?)? })
    }

    /// By F(4,3): about twice as fast, a digit less precise (RRDBNet stays within 1.1e-5 of
    /// ncnn on natural input, 8e-5 on noise; its bound is 1e-4).
    pub fn fast(conv: &Conv) -> Result<ConvCl> {
        Ok(ConvCl { wino: Winograd::f4(&conv.weight, &conv.bias.flatten_all()?)? })
    }

    pub fn forward(&self, x: &Padded) -> Result<Padded> {
        self.forward_act(x, Activation::None)
    }

    /// The convolution, its bias and then `act`, in one pass over the output.
    pub fn forward_act(&self, x: &Padded, act: Activation<'_>) -> Result<Padded> {
        Ok(Padded { t: self.wino.forward(&x.t, x.h, x.w, act)?, h: x.h, w: x.w })
    }

    pub fn in_channels(&self) -> usize {
        self.wino.in_channels()
    }

    /// The same on padded h×w activations whose pixels are `stride` values apart (the first C
    /// are read); returns the padded output, O values a pixel.
    pub fn forward_slice(&self, x: &[f32], stride: usize, h: usize, w: usize, act: Activation<'_>) -> Vec<f32> {
        self.wino.forward_slice(x, stride, h, w, act)
    }
}

/// Reports how long each stage of a forward pass took: `lap(name)` ends a stage.
pub fn stopwatch(stage: &mut dyn FnMut(&str, f64)) -> impl FnMut(&str) + '_ {
    let mut t = std::time::Instant::now();
    move |name| {
        stage(name, t.elapsed().as_secs_f64());
        t = std::time::Instant::now();
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



#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn conv_few_equals_the_direct_convolution() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1f32, (3, 20, 9, 9), &dev)?;
        let b = Tensor::randn(0f32, 1f32, (3,), &dev)?;
        let x = Tensor::randn(0f32, 1f32, (1, 20, 13, 17), &dev)?;
        let conv = Conv::new(w.clone(), b.clone())?;
        let fast = ConvFew::new(&conv)?.forward(&x.squeeze(0)?.permute((1, 2, 0))?)?;
        let direct = conv.forward(&x)?;
        // Sums of 1620 products of N(0, 1) values: compare relative to the largest output.
        let scale = direct.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let diff = (fast - direct)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5 * scale, "{diff} of {scale}");
        Ok(())
    }
}
