//! Development aid: one 3×3 convolution on channels-last padded activations by Winograd
//! F(2,3), in GMAC/s of the direct convolution it replaces.
//! `cargo run --release -p tessera-cnn --example winograd_bench`
use std::time::Instant;

use candle_core::{Device, Tensor};
use tessera_cnn::layers::Padded;
use tessera_cnn::winograd::{Activation, WinogradWeights};

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (side, c, o) in [(128usize, 64usize, 64usize), (128, 64, 32), (128, 192, 64), (256, 64, 64), (512, 64, 64)] {
        let x = Padded::from_nchw(&Tensor::rand(0f32, 1f32, (1, c, side, side), &dev)?)?;
        let ww = WinogradWeights::new(&Tensor::rand(-0.1f32, 0.1f32, (o, c, 3, 3), &dev)?, &Tensor::zeros(o, candle_core::DType::F32, &dev)?)?;
        let _ = ww.forward(&x.t, side, side, Activation::None)?;
        let n = 5;
        let t = Instant::now();
        for _ in 0..n {
            let _ = ww.forward(&x.t, side, side, Activation::None)?;
        }
        let s = t.elapsed().as_secs_f64() / n as f64;
        let mac = (side * side * c * o * 9) as f64;
        println!("{side}² {c}→{o}: {:.1} ms, {:.1} GMAC/s direct-equivalent", s * 1e3, mac / s / 1e9);
    }
    Ok(())
}
