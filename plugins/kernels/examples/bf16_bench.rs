//! GFLOP/s of the bf16 product against candle's f32 matmul (gemm's AVX-512 kernels) on the
//! UNet's shapes: `cargo run --release -p tessera-kernels --example bf16_bench`.
use std::time::Instant;

use candle_core::{Device, Tensor};
use tessera_kernels::bf16::{self, Bf16Matrix};

fn best_of(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..runs).map(|_| { let t = Instant::now(); f(); t.elapsed().as_secs_f64() }).fold(f64::MAX, f64::min)
}

fn main() -> candle_core::Result<()> {
    println!("bf16 kernel: {}", bf16::Kernel::best().name());
    println!("{:>20} {:>12} {:>12} {:>7}", "m × k × n", "f32 GFLOP/s", "bf16 GFLOP/s", "ratio");
    // The gemm-ceiling shape, then the UNet's linear layers at 64² latent, batch 2 (8192
    // tokens at 320 channels, 2048 at 640, 512 at 1280) and the text/time projections.
    for &(m, k, n) in &[(4096, 1280, 1280), (8192, 320, 320), (8192, 320, 2560), (8192, 1280, 320), (2048, 640, 640), (2048, 640, 5120), (512, 1280, 1280), (512, 5120, 1280), (154, 1024, 320)] {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104729 % 1000) as f32 - 500.0) / 5000.0).collect();
        let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu)?;
        let wt = Tensor::from_slice(&w, (n, k), &Device::Cpu)?;
        let packed = Bf16Matrix::from_rows(&w, n, k);
        let flop = 2.0 * (m * k * n) as f64;
        let runs = (4e10 / flop).clamp(3.0, 20.0) as usize;
        let f32_s = best_of(runs, || { xt.matmul(&wt.t().unwrap()).unwrap(); });
        let bf16_s = best_of(runs, || { bf16::matmul(&x, m, &packed, None); });
        let mut y = vec![0f32; m * n];
        let reuse_s = best_of(runs, || bf16::matmul_into(&x, m, &packed, None, bf16::Kernel::best(), &mut y));
        eprintln!("  into a reused buffer: {:.1} GFLOP/s", flop / reuse_s / 1e9);
        println!("{:>20} {:>12.1} {:>12.1} {:>7.2}", format!("{m}×{k}×{n}"), flop / f32_s / 1e9, flop / bf16_s / 1e9, f32_s / bf16_s);
    }
    Ok(())
}
