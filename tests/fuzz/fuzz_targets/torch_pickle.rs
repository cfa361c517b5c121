//! Torch checkpoints: the `.pth` reader of the cnn importer (zip or legacy pickle) and the
//! PiSA-SR `pisa_sr.pkl` reader (which takes a file, as users give it).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::sync::Once;

static CONTAINED_PANICS: Once = Once::new();

fuzz_target!(|data: &[u8]| {
    // libFuzzer's hook aborts on every panic, even one caught. tessera_pisa_model::torch::read
    // catches those of candle's pickle reader (it indexes tuples as torch writes them) and
    // returns them as errors, so those alone go on to be caught; any other panic still aborts.
    CONTAINED_PANICS.call_once(|| {
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_candle_pickle = info.location().is_some_and(|l| l.file().contains("candle-core") && l.file().ends_with("pickle.rs"));
            if !in_candle_pickle {
                abort(info);
            }
        }));
    });
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
