//! `tessera doctor`: what is installed where, which editors are here and whether each sees
//! Tessera, the daemon's state, the models and the devices; for each problem, the one command
//! that fixes it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::install::{self, Places, Record, GIMP_PLUGIN, KRITA_PLUGIN};
use crate::models;

/// One line of the report: a fact, or a problem with its fix.
#[derive(Debug, Clone)]
pub struct Finding {
    pub problem: bool,
    pub what: String,
    pub fix: Option<String>,
}

impl Finding {
    fn ok(what: impl Into<String>) -> Finding {
        Finding { problem: false, what: what.into(), fix: None }
    }
    fn problem(what: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding { problem: true, what: what.into(), fix: Some(fix.into()) }
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub sections: Vec<(&'static str, Vec<Finding>)>,
}

impl Report {
    pub fn problems(&self) -> usize {
        self.sections.iter().flat_map(|(_, f)| f).filter(|f| f.problem).count()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (title, findings) in &self.sections {
            out.push_str(&format!("{title}\n"));
            for f in findings {
                out.push_str(&format!("  {} {}\n", if f.problem { "PROBLEM" } else { "ok     " }, f.what));
                if let Some(fix) = &f.fix {
                    out.push_str(&format!("          fix: {fix}\n"));
                }
            }
        }
        match self.problems() {
            0 => out.push_str("no problems found\n"),
            n => out.push_str(&format!("{n} problem(s) found\n")),
        }
        out
    }
}

/// Everything `tessera doctor` checks. `store` is the model store, `socket` the daemon's.
pub fn diagnose(places: &Places, store: &Path, socket: &Path) -> Report {
    let record = install::Record::read(&places.record_path());
    let mut report = Report::default();
    let rec = match record {
        Ok(r) => r,
        Err(e) => {
            report.sections.push(("Tessera", vec![Finding::problem(e.to_string(), "tessera install")]));
            None
        }
    };
    if report.sections.is_empty() {
        report.sections.push(("Tessera", tessera_files(places, rec.as_ref())));
    }
    report.sections.push(("GIMP 3", gimp(places)));
    report.sections.push(("Krita 5 and 6", krita(places)));
    let (daemon, devices) = daemon(socket);
    report.sections.push(("tesserad", daemon));
    report.sections.push(("Models", models_in(store)));
    report.sections.push(("Devices", devices));
    report
}

fn is_executable(path: &Path) -> bool {
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 == 0o111)
}

fn tessera_files(places: &Places, rec: Option<&Record>) -> Vec<Finding> {
    let Some(rec) = rec else {
        return vec![Finding::problem(
            format!("not installed under {} (no {})", places.prefix.display(), places.record_path().display()),
            "tessera install (or installer/install.sh from a checkout)",
        )];
    };
    let mut out = vec![Finding::ok(format!("Tessera {} installed in {} ({} files)", rec.version, places.prefix.display(), rec.files.len()))];
    if rec.version != env!("CARGO_PKG_VERSION") {
        out.push(Finding::problem(format!("the install is version {}, this tessera is {}", rec.version, env!("CARGO_PKG_VERSION")), "tessera install"));
    }
    for (file, mode) in &rec.files {
        if !file.is_file() {
            out.push(Finding::problem(format!("{} is missing", file.display()), "tessera install"));
        } else if mode & 0o111 != 0 && !is_executable(file) {
            out.push(Finding::problem(format!("{} is not executable", file.display()), format!("chmod +x {}", file.display())));
        }
    }
    for dir in &rec.owned_dirs {
        if !dir.is_dir() {
            out.push(Finding::problem(format!("{} is missing", dir.display()), "tessera install"));
        }
    }
    out
}

/// The first line of `program --version`, if it answers within a few seconds.
fn version_of(program: &Path) -> Option<String> {
    let mut child = Command::new(program).arg("--version").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let out = child.wait_with_output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().map(str::trim).find(|l| !l.is_empty()).map(String::from)
}

/// The version of the Debian package that ships `program` (Krita's `--version` needs a display).
fn package_version(program: &Path) -> Option<String> {
    let out = Command::new("dpkg-query").arg("--search").arg(program).stderr(Stdio::null()).output().ok()?;
    let package = String::from_utf8_lossy(&out.stdout).split(':').next()?.trim().to_string();
    let out = Command::new("dpkg-query").args(["--show", "--showformat=${Version}", &package]).stderr(Stdio::null()).output().ok()?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !version.is_empty()).then(|| format!("{package} {version} (Debian package)"))
}

fn on_path(names: &[&str]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        for name in names {
            let p = dir.join(name);
            if is_executable(&p) && !found.iter().any(|f: &PathBuf| f.canonicalize().ok() == p.canonicalize().ok()) {
                found.push(p);
            }
        }
    }
    found
}

fn editors(names: &[&str], flatpak: &str, label: &str) -> Vec<Finding> {
    let mut out: Vec<Finding> = on_path(names)
        .into_iter()
        .map(|p| {
            let version = version_of(&p).or_else(|| package_version(&p)).unwrap_or_else(|| "version unknown".into());
            Finding::ok(format!("{label} at {}: {version}", p.display()))
        })
        .collect();
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    if home.join(".var/app").join(flatpak).is_dir() {
        out.push(Finding::ok(format!("{label} as the Flatpak {flatpak}")));
    }
    if out.is_empty() {
        out.push(Finding::ok(format!("no {label} found on PATH or as a Flatpak (the plug-in is in place for when one is installed)")));
    }
    out
}

fn gimp(places: &Places) -> Vec<Finding> {
    let mut out = editors(&["gimp-3.2", "gimp-3.0", "gimp-3", "gimp"], "org.gimp.GIMP", "GIMP");
    for profile in &places.gimp_profiles {
        let dir = profile.join("plug-ins").join(GIMP_PLUGIN);
        let script = dir.join(format!("{GIMP_PLUGIN}.py"));
        if !script.is_file() {
            out.push(Finding::problem(format!("the GIMP profile {} has no Tessera plug-in", profile.display()), "tessera install"));
        } else if !is_executable(&script) {
            out.push(Finding::problem(
                format!("{} is not executable: GIMP does not run it", script.display()),
                format!("chmod +x {}", script.display()),
            ));
        } else if !dir.join("tessera_client/__init__.py").is_file() {
            out.push(Finding::problem(format!("{} lacks its copy of the Python client", dir.display()), "tessera install"));
        } else {
            out.push(Finding::ok(format!("GIMP sees the plug-in in {}", dir.display())));
        }
    }
    out
}

fn krita(places: &Places) -> Vec<Finding> {
    let mut out = editors(&["krita"], "org.kde.krita", "Krita");
    let dir = places.pykrita.join(KRITA_PLUGIN);
    let desktop = places.pykrita.join(format!("{KRITA_PLUGIN}.desktop"));
    if !desktop.is_file() || !dir.join("__init__.py").is_file() {
        out.push(Finding::problem(format!("the Krita plugin is not in {}", places.pykrita.display()), "tessera install"));
    } else if !dir.join("tessera_client/__init__.py").is_file() {
        out.push(Finding::problem(format!("{} lacks its copy of the Python client", dir.display()), "tessera install"));
    } else {
        out.push(Finding::ok(format!("the Krita plugin is in {}", places.pykrita.display())));
    }
    match install::kritarc_enabled(&places.kritarc, KRITA_PLUGIN) {
        Some(true) => out.push(Finding::ok(format!("enabled in {}", places.kritarc.display()))),
        state => out.push(Finding::problem(
            format!(
                "the Krita plugin is {} in {}: Krita will not load it",
                if state.is_some() { "disabled" } else { "not enabled" },
                places.kritarc.display()
            ),
            "tessera install (with Krita closed: Krita rewrites kritarc when it quits)",
        )),
    }
    out
}

fn daemon(socket: &Path) -> (Vec<Finding>, Vec<Finding>) {
    let cpu_only = || Finding::ok("cpu (tesserad is not running to ask; this build has CPU engines only)");
    match crate::client::Client::connect(socket, false) {
        Ok(mut c) => {
            let mut out = vec![Finding::ok(format!("{} running on {}", c.daemon, socket.display()))];
            let engines: Vec<String> = c.plugins.iter().map(|p| format!("{} {}", p.id, p.version)).collect();
            out.push(Finding::ok(format!("engines: {}", engines.join(", "))));
            let running_version = c.daemon.rsplit(' ').next().unwrap_or("");
            if !c.daemon.is_empty() && running_version != env!("CARGO_PKG_VERSION") {
                out.push(Finding::problem(
                    format!("the running daemon ({}) is not this version ({})", c.daemon, env!("CARGO_PKG_VERSION")),
                    "pkill -x tesserad (editors start the installed one on demand)",
                ));
            }
            let devices = match c.workers() {
                Ok(workers) => workers
                    .iter()
                    .map(|w| {
                        let crashed = if w.restarts > 0 { format!(", restarted {} time(s)", w.restarts) } else { String::new() };
                        Finding::ok(format!("{}: worker {} ({:?}{crashed})", w.device, w.id, w.state))
                    })
                    .collect(),
                Err(e) => vec![Finding::problem(format!("the daemon did not list its workers: {e}"), "pkill -x tesserad")],
            };
            (out, devices)
        }
        Err(_) if !socket.exists() => (vec![Finding::ok(format!("not running (no {}); editors start it on demand", socket.display()))], vec![cpu_only()]),
        Err(e) => (
            vec![Finding::ok(format!("not answering on {} ({e}); the next start replaces the stale socket", socket.display()))],
            vec![cpu_only()],
        ),
    }
}

fn models_in(store: &Path) -> Vec<Finding> {
    let mut out = vec![Finding::ok(format!("store: {}", store.display()))];
    let ids = models::store::installed(store);
    for id in &ids {
        match models::store::verify(store, id) {
            Ok(m) => {
                let bytes: u64 = m.files.values().map(|f| f.size).sum();
                out.push(Finding::ok(format!("{id}: verified, {} file(s), {:.0} MB", m.files.len(), bytes as f64 / 1e6)));
            }
            Err(e) => out.push(Finding::problem(format!("{e}"), models::repair_command(id))),
        }
    }
    let default = models::catalog::DEFAULT;
    if !ids.iter().any(|id| id == default) {
        out.push(Finding::problem(
            format!("the default model {default} is not installed (upscales fall back to plain Lanczos)"),
            format!("tessera models fetch {default}"),
        ));
    }
    out
}
