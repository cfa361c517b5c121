//! tesserad: client connections, pixel buffers, the job queue and worker supervision.
//! It links no GPU code, so it starts at once and never dies with a driver.

mod kept;
mod scheduler;
mod session;

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Context};
use parking_lot::{Mutex, RwLock};
use tessera_protocol::{to_body, Event, Limits, PluginInfo, WorkerInfo};

use crate::buffers::{BufferStore, ClientId};
use crate::paths;
use scheduler::{Sched, Scheduler};

/// Everything tesserad can be told at start. Defaults come from the environment (paths.rs).
#[derive(Clone, Debug)]
pub struct Config {
    pub runtime_dir: PathBuf,
    pub socket: PathBuf,
    /// Also listen on TCP (loopback unless `allow_remote`); clients must send the token.
    pub tcp: Option<SocketAddr>,
    pub allow_remote: bool,
    pub token_path: PathBuf,
    pub plugin_dirs: Vec<PathBuf>,
    /// The devices that get a worker; `None`: the CPU and every CUDA card found.
    pub devices: Option<Vec<String>>,
    pub limits: Limits,
    /// How long a worker may take to load its plugins and say hello.
    pub worker_start_timeout: Duration,
    /// How long a running job may take to stop after a cancel before its worker is killed.
    pub cancel_grace: Duration,
    /// A worker silent this long (no heartbeat, no message) is hung and is replaced.
    pub heartbeat_timeout: Duration,
    /// A running job that reports no progress this long is stuck (an engine in a deadlock or a
    /// driver that never returns, while the heartbeat thread goes on); its worker is replaced.
    /// Engines report at least every tile or stage; the longest gap measured is well under a
    /// minute (a PiSA-SR UNet window at full size on 2 CPU cores).
    pub stall_timeout: Duration,
    /// Exit after this long with no client connected and no job: for daemons that clients
    /// start on demand, so none lingers after the editor is closed.
    pub idle_exit: Option<Duration>,
}

impl Default for Config {
    fn default() -> Config {
        let runtime_dir = paths::runtime_dir();
        Config {
            socket: paths::socket_path(&runtime_dir),
            runtime_dir,
            tcp: None,
            allow_remote: false,
            token_path: paths::token_path(),
            plugin_dirs: default_plugin_dirs(),
            devices: None,
            limits: Limits::default(),
            worker_start_timeout: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(600),
            idle_exit: None,
        }
    }
}

/// `$TESSERA_PLUGIN_DIR`, else `<exe dir>/plugins`, `<exe dir>/../lib/tessera/plugins`, and the
/// executable's own directory (where cargo puts the plugin libraries in a development build).
pub fn default_plugin_dirs() -> Vec<PathBuf> {
    if let Some(dir) = std::env::var_os("TESSERA_PLUGIN_DIR").filter(|v| !v.is_empty()) {
        return std::env::split_paths(&dir).collect();
    }
    let Some(exe_dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(PathBuf::from)) else {
        return Vec::new();
    };
    vec![exe_dir.join("plugins"), exe_dir.join("../lib/tessera/plugins"), exe_dir]
}

/// A client's connection, Unix or TCP.
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }
    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(crate) enum Outgoing {
    Frame(Vec<u8>),
    /// Flush what is queued, then close the connection.
    Close,
}

/// Frames queued for a client that it has not read yet, at most: a client that stops reading
/// its events (10 000 requests and no reads) must not grow the daemon's memory. Far above what
/// a reading client ever has queued (a job sends a few events a second).
pub(crate) const MAX_UNREAD_FRAMES: usize = 4096;

/// The way to a client: its writer thread's queue, and its socket, to drop the client when
/// that queue is full.
#[derive(Clone)]
pub(crate) struct ClientOut {
    client: ClientId,
    tx: mpsc::SyncSender<Outgoing>,
    socket: Arc<Stream>,
    dropped: Arc<std::sync::atomic::AtomicBool>,
}

impl ClientOut {
    /// Queues `out` without waiting; a client whose queue is full is disconnected (its reader
    /// then cleans up as for any client that leaves), so the scheduler and the other clients
    /// never wait for it.
    pub fn send(&self, out: Outgoing) {
        if let Err(mpsc::TrySendError::Full(_)) = self.tx.try_send(out) {
            if !self.dropped.swap(true, Ordering::Relaxed) {
                tracing::warn!(client = self.client, "disconnecting a client that left {MAX_UNREAD_FRAMES} events unread");
                self.socket.shutdown();
            }
        }
    }
}

/// State shared by the connection threads and the scheduler.
pub(crate) struct Shared {
    pub config: Config,
    pub buffers: Mutex<BufferStore>,
    pub clients: Mutex<HashMap<ClientId, ClientOut>>,
    pub plugins: RwLock<Vec<PluginInfo>>,
    pub workers: Mutex<Vec<WorkerInfo>>,
    /// The devices that have a worker, best first (set once at start).
    pub devices: Mutex<Vec<tessera_protocol::DeviceInfo>>,
    pub sched: Mutex<mpsc::Sender<Sched>>,
    pub token: Option<String>,
    pub next_client: AtomicU64,
    pub next_job: AtomicU64,
    pub kept: Mutex<kept::KeptJobs>,
}

impl Shared {
    /// The plugins' models, and every PiSA-SR model imported under an id of its own
    /// (`tessera models import pisa --id ID`: a fine-tune beside the original), which the
    /// pisa plugin runs like its `pisa` model. The store is read each time, so an import shows
    /// without a restart.
    pub fn plugins(&self) -> Vec<PluginInfo> {
        let mut plugins = self.plugins.read().clone();
        let pisa = crate::models::imported::PISA;
        if let Some(p) = plugins.iter_mut().find(|p| p.id == pisa) {
            if let Some(template) = p.models.iter().find(|m| m.id == pisa).cloned() {
                for id in crate::models::imported::installed_pisa(&crate::models::store::store_dir()) {
                    if !p.models.iter().any(|m| m.id == id) {
                        p.models.push(tessera_protocol::ModelInfo {
                            name: format!("{} · {id}", template.name),
                            description: format!("PiSA-SR weights imported as `{id}`. {}", template.description),
                            id,
                            ..template.clone()
                        });
                    }
                }
            }
        }
        plugins
    }

    /// Queues an event for a client; a client that has left is silently skipped.
    pub fn send(&self, client: ClientId, event: &Event) {
        if let Some(out) = self.clients.lock().get(&client) {
            out.send(Outgoing::Frame(to_body(event)));
        }
    }
    pub fn schedule(&self, msg: Sched) {
        let _ = self.sched.lock().send(msg);
    }
}

fn lock_runtime(config: &Config) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let name = format!("{}.lock", config.socket.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "tesserad".into()));
    let path = config.socket.with_file_name(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("tesserad is already running on {} (another one holds {})", config.socket.display(), path.display());
    }
    Ok(file)
}

/// Runs tesserad until SIGTERM/SIGINT: then jobs are cancelled, workers stopped, and the
/// socket and every buffer file removed.
pub fn run(config: Config) -> anyhow::Result<()> {
    paths::private_dir(&config.runtime_dir)
        .with_context(|| format!("cannot prepare the runtime directory {}", config.runtime_dir.display()))?;
    if let Some(parent) = config.socket.parent() {
        paths::private_dir(parent)?;
    }
    // Held until this process ends (the kernel lets go of it even after SIGKILL): of two
    // daemons started at the same instant (two editors starting theirs), one runs and the
    // other refuses before it touches the socket or the buffer directory.
    let _lock = lock_runtime(&config)?;
    if config.socket.exists() {
        if UnixStream::connect(&config.socket).is_ok() {
            bail!("tesserad is already running on {}", config.socket.display());
        }
        std::fs::remove_file(&config.socket).context("cannot remove a stale socket")?;
        tracing::warn!("removed a stale socket at {}: an earlier tesserad did not shut down", config.socket.display());
    }
    let buffers = BufferStore::new(&config.runtime_dir.join("buffers"))
        .context("cannot prepare the buffer directory")?;
    let token = match config.tcp {
        Some(addr) => {
            if !addr.ip().is_loopback() && !config.allow_remote {
                bail!("refusing to listen on {addr}: it is not a loopback address (pass --allow-remote to mean it)");
            }
            Some(paths::load_or_create_token(&config.token_path).context("cannot create the TCP token file")?)
        }
        None => None,
    };
    let (sched_tx, sched_rx) = mpsc::channel();
    let shared = Arc::new(Shared {
        config: config.clone(),
        buffers: Mutex::new(buffers),
        clients: Mutex::new(HashMap::new()),
        plugins: RwLock::new(Vec::new()),
        workers: Mutex::new(Vec::new()),
        devices: Mutex::new(Vec::new()),
        sched: Mutex::new(sched_tx.clone()),
        token,
        next_client: AtomicU64::new(1),
        next_job: AtomicU64::new(1),
        kept: Mutex::new(kept::KeptJobs::default()),
    });

    // Start the workers before listening, so the first client already sees the plugins.
    let mut scheduler = Scheduler::new(shared.clone(), sched_rx, sched_tx);
    scheduler.start_workers();
    std::thread::Builder::new().name("scheduler".into()).spawn(move || scheduler.run())?;

    let listener = {
        // SAFETY: umask only affects this process's file creation mode; restored at once.
        let old = unsafe { libc::umask(0o177) };
        let l = UnixListener::bind(&config.socket);
        unsafe { libc::umask(old) };
        l.with_context(|| format!("cannot listen on {}", config.socket.display()))?
    };
    std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!("tesserad {} listening on {}", env!("CARGO_PKG_VERSION"), config.socket.display());

    if let Some(addr) = config.tcp {
        let tcp = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!("also listening on tcp:{} (token in {})", tcp.local_addr()?, config.token_path.display());
        let shared = shared.clone();
        std::thread::spawn(move || {
            for stream in tcp.incoming().flatten() {
                let _ = stream.set_nodelay(true);
                spawn_session(shared.clone(), Stream::Tcp(stream), true);
            }
        });
    }
    install_signal_handlers(shared.clone())?;
    if let Some(after) = config.idle_exit {
        watch_idle(shared.clone(), after);
    }

    for stream in listener.incoming() {
        match stream {
            Ok(s) => spawn_session(shared.clone(), Stream::Unix(s), false),
            Err(e) => tracing::warn!("accept failed: {e}"),
        }
    }
    Ok(())
}

fn spawn_session(shared: Arc<Shared>, stream: Stream, needs_token: bool) {
    let client = shared.next_client.fetch_add(1, Ordering::Relaxed);
    let _ = std::thread::Builder::new()
        .name(format!("client-{client}"))
        .spawn(move || session::serve(shared, client, stream, needs_token));
}

fn install_signal_handlers(shared: Arc<Shared>) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            shutdown(&shared, &format!("signal {sig}"));
        }
    });
    Ok(())
}

/// Exits once no client has been connected and no job queued or running for `after`.
fn watch_idle(shared: Arc<Shared>, after: Duration) {
    std::thread::spawn(move || {
        let mut idle_since: Option<std::time::Instant> = None;
        loop {
            std::thread::sleep(Duration::from_millis(250));
            let busy = !shared.clients.lock().is_empty()
                || shared.workers.lock().iter().any(|w| w.queued > 0 || w.state == tessera_protocol::WorkerState::Busy);
            if busy {
                idle_since = None;
            } else if idle_since.get_or_insert_with(std::time::Instant::now).elapsed() >= after {
                shutdown(&shared, &format!("idle for {after:?}"));
            }
        }
    });
}

/// Cancels the jobs, stops the worker, removes the socket and every buffer, and exits.
fn shutdown(shared: &Shared, reason: &str) -> ! {
    tracing::info!("{reason}: cancelling jobs and shutting down");
    // No new connections from here on.
    let _ = std::fs::remove_file(&shared.config.socket);
    let (done_tx, done_rx) = mpsc::channel();
    shared.schedule(Sched::Shutdown(done_tx));
    let _ = done_rx.recv_timeout(Duration::from_secs(20));
    // Let the connection threads flush the shutdown errors they were handed.
    for out in shared.clients.lock().values() {
        out.send(Outgoing::Close);
    }
    std::thread::sleep(Duration::from_millis(100));
    shared.kept.lock().clear();
    let mut buffers = shared.buffers.lock();
    buffers.remove_all();
    let _ = std::fs::remove_dir(buffers.dir());
    tracing::info!("tesserad stopped");
    std::process::exit(0);
}
