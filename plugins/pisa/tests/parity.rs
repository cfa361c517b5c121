//! The whole pipeline against PyTorch on the small SD2.1-structured model of
//! `tests/fixtures/pisa` (`tests/parity/make_pisa_fixtures.py`): from the 8-bit LR image
//! through the importer's files to the colour-fixed images, at several (λ_pix, λ_sem),
//! including (0, 0) and (1.2, 0.8), on an image whose ×4 is not a multiple of 8.

mod common;

use std::collections::HashMap;

use common::{bound, device, fixtures, import_into, planes_tensor};

use candle_core::{Device, Tensor};
use tessera_pisa::colour::ColourFix;
use tessera_pisa::pipeline::{self, Latents, Pipeline, Planes, Tiling};
use tessera_pisa_model::nn::Ctx;
use tessera_pisa_model::store::PisaModel;
use tessera_protocol::{Layout, SampleType};
use tessera_resample::{Filter, Resampler, Scratch};

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (a.to_device(&Device::Cpu).unwrap(), b.to_device(&Device::Cpu).unwrap());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// The LR fixture upscaled by the engine's bicubic (the base layer's resampler), clamped as
/// the engine's model input is.
fn bicubic() -> Planes {
    let img = image::open(fixtures().join("lr.png")).unwrap().to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let layout = Layout::tight(w as u32, h as u32, 3, SampleType::U8);
    let input = tessera_plugin_abi::pixels::ImageRef::new(layout, img.as_raw());
    let r = Resampler::new(&layout, 4 * w, 4 * h, Filter::Bicubic);
    let (ow, oh) = (4 * w, 4 * h);
    let mut data = vec![0f32; 3 * ow * oh];
    r.band(&input, 0, oh, &mut Scratch::default(), |y, row| {
        for x in 0..ow {
            for ch in 0..3 {
                data[(ch * oh + y) * ow + x] = row[x * 3 + ch].clamp(0.0, 1.0);
            }
        }
    });
    Planes { width: ow, height: oh, data }
}

#[test]
fn pipeline_matches_pytorch_at_every_lambda() {
    let r: HashMap<String, Tensor> = candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu).unwrap();
    let lambdas: Vec<(f64, f64)> = {
        let raw = std::fs::read(fixtures().join("reference.safetensors")).unwrap();
        let header = safetensors_metadata(&raw);
        serde_json::from_str(&header["lambdas"]).unwrap()
    };
    let dir = std::env::temp_dir().join(format!("tessera-pisa-pipeline-{}", std::process::id()));
    import_into(&dir);
    let model = PisaModel::load(&dir, &device(), tessera_pisa_model::weights::Precision::F32).unwrap();
    let pipe = Pipeline { model: &model, ctx: Ctx::default(), tiling: Tiling::untiled() };
    let mut worst: HashMap<&str, f32> = HashMap::new();
    let mut check = |name: &'static str, d: f32, tol: f32| {
        let tol = bound(tol);
        assert!(d <= tol, "{name}: max |Δ| {d:.3e} > {tol:.0e}");
        let w = worst.entry(name).or_insert(0.0);
        *w = w.max(d);
    };

    let bic = bicubic();
    check("bicubic", max_abs(&planes_tensor(&bic), &r["bicubic"]), 1e-4);
    check("x_in", max_abs(&pipeline::model_input(&bic, &device()).unwrap(), &r["x_in"]), 2e-4);
    let z_l = pipe.encode(&bic, &mut |_| Ok(())).unwrap();
    check("z_l", max_abs(&z_l, &r["z_l"]), 1e-4);
    let (eps_pix, eps_full) = pipe.predict(&z_l, true, &mut |_| Ok(())).unwrap();
    check("eps_pix", max_abs(eps_pix.as_ref().unwrap(), &r["eps_pix"]), 1e-4);
    check("eps_full", max_abs(&eps_full, &r["eps_full"]), 1e-4);
    // The one-pass default mode gives ε_full alone.
    let (none, eps_default) = pipe.predict(&z_l, false, &mut |_| Ok(())).unwrap();
    assert!(none.is_none());
    check("eps_default", max_abs(&eps_default, &r["eps_full"]), 1e-4);

    let latents = Latents { width: bic.width, height: bic.height, z_l: z_l.clone(), eps_pix, eps_full };
    for (k, &(lp, ls)) in lambdas.iter().enumerate() {
        let z_h = (&latents.z_l - latents.eps(lp, ls).unwrap()).unwrap();
        check("z_h", max_abs(&z_h, &r[&format!("z_h.{k}")]), 1e-4);
        for (fix, key) in [(ColourFix::None, "x"), (ColourFix::AdaIn, "x_adain"), (ColourFix::Wavelet, "x_wavelet")] {
            let x = pipe.render(&latents, lp, ls, fix, &bic, &mut |_| Ok(())).unwrap();
            let name: &'static str = match fix {
                ColourFix::None => "x",
                ColourFix::AdaIn => "x_adain",
                ColourFix::Wavelet => "x_wavelet",
            };
            check(name, max_abs(&planes_tensor(&x), &r[&format!("{key}.{k}")]), 1e-3);
        }
    }
    let mut names: Vec<_> = worst.into_iter().collect();
    names.sort_by_key(|(n, _)| *n);
    for (n, d) in names {
        eprintln!("parity {n:<12} max |Δ| = {d:.2e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The `__metadata__` of a safetensors file.
fn safetensors_metadata(raw: &[u8]) -> HashMap<String, String> {
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&raw[8..8 + n]).unwrap();
    serde_json::from_value(header["__metadata__"].clone()).unwrap()
}
