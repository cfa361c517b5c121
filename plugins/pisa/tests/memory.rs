//! A job's peak memory follows its budget, not its size: on the small model, a 512 × 384 job
//! with a budget of 48 MiB stays within the budget plus its images, where the same job
//! untiled takes several times more. (One test in its own binary: the process's high-water
//! mark is this test's.)

mod common;

use common::{model, picture};
use tessera_pisa::budget::{self, Request};
use tessera_pisa::colour::ColourFix;
use tessera_pisa::pipeline::{Latents, Pipeline, Planes, Tiling, VaeNorm};
use tessera_pisa_model::nn::Ctx;
use tessera_pisa_model::store::PisaModel;

fn kib(field: &str) -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap()
}

/// Resets the high-water mark to the current RSS (Linux: writing 5 to clear_refs).
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

fn job(m: &PisaModel, bic: &Planes, ctx: Ctx, tiling: Tiling) {
    let pipe = Pipeline { model: m, ctx, tiling };
    let mut none = |_| Ok(());
    let z = pipe.encode(bic, &mut none).unwrap();
    let (pix, full) = pipe.predict(&z, true, &mut none).unwrap();
    let l = Latents { width: bic.width, height: bic.height, z_l: z, eps_pix: pix, eps_full: full };
    for (lp, ls) in [(1.0, 1.0), (1.0, 0.0)] {
        pipe.render(&l, lp, ls, ColourFix::AdaIn, bic, &mut none).unwrap();
    }
}

#[test]
fn peak_memory_follows_the_budget_not_the_image() {
    let m = model("memory");
    // Warm up threads and allocator pools on a small job.
    job(&m, &picture(64, 48), Ctx::default(), Tiling::untiled());
    let bic = picture(512, 384);
    let memory_mb = 48;
    let r = Request { memory_mb, unet_tile: 96, unet_overlap: 32, vae_tile: 0, vae_norm: VaeNorm::Estimate(1) };
    let (ctx, tiling) = budget::settle(&m.unet.config, &m.vae.config, bic.width, bic.height, &r, 256);
    assert!(tiling.decoder_tile > 0 && tiling.encoder_tile > 0, "{tiling:?}");

    let images = 100 * bic.width * bic.height; // bicubic, decoded pictures and their copies
    reset_peak();
    let before = kib("VmRSS:");
    job(&m, &bic, ctx, tiling.clone());
    let tiled = (kib("VmHWM:") - before) << 10;

    reset_peak();
    let before = kib("VmRSS:");
    job(&m, &bic, Ctx::default(), Tiling::untiled());
    let whole = (kib("VmHWM:") - before) << 10;

    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    eprintln!("512×384 on the small model: tiled ({tiling:?}) peak +{:.1} MiB for a budget of {memory_mb} MiB and {:.1} MiB of images; untiled +{:.1} MiB", mib(tiled), mib(images), mib(whole));
    assert!(tiled <= (memory_mb << 20) + images, "tiled peak {:.1} MiB over the budget", mib(tiled));
    assert!(whole > 2 * tiled, "untiled {:.1} MiB, tiled {:.1} MiB: the budget made no difference", mib(whole), mib(tiled));
}
