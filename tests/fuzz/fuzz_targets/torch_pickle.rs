//! Torch checkpoints: the `.pth` reader of the cnn importer (zip or legacy pickle) and the
//! PiSA-SR `pisa_sr.pkl` reader (which takes a file, as users give it).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let _ = tessera_host::models::convert::rrdbnet_pth(data);
    let mut f = tempfile();
    f.1.write_all(data).unwrap();
    let _ = tessera_pisa_model::checkpoint::PisaLora::read(&f.0, &candle_core::Device::Cpu);
});

fn tempfile() -> (std::path::PathBuf, std::fs::File) {
    let path = std::env::temp_dir().join(format!("tessera-fuzz-{}.pkl", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    (path, file)
}
