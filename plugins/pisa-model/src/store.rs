//! The files an imported PiSA-SR model keeps in the model store, and loading them into the
//! networks a job runs: the UNet with the pixel LoRA merged and the semantic LoRA kept for run
//! time, the VAE, and the empty-prompt embedding.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};

use crate::checkpoint::PisaLora;
use crate::config::{self, UNetConfig, VaeConfig};
use crate::error::{ModelError, Result};
use crate::nn::LoraPlan;
use crate::unet::UNet;
use crate::vae::{self, Vae};
use crate::weights::{Precision, Weights};

pub const UNET_CONFIG: &str = "unet.json";
pub const UNET: &str = "unet.safetensors";
pub const VAE_CONFIG: &str = "vae.json";
pub const VAE: &str = "vae.safetensors";
pub const LORA: &str = "lora.safetensors";
pub const EMBEDDING: &str = "embedding.safetensors";
/// The key of the empty prompt's `[1, tokens, hidden]` embedding in [`EMBEDDING`].
pub const EMPTY_PROMPT: &str = "empty_prompt";

/// Every file of an imported model, in the order the importer writes them.
pub const FILES: [&str; 6] = [UNET_CONFIG, UNET, VAE_CONFIG, VAE, LORA, EMBEDDING];

/// f32 tensors as safetensors bytes, keys sorted, with `metadata` in the header.
pub fn to_safetensors(tensors: &HashMap<String, Tensor>, metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    let mut data = Vec::with_capacity(keys.len());
    for k in keys {
        let t = &tensors[k];
        let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        data.push((k.clone(), t.dims().to_vec(), bytes));
    }
    let views = data
        .iter()
        .map(|(k, shape, b)| TensorView::new(Dtype::F32, shape.clone(), b).map(|v| (k.clone(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| ModelError::Checkpoint { file: "safetensors".into(), why: e.to_string() })?;
    safetensors::tensor::serialize(views, Some(metadata)).map_err(|e| ModelError::Checkpoint { file: "safetensors".into(), why: e.to_string() })
}

/// The two LoRA families as [`LORA`] stores them: `pix.<module>.lora_A` and so on.
pub fn lora_tensors(lora: &PisaLora) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (prefix, family) in [("pix", &lora.pix), ("sem", &lora.sem)] {
        for (module, ad) in &family.layers {
            out.insert(format!("{prefix}.{module}.lora_A"), ad.a.clone());
            out.insert(format!("{prefix}.{module}.lora_B"), ad.b.clone());
        }
    }
    out
}

/// Reads [`LORA`] back into the two families.
fn read_lora(path: &Path, device: &Device) -> Result<PisaLora> {
    let w = Weights::read(path, device)?;
    let file = w.file.clone();
    let tensors: Vec<(String, Tensor)> = w
        .into_tensors()
        .into_iter()
        .map(|(k, t)| {
            let (family, rest) = k.split_once('.').unwrap_or(("", &k));
            let (module, ab) = rest.rsplit_once('.').unwrap_or((rest, ""));
            let group = crate::checkpoint::group_of(module);
            (format!("{module}.{ab}.default_{group}_{family}.weight"), t)
        })
        .collect();
    PisaLora::from_tensors(tensors, &file, device)
}

/// A PiSA-SR model ready to run.
pub struct PisaModel {
    pub unet: UNet,
    pub vae: Vae,
    /// `[1, tokens, hidden]`.
    pub embedding: Tensor,
}

impl PisaModel {
    /// Loads an imported model from its store directory (files already verified), its
    /// layers' weights kept in `precision`.
    pub fn load(dir: &Path, device: &Device, precision: Precision) -> Result<PisaModel> {
        let text = |name: &str| std::fs::read_to_string(dir.join(name)).map_err(|e| ModelError::File { path: dir.join(name), why: e.to_string() });
        let unet_config: UNetConfig = config::parse_unet(&text(UNET_CONFIG)?, &dir.join(UNET_CONFIG))?;
        let vae_config: VaeConfig = config::parse_vae(&text(VAE_CONFIG)?, &dir.join(VAE_CONFIG))?;
        let lora = read_lora(&dir.join(LORA), device)?;
        let unet_weights = Weights::read(&dir.join(UNET), device)?.with_precision(precision);
        let unet = build_unet(&unet_weights, &unet_config, lora)?;
        drop(unet_weights);
        let mut vae_weights = Weights::read(&dir.join(VAE), device)?.with_precision(precision);
        vae::rename_legacy_attention(&mut vae_weights);
        let vae = Vae::load(&vae_weights.root(), &vae_config)?;
        let emb = Weights::read(&dir.join(EMBEDDING), device)?;
        let embedding = emb
            .get(EMPTY_PROMPT)
            .cloned()
            .ok_or_else(|| ModelError::Missing { file: emb.file.clone(), key: EMPTY_PROMPT.into(), expected: vec![1, 77, unet_config.cross_attention_dim] })?;
        if embedding.dims() != [1, embedding.dim(1)?, unet_config.cross_attention_dim] {
            return Err(ModelError::Shape { file: emb.file.clone(), key: EMPTY_PROMPT.into(), expected: vec![1, 77, unet_config.cross_attention_dim], found: embedding.dims().to_vec() });
        }
        Ok(PisaModel { unet, vae, embedding })
    }
}

/// The UNet with the pixel family merged into its weights (`W_pix`) and the semantic family
/// kept for run time, checking that every tensor and every adapter found its layer.
pub fn build_unet(weights: &Weights, config: &UNetConfig, lora: PisaLora) -> Result<UNet> {
    let plan = LoraPlan::new(vec![lora.pix], Some(lora.sem));
    let unet = UNet::load(&weights.root(), Some(&plan), config)?;
    weights.check_all_used(|_| false, "UNet")?;
    plan.check_all_used()?;
    Ok(unet)
}
