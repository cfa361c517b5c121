//! Worker mode (`tesserad worker`): a child process that loads the engine plugins and runs one
//! job at a time. A crash here (a plugin fault, a driver reset, out of memory) takes down only
//! this process; tesserad fails the job and starts a new worker.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Context;
use ipc_channel::ipc::{self, IpcSender};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use tessera_plugin_abi::host::{Instance, OutputBuf, Plugin, ProcessError, ProcessRequest};

use crate::ipc::{FromWorker, RunJob, ToWorker};

/// The job the worker is running and its cancel flag, shared with the request reader.
type CurrentJob = Option<(u64, Arc<AtomicBool>)>;

/// File names a plugin library may have in a plugin directory.
fn is_plugin_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return false };
    let ext = std::env::consts::DLL_EXTENSION;
    name.ends_with(&format!(".{ext}"))
        && (name.starts_with("libtessera_") || name.starts_with("tessera_"))
}

/// Where a worker for `device` looks for plugins: for a GPU, each directory's subdirectory
/// of that kind (`plugins/cuda/`, the GPU builds) before the directory itself.
pub fn device_plugin_dirs(dirs: &[PathBuf], device: &str) -> Vec<PathBuf> {
    let kind = device.split(':').next().unwrap_or(device);
    if kind == "cpu" {
        return dirs.to_vec();
    }
    dirs.iter().flat_map(|d| [d.join(kind), d.clone()]).collect()
}

/// Test hook: a worker for a CUDA device that runs the CPU builds on the CPU, so that the
/// daemon's supervision of several workers can be tested on machines without a card. Set to
/// `slow:N`, that worker also takes N seconds to start, as one opening a card can.
const GPU_AS_CPU: &str = "TESSERA_TEST_GPU_AS_CPU";

/// Loads every plugin found in `dirs` that runs on `device`, first directory first; a plugin
/// id seen twice keeps the first. Returns the plugins and one message per library that failed.
pub fn load_plugins(dirs: &[PathBuf], device: &str) -> (Vec<(Plugin, Instance)>, Vec<String>) {
    let hook = std::env::var(GPU_AS_CPU).ok().filter(|_| device != "cpu");
    if let Some(secs) = hook.as_deref().and_then(|h| h.strip_prefix("slow:")).and_then(|n| n.parse().ok()) {
        std::thread::sleep(std::time::Duration::from_secs_f64(secs));
    }
    let device = if hook.is_some() { "cpu" } else { device };
    let mut loaded: Vec<(Plugin, Instance)> = Vec::new();
    let mut errors = Vec::new();
    for dir in dirs {
        let Ok(entries) = fs::read_dir(dir) else { continue };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_plugin_file(p)).collect();
        paths.sort();
        for path in paths {
            let config = serde_json::json!({ "model_store": crate::models::store::store_dir(), "device": device });
            let plugin = match Plugin::load(&path) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!("{e}");
                    errors.push(e.to_string());
                    continue;
                }
            };
            if loaded.iter().any(|(p, _)| p.info.id == plugin.info.id) {
                tracing::debug!("skipping {}: plugin `{}` is already loaded", path.display(), plugin.info.id);
                continue;
            }
            if !plugin.info.runs_on(device) {
                tracing::debug!("skipping {}: this build of `{}` runs on {:?}, not {device}", path.display(), plugin.info.id, plugin.info.devices);
                continue;
            }
            match plugin.instantiate(&config) {
                Ok(instance) => {
                    tracing::info!("loaded plugin `{}` {} from {} for {device}", plugin.info.id, plugin.info.version, path.display());
                    loaded.push((plugin, instance));
                }
                Err(e) => {
                    tracing::error!("{e}");
                    errors.push(e.to_string());
                }
            }
        }
    }
    (loaded, errors)
}

/// The worker's main: connect to the daemon's one-shot server `ipc_name`, say hello, then run
/// jobs until told to stop or until the daemon goes away.
pub fn run(ipc_name: String, plugin_dirs: Vec<PathBuf>, device: String) -> anyhow::Result<()> {
    let (mut plugins, load_errors) = load_plugins(&device_plugin_dirs(&plugin_dirs, &device), &device);
    let to_daemon: IpcSender<FromWorker> =
        IpcSender::connect(ipc_name).context("cannot reach tesserad's worker channel")?;
    let (req_tx, req_rx) = ipc::channel::<ToWorker>()?;
    to_daemon.send(FromWorker::Hello {
        pid: std::process::id(),
        device,
        plugins_json: plugins.iter().map(|(p, _)| serde_json::to_string(&p.info).unwrap_or_default()).collect(),
        load_errors,
        requests: req_tx,
    })?;
    let to_daemon = Arc::new(Mutex::new(to_daemon));
    {
        // Beats while the process is scheduled and can reach the daemon; a stopped or
        // deadlocked worker falls silent and is replaced.
        let to_daemon = to_daemon.clone();
        std::thread::Builder::new().name("heartbeat".into()).spawn(move || loop {
            std::thread::sleep(crate::ipc::HEARTBEAT_INTERVAL);
            if to_daemon.lock().send(FromWorker::Heartbeat).is_err() {
                return;
            }
        })?;
    }

    // A reader thread keeps cancel responsive while the job thread is busy in a plugin.
    let current: Arc<Mutex<CurrentJob>> = Arc::new(Mutex::new(None));
    let cancelled_early: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let (jobs_tx, jobs_rx) = mpsc::channel::<RunJob>();
    {
        let current = current.clone();
        let cancelled_early = cancelled_early.clone();
        std::thread::spawn(move || loop {
            match req_rx.recv() {
                Ok(ToWorker::Run(job)) => {
                    let _ = jobs_tx.send(job);
                }
                Ok(ToWorker::Cancel { job }) => match &*current.lock() {
                    Some((id, flag)) if *id == job => flag.store(true, Ordering::Relaxed),
                    _ => {
                        cancelled_early.lock().insert(job);
                    }
                },
                // Told to stop, or the daemon is gone: nobody is left to report to.
                Ok(ToWorker::Shutdown) | Err(_) => std::process::exit(0),
            }
        });
    }

    for job in jobs_rx {
        let id = job.job;
        let flag = Arc::new(AtomicBool::new(cancelled_early.lock().remove(&id)));
        *current.lock() = Some((id, flag.clone()));
        let result = run_job(&mut plugins, &job, &flag, &to_daemon);
        *current.lock() = None;
        let reply = match result {
            Ok(()) => FromWorker::Done { job: id },
            Err(ProcessError::Cancelled) => FromWorker::Failed { job: id, cancelled: true, message: "cancelled".into() },
            Err(ProcessError::Failed(message)) => FromWorker::Failed { job: id, cancelled: false, message },
        };
        to_daemon.lock().send(reply)?;
    }
    Ok(())
}

fn run_job(
    plugins: &mut [(Plugin, Instance)],
    job: &RunJob,
    cancel: &AtomicBool,
    to_daemon: &Mutex<IpcSender<FromWorker>>,
) -> Result<(), ProcessError> {
    let fail = |m: String| ProcessError::Failed(m);
    let (_, instance) = plugins
        .iter_mut()
        .find(|(p, _)| p.info.id == job.plugin)
        .ok_or_else(|| fail(format!("plugin `{}` is not loaded in this worker", job.plugin)))?;
    let params: Map<String, Value> =
        serde_json::from_str(&job.params_json).map_err(|e| fail(format!("bad params: {e}")))?;

    let input_file = fs::File::open(&job.input.path).map_err(|e| fail(format!("cannot open the input buffer: {e}")))?;
    // SAFETY: the daemon owns the file and no one truncates it while the job runs; a client
    // writing into its own input meanwhile changes only pixel values.
    // populate: one pass of page-table set-up instead of a fault per 4 KiB page.
    let input = unsafe { memmap2::MmapOptions::new().populate().map(&input_file) }
        .map_err(|e| fail(format!("cannot map the input buffer: {e}")))?;
    let mut maps = Vec::with_capacity(job.outputs.len());
    for out in &job.outputs {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&out.buf.path)
            .map_err(|e| fail(format!("cannot open an output buffer: {e}")))?;
        // SAFETY: as above; outputs are fresh files only this job writes.
        maps.push(
            unsafe { memmap2::MmapOptions::new().populate().map_mut(&f) }
                .map_err(|e| fail(format!("cannot map an output buffer: {e}")))?,
        );
    }
    let outputs = job
        .outputs
        .iter()
        .zip(maps.iter_mut())
        .map(|(o, m)| OutputBuf { role: o.role, layout: o.buf.layout, offset: o.offset, data: &mut m[..] })
        .collect();

    // Progress from any plugin thread, at most every 50 ms within a stage; always the last
    // one and the first of each stage (a client shows the stages a job goes through).
    let last = Mutex::new((Instant::now() - Duration::from_secs(1), String::new()));
    let progress = |done: u64, total: u64, stage: &str| {
        let mut last = last.lock();
        if done < total && last.1 == stage && last.0.elapsed() < Duration::from_millis(50) {
            return;
        }
        *last = (Instant::now(), stage.to_string());
        let _ = to_daemon.lock().send(FromWorker::Progress { job: job.job, done, total, stage: stage.into() });
    };
    instance.process(ProcessRequest {
        job_id: job.job,
        model: &job.model,
        scale: job.scale,
        params: &params,
        input: (&job.input.layout, &input[..]),
        outputs,
        cancel,
        progress: &progress,
    })
}
