//! Development check: RRDBNet from the model store against the ncnn fixture, unclamped.
//! `cargo run --release -p tessera-cnn --example rrdb_parity -- STORE tests/fixtures/realesrgan_ncnn.npz`
use candle_core::{DType, Device, Tensor};
use tessera_cnn::rrdbnet::RrdbNet;

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let store = std::path::Path::new(&args[1]);
    let fixtures: std::collections::HashMap<String, Tensor> = Tensor::read_npz(&args[2])?.into_iter().collect();
    for (model, prefix) in [("realesrgan-x4plus", "x4plus"), ("realesrgan-x4plus-anime", "anime")] {
        let net = RrdbNet::load_file(&store.join(model).join("rrdbnet.safetensors"), &Device::Cpu)?;
        for input in ["cat", "noise"] {
            let x = (fixtures[&format!("input_{input}")].to_dtype(DType::F32)? / 255.0)?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?;
            let y = net.forward(&x)?.squeeze(0)?.permute((1, 2, 0))?;
            let want = &fixtures[&format!("{prefix}_{input}")];
            let diff = (y - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            println!("{model} {input}: max |candle − ncnn| = {diff:.2e}");
        }
    }
    Ok(())
}
