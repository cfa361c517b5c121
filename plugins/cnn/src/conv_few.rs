//! A large k×k convolution to a handful of outputs (SRResNet's final 9×9, 64 → 3 at the
//! output resolution) as a wide GEMM. Per output pixel it is a dot product k²·C long with only
//! O = 3 results, which no GEMM blocks well (im2col ran it at 0.8 GMAC/s, per-pixel dot
//! products at 18). Turned around, every *input* pixel's C channels multiply a C × k²·O matrix
//! (a GEMM k²·O = 243 columns wide), and the k²·O products are then added into the k² output
//! pixels they belong to, k²·O additions an input pixel against k²·O·C multiplications.
//!
//! Input rows come from a callback, so the network's last pixel shuffle happens as the rows
//! are read and the shuffled image, the largest activation in the network, never exists.

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use crate::layers::{Conv, Padded};

pub struct ConvFew {
    /// C × k²·O, row-major: `taps[c][(ky·k + kx)·O + o]`.
    taps: Vec<f32>,
    bias: Vec<f32>,
    k: usize,
    c: usize,
    o: usize,
}

/// Output columns per step: a step's products (k²·O × (COLS + k − 1)) stay in L2.
const COLS: usize = 256;

impl ConvFew {
    pub fn new(conv: &Conv) -> Result<ConvFew> {
        let (o, c, k, _) = conv.weight.dims4()?;
        let taps = conv.weight.permute((1, 2, 3, 0))?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        Ok(ConvFew { taps, bias: conv.bias.flatten_all()?.to_vec1::<f32>()?, k, c, o })
    }

    /// (h, w, C) → (1, O, h, w), zero padding of k/2 (the networks use `forward_shuffled`).
    #[cfg(test)]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (h, w, c) = x.dims3()?;
        if c != self.c {
            candle_core::bail!("ConvFew expects {} channels, got {c}", self.c);
        }
        crate::winograd::with_slice(x, |x| {
            self.run(h, w, |y, x0, dst: &mut [f32]| dst.copy_from_slice(&x[(y * w + x0) * c..][..dst.len()]))
        })?
    }

    /// The convolution of `pre.pixel_shuffle2()` (torch's order: sub-pixel (dy, dx) of channel
    /// c is pre-shuffle channel `c·4 + dy·2 + dx`), reading `pre` directly: (1, O, 2h, 2w).
    pub fn forward_shuffled(&self, pre: &Padded) -> Result<Tensor> {
        let (h, w, c) = (pre.h, pre.w, self.c);
        if pre.t.dim(1)? != 4 * c {
            candle_core::bail!("ConvFew expects {} channels before the shuffle, got {}", 4 * c, pre.t.dim(1)?);
        }
        crate::winograd::with_slice(&pre.t, |p| {
            self.run(2 * h, 2 * w, |y, x0, dst: &mut [f32]| {
                let (i, dy) = (y / 2, y % 2);
                let row = &p[((i + 1) * (w + 2) + 1) * 4 * c..];
                for (n, px) in dst.chunks_exact_mut(c).enumerate() {
                    let (j, dx) = ((x0 + n) / 2, (x0 + n) % 2);
                    let src = &row[j * 4 * c..][..4 * c];
                    for (ch, v) in px.iter_mut().enumerate() {
                        *v = src[ch * 4 + dy * 2 + dx];
                    }
                }
            })
        })?
    }

    /// The convolution of padded channels-last activations: (1, O, h, w). RRDBNet's last
    /// convolution (3×3, 64 → 3 at the output resolution) took 3 of 16 lanes on Winograd.
    pub fn forward_padded(&self, x: &Padded) -> Result<Tensor> {
        let (h, w, c) = (x.h, x.w, self.c);
        if x.t.dim(1)? != c {
            candle_core::bail!("ConvFew expects {c} channels, got {}", x.t.dim(1)?);
        }
        crate::winograd::with_slice(&x.t, |p| {
            self.run(h, w, |y, x0, dst: &mut [f32]| dst.copy_from_slice(&p[((y + 1) * (w + 2) + 1 + x0) * c..][..dst.len()]))
        })?
    }

    /// Runs over an h×w image whose row `y`, columns `x0..x0 + n`, `read(y, x0, dst)` writes
    /// into `dst` (n·C values, channels-last). Threads take strips of output rows.
    fn run(&self, h: usize, w: usize, read: impl Fn(usize, usize, &mut [f32]) + Sync) -> Result<Tensor> {
        let (k, c, o, p) = (self.k, self.c, self.o, self.k / 2);
        let strip = (h / (4 * rayon::current_num_threads())).clamp(8, 128);
        let taps_n = k * k * o;
        // Output rows × O planes × w: a strip is one contiguous chunk.
        let mut out = vec![0f32; h * o * w];
        out.par_chunks_mut(strip * o * w).enumerate().for_each(|(s, chunk)| {
            let (y0, rows) = (s * strip, chunk.len() / (o * w));
            for (r, plane) in chunk.chunks_exact_mut(w).enumerate() {
                plane.fill(self.bias[r % o]);
            }
            let mut input = vec![0f32; (COLS + k - 1) * c];
            let mut prods = vec![0f32; taps_n * (COLS + k - 1)];
            for x0 in (0..w).step_by(COLS) {
                let cols = COLS.min(w - x0);
                // Input columns x0 − p .. x0 + cols + p, the ones outside the image zero.
                let (lo, hi) = (x0.saturating_sub(p), (x0 + cols + p).min(w));
                let (skip, span) = (lo + p - x0, cols + k - 1);
                let input = &mut input[..span * c];
                input.fill(0.0);
                let prods = &mut prods[..taps_n * span];
                for y in y0.saturating_sub(p)..(y0 + rows + p).min(h) {
                    read(y, lo, &mut input[skip * c..(skip + hi - lo) * c]);
                    // prods[(tap, o)][n] = Σ_c input[n][c]·taps[c][(tap, o)], column-major.
                    crate::winograd::matmul_to(input, c, &self.taps, prods, (span, c, taps_n), (1, span));
                    for ky in 0..k {
                        // Output row y + p − ky reads this input row through kernel row ky.
                        let Some(r) = (y + p).checked_sub(ky + y0).filter(|&r| r < rows) else { continue };
                        let plane = &mut chunk[r * o * w..(r + 1) * o * w];
                        add_taps(plane, prods, (ky * k) * o * span, span, x0, cols, w, k, o);
                    }
                }
            }
        });
        Tensor::from_vec(out, (h, o, w), &Device::Cpu)?.permute((1, 0, 2))?.unsqueeze(0)?.contiguous()
    }
}

multiversion! {
    /// Adds the products of kernel row `ky` (from `prods[first..]`: k·O rows of `span`) into
    /// one output row's O planes of `w` (`plane`), columns `x0 .. x0 + cols`.
    #[allow(clippy::too_many_arguments)]
    fn add_taps(plane: &mut [f32], prods: &[f32], first: usize, span: usize, x0: usize, cols: usize, w: usize, k: usize, o: usize) {
        for oc in 0..o {
            let acc = &mut plane[oc * w + x0..][..cols];
            for kx in 0..k {
                let src = &prods[first + (kx * o + oc) * span + kx..][..cols];
                for (a, s) in acc.iter_mut().zip(src) {
                    *a += s;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> Result<(f32, f32)> {
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        Ok((diff, scale))
    }

    #[test]
    fn equals_the_direct_convolution() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1f32, (3, 20, 9, 9), &dev)?;
        let b = Tensor::randn(0f32, 1f32, (3,), &dev)?;
        let conv = Conv::new(w, b)?;
        // Wider than a column step, and narrower than the kernel.
        for (h, wd) in [(13, 17), (40, 300), (3, 2)] {
            let x = Tensor::randn(0f32, 1f32, (1, 20, h, wd), &dev)?;
            let fast = ConvFew::new(&conv)?.forward(&x.squeeze(0)?.permute((1, 2, 0))?)?;
            // Sums of 1620 products of N(0, 1) values: compare relative to the largest output.
            let (diff, scale) = max_rel_diff(&fast, &conv.forward(&x)?)?;
            assert!(diff < 1e-5 * scale, "{h}×{wd}: {diff} of {scale}");
        }
        Ok(())
    }

    #[test]
    fn reads_padded_activations() -> Result<()> {
        let dev = Device::Cpu;
        let conv = Conv::new(Tensor::randn(0f32, 1f32, (3, 16, 3, 3), &dev)?, Tensor::randn(0f32, 1f32, (3,), &dev)?)?;
        let x = Tensor::randn(0f32, 1f32, (1, 16, 9, 300), &dev)?;
        let fast = ConvFew::new(&conv)?.forward_padded(&Padded::from_nchw(&x)?)?;
        let (diff, scale) = max_rel_diff(&fast, &conv.forward(&x)?)?;
        assert!(diff < 1e-5 * scale, "{diff} of {scale}");
        Ok(())
    }

    #[test]
    fn reads_through_the_pixel_shuffle() -> Result<()> {
        let dev = Device::Cpu;
        let conv = Conv::new(Tensor::randn(0f32, 1f32, (3, 8, 9, 9), &dev)?, Tensor::randn(0f32, 1f32, (3,), &dev)?)?;
        let pre = Padded::from_nchw(&Tensor::randn(0f32, 1f32, (1, 32, 11, 70), &dev)?)?;
        let fast = ConvFew::new(&conv)?.forward_shuffled(&pre)?;
        let direct = conv.forward(&crate::layers::tests::pixel_shuffle2_nchw(&pre.to_nchw()?)?)?;
        let (diff, scale) = max_rel_diff(&fast, &direct)?;
        assert!(diff < 1e-5 * scale, "{diff} of {scale}");
        Ok(())
    }
}
