//! A LoRA-adapted SRResNet runs exactly as fast as the base one, because the adapters are
//! merged into the weights at load (AdaptSR):
//! `cargo run --release -p tessera-cnn --example lora_bench -- STORE/srgan-pair/srresnet.safetensors [SIDE]`
//! Builds a rank-4 adapter on every convolution, merges it, and times both networks alternately.
use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use tessera_cnn::lora::LoraAdapter;
use tessera_cnn::srresnet::SrResNet;

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::Path::new(&args[1]);
    let side: usize = args.get(2).map_or(96, |s| s.parse().unwrap());
    let dev = Device::Cpu;
    let weights = candle_core::safetensors::load(path, &dev)?;
    let mut lora = HashMap::new();
    for (key, w) in &weights {
        if let (Some(name), 4) = (key.strip_suffix(".weight"), w.rank()) {
            let (o, i, k, _) = w.dims4()?;
            lora.insert(format!("{name}.lora_A.weight"), Tensor::randn(0f32, 0.01, (4, i, k, k), &dev)?);
            lora.insert(format!("{name}.lora_B.weight"), Tensor::randn(0f32, 0.01, (o, 4, 1, 1), &dev)?);
        }
    }
    let adapter = LoraAdapter::from_tensors(lora)?;
    let base = SrResNet::load_file(path, &dev)?;
    let merged = SrResNet::load_adapted(path, &[(&adapter, 1.0)], &dev)?;
    let x = Tensor::rand(0f32, 1f32, (1, 3, side, side), &dev)?;
    let (mut tb, mut tm) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let t = Instant::now();
        base.forward(&x)?;
        tb = tb.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        merged.forward(&x)?;
        tm = tm.min(t.elapsed().as_secs_f64());
    }
    println!("{} adapted layers, rank 4, input {side}²: base {tb:.3} s, merged {tm:.3} s, ratio {:.3}", adapter.layers.len(), tm / tb);
    Ok(())
}
