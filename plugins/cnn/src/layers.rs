//! Building blocks shared by the networks: convolutions (with BatchNorm folded at load), and
//! channels-last zero-padded activations on which a 3×3 convolution is nine matmuls.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor};

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

    /// Rows `r0..r1` of the interior, as their own padded activations.
    pub fn rows(&self, r0: usize, r1: usize) -> Result<Padded> {
        let pw = self.w + 2;
        // Interior rows r0..r1 are padded rows r0 + 1 ..= r1, each with its zero columns.
        let body = self.t.narrow(0, (r0 + 1) * pw, (r1 - r0) * pw)?;
        let t = body.pad_with_zeros(0, pw, 2 * pw)?;
        Ok(Padded { t, h: r1 - r0, w: self.w })
    }

    pub fn add(&self, other: &Padded) -> Result<Padded> {
        Ok(Padded { t: (&self.t + &other.t)?, h: self.h, w: self.w })
    }

    /// `scale · self + other` (zero padding stays zero).
    pub fn scale_add(&self, scale: f64, other: &Padded) -> Result<Padded> {
        Ok(Padded { t: (self.t.affine(scale, 0.0)? + &other.t)?, h: self.h, w: self.w })
    }

    /// torch's pixel_shuffle ×2 (channel `c·4 + dy·2 + dx` → sub-pixel (dy, dx) of channel c).
    pub fn pixel_shuffle2(&self) -> Result<Padded> {
        let c = self.t.dim(1)? / 4;
        self.expand2(c, |px, dy, dx, dst| {
            for (ch, v) in dst.iter_mut().enumerate() {
                *v = px[ch * 4 + dy * 2 + dx];
            }
        })
    }

    /// Nearest-neighbour ×2 upsampling.
    pub fn upsample2(&self) -> Result<Padded> {
        self.expand2(self.t.dim(1)?, |px, _, _, dst| dst.copy_from_slice(px))
    }

    /// A ×2 upsampling written straight into a new padded buffer of `c_out` channels:
    /// `fill(pixel, dy, dx, dst)` writes sub-pixel (dy, dx) of an input pixel. One pass over
    /// memory, where candle's pad, permute and copy took four.
    fn expand2(&self, c_out: usize, fill: impl Fn(&[f32], usize, usize, &mut [f32]) + Sync) -> Result<Padded> {
        use rayon::prelude::*;
        let (h, w, c) = (self.h, self.w, self.t.dim(1)?);
        let pw = 2 * w + 2;
        let out = crate::winograd::with_slice(&self.t, |src| {
            let mut out = vec![0f32; (2 * h + 3) * pw * c_out];
            out[pw * c_out..(2 * h + 1) * pw * c_out].par_chunks_mut(pw * c_out).enumerate().for_each(|(y, row)| {
                let (i, dy) = (y / 2, y % 2);
                for j in 0..w {
                    let px = &src[((i + 1) * (w + 2) + j + 1) * c..][..c];
                    for dx in 0..2 {
                        fill(px, dy, dx, &mut row[(2 * j + dx + 1) * c_out..][..c_out]);
                    }
                }
            });
            out
        })?;
        Ok(Padded { t: Tensor::from_vec(out, ((2 * h + 3) * pw, c_out), &candle_core::Device::Cpu)?, h: 2 * h, w: 2 * w })
    }
}

/// A 3×3 convolution on [`Padded`] activations, by Winograd ([`crate::winograd`]).
pub struct ConvCl {
    wino: Winograd,
}

impl ConvCl {
    /// By F(2,3): within float rounding of the direct convolution.
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

    /// The convolution of the first C channels of a transformed input (F(4,3) only).
    pub fn forward_transformed(&self, t: &crate::winograd::Transformed, act: Activation<'_>) -> Vec<f32> {
        self.wino.forward_transformed(t, act)
    }

    /// Adds `new`'s channels to `t` and convolves tile rows `rows` ([`Winograd::forward_adding_rows`]).
    pub fn forward_adding_rows(&self, t: &mut crate::winograd::Transformed, new: (&[f32], usize, usize, usize), act: Activation<'_>, rows: std::ops::Range<usize>, out: &mut [f32]) {
        self.wino.forward_adding_rows(t, new, act, rows, out)
    }

    pub fn out_channels(&self) -> usize {
        self.wino.out_channels()
    }

    /// The same on padded h×w activations whose pixels are `stride` values apart (the first C
    /// are read); returns the padded output, O values a pixel.
    pub fn forward_slice(&self, x: &[f32], stride: usize, h: usize, w: usize, act: Activation<'_>) -> Vec<f32> {
        self.wino.forward_slice(x, stride, h, w, act)
    }
}

/// Runs `f` on a thread of rayon's pool. The parallel loops inside it then start from a pool
/// thread, which shares their work by stealing; started from outside the pool each loop
/// queues its work, wakes the pool and sleeps until it is done, and a dense block's wavefront
/// runs thousands of short loops.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
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
pub(crate) mod tests {
    use super::*;
    use candle_core::Device;

    /// torch's pixel_shuffle by reshapes: (1, 4C, h, w) → (1, C, 2h, 2w).
    pub fn pixel_shuffle2_nchw(x: &Tensor) -> Result<Tensor> {
        let (_, c4, h, w) = x.dims4()?;
        x.reshape((1, c4 / 4, 2, 2, h, w))?.permute((0, 1, 4, 2, 5, 3))?.reshape((1, c4 / 4, 2 * h, 2 * w))
    }

    #[test]
    fn upsamplings_match_candle() -> Result<()> {
        let x = Tensor::randn(0f32, 1f32, (1, 8, 5, 7), &Device::Cpu)?;
        let p = Padded::from_nchw(&x)?;
        let same = |a: Tensor, b: Tensor| -> Result<()> {
            assert_eq!(a.dims(), b.dims());
            assert_eq!((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?, 0.0);
            Ok(())
        };
        same(p.upsample2()?.to_nchw()?, x.upsample_nearest2d(10, 14)?)?;
        same(p.pixel_shuffle2()?.to_nchw()?, pixel_shuffle2_nchw(&x)?)?;
        // The padding stays zero.
        let up = p.upsample2()?;
        same(up.t.clone(), Padded::from_nchw(&up.to_nchw()?)?.t)?;
        Ok(())
    }
}
