//! Models users import from files they have (not fetched from a catalog): PiSA-SR, from an
//! SD2.1-base folder and the released `pisa_sr.pkl`. The format knowledge is the pisa crates';
//! this installs what they produce into the store, all or nothing.

use std::path::Path;

use super::store::{self, Manifest, StoreError};

/// The plugin that runs imported PiSA-SR models, and its default model id.
pub const PISA: &str = "pisa";

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Model(#[from] tessera_pisa_model::ModelError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The command that installs model `id` of `plugin`, where it is imported rather than fetched.
pub fn install_command(plugin: &str, id: &str) -> Option<String> {
    (plugin == PISA).then(|| {
        let named = if id == PISA { String::new() } else { format!(" --id {id}") };
        format!("tessera models import pisa --base SD21_BASE_DIR --checkpoint pisa_sr.pkl{named} (SD2.1-base from stabilityai/stable-diffusion-2-1-base, pisa_sr.pkl from PiSA-SR's release; see the README)")
    })
}

/// Checks and converts `base` and `checkpoint`, and installs the result as model `id`.
pub fn import_pisa(base: &Path, checkpoint: &Path, id: &str, store_dir: &Path, say: &dyn Fn(&str)) -> Result<Manifest, ImportError> {
    let imported = tessera_pisa_model::import::import(base, checkpoint, say)?;
    say(&format!("checked: {}", imported.summary));
    let source = format!("PiSA-SR imported from {} and {}", base.display(), checkpoint.display());
    let licence = "SD2.1-base: CreativeML Open RAIL++-M (stabilityai); PiSA-SR LoRA: Apache-2.0 (csslc/PiSA-SR)";
    let manifest = store::install(store_dir, id, &source, licence, &imported.files)?;
    say(&format!("installed {id} in {}", store::model_dir(store_dir, id).display()));
    Ok(manifest)
}

/// Store entries that hold an imported PiSA-SR model, by id.
pub fn installed_pisa(store_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(store_dir) else { return Vec::new() };
    let mut ids: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| tessera_pisa_model::store::FILES.iter().all(|f| e.path().join(f).is_file()))
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|id| !id.starts_with('.'))
        .collect();
    ids.sort();
    ids
}
