//! The model store: `<store>/<model id>/` holds safetensors files and `manifest.json` with
//! their SHA-256. Engines load only files the manifest vouches for.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::sha256_hex;

/// `$TESSERA_MODEL_DIR`, else `<data dir>/models` (`~/.local/share/tessera/models`).
pub fn store_dir() -> PathBuf {
    match std::env::var_os("TESSERA_MODEL_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => dir.into(),
        None => crate::paths::data_dir().join("models"),
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FileEntry {
    pub sha256: String,
    pub size: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Manifest {
    pub id: String,
    /// Where the weights came from, for people: package, version, members.
    pub source: String,
    pub licence: String,
    pub files: BTreeMap<String, FileEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("model `{id}` is not installed (no {path})")]
    Missing { id: String, path: PathBuf },
    #[error("model `{id}` is damaged: {why}")]
    Damaged { id: String, why: String },
    #[error(transparent)]
    Io(#[from] io::Error),
}

pub fn model_dir(store: &Path, id: &str) -> PathBuf {
    store.join(id)
}

/// What a file looked like when its SHA-256 last matched: (size, modification time).
type Seen = (u64, std::time::SystemTime);

/// Files whose hash matched their manifest, so a long-running daemon does not re-hash tens of
/// megabytes of weights on every job; a file that changes size or modification time is hashed
/// again.
static VERIFIED: std::sync::Mutex<Option<std::collections::HashMap<PathBuf, (Seen, String)>>> = std::sync::Mutex::new(None);

fn seen(path: &Path) -> Option<Seen> {
    let meta = fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// [`verify`], trusting files whose size and modification time are those they had when their
/// hash last matched the same manifest entry (the daemon's check before each job).
pub fn verify_cached(store: &Path, id: &str) -> Result<Manifest, StoreError> {
    let dir = model_dir(store, id);
    let manifest = read_manifest(store, id)?;
    let unchanged = {
        let cache = VERIFIED.lock().unwrap_or_else(|e| e.into_inner());
        manifest.files.iter().all(|(name, entry)| {
            let path = dir.join(name);
            matches!((cache.as_ref().and_then(|c| c.get(&path)), seen(&path)),
                (Some((was, sha)), Some(now)) if *was == now && *sha == entry.sha256)
        })
    };
    if unchanged {
        return Ok(manifest);
    }
    let manifest = verify(store, id)?;
    let mut cache = VERIFIED.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(Default::default);
    for (name, entry) in &manifest.files {
        let path = dir.join(name);
        if let Some(now) = seen(&path) {
            cache.insert(path, (now, entry.sha256.clone()));
        }
    }
    Ok(manifest)
}

fn read_manifest(store: &Path, id: &str) -> Result<Manifest, StoreError> {
    let path = model_dir(store, id).join("manifest.json");
    let text = fs::read_to_string(&path).map_err(|_| StoreError::Missing { id: id.into(), path: path.clone() })?;
    serde_json::from_str(&text).map_err(|e| StoreError::Damaged { id: id.into(), why: format!("bad manifest: {e}") })
}

/// Reads a model's manifest and checks every file against it.
pub fn verify(store: &Path, id: &str) -> Result<Manifest, StoreError> {
    let dir = model_dir(store, id);
    let manifest = read_manifest(store, id)?;
    for (name, entry) in &manifest.files {
        let bytes = fs::read(dir.join(name)).map_err(|e| StoreError::Damaged { id: id.into(), why: format!("{name}: {e}") })?;
        if bytes.len() as u64 != entry.size || sha256_hex(&bytes) != entry.sha256 {
            return Err(StoreError::Damaged { id: id.into(), why: format!("{name} does not match its SHA-256") });
        }
    }
    Ok(manifest)
}

/// Installs a model's files, all or nothing: written into a temporary directory beside the
/// model's, then renamed into place.
pub fn install(store: &Path, id: &str, source: &str, licence: &str, files: &[(String, Vec<u8>)]) -> Result<Manifest, StoreError> {
    fs::create_dir_all(store)?;
    let tmp = store.join(format!(".{id}.installing-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let written = write_model(&tmp, id, source, licence, files);
    let manifest = match written {
        Ok(m) => m,
        Err(e) => {
            // A full disk or a failed write leaves the store as it was.
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let dir = model_dir(store, id);
    // The old copy steps aside before the new one takes its name, so the id always names a
    // whole model: the old one or the new one.
    let old = store.join(format!(".{id}.replaced-{}", std::process::id()));
    let had_old = dir.exists();
    if had_old {
        fs::rename(&dir, &old)?;
    }
    if let Err(e) = fs::rename(&tmp, &dir) {
        if had_old {
            let _ = fs::rename(&old, &dir);
        }
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.into());
    }
    if had_old {
        let _ = fs::remove_dir_all(&old);
    }
    Ok(manifest)
}

fn write_model(tmp: &Path, id: &str, source: &str, licence: &str, files: &[(String, Vec<u8>)]) -> Result<Manifest, StoreError> {
    fs::create_dir_all(tmp)?;
    let mut manifest = Manifest { id: id.into(), source: source.into(), licence: licence.into(), files: BTreeMap::new() };
    for (name, bytes) in files {
        fs::write(tmp.join(name), bytes)?;
        manifest.files.insert(name.clone(), FileEntry { sha256: sha256_hex(bytes), size: bytes.len() as u64 });
    }
    fs::write(tmp.join("manifest.json"), serde_json::to_string_pretty(&manifest).expect("manifest serialises"))?;
    Ok(manifest)
}

/// The ids of the models in the store (folders with a manifest), sorted.
pub fn installed(store: &Path) -> Vec<String> {
    let mut ids: Vec<String> = fs::read_dir(store)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("manifest.json").is_file())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|id| !id.starts_with('.'))
        .collect();
    ids.sort();
    ids
}

/// Removes model `id` from the store (renamed aside first, so no half-removed model is seen).
pub fn remove(store: &Path, id: &str) -> Result<(), StoreError> {
    let dir = model_dir(store, id);
    if !dir.join("manifest.json").is_file() {
        return Err(StoreError::Missing { id: id.into(), path: dir.join("manifest.json") });
    }
    let aside = store.join(format!(".{id}.removing-{}", std::process::id()));
    fs::rename(&dir, &aside)?;
    fs::remove_dir_all(&aside)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_then_verify_and_detect_damage() {
        let store = std::env::temp_dir().join(format!("tessera-store-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&store);
        assert!(matches!(verify(&store, "m"), Err(StoreError::Missing { .. })));
        install(&store, "m", "test", "CC0", &[("a.safetensors".into(), vec![1, 2, 3])]).unwrap();
        assert_eq!(verify(&store, "m").unwrap().files["a.safetensors"].size, 3);
        assert!(verify_cached(&store, "m").is_ok());
        fs::write(store.join("m/a.safetensors"), [1, 2, 4]).unwrap();
        assert!(matches!(verify(&store, "m"), Err(StoreError::Damaged { .. })));
        // A rewritten file is hashed again even where its size is the same: its mtime moved.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        fs::File::options().write(true).open(store.join("m/a.safetensors")).unwrap().set_modified(old).unwrap();
        assert!(matches!(verify_cached(&store, "m"), Err(StoreError::Damaged { .. })));
        fs::remove_dir_all(&store).unwrap();
    }
}
