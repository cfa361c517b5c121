//! PiSA-SR's released checkpoint, `pisa_sr.pkl`: a `torch.save` dict whose `state_dict_unet`
//! holds both LoRA families under peft's key names,
//! `<module>.lora_{A,B}.default_{encoder,decoder,others}_{pix,sem}.weight`. Ranks follow from
//! the tensors' shapes; α is peft's default 8 (PiSA never sets it), so a layer adds
//! `8/r · B·A`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::nn::{Adapter, Family};

/// peft's `LoraConfig` default, which PiSA-SR's training keeps.
pub const LORA_ALPHA: f64 = 8.0;

/// The parts of the UNet each family's adapters are grouped by, as PiSA-SR names them.
pub const GROUPS: [&str; 3] = ["encoder", "decoder", "others"];

/// The substrings PiSA-SR's `initialize_unet` picks LoRA targets by.
const TARGETS: [&str; 14] = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut", "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj"];

/// The group PiSA-SR puts a module in: down blocks and `conv_in` are the encoder, up blocks
/// and `conv_out` the decoder, the rest (the mid block) "others".
pub fn group_of(module: &str) -> &'static str {
    if module.contains("down_blocks") || module.contains("conv_in") {
        "encoder"
    } else if module.contains("up_blocks") || module.contains("conv_out") {
        "decoder"
    } else {
        "others"
    }
}

/// The modules PiSA-SR adapts in a UNet with these parameter names: every weight that is
/// neither a bias nor a norm and whose name contains one of its target substrings (SD2.1:
/// 258, of which 94 encoder, 148 decoder and 16 others).
pub fn target_modules<'a>(param_names: impl IntoIterator<Item = &'a String>) -> BTreeSet<String> {
    param_names
        .into_iter()
        .filter(|n| !n.contains("bias") && !n.contains("norm") && TARGETS.iter().any(|t| n.contains(t)))
        .filter_map(|n| n.strip_suffix(".weight").map(String::from))
        .collect()
}

/// Both families, read and checked for internal consistency (pairs, ranks, group names).
pub struct PisaLora {
    pub pix: Family,
    pub sem: Family,
}

impl PisaLora {
    pub fn read(path: &Path, device: &Device) -> Result<PisaLora> {
        let file = path.display().to_string();
        let bad = |why: String| ModelError::Checkpoint { file: file.clone(), why };
        if !path.is_file() {
            return Err(ModelError::File { path: path.to_path_buf(), why: "no such file (the PiSA-SR checkpoint, pisa_sr.pkl)".into() });
        }
        let tensors = crate::torch::read(path, Some("state_dict_unet"))
            .map_err(|why| bad(format!("cannot read `state_dict_unet` from it as a torch.save file ({why}); is it PiSA-SR's pisa_sr.pkl, whole?")))?;
        if tensors.is_empty() {
            return Err(bad("it has no `state_dict_unet` tensors; PiSA-SR's pisa_sr.pkl has 1032".into()));
        }
        Self::from_tensors(tensors, &file, device)
    }

    pub fn from_tensors(tensors: Vec<(String, Tensor)>, file: &str, device: &Device) -> Result<PisaLora> {
        let bad = |why: String| ModelError::Checkpoint { file: file.to_string(), why };
        // (family, module) → (A, B)
        let mut pairs: BTreeMap<(String, String), (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (key, t) in tensors {
            let parsed = ["lora_A", "lora_B"].iter().find_map(|ab| {
                let (module, rest) = key.split_once(&format!(".{ab}."))?;
                let adapter = rest.strip_suffix(".weight")?;
                Some((*ab, module.to_string(), adapter.to_string()))
            });
            let Some((ab, module, adapter)) = parsed else {
                return Err(bad(format!("tensor `{key}` is not a LoRA weight `<module>.lora_A|lora_B.<adapter>.weight`")));
            };
            let (group, family) = adapter
                .strip_prefix("default_")
                .and_then(|a| a.rsplit_once('_'))
                .filter(|(g, f)| GROUPS.contains(g) && (*f == "pix" || *f == "sem"))
                .ok_or_else(|| bad(format!("tensor `{key}`: adapter `{adapter}` is not one of PiSA-SR's default_{{encoder,decoder,others}}_{{pix,sem}}")))?;
            if group != group_of(&module) {
                return Err(bad(format!("tensor `{key}`: module `{module}` belongs to the {} adapters, not `{adapter}`", group_of(&module))));
            }
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            let slot = pairs.entry((family.to_string(), module)).or_default();
            if ab == "lora_A" {
                slot.0 = Some(t);
            } else {
                slot.1 = Some(t);
            }
        }
        let mut pix = Family { name: format!("{file} (pixel LoRA)"), ..Default::default() };
        let mut sem = Family { name: format!("{file} (semantic LoRA)"), ..Default::default() };
        for ((family, module), (a, b)) in pairs {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(bad(format!("module `{module}` of the {family} family has only one of lora_A and lora_B")));
            };
            let r = a.dim(0)?;
            if b.dims().get(1) != Some(&r) {
                return Err(bad(format!("module `{module}`: lora_A has rank {r} but lora_B is {:?}", b.dims())));
            }
            let target = if family == "pix" { &mut pix } else { &mut sem };
            target.layers.insert(module, Adapter { a, b, scale: LORA_ALPHA / r as f64 });
        }
        Ok(PisaLora { pix, sem })
    }

    /// Checks both families adapt exactly the modules PiSA-SR's rule picks in a UNet whose
    /// parameters are `param_names`.
    pub fn check_targets<'a>(&self, param_names: impl IntoIterator<Item = &'a String>, file: &str) -> Result<()> {
        let expected = target_modules(param_names);
        for family in [&self.pix, &self.sem] {
            let have: BTreeSet<&String> = family.layers.keys().collect();
            let which = if std::ptr::eq(family, &self.pix) { "pixel" } else { "semantic" };
            if let Some(missing) = expected.iter().find(|m| !have.contains(m)) {
                return Err(ModelError::Checkpoint {
                    file: file.into(),
                    why: format!("the {which} LoRA has no `{missing}.lora_A.default_{}_{}.weight` (PiSA-SR adapts {} modules of this UNet; the file has {})", group_of(missing), &which[..3], expected.len(), have.len()),
                });
            }
            if let Some(extra) = have.iter().find(|m| !expected.contains(**m)) {
                return Err(ModelError::Checkpoint { file: file.into(), why: format!("the {which} LoRA adapts `{extra}`, which is not a module PiSA-SR adapts in this UNet") });
            }
        }
        Ok(())
    }

    /// The ranks of the two families (the largest, where layers differ).
    pub fn ranks(&self) -> (usize, usize) {
        let rank = |f: &Family| f.layers.values().map(|a| a.a.dims()[0]).max().unwrap_or(0);
        (rank(&self.pix), rank(&self.sem))
    }
}
