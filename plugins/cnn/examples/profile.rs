//! Times each stage of one forward pass of a model-store network (a development aid):
//! `cargo run --release -p tessera-cnn --example profile -- STORE/srgan-pair/srresnet.safetensors 128`
//! `cargo run --release -p tessera-cnn --example profile -- STORE/realesrgan-x4plus/rrdbnet.safetensors 64`
use candle_core::{Device, Tensor};
use tessera_cnn::rrdbnet::RrdbNet;
use tessera_cnn::srresnet::SrResNet;

type Timed = dyn Fn(&Tensor, &mut dyn FnMut(&str, f64)) -> candle_core::Result<Tensor> + Sync;

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::Path::new(&args[1]);
    let side: usize = args.get(2).map_or(128, |s| s.parse().unwrap());
    let forward: Box<Timed> = if path.ends_with("rrdbnet.safetensors") {
        let net = RrdbNet::load_file(path, &Device::Cpu)?;
        Box::new(move |x, f| net.forward_timed(x, f))
    } else {
        let net = SrResNet::load_file(path, &Device::Cpu)?;
        Box::new(move |x, f| net.forward_timed(x, f))
    };
    let status = || std::fs::read_to_string("/proc/self/status").unwrap().lines().filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM")).collect::<Vec<_>>().join(" ");
    println!("after load: {}", status());
    let x = Tensor::rand(0f32, 1f32, (1, 3, side, side), &Device::Cpu)?;
    for run in 0..2 {
        let mut total = 0.0;
        let mut line = Vec::new();
        // On a pool thread, as the engine's tiler runs the networks.
        tessera_cnn::layers::in_pool(|| {
            forward(&x, &mut |name, s| {
                total += s;
                line.push(format!("{name} {:.0} ms", s * 1e3));
            })
        })?;
        println!("run {run}: {:.2} s = {}", total, line.join(", "));
        println!("  {}", status());
    }
    Ok(())
}
