//! safetensors files (header JSON, offsets, dtypes) as the pisa model store reads them.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("tessera-fuzz-{}.safetensors", std::process::id()));
    std::fs::write(&path, data).unwrap();
    let _ = tessera_pisa_model::weights::Weights::read(&path, &candle_core::Device::Cpu);
});
