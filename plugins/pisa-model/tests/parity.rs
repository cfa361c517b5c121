//! The networks against PyTorch (diffusers + peft) on the small SD2.1-structured models of
//! `tests/fixtures/pisa` (made by `tests/parity/make_pisa_fixtures.py`), loaded the way users'
//! models are: through the importer, from the real release formats.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tessera_pisa_model::nn::Ctx;
use tessera_pisa_model::store::PisaModel;
use tessera_pisa_model::weights::{Precision, Weights};
use tessera_pisa_model::{config, import, unet::UNet};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pisa")
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn imported(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-pisa-parity-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let got = import::import(&fixtures().join("sd21-tiny"), &fixtures().join("pisa_sr_tiny.pkl"), &|_| {}).unwrap();
    for (file, bytes) in &got.files {
        std::fs::write(dir.join(file), bytes).unwrap();
    }
    dir
}

/// Each network's output against PyTorch's: (name, max |Δ|, max |reference|).
fn networks_against_pytorch(precision: Precision) -> Vec<(&'static str, f32, f32)> {
    let r = reference();
    let dir = imported(precision.name());
    let dev = Device::Cpu;
    let model = PisaModel::load(&dir, &dev, precision).unwrap();
    let ctx = Ctx::default();
    let mut out = Vec::new();
    let mut report = |name: &'static str, got: &Tensor, want: &Tensor| {
        let d = max_abs(got, want);
        let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        eprintln!("{:<5} {name:<12} max |Δ| = {d:.2e} ({:.2e} of max |reference| {scale:.2e})", precision.name(), d / scale);
        out.push((name, d, scale));
    };
    report("embedding", &model.embedding, &r["embedding"]);

    let sf = model.vae.config.scaling_factor;
    let z = (model.vae.encode_mean(&r["x_in"], &ctx).unwrap() * sf).unwrap();
    report("z_l", &z, &r["z_l"]);

    // The bare UNet, straight from the folder's file.
    let folder = fixtures().join("sd21-tiny/unet");
    let cfg = config::read_unet(&folder.join("config.json")).unwrap();
    let w = Weights::read(&folder.join("diffusion_pytorch_model.safetensors"), &dev).unwrap().with_precision(precision);
    let bare = UNet::load(&w.root(), None, &cfg).unwrap();
    let eps = bare.forward(&r["z_l"], 1.0, &r["embedding"], &ctx).unwrap();
    report("eps_base", &eps, &r["eps_base"]);

    // ε_pix and ε_full as one batch of two: the semantic LoRA at scale 0, then 1.
    let z2 = Tensor::cat(&[&r["z_l"], &r["z_l"]], 0).unwrap();
    let c2 = model.embedding.repeat((2, 1, 1)).unwrap();
    let ctx2 = Ctx { lora: Some(Tensor::new(&[0f32, 1.0], &dev).unwrap()), ..Ctx::default() };
    let eps2 = model.unet.forward(&z2, 1.0, &c2, &ctx2).unwrap();
    report("eps_pix", &eps2.get(0).unwrap().unsqueeze(0).unwrap(), &r["eps_pix"]);
    report("eps_full", &eps2.get(1).unwrap().unsqueeze(0).unwrap(), &r["eps_full"]);

    let x = model.vae.decode(&(&r["z_l"] / sf).unwrap(), &ctx).unwrap();
    let x = ((x.clamp(-1f32, 1f32).unwrap() * 0.5).unwrap() + 0.5).unwrap().narrow(2, 0, 52).unwrap().narrow(3, 0, 76).unwrap();
    report("x_vae", &x, &r["x_vae"]);
    std::fs::remove_dir_all(&dir).unwrap();
    out
}

#[test]
fn networks_match_pytorch() {
    for (name, d, _) in networks_against_pytorch(Precision::F32) {
        let tol = match name {
            "embedding" => 1e-5,
            "x_vae" => 1e-3,
            _ => 1e-4,
        };
        assert!(d <= tol, "{name}: {d} > {tol}");
    }
}

/// bf16 weights and products: every output within BF16_BOUND of the reference's largest
/// value (PyTorch in f32). The embedding is read, not computed: it stays exact.
#[test]
fn bf16_networks_stay_near_pytorch() {
    for kernel in tessera_kernels::bf16::Kernel::ALL {
        eprintln!("{}: {}", kernel.name(), if kernel.runs_here() { "runs here" } else { "not on this machine" });
    }
    for (name, d, scale) in networks_against_pytorch(Precision::Bf16) {
        let tol = if name == "embedding" { 1e-5 } else { BF16_BOUND * scale };
        assert!(d <= tol, "{name}: {d} > {tol} ({} of the reference's largest value)", d / scale);
    }
}

/// The bound of [`bf16_networks_stay_near_pytorch`], relative to the largest reference value.
const BF16_BOUND: f32 = 5e-2;

/// A small attention budget gives the same result as an unbounded one.
#[test]
fn chunked_attention_equals_whole() {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (2, 37, 32), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (2, 23, 32), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (2, 23, 32), &dev).unwrap();
    let whole = tessera_pisa_model::nn::attention(&q, &k, &v, 4, None, &Ctx::default()).unwrap();
    // One query row per chunk: 2·4·23 f32 scores.
    let tiny = Ctx { attention_bytes: 2 * 4 * 23 * 4, ..Ctx::default() };
    let chunked = tessera_pisa_model::nn::attention(&q, &k, &v, 4, None, &tiny).unwrap();
    assert!(max_abs(&whole, &chunked) < 1e-6);
}

/// A copy of the fixture folder to damage.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn import_error(base: &Path, ckpt: &Path) -> String {
    match import::import(base, ckpt, &|_| {}) {
        Ok(_) => panic!("imported a damaged model"),
        Err(e) => e.to_string(),
    }
}

/// Missing, truncated and mismatched files are errors that name the file and the key or
/// shape expected.
#[test]
fn damaged_files_are_named() {
    let tmp = std::env::temp_dir().join(format!("tessera-pisa-damaged-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let base = tmp.join("sd");
    copy_dir(&fixtures().join("sd21-tiny"), &base);
    let ckpt = fixtures().join("pisa_sr_tiny.pkl");

    let e = import_error(&tmp.join("nowhere"), &ckpt);
    assert!(e.contains("nowhere") && e.contains("no such folder"), "{e}");
    let e = import_error(&base, &tmp.join("none.pkl"));
    assert!(e.contains("none.pkl"), "{e}");

    // A truncated checkpoint.
    let bytes = std::fs::read(&ckpt).unwrap();
    std::fs::write(tmp.join("short.pkl"), &bytes[..bytes.len() / 2]).unwrap();
    let e = import_error(&base, &tmp.join("short.pkl"));
    assert!(e.contains("short.pkl"), "{e}");

    // A truncated UNet.
    let unet = base.join("unet/diffusion_pytorch_model.safetensors");
    let good = std::fs::read(&unet).unwrap();
    std::fs::write(&unet, &good[..good.len() - 1000]).unwrap();
    let e = import_error(&base, &ckpt);
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");

    // A UNet config of other channel counts: the first tensor whose shape differs is named.
    std::fs::write(&unet, &good).unwrap();
    let cfg_path = base.join("unet/config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    json["cross_attention_dim"] = 24.into();
    std::fs::write(&cfg_path, json.to_string()).unwrap();
    let e = import_error(&base, &ckpt);
    assert!(e.contains("attn2.to_k.weight") && e.contains("expected [16, 24]"), "{e}");
    std::fs::write(&cfg_path, &cfg).unwrap();

    // No VAE weights at all.
    std::fs::remove_file(base.join("vae/diffusion_pytorch_model.bin")).unwrap();
    let e = import_error(&base, &ckpt);
    assert!(e.contains("vae") && e.contains("diffusion_pytorch_model.bin"), "{e}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// PiSA-SR's rule picks the 258 modules per family of SD2.1's module tree (94 encoder, 148
/// decoder, 16 mid block), which the small model shares.
#[test]
fn the_lora_rule_picks_sd21s_modules() {
    let folder = fixtures().join("sd21-tiny/unet");
    let w = Weights::read(&folder.join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    let keys: Vec<String> = w.keys().cloned().collect();
    let targets = tessera_pisa_model::checkpoint::target_modules(&keys);
    let count = |g: &str| targets.iter().filter(|m| tessera_pisa_model::checkpoint::group_of(m) == g).count();
    assert_eq!((targets.len(), count("encoder"), count("decoder"), count("others")), (258, 94, 148, 16));
}
