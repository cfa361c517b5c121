//! `tessera models import pisa`: an SD2.1-base folder in diffusers layout and a PiSA-SR
//! checkpoint become the files of [`crate::store`], after every key and shape was checked
//! against the folder's configs and the empty prompt was encoded by the folder's own text
//! encoder. Nothing is written here: the caller installs the files all or nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::checkpoint::{self, PisaLora};
use crate::clip::ClipText;
use crate::config;
use crate::error::{ModelError, Result};
use crate::store;
use crate::unet::UNet;
use crate::vae::{self, Vae};
use crate::weights::Weights;

/// What an import produced: the store's files, and a line for people about what was checked.
pub struct Imported {
    pub files: Vec<(String, Vec<u8>)>,
    pub summary: String,
}

/// The first of `names` that exists in `dir`, else an error listing them.
fn find(dir: &Path, names: &[&str], what: &str) -> Result<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file()).ok_or_else(|| ModelError::File {
        path: dir.to_path_buf(),
        why: format!("no {what} here (looked for {}); is this a Stable Diffusion 2.1-base folder in diffusers layout?", names.join(", ")),
    })
}

const DIFFUSERS_WEIGHTS: [&str; 3] = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin"];

/// A token's id in the tokenizer's `vocab.json`; the token is named in `tokenizer_config.json`
/// or `special_tokens_map.json` (as a string or `{"content": …}`), else `default`.
fn special_token(dir: &Path, vocab: &HashMap<String, u32>, name: &str, default: &str) -> Result<u32> {
    let mut token = default.to_string();
    for file in ["special_tokens_map.json", "tokenizer_config.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(file)) else { continue };
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config { path: dir.join(file), why: e.to_string() })?;
        match &json[name] {
            serde_json::Value::String(s) => token = s.clone(),
            v if v["content"].is_string() => token = v["content"].as_str().unwrap_or_default().to_string(),
            _ => {}
        }
    }
    vocab.get(&token).copied().ok_or_else(|| ModelError::Config { path: dir.join("vocab.json"), why: format!("the {name} `{token}` is not in the vocabulary") })
}

/// The token ids of the empty prompt, as CLIPTokenizer pads it to the model's length:
/// start, end, then the pad token (SD2.1's `!`, id 0).
pub fn empty_prompt_ids(tokenizer_dir: &Path, max_length: usize) -> Result<Vec<u32>> {
    let vocab_path = tokenizer_dir.join("vocab.json");
    let text = std::fs::read_to_string(&vocab_path).map_err(|e| ModelError::File { path: vocab_path.clone(), why: format!("{e} (the CLIP tokenizer's vocabulary)") })?;
    let vocab: HashMap<String, u32> = serde_json::from_str(&text).map_err(|e| ModelError::Config { path: vocab_path.clone(), why: e.to_string() })?;
    let bos = special_token(tokenizer_dir, &vocab, "bos_token", "<|startoftext|>")?;
    let eos = special_token(tokenizer_dir, &vocab, "eos_token", "<|endoftext|>")?;
    let pad = special_token(tokenizer_dir, &vocab, "pad_token", "<|endoftext|>")?;
    let mut ids = vec![bos, eos];
    ids.resize(max_length.max(2), pad);
    Ok(ids)
}

/// Checks and converts `base` (unet/, vae/, text_encoder/, tokenizer/) and `checkpoint`.
pub fn import(base: &Path, checkpoint: &Path, progress: &dyn Fn(&str)) -> Result<Imported> {
    let device = Device::Cpu;
    if !base.is_dir() {
        return Err(ModelError::File { path: base.to_path_buf(), why: "no such folder (the Stable Diffusion 2.1-base folder in diffusers layout)".into() });
    }
    progress(&format!("reading the LoRA checkpoint {}", checkpoint.display()));
    let lora = PisaLora::read(checkpoint, &device)?;
    let (rank_pix, rank_sem) = lora.ranks();

    progress("checking the UNet");
    let unet_config_path = base.join("unet/config.json");
    let unet_config = config::read_unet(&unet_config_path)?;
    let unet_file = find(&base.join("unet"), &DIFFUSERS_WEIGHTS, "UNet weights")?;
    let unet_weights = Weights::read(&unet_file, &device)?;
    // The bare UNet first: every tensor in the file, each of the shape its config implies.
    UNet::load(&unet_weights.root(), None, &unet_config)?;
    unet_weights.check_all_used(|_| false, "UNet")?;
    let ckpt_name = checkpoint.display().to_string();
    lora.check_targets(&unet_weights.used_keys(), &ckpt_name)?;
    let modules = lora.pix.layers.len();
    let lora_bytes = store::to_safetensors(&store::lora_tensors(&lora), HashMap::from([("lora_alpha".into(), checkpoint::LORA_ALPHA.to_string())]))?;
    // Then with both families, as a job builds it: every adapter fits its layer.
    let unet = store::build_unet(&Weights::new(unet_weights.file.clone(), unet_weights_clone(&unet_weights)), &unet_config, lora)?;
    drop(unet);

    progress("checking the VAE");
    let vae_config_path = base.join("vae/config.json");
    let vae_config = config::read_vae(&vae_config_path)?;
    let vae_file = find(&base.join("vae"), &DIFFUSERS_WEIGHTS, "VAE weights")?;
    let mut vae_weights = Weights::read(&vae_file, &device)?;
    vae::rename_legacy_attention(&mut vae_weights);
    Vae::load(&vae_weights.root(), &vae_config)?;
    vae_weights.check_all_used(|_| false, "VAE")?;

    progress("encoding the empty prompt");
    let clip_config = config::read_clip(&base.join("text_encoder/config.json"))?;
    if clip_config.hidden_size != unet_config.cross_attention_dim {
        return Err(ModelError::Config {
            path: base.join("text_encoder/config.json"),
            why: format!("hidden_size {} differs from the UNet's cross_attention_dim {}", clip_config.hidden_size, unet_config.cross_attention_dim),
        });
    }
    let clip_file = find(&base.join("text_encoder"), &["model.safetensors", "model.fp16.safetensors", "pytorch_model.bin"], "text encoder weights")?;
    let clip_weights = Weights::read(&clip_file, &device)?;
    let clip = ClipText::load(&clip_weights.root(), &clip_config)?;
    // Checkpoints of some transformers versions carry the position ids buffer; it is 0..n.
    clip_weights.check_all_used(|k| k.ends_with("position_ids"), "text encoder")?;
    let ids = empty_prompt_ids(&base.join("tokenizer"), clip_config.max_position_embeddings.min(77))?;
    let embedding = clip.forward(&ids, &device)?;

    let json = |path: &Path| std::fs::read(path).map_err(|e| ModelError::File { path: path.to_path_buf(), why: e.to_string() });
    let files = vec![
        (store::UNET_CONFIG.to_string(), json(&unet_config_path)?),
        (store::UNET.to_string(), store::to_safetensors(&unet_weights.into_tensors(), HashMap::new())?),
        (store::VAE_CONFIG.to_string(), json(&vae_config_path)?),
        (store::VAE.to_string(), store::to_safetensors(&vae_weights.into_tensors(), HashMap::new())?),
        (store::LORA.to_string(), lora_bytes),
        (store::EMBEDDING.to_string(), store::to_safetensors(&HashMap::from([(store::EMPTY_PROMPT.to_string(), embedding)]), HashMap::new())?),
    ];
    let summary = format!(
        "UNet {} channels, VAE {} channels, {modules} LoRA modules per family (pixel rank {rank_pix}, semantic rank {rank_sem}), empty prompt {}×{}",
        fmt_list(&unet_config.block_out_channels),
        fmt_list(&vae_config.block_out_channels),
        ids.len(),
        clip_config.hidden_size
    );
    Ok(Imported { files, summary })
}

fn unet_weights_clone(w: &Weights) -> HashMap<String, Tensor> {
    w.keys().filter_map(|k| w.get(k).map(|t| (k.clone(), t.clone()))).collect()
}

fn fmt_list(v: &[usize]) -> String {
    v.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("/")
}
