//! Where tesserad keeps its socket, buffers and token. The Python client resolves the same
//! paths the same way (adapters/python/tessera_client), so keep the two in step.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// `$TESSERA_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/tessera`, else `<tmp>/tessera-<uid>`.
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TESSERA_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return dir.into();
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return Path::new(&dir).join("tessera");
    }
    std::env::temp_dir().join(format!("tessera-{}", uid()))
}

/// `$TESSERA_SOCKET`, else `<runtime dir>/tesserad.sock`.
pub fn socket_path(runtime: &Path) -> PathBuf {
    match std::env::var_os("TESSERA_SOCKET").filter(|v| !v.is_empty()) {
        Some(p) => p.into(),
        None => runtime.join("tesserad.sock"),
    }
}

/// The per-install secret that TCP clients present: `$XDG_CONFIG_HOME/tessera/token`.
pub fn token_path() -> PathBuf {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".config"));
    config.join("tessera").join("token")
}

/// Where `tessera models fetch` and the installer put things: `$XDG_DATA_HOME/tessera`.
pub fn data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".local/share"))
        .join("tessera")
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"))
}

pub fn uid() -> u32 {
    // SAFETY: getuid has no failure mode.
    unsafe { libc::getuid() }
}

/// Creates `dir` (and parents) and makes it private to this user (0700). An existing
/// directory owned by someone else is refused: another user could read our pixels.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let meta = fs::metadata(dir)?;
    if meta.uid() != uid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} belongs to another user", dir.display()),
        ));
    }
    if meta.permissions().mode() & 0o777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Reads the token, creating a random one (0600) on first use.
pub fn load_or_create_token(path: &Path) -> io::Result<String> {
    if let Ok(t) = fs::read_to_string(path) {
        let t = t.trim().to_string();
        if t.len() >= 16 {
            return Ok(t);
        }
    }
    if let Some(parent) = path.parent() {
        private_dir(parent)?;
    }
    let mut raw = [0u8; 16];
    io::Read::read_exact(&mut fs::File::open("/dev/urandom")?, &mut raw)?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut opts = fs::OpenOptions::new();
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.write(true).create(true).truncate(true).open(path)?;
    io::Write::write_all(&mut f, token.as_bytes())?;
    Ok(token)
}
