//! The Keras HDF5 weights the srgan-pair importer reads.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tessera_host::models::convert::srgan_h5(data);
});
