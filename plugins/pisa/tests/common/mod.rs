//! What the pisa tests share: the committed small model, imported as the CLI would.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tessera_pisa::pipeline::Planes;

/// `tests/fixtures/pisa`; `TESSERA_PISA_FIXTURES` where the test binary runs on another
/// machine than it was built on (tests/gpu/run.sh).
pub fn fixtures() -> PathBuf {
    match std::env::var_os("TESSERA_PISA_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pisa"),
    }
}

/// The device the tests run the networks on: `TESSERA_TEST_DEVICE` (`cuda:0` in
/// tests/gpu/run.sh, with a build that has the `cuda` feature), else the CPU.
pub fn device() -> Device {
    let spec = std::env::var("TESSERA_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    tessera_kernels::device::open(&spec).unwrap()
}

/// A parity bound on the test device: the CPU's as measured; on a GPU 4× (other summation
/// orders in cuBLAS and the reductions, in f32 throughout).
pub fn bound(cpu: f32) -> f32 {
    if device().is_cpu() { cpu } else { 4.0 * cpu }
}

pub fn planes_tensor(p: &Planes) -> Tensor {
    Tensor::from_vec(p.data.clone(), (1, 3, p.height, p.width), &Device::Cpu).unwrap()
}

/// Imports the small SD2.1-structured model and its PiSA-SR checkpoint into `dir`.
pub fn import_into(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let got = tessera_pisa_model::import::import(&fixtures().join("sd21-tiny"), &fixtures().join("pisa_sr_tiny.pkl"), &|_| {}).unwrap();
    for (file, bytes) in &got.files {
        std::fs::write(dir.join(file), bytes).unwrap();
    }
}

/// The imported small model, loaded (imported once per test binary and process).
pub fn model(name: &str) -> tessera_pisa_model::store::PisaModel {
    let dir = std::env::temp_dir().join(format!("tessera-pisa-{name}-{}", std::process::id()));
    import_into(&dir);
    let m = tessera_pisa_model::store::PisaModel::load(&dir, &device(), tessera_pisa_model::weights::Precision::F32).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    m
}

/// PSNR of `a` against `b`, images in [0, 1].
pub fn psnr(a: &Planes, b: &Planes) -> f64 {
    assert_eq!((a.width, a.height), (b.width, b.height));
    let mse = a.data.iter().zip(&b.data).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.data.len() as f64;
    10.0 * (1.0 / mse.max(1e-20)).log10()
}

/// A test picture of `w × h`: smooth shading, a few hard edges and some texture, in [0, 1].
pub fn picture(w: usize, h: usize) -> Planes {
    let mut data = vec![0f32; 3 * w * h];
    for ch in 0..3 {
        for y in 0..h {
            for x in 0..w {
                let (u, v) = (x as f32 / w as f32, y as f32 / h as f32);
                let disc = ((u - 0.4).powi(2) + (v - 0.55).powi(2)).sqrt() < 0.22;
                let stripes = (((x / 5) + (y / 7)) % 2) as f32 * 0.15 * (u > 0.7) as u8 as f32;
                let base = 0.2 + 0.5 * u * (1.0 - v) + 0.1 * ch as f32 * v;
                data[(ch * h + y) * w + x] = (if disc { 0.85 - 0.2 * ch as f32 } else { base } + stripes).clamp(0.0, 1.0);
            }
        }
    }
    Planes { width: w, height: h, data }
}
