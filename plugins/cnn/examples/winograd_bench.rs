//! Development aid: one 3×3 convolution on channels-last padded activations by Winograd
//! F(2,3), in GMAC/s of the direct convolution it replaces.
//! `cargo run --release -p tessera-cnn --example winograd_bench`
use std::time::Instant;

use candle_core::{Device, Tensor};
use tessera_cnn::layers::Padded;
use tessera_cnn::winograd::{Activation, Winograd};

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (side, c, o) in [(128usize, 64usize, 32usize), (256, 64, 32), (128, 192, 64), (256, 192, 64), (128, 64, 64), (256, 64, 64)] {
        let x = Padded::from_nchw(&Tensor::rand(0f32, 1f32, (1, c, side, side), &dev)?)?;
        let wt = Tensor::rand(-0.1f32, 0.1f32, (o, c, 3, 3), &dev)?;
        let b = Tensor::zeros(o, candle_core::DType::F32, &dev)?;
        let f2 = Winograd::f2(&wt, &b)?;
        let f4 = Winograd::f4(&wt, &b)?;
        let mac = (side * side * c * o * 9) as f64;
        let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<f64> {
            f()?;
            let t = Instant::now();
            for _ in 0..5 {
                f()?;
            }
            Ok(t.elapsed().as_secs_f64() / 5.0)
        };
        let s2 = time(&|| f2.forward(&x.t, side, side, Activation::None))?;
        let s4 = time(&|| f4.forward(&x.t, side, side, Activation::None))?;
        println!(
            "{side}² {c}→{o}: F(2,3) {:.1} ms = {:.0} GMAC/s, F(4,3) {:.1} ms = {:.0} GMAC/s (direct-equivalent)",
            s2 * 1e3,
            mac / s2 / 1e9,
            s4 * 1e3,
            mac / s4 / 1e9
        );
    }
    Ok(())
}
