//! 3×3 convolutions (stride 1, padding 1) of NCHW activations by Winograd F(4,3).
//!
//! candle's conv2d unfolds its input (im2col, 9 values per input channel and pixel) and runs
//! one GEMM: 9 multiplies per output and tap, about 70 GFLOP/s on this machine's two cores.
//! F(4,3) takes 36 products per 16 outputs (4× fewer) on cache-sized blocks. The activations
//! are copied channels-last into a zero-padded band of rows (one row of context above and
//! below), convolved, and copied back; bands keep those copies within a byte budget, and give
//! the same result as the whole (each output row sees the same three input rows).

use rayon::prelude::*;

use crate::winograd::{Activation, Winograd};

/// Channels copied back together: one cache line of the channels-last output.
const GROUP: usize = 16;

/// Rows of a band whose channels-last input and output take at most `bytes` (a multiple of
/// F(4,3)'s tile side, at least one tile row).
fn band_rows(h: usize, w: usize, c: usize, o: usize, bytes: usize) -> usize {
    let row = (w + 2) * (c + o) * std::mem::size_of::<f32>();
    let rows = (bytes / row.max(1)).saturating_sub(4) / 4 * 4;
    rows.clamp(4, h.next_multiple_of(4))
}

/// `conv3x3(x) + bias` of one C×H×W image `x` with `conv`'s weights, as O×H×W.
pub fn conv3x3(conv: &Winograd, x: &[f32], h: usize, w: usize, bytes: usize) -> Vec<f32> {
    let (c, o) = (conv.in_channels(), conv.out_channels());
    assert_eq!(x.len(), c * h * w, "the input does not match the convolution");
    let pw = w + 2;
    let rows = band_rows(h, w, c, o, bytes);
    let mut out = vec![0f32; o * h * w];
    let mut padded = Vec::new();
    for r0 in (0..h).step_by(rows) {
        let bh = rows.min(h - r0);
        // Padded row py holds input row r0 + py − 1: rows 0 and bh + 1 are the band's context
        // (zeros outside the image), row bh + 2 the layout's spare row.
        padded.clear();
        padded.resize((bh + 3) * pw * c, 0.0);
        padded.par_chunks_mut(pw * c).take(bh + 2).enumerate().for_each(|(py, dst)| {
            let Some(y) = (r0 + py).checked_sub(1).filter(|&y| y < h) else { return };
            for ch in 0..c {
                for (i, v) in x[(ch * h + y) * w..][..w].iter().enumerate() {
                    dst[(i + 1) * c + ch] = *v;
                }
            }
        });
        let y = conv.forward_slice(&padded, c, bh, w, Activation::None);
        out.par_chunks_mut(GROUP * h * w).enumerate().for_each(|(g, planes)| {
            let o0 = g * GROUP;
            let n = planes.len() / (h * w);
            for row in 0..bh {
                let src = &y[((row + 1) * pw + 1) * o..][..w * o];
                let at = (r0 + row) * w;
                for i in 0..w {
                    for (k, v) in src[i * o + o0..][..n].iter().enumerate() {
                        planes[k * h * w + at + i] = *v;
                    }
                }
            }
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn bands_equal_candles_convolution() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (c, o, h, w) in [(5, 7, 9, 13), (20, 18, 17, 6), (3, 33, 4, 4), (8, 4, 1, 3)] {
            let x = Tensor::randn(0f32, 1f32, (1, c, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1f32, (o, c, 3, 3), &dev)?;
            let b = Tensor::randn(0f32, 1f32, (o,), &dev)?;
            let want = x.conv2d(&wt, 1, 1, 1, 1)?.broadcast_add(&b.reshape((1, o, 1, 1))?)?.flatten_all()?.to_vec1::<f32>()?;
            let conv = Winograd::f4_from_oihw(&wt.flatten_all()?.to_vec1()?, b.to_vec1()?, o, c);
            let xs = x.flatten_all()?.to_vec1::<f32>()?;
            // One band, bands of one tile row, and in between.
            for bytes in [usize::MAX, 1, (w + 2) * (c + o) * 4 * 9] {
                let got = conv3x3(&conv, &xs, h, w, bytes);
                let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                // F(4,3) is a digit less precise than the direct sum: relative to the outputs'
                // size, as the Winograd module's own tests bound it.
                let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                assert!(diff < 4e-5 * scale, "{c}→{o} at {h}×{w}, {bytes} bytes: {diff} of {scale}");
            }
        }
        Ok(())
    }
}
