//! Experiment for the next session: a 3×3 convolution on channels-last activations as nine
//! matmuls over contiguous row ranges of the padded pixel matrix, vs candle's conv2d.
use std::time::Instant;

use candle_core::{Device, Tensor, D};

/// x: (H+2)·(W+2) × C, padded, channels-last; w9: nine (C × O) matrices.
/// Returns H·(W+2) × O (two junk columns a row, dropped by the caller).
fn conv_shifted(xp: &Tensor, w9: &[Tensor], h: usize, w: usize) -> candle_core::Result<Tensor> {
    let m = h * (w + 2);
    let mut acc: Option<Tensor> = None;
    for ky in 0..3 {
        for kx in 0..3 {
            let part = xp.narrow(0, ky * (w + 2) + kx, m)?.matmul(&w9[ky * 3 + kx])?;
            acc = Some(match acc { Some(a) => (a + part)?, None => part });
        }
    }
    Ok(acc.unwrap())
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for side in [128usize, 256] {
        let x = Tensor::rand(0f32, 1f32, (1, 64, side, side), &dev)?;
        let wt = Tensor::rand(-0.1f32, 0.1f32, (64, 64, 3, 3), &dev)?;
        let direct = x.conv2d(&wt, 1, 1, 1, 1)?;
        // Channels-last, padded, flattened to pixels × channels (+ one spare row for the last shift).
        let xp = x.pad_with_zeros(2, 1, 2)?.pad_with_zeros(3, 1, 1)?.permute((0, 2, 3, 1))?.contiguous()?
            .reshape(((side + 3) * (side + 2), 64))?;
        let w9: Vec<Tensor> = (0..9).map(|k| wt.narrow(2, k / 3, 1).unwrap().narrow(3, k % 3, 1).unwrap()
            .reshape((64, 64)).unwrap().t().unwrap().contiguous().unwrap()).collect();
        let y = conv_shifted(&xp, &w9, side, side)?;
        let y = y.reshape((side, side + 2, 64))?.narrow(1, 0, side)?.permute((2, 0, 1))?.unsqueeze(0)?;
        let diff = (direct - &y)?.abs()?.flatten_all()?.max(D::Minus1)?.to_scalar::<f32>()?;
        let mac = (side * side * 64 * 64 * 9) as f64;
        let t = Instant::now();
        for _ in 0..5 { let _ = x.conv2d(&wt, 1, 1, 1, 1)?; }
        let a = t.elapsed().as_secs_f64() / 5.0;
        let t = Instant::now();
        for _ in 0..5 { let _ = conv_shifted(&xp, &w9, side, side)?; }
        let b = t.elapsed().as_secs_f64() / 5.0;
        println!("{side}²: conv2d {:.1} GMAC/s, nine shifted matmuls (channels-last) {:.1} GMAC/s, max diff {diff:.1e}", mac / a / 1e9, mac / b / 1e9);
    }
    Ok(())
}
