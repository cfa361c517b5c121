//! Times each stage of one SRResNet forward pass (a development aid):
//! `cargo run --release -p tessera-cnn --example profile -- STORE/srgan-pair/srresnet.safetensors 128`
use candle_core::{Device, Tensor};
use tessera_cnn::srresnet::SrResNet;

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let side: usize = args.get(2).map_or(128, |s| s.parse().unwrap());
    let net = SrResNet::load_file(std::path::Path::new(&args[1]), &Device::Cpu)?;
    let x = Tensor::rand(0f32, 1f32, (1, 3, side, side), &Device::Cpu)?;
    for run in 0..2 {
        let mut total = 0.0;
        let mut line = Vec::new();
        net.forward_timed(&x, &mut |name, s| {
            total += s;
            line.push(format!("{name} {:.0} ms", s * 1e3));
        })?;
        println!("run {run}: {:.2} s = {}", total, line.join(", "));
    }
    Ok(())
}
