//! An ncnn `.param` text and `.bin` weights, as the Real-ESRGAN importer reads them.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte splits the input into the two files.
    let Some((&cut, rest)) = data.split_first() else { return };
    let at = (cut as usize * rest.len()) / 255;
    let (param, bin) = rest.split_at(at);
    let _ = tessera_host::models::ncnn::rrdbnet(param, bin);
});
