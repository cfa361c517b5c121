//! How long PiSA-SR takes at Stable Diffusion 2.1-base's real size on this machine, stage by
//! stage: the networks are built from SD2.1-base's own configs with random weights and random
//! rank-4 LoRA on all 258 modules of both families (the maths and the cost are the weights'
//! shapes, not their values), and the pipeline runs as a job does.
//!
//! cargo run --release -p tessera-pisa --example bench -- [WIDTH HEIGHT] [--default] [--memory-mb N [--vae-norm estimate|exact]]
//!     [--weights DIR [--save FILE]] [--json] [--im2col] [--bf16] [--device cuda:0 [--warm]]
//! (input size in pixels, default 128 128: a 512×512 result)
//!
//! `--weights DIR` takes the UNet and VAE from a diffusers-layout folder (`unet/` and `vae/`,
//! each `config.json` and `diffusion_pytorch_model.safetensors`) and the text embedding from
//! `DIR/embedding.safetensors` (`embedding`, `[1, 77, hidden]`), as `tests/bench/pisa_vs_runtimes.py`
//! writes them for every runtime; the LoRA is then rank 4 with B = 0, so it costs what a real one
//! does and changes nothing, and the results equal the plain networks'. `--save FILE` writes
//! `z_l`, `eps_full` and `x_full` (decoded at λ = (1, 1), before the colour fix) for comparison,
//! `--json` a last line of figures. `--device` runs it on a CUDA card (a build with the `cuda`
//! feature): each stage ends with the card synchronised, and the peak is the card's memory in
//! use at its fullest step (free memory sampled after each step) besides the process's RSS;
//! `--warm` runs the job once untimed first (kernel loading, cuBLAS's start). `--bf16` keeps the
//! layers' weights in bf16 (`Precision::Bf16`: AMX or AVX512_BF16 products on the CPU).

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use tessera_pisa::colour::ColourFix;
use tessera_pisa::budget;
use tessera_pisa::pipeline::{Latents, Pipeline, Planes, Tiling, VaeNorm};
use tessera_pisa_model::checkpoint::{self, PisaLora};
use tessera_pisa_model::config::{UNetConfig, VaeConfig};
use tessera_pisa_model::error::ModelError;
use tessera_pisa_model::nn::Ctx;
use tessera_pisa_model::store::{self, PisaModel};
use tessera_pisa_model::unet::UNet;
use tessera_pisa_model::vae::Vae;
use tessera_pisa_model::weights::{Precision, Weights};

const UNET: &str = r#"{"act_fn": "silu", "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
 "center_input_sample": false, "cross_attention_dim": 1024, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
 "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
 "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "use_linear_projection": true}"#;
const VAE: &str = r#"{"act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
 "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 768, "scaling_factor": 0.18215,
 "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#;

/// Random weights for every tensor `build` asks for: each missing tensor is made with the shape
/// the error names (N(0, 1/fan_in); norms' scales 1) until the network builds.
fn random_weights<T>(dev: &Device, build: impl Fn(&Weights) -> Result<T, ModelError>) -> (Weights, T) {
    let dev = dev.clone();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    loop {
        let w = Weights::new("random", tensors.clone());
        match build(&w) {
            Ok(net) => return (w, net),
            Err(ModelError::Missing { key, expected, .. }) => {
                let fan_in: usize = expected.iter().skip(1).product::<usize>().max(1);
                let t = if key.contains("norm") && key.ends_with("weight") {
                    Tensor::ones(expected.as_slice(), candle_core::DType::F32, &dev)
                } else if key.ends_with("bias") || key.contains("norm") {
                    Tensor::zeros(expected.as_slice(), candle_core::DType::F32, &dev)
                } else {
                    Tensor::randn(0f32, (1.0 / fan_in as f32).sqrt(), expected.as_slice(), &dev)
                };
                tensors.insert(key, t.expect("random tensor"));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn rss_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()).unwrap_or(0.0) / 1024.0
}

/// The folder's networks (its own configs) and embedding.
fn load_folder(dir: &std::path::Path, dev: &Device, precision: Precision) -> (UNetConfig, Weights, Vae, Tensor) {
    let dev = dev.clone();
    let config = |net: &str| std::fs::read_to_string(dir.join(net).join("config.json")).unwrap_or_else(|e| panic!("{}/{net}/config.json: {e}", dir.display()));
    let unet_cfg: UNetConfig = serde_json::from_str(&config("unet")).expect("unet/config.json");
    let vae_cfg: VaeConfig = serde_json::from_str(&config("vae")).expect("vae/config.json");
    let read = |net: &str| Weights::read(&dir.join(net).join("diffusion_pytorch_model.safetensors"), &dev).unwrap_or_else(|e| panic!("{e}"));
    let unet_w = read("unet");
    let vae = Vae::load(&read("vae").with_precision(precision).root(), &vae_cfg).unwrap_or_else(|e| panic!("{e}"));
    let embedding = Weights::read(&dir.join("embedding.safetensors"), &dev).unwrap_or_else(|e| panic!("{e}")).get("embedding").expect("embedding").clone();
    (unet_cfg, unet_w, vae, embedding)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let adjustable = !args.iter().any(|a| a == "--default");
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let memory_mb: Option<usize> = flag("--memory-mb").and_then(|v| v.parse().ok());
    let vae_norm = flag("--vae-norm").map(|v| VaeNorm::parse(&v).expect("vae_norm: estimate, estimate:N or exact")).unwrap_or(VaeNorm::Estimate(1));
    let weights_dir = flag("--weights").map(std::path::PathBuf::from);
    let save = flag("--save");
    let json = args.iter().any(|a| a == "--json");
    let nums: Vec<usize> = args.iter().filter(|a| !a.starts_with("--")).filter(|a| Some(*a) != flag("--memory-mb").as_ref()).filter_map(|a| a.parse().ok()).collect();
    let (w, h) = (nums.first().copied().unwrap_or(128), nums.get(1).copied().unwrap_or(128));
    let dev = tessera_kernels::device::open(&flag("--device").unwrap_or_else(|| "cpu".into())).unwrap_or_else(|e| panic!("{e}"));
    let precision = if args.iter().any(|a| a == "--bf16") { Precision::Bf16 } else { Precision::F32 };
    let t = Instant::now();
    let (unet_cfg, unet_w, vae, embedding) = match &weights_dir {
        Some(dir) => load_folder(dir, &dev, precision),
        None => {
            let unet_cfg: UNetConfig = serde_json::from_str(UNET).unwrap();
            let vae_cfg: VaeConfig = serde_json::from_str(VAE).unwrap();
            let (unet_w, _) = random_weights(&dev, |w| UNet::load(&w.root(), None, &unet_cfg));
            let (vae_w, _) = random_weights(&dev, |w| Vae::load(&w.root(), &vae_cfg));
            let vae = Vae::load(&vae_w.with_precision(precision).root(), &vae_cfg).unwrap();
            (unet_cfg, unet_w, vae, Tensor::randn(0f32, 1.0, (1, 77, 1024), &dev).unwrap())
        }
    };
    let b_scale = if weights_dir.is_some() { 0.0 } else { 0.01 };
    let mut lora_tensors = Vec::new();
    for module in checkpoint::target_modules(&unet_w.used_keys()) {
        let shape = unet_w.get(&format!("{module}.weight")).unwrap().dims().to_vec();
        let mut a = shape.clone();
        a[0] = 4;
        let b: Vec<usize> = if shape.len() == 4 { vec![shape[0], 4, 1, 1] } else { vec![shape[0], 4] };
        let group = checkpoint::group_of(&module);
        for fam in ["pix", "sem"] {
            lora_tensors.push((format!("{module}.lora_A.default_{group}_{fam}.weight"), Tensor::randn(0f32, 0.01, a.as_slice(), &dev).unwrap()));
            let b = (Tensor::randn(0f32, 1.0, b.as_slice(), &dev).unwrap() * b_scale).unwrap();
            lora_tensors.push((format!("{module}.lora_B.default_{group}_{fam}.weight"), b));
        }
    }
    let lora = PisaLora::from_tensors(lora_tensors, "random", &dev).unwrap();
    let unet_w = unet_w.with_precision(precision);
    let unet = store::build_unet(&unet_w, &unet_cfg, lora).unwrap();
    drop(unet_w);
    let model = PisaModel { unet, vae, embedding };
    eprintln!("built SD2.1-base-sized networks with random weights and LoRA in {:.1} s (RSS {:.0} MiB)", t.elapsed().as_secs_f64(), rss_mib("VmRSS:"));

    let (ow, oh) = (4 * w, 4 * h);
    let bicubic = Planes { width: ow, height: oh, data: (0..3 * ow * oh).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect() };
    // Untiled unless given a budget; then tiled as a job with that memory_mb is.
    let (ctx, tiling) = match memory_mb {
        None => (Ctx::default(), Tiling::untiled()),
        Some(mb) => {
            let r = budget::Request { memory_mb: mb, unet_tile: 96, unet_overlap: 32, vae_tile: 0, vae_norm };
            budget::settle(&model.unet.config, &model.vae.config, ow, oh, &r, 256)
        }
    };
    // `--im2col`: every convolution on candle's im2col + GEMM, as before Winograd.
    let ctx = Ctx { winograd: !args.iter().any(|a| a == "--im2col"), ..ctx };
    println!("tiling: {tiling:?}, Winograd convolutions: {}, precision: {}{}", ctx.winograd, precision.name(),
        if precision == Precision::Bf16 && dev.is_cpu() { format!(" ({})", tessera_kernels::bf16::Kernel::best().name()) } else { String::new() });
    let pipe = Pipeline { model: &model, ctx, tiling };
    let (enc_steps, unet_steps, dec_steps) = pipe.tiling.steps(&model.vae, ow, oh);
    println!("steps: encode {enc_steps}, UNet {unet_steps}, decode {dec_steps}");
    // A card's memory in use at its fullest sampled step (its free memory after each step).
    let card_used = |dev: &Device| tessera_kernels::device::memory(dev).map(|(free, total)| (total - free) as f64 / 1048576.0);
    let card_peak = std::cell::Cell::new(card_used(&dev).unwrap_or(0.0));
    // Large layers take hours here: each step's time on stderr tells how far a run has got.
    let progress = |total: usize| {
        let (start, mut done) = (Instant::now(), 0usize);
        let (dev, card_peak) = (&dev, &card_peak);
        move |stage: &'static str| {
            done += 1;
            let t = start.elapsed().as_secs_f64();
            if let Some(used) = card_used(dev) {
                card_peak.set(card_peak.get().max(used));
            }
            eprintln!("  {stage} {done}/{total} at {t:.0} s (RSS {:.0} MiB, peak so far {:.0} MiB)", rss_mib("VmRSS:"), rss_mib("VmHWM:"));
            Ok(())
        }
    };
    let sync = || dev.synchronize().expect("synchronise the device");
    if args.iter().any(|a| a == "--warm") {
        let quiet = &mut |_: &'static str| Ok(());
        let z_l = pipe.encode(&bicubic, quiet).unwrap();
        let (eps_pix, eps_full) = pipe.predict(&z_l, adjustable, quiet).unwrap();
        pipe.render(&Latents { width: ow, height: oh, z_l, eps_pix, eps_full }, 1.0, 1.0, ColourFix::None, &bicubic, quiet).unwrap();
        card_peak.set(card_used(&dev).unwrap_or(0.0));
    }
    // The job's own peak: the high-water mark restarts from here (Linux: clear_refs 5).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = rss_mib("VmRSS:");
    let t = Instant::now();
    let z_l = pipe.encode(&bicubic, &mut progress(enc_steps)).unwrap();
    sync();
    let encode = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (eps_pix, eps_full) = pipe.predict(&z_l, adjustable, &mut progress(unet_steps)).unwrap();
    sync();
    let unet_s = t.elapsed().as_secs_f64();
    let latents = Latents { width: ow, height: oh, z_l, eps_pix, eps_full };
    let t = Instant::now();
    let mut x = pipe.render(&latents, 1.0, 1.0, ColourFix::None, &bicubic, &mut progress(dec_steps)).unwrap();
    let decode = t.elapsed().as_secs_f64();
    let x_raw = save.as_ref().map(|_| x.data.clone());
    let t = Instant::now();
    ColourFix::AdaIn.apply(&mut x, &bicubic);
    let fix = t.elapsed().as_secs_f64();
    let decodes = if adjustable { 2.0 } else { 1.0 };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let on = if dev.is_cpu() { format!("{threads} threads, f32 CPU") } else { format!("f32 on {}", flag("--device").unwrap_or_default()) };
    println!("pisa {w}×{h} → {ow}×{oh}, {} mode, {on}", if adjustable { "adjustable (UNet batch of 2)" } else { "default (one pass)" });
    println!("  encode      {encode:8.2} s");
    println!("  unet        {unet_s:8.2} s");
    println!("  decode      {decode:8.2} s  (×{decodes} per job: x_full and x_pix; an exact render is one)");
    println!("  colour fix  {fix:8.3} s");
    println!("  job total   {:8.2} s", encode + unet_s + decodes * decode + decodes * fix);
    let peak = rss_mib("VmHWM:");
    println!("  peak RSS    {peak:8.0} MiB ({before:.0} MiB before the job: weights; the job's own {:.0} MiB)", peak - before);
    if !dev.is_cpu() {
        println!("  card peak   {:8.0} MiB in use (sampled after each step)", card_peak.get());
    }
    if let (Some(path), Some(x_raw)) = (save, x_raw) {
        let x_full = Tensor::from_vec(x_raw, (1, 3, oh, ow), &dev).unwrap();
        let out: HashMap<String, Tensor> =
            [("z_l".to_string(), latents.z_l.clone()), ("eps_full".to_string(), latents.eps_full.clone()), ("x_full".to_string(), x_full)].into();
        candle_core::safetensors::save(&out, &path).expect("--save");
    }
    if json {
        println!(
            "json: {{\"encode\": {encode:.3}, \"unet\": {unet_s:.3}, \"decode\": {decode:.3}, \"job\": {:.3}, \"peak_mib\": {peak:.0}, \"card_peak_mib\": {:.0}}}",
            encode + unet_s + decodes * decode + decodes * fix,
            card_peak.get()
        );
    }
}
