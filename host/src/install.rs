//! `tessera install` and `tessera uninstall`: the daemon, the CLI and the engines into a user
//! prefix, the GIMP 3 plug-in into every GIMP 3.x profile, the Krita plugin into `pykrita` and
//! enabled in `kritarc`, each adapter with its own copy of the Python client; optionally a
//! systemd user unit. What was put where is recorded in `<prefix>/installed.json`, so that
//! installing again replaces exactly the last install and uninstalling removes exactly it.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The Krita plugin's name: its folder and `.desktop` in `pykrita`, its `kritarc` key.
pub const KRITA_PLUGIN: &str = "tessera_krita";
/// The GIMP plug-in's folder (GIMP 3 runs `plug-ins/NAME/NAME.py`).
pub const GIMP_PLUGIN: &str = "tessera-upscale";
const RECORD: &str = "installed.json";
const SERVICE: &str = "tesserad.service";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot find what to install beside {exe}: {why}; run `tessera install` from a build (target/release) or an unpacked Tessera tarball")]
    NoSources { exe: PathBuf, why: String },
    #[error("{what} {path}: {why}")]
    Io { what: &'static str, path: PathBuf, why: io::Error },
    #[error("{path} is not an install record Tessera can read ({why}); remove it and run `tessera install` again")]
    Record { path: PathBuf, why: String },
    #[error("nothing of Tessera is installed under {0} (no installed.json); pass the --prefix it was installed with")]
    NotInstalled(PathBuf),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> InstallError + 'a {
    move |why| InstallError::Io { what, path: path.to_path_buf(), why }
}

/// What an install copies: the two executables, the engine libraries and the adapters' sources.
#[derive(Debug, Clone)]
pub struct Sources {
    pub bins: Vec<PathBuf>,
    pub plugins: Vec<PathBuf>,
    /// A folder with `python/tessera_client`, `gimp/tessera-upscale` and `krita/`.
    pub adapters: PathBuf,
}

impl Sources {
    /// Finds them beside the running executable: a tarball's layout (`bin/`,
    /// `lib/tessera/plugins/`, `share/tessera/adapters/`), an installed prefix of the same
    /// layout, or a cargo target folder (`target/release/`, with the repository's `adapters/`).
    pub fn beside(exe: &Path) -> Result<Sources, InstallError> {
        let fail = |why: String| InstallError::NoSources { exe: exe.to_path_buf(), why };
        let bin_dir = exe.parent().ok_or_else(|| fail("it has no folder".into()))?;
        let bins: Vec<PathBuf> = ["tesserad", "tessera"].iter().map(|b| bin_dir.join(b)).collect();
        if let Some(missing) = bins.iter().find(|b| !b.is_file()) {
            return Err(fail(format!("{} is missing", missing.display())));
        }
        let candidates = [
            (bin_dir.join("../lib/tessera/plugins"), bin_dir.join("../share/tessera/adapters")),
            (bin_dir.to_path_buf(), bin_dir.join("../../adapters")),
        ];
        for (plugin_dir, adapters) in candidates {
            if !adapters.join("python/tessera_client").is_dir() {
                continue;
            }
            let plugins = engine_libraries(&plugin_dir);
            if plugins.is_empty() {
                return Err(fail(format!("no engine libraries (libtessera_*.so) in {}", plugin_dir.display())));
            }
            let adapters = adapters.canonicalize().map_err(io_err("cannot open", &adapters))?;
            return Ok(Sources { bins, plugins, adapters });
        }
        Err(fail("no adapters folder (share/tessera/adapters, or the repository's adapters/)".into()))
    }
}

fn engine_libraries(dir: &Path) -> Vec<PathBuf> {
    let mut libs: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("libtessera_") && (name.ends_with(".so") || name.ends_with(".dylib")) && p.is_file()
        })
        .collect();
    libs.sort();
    libs
}

/// Where things go for this user (from `HOME` and the XDG variables).
#[derive(Debug, Clone)]
pub struct Places {
    pub prefix: PathBuf,
    /// GIMP 3.x profiles (`~/.config/GIMP/3.0`, `3.2`, … and Flatpak's); `3.0` when none exists
    /// yet, so that a GIMP started later finds the plug-in.
    pub gimp_profiles: Vec<PathBuf>,
    /// Krita 5 and 6 both read `~/.local/share/krita/pykrita` and `~/.config/kritarc`.
    pub pykrita: PathBuf,
    pub kritarc: PathBuf,
    pub systemd_user: PathBuf,
}

impl Places {
    pub fn for_user(prefix: Option<PathBuf>) -> Places {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
        let xdg = |var: &str, default: &str| std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| home.join(default));
        let (config, data) = (xdg("XDG_CONFIG_HOME", ".config"), xdg("XDG_DATA_HOME", ".local/share"));
        let mut gimp_profiles = gimp3_profiles(&config.join("GIMP"));
        gimp_profiles.extend(gimp3_profiles(&home.join(".var/app/org.gimp.GIMP/config/GIMP")));
        if gimp_profiles.is_empty() {
            gimp_profiles.push(config.join("GIMP/3.0"));
        }
        // Recorded paths must not depend on where the command ran.
        let prefix = prefix.map(|p| if p.is_absolute() { p } else { std::env::current_dir().unwrap_or_default().join(p) });
        Places {
            prefix: prefix.unwrap_or_else(crate::paths::data_dir),
            gimp_profiles,
            pykrita: data.join("krita/pykrita"),
            kritarc: config.join("kritarc"),
            systemd_user: config.join("systemd/user"),
        }
    }

    pub fn record_path(&self) -> PathBuf {
        self.prefix.join(RECORD)
    }
}

/// The `3.x` folders of a GIMP configuration folder (2.10's are left alone: no Python 3 there).
pub fn gimp3_profiles(gimp_config: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(gimp_config)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("3.") && n[2..].chars().all(|c| c.is_ascii_digit()) && n.len() > 2))
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out
}

/// What one install put in place.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub version: String,
    /// Files written, with the mode each was given.
    pub files: Vec<(PathBuf, u32)>,
    /// Folders that are Tessera's alone (removed whole on uninstall).
    pub owned_dirs: Vec<PathBuf>,
    pub gimp_profiles: Vec<PathBuf>,
    pub pykrita: PathBuf,
    /// The kritarc whose `[python] enable_tessera_krita` the install set.
    pub kritarc: PathBuf,
    pub service: Option<PathBuf>,
}

impl Record {
    pub fn read(path: &Path) -> Result<Option<Record>, InstallError> {
        match fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| InstallError::Record { path: path.into(), why: e.to_string() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(InstallError::Io { what: "cannot read", path: path.into(), why: e }),
        }
    }
}

/// Copies everything into `places`, replacing the previous install (its files first, so that
/// a file a newer version no longer ships does not linger), and records it.
pub fn install(src: &Sources, places: &Places, service: bool, say: &dyn Fn(&str)) -> Result<Record, InstallError> {
    if let Some(old) = Record::read(&places.record_path())? {
        remove_installed(&old, false, say)?;
    }
    let mut rec = Record {
        version: env!("CARGO_PKG_VERSION").into(),
        files: Vec::new(),
        owned_dirs: Vec::new(),
        gimp_profiles: places.gimp_profiles.clone(),
        pykrita: places.pykrita.clone(),
        kritarc: places.kritarc.clone(),
        service: None,
    };
    let prefix = &places.prefix;
    for bin in &src.bins {
        copy_file(bin, &prefix.join("bin").join(bin.file_name().unwrap()), 0o755, &mut rec)?;
    }
    for lib in &src.plugins {
        copy_file(lib, &prefix.join("lib/tessera/plugins").join(lib.file_name().unwrap()), 0o644, &mut rec)?;
    }
    let client = src.adapters.join("python/tessera_client");
    let bin_dir = prefix.join("bin");
    copy_client(&client, &prefix.join("python/tessera_client"), &bin_dir, &mut rec)?;
    say(&format!("installed tesserad, tessera and {} engine(s) into {}", src.plugins.len(), prefix.display()));

    for profile in &places.gimp_profiles {
        let dir = profile.join("plug-ins").join(GIMP_PLUGIN);
        copy_owned_tree(&src.adapters.join("gimp").join(GIMP_PLUGIN), &dir, &mut rec)?;
        let script = dir.join(format!("{GIMP_PLUGIN}.py"));
        set_mode(&script, 0o755)?;
        copy_client(&client, &dir.join("tessera_client"), &bin_dir, &mut rec)?;
        say(&format!("installed the GIMP 3 plug-in into {} (Filters → Enhance → Tessera)", dir.display()));
    }

    let krita_src = src.adapters.join("krita");
    copy_file(&krita_src.join(format!("{KRITA_PLUGIN}.desktop")), &places.pykrita.join(format!("{KRITA_PLUGIN}.desktop")), 0o644, &mut rec)?;
    let plugin_dir = places.pykrita.join(KRITA_PLUGIN);
    copy_owned_tree(&krita_src.join(KRITA_PLUGIN), &plugin_dir, &mut rec)?;
    copy_client(&client, &plugin_dir.join("tessera_client"), &bin_dir, &mut rec)?;
    kritarc_set(&places.kritarc, KRITA_PLUGIN, true)?;
    say(&format!("installed the Krita plugin into {} and enabled it in {}", places.pykrita.display(), places.kritarc.display()));
    if process_running("krita") {
        say("Krita is running: it rewrites kritarc when it quits, which may disable the plugin again; quit Krita, then run `tessera install` once more (or check with `tessera doctor`)");
    }

    if service {
        let unit = places.systemd_user.join(SERVICE);
        let tesserad = prefix.join("bin/tesserad");
        write_file(&unit, service_unit(&tesserad).as_bytes(), 0o644, &mut rec)?;
        rec.service = Some(unit.clone());
        say(&format!("installed the systemd user unit {}", unit.display()));
        systemctl(&["daemon-reload"], say);
        systemctl(&["enable", "--now", SERVICE], say);
    }
    write_record(&places.record_path(), &rec)?;
    Ok(rec)
}

/// Removes what the install recorded under `places.prefix`, and the models with `models`
/// (`store` is the model store).
pub fn uninstall(places: &Places, models: Option<&Path>, say: &dyn Fn(&str)) -> Result<Record, InstallError> {
    let path = places.record_path();
    let rec = Record::read(&path)?.ok_or_else(|| InstallError::NotInstalled(places.prefix.clone()))?;
    remove_installed(&rec, true, say)?;
    remove_if_exists(&path)?;
    if let Some(store) = models {
        remove_models(store, say)?;
    }
    prune_empty(&places.prefix.join("lib/tessera/plugins"), &places.prefix);
    prune_empty(&places.prefix.join("bin"), &places.prefix);
    prune_empty(&places.prefix.join("python"), &places.prefix);
    let _ = fs::remove_dir(&places.prefix);
    say(&format!("removed Tessera {} from {}", rec.version, places.prefix.display()));
    Ok(rec)
}

/// The files and folders of `rec`; with `all`, also its kritarc entry and service.
fn remove_installed(rec: &Record, all: bool, say: &dyn Fn(&str)) -> Result<(), InstallError> {
    if all {
        if let Some(unit) = &rec.service {
            systemctl(&["disable", "--now", SERVICE], say);
            remove_if_exists(unit)?;
            if let Some(config) = unit.ancestors().nth(3) {
                prune_empty(unit.parent().unwrap_or(config), config); // systemd/user, if we made it
            }
            systemctl(&["daemon-reload"], say);
        }
        kritarc_set(&rec.kritarc, KRITA_PLUGIN, false)?;
    }
    for dir in &rec.owned_dirs {
        match fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(InstallError::Io { what: "cannot remove", path: dir.clone(), why: e }),
        }
    }
    for (file, _) in &rec.files {
        remove_if_exists(file)?;
    }
    if all {
        for profile in &rec.gimp_profiles {
            prune_empty(&profile.join("plug-ins"), profile);
        }
    }
    Ok(())
}

/// Every model folder of the store (one with a manifest), then the store if it is left empty.
fn remove_models(store: &Path, say: &dyn Fn(&str)) -> Result<(), InstallError> {
    for entry in fs::read_dir(store).into_iter().flatten().flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = path.join("manifest.json").is_file() || name.starts_with(".download-") || name.starts_with(".partial");
        if ours && path.is_dir() {
            fs::remove_dir_all(&path).map_err(io_err("cannot remove", &path))?;
            say(&format!("removed the model {name}"));
        }
    }
    let _ = fs::remove_dir(store);
    Ok(())
}

fn remove_if_exists(path: &Path) -> Result<(), InstallError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(InstallError::Io { what: "cannot remove", path: path.into(), why: e }),
        _ => Ok(()),
    }
}

/// Removes `dir` and its parents up to (not including) `stop` while they are empty.
fn prune_empty(dir: &Path, stop: &Path) {
    let mut d = dir.to_path_buf();
    while d.starts_with(stop) && d != stop && fs::remove_dir(&d).is_ok() {
        if !d.pop() {
            break;
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), InstallError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("cannot set the mode of", path))
}

/// Writes through a temporary file renamed into place, so a running program (a daemon started
/// from the old binary) keeps its file and nothing half-written is ever seen.
fn write_file(dest: &Path, bytes: &[u8], mode: u32, rec: &mut Record) -> Result<(), InstallError> {
    let dir = dest.parent().expect("install paths have a folder");
    fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
    let tmp = dir.join(format!(".{}.tessera-new", dest.file_name().unwrap().to_string_lossy()));
    fs::write(&tmp, bytes).map_err(io_err("cannot write", &tmp))?;
    set_mode(&tmp, mode)?;
    fs::rename(&tmp, dest).map_err(io_err("cannot move into place", dest))?;
    rec.files.push((dest.to_path_buf(), mode));
    Ok(())
}

fn copy_file(src: &Path, dest: &Path, mode: u32, rec: &mut Record) -> Result<(), InstallError> {
    let bytes = fs::read(src).map_err(io_err("cannot read", src))?;
    write_file(dest, &bytes, mode, rec)
}

/// A copy of the Python client, told where this install's tesserad is (the adapters start it
/// on demand, and the prefix need not be the default one they also look in).
fn copy_client(client: &Path, dest: &Path, bin_dir: &Path, rec: &mut Record) -> Result<(), InstallError> {
    copy_owned_tree(client, dest, rec)?;
    let marker = dest.join("installed_bin_dir");
    fs::write(&marker, format!("{}\n", bin_dir.display())).map_err(io_err("cannot write", &marker))
}

/// Copies a source folder (no `__pycache__`) to `dest`, which becomes Tessera's alone.
fn copy_owned_tree(src: &Path, dest: &Path, rec: &mut Record) -> Result<(), InstallError> {
    if !rec.owned_dirs.iter().any(|d| dest.starts_with(d)) {
        match fs::remove_dir_all(dest) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(InstallError::Io { what: "cannot replace", path: dest.into(), why: e }),
            _ => {}
        }
        rec.owned_dirs.push(dest.to_path_buf());
    }
    copy_tree(src, dest)
}

fn copy_tree(src: &Path, dest: &Path) -> Result<(), InstallError> {
    fs::create_dir_all(dest).map_err(io_err("cannot create", dest))?;
    for entry in fs::read_dir(src).map_err(io_err("cannot read", src))? {
        let entry = entry.map_err(io_err("cannot read", src))?;
        let (from, name) = (entry.path(), entry.file_name());
        let to = dest.join(&name);
        if from.is_dir() {
            if name != "__pycache__" {
                copy_tree(&from, &to)?;
            }
        } else if !name.to_string_lossy().ends_with(".pyc") {
            fs::copy(&from, &to).map_err(io_err("cannot copy", &from))?;
            set_mode(&to, 0o644)?;
        }
    }
    Ok(())
}

fn write_record(path: &Path, rec: &Record) -> Result<(), InstallError> {
    let text = serde_json::to_string_pretty(rec).expect("a record serialises");
    let mut scratch = rec.clone();
    write_file(path, text.as_bytes(), 0o644, &mut scratch)
}

fn service_unit(tesserad: &Path) -> String {
    format!(
        "[Unit]\nDescription=Tessera upscaling daemon (GIMP and Krita plug-ins)\n\n[Service]\nExecStart={}\nRestart=on-failure\n\n[Install]\nWantedBy=default.target\n",
        tesserad.display()
    )
}

/// `systemctl --user ARGS`, where there is one; what it says goes to the user, not an error.
fn systemctl(args: &[&str], say: &dyn Fn(&str)) {
    match std::process::Command::new("systemctl").arg("--user").args(args).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => say(&format!("systemctl --user {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())),
        Err(e) => say(&format!("systemctl --user {}: cannot run it ({e}); the unit is in place for when systemd runs", args.join(" "))),
    }
}

/// Whether a process of this user named `name` runs (from /proc; false where there is none).
fn process_running(name: &str) -> bool {
    let uid = crate::paths::uid();
    fs::read_dir("/proc").into_iter().flatten().flatten().any(|e| {
        let dir = e.path();
        let ours = fs::metadata(&dir).is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == uid);
        ours && fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == name)
    })
}

/// `[python] enable_NAME` in a kritarc: `Some(true/false)` as written, `None` when absent.
pub fn kritarc_enabled(kritarc: &Path, name: &str) -> Option<bool> {
    let text = fs::read_to_string(kritarc).ok()?;
    let key = format!("enable_{name}");
    let mut in_python = false;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            in_python = l == "[python]";
        } else if in_python {
            if let Some((k, v)) = l.split_once('=') {
                if k.trim() == key {
                    return Some(v.trim() == "true");
                }
            }
        }
    }
    None
}

/// Sets (`on`) or removes (`!on`) `[python] enable_NAME=true`, leaving every other line of the
/// file as it was. Krita rewrites kritarc when it quits, so this holds for the next start of a
/// Krita that is not running now.
pub fn kritarc_set(kritarc: &Path, name: &str, on: bool) -> Result<(), InstallError> {
    let text = match fs::read_to_string(kritarc) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !on => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(InstallError::Io { what: "cannot read", path: kritarc.into(), why: e }),
    };
    let key = format!("enable_{name}");
    let mut out: Vec<String> = Vec::new();
    let (mut in_python, mut seen_python, mut written) = (false, false, false);
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            if in_python && on && !written {
                insert_before_blank_tail(&mut out, format!("{key}=true"));
                written = true;
            }
            in_python = l == "[python]";
            seen_python |= in_python;
        } else if in_python && l.split_once('=').is_some_and(|(k, _)| k.trim() == key) {
            if on && !written {
                out.push(format!("{key}=true"));
                written = true;
            }
            continue;
        }
        out.push(line.to_string());
    }
    if on && !written {
        if seen_python && in_python {
            insert_before_blank_tail(&mut out, format!("{key}=true"));
        } else {
            if out.last().is_some_and(|l| !l.trim().is_empty()) {
                out.push(String::new());
            }
            out.push("[python]".into());
            out.push(format!("{key}=true"));
        }
    }
    let mut new = out.join("\n");
    new.push('\n');
    if new == text {
        return Ok(());
    }
    if let Some(dir) = kritarc.parent() {
        fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
    }
    let tmp = kritarc.with_extension("tessera-new");
    fs::write(&tmp, new).map_err(io_err("cannot write", &tmp))?;
    fs::rename(&tmp, kritarc).map_err(io_err("cannot update", kritarc))
}

/// Adds `line` at the end of the current section, before the blank lines that end it.
fn insert_before_blank_tail(out: &mut Vec<String>, line: String) {
    let at = out.iter().rposition(|l| !l.trim().is_empty()).map_or(0, |i| i + 1);
    out.insert(at, line);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edited(before: &str, on: bool) -> String {
        let dir = std::env::temp_dir().join(format!("tessera-kritarc-{}-{}", std::process::id(), before.len() + on as usize));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kritarc");
        fs::write(&path, before).unwrap();
        kritarc_set(&path, "tessera_krita", on).unwrap();
        let after = fs::read_to_string(&path).unwrap();
        assert_eq!(kritarc_enabled(&path, "tessera_krita"), on.then_some(true));
        fs::remove_dir_all(&dir).unwrap();
        after
    }

    #[test]
    fn kritarc_gets_our_entry_and_keeps_everything_else() {
        assert_eq!(edited("[General]\nx=1\n", true), "[General]\nx=1\n\n[python]\nenable_tessera_krita=true\n");
        assert_eq!(
            edited("[python]\nenable_other=true\n\n[Zeta]\ny=2\n", true),
            "[python]\nenable_other=true\nenable_tessera_krita=true\n\n[Zeta]\ny=2\n"
        );
        assert_eq!(edited("[python]\nenable_tessera_krita=false\nenable_b=true\n", true), "[python]\nenable_tessera_krita=true\nenable_b=true\n");
        assert_eq!(edited("[a]\nk=v\n[python]\nenable_b=true\n", true), "[a]\nk=v\n[python]\nenable_b=true\nenable_tessera_krita=true\n");
    }

    #[test]
    fn kritarc_loses_only_our_entry() {
        assert_eq!(edited("[python]\nenable_b=true\nenable_tessera_krita=true\n[c]\nd=1\n", false), "[python]\nenable_b=true\n[c]\nd=1\n");
        // An entry of the same name in another section is not ours.
        assert_eq!(edited("[other]\nenable_tessera_krita=true\n", false), "[other]\nenable_tessera_krita=true\n");
    }
}
