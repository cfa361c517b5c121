//! A diffusers `config.json` of the UNet and of the VAE, as the pisa importer reads them.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = tessera_pisa_model::config::parse_unet(text, Path::new("unet/config.json"));
    let _ = tessera_pisa_model::config::parse_vae(text, Path::new("vae/config.json"));
});
