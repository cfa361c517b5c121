//! A small synchronous client for the `tessera` command line: connect (starting tesserad if
//! needed), allocate and map buffers, submit, and read events from a background thread so the
//! caller can poll for Ctrl-C while a job runs.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tessera_protocol::{
    read_frame, to_body, write_frame, BufferInfo, ErrorReply, Event, LayoutRequest, PluginInfo, Request, SampleType, Submit,
    MAX_FRAME_LEN, PROTOCOL_VERSION,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach tesserad at {socket}: {source}")]
    Connect { socket: PathBuf, source: io::Error },
    #[error("tesserad is not running and cannot be started: {0}")]
    Start(String),
    #[error("{}: {} ({})", .0.code_name(), .0.message, .0.hint)]
    Daemon(ErrorReply),
    #[error("tesserad closed the connection")]
    Disconnected,
    #[error("unexpected reply from tesserad: {0}")]
    Unexpected(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

trait CodeName {
    fn code_name(&self) -> String;
}
impl CodeName for ErrorReply {
    fn code_name(&self) -> String {
        serde_json::to_value(self.code).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
    }
}

pub struct Client {
    writer: UnixStream,
    events: mpsc::Receiver<Result<Event, ClientError>>,
    next_id: u64,
    pub plugins: Vec<PluginInfo>,
    /// The devices that have a worker, best first.
    pub devices: Vec<tessera_protocol::DeviceInfo>,
    /// The daemon's name and version, as its `welcome` says.
    pub daemon: String,
}

/// A buffer mapped into this process.
pub struct Mapped {
    pub info: BufferInfo,
    pub map: memmap2::MmapMut,
}

impl Client {
    /// Connects to `socket`; if nothing listens there and `autostart`, starts tesserad
    /// (next to this executable, else from PATH) and waits for it.
    pub fn connect(socket: &Path, autostart: bool) -> Result<Client, ClientError> {
        let stream = match UnixStream::connect(socket) {
            Ok(s) => s,
            Err(e) if autostart && matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
                start_daemon(socket)?
            }
            Err(source) => return Err(ClientError::Connect { socket: socket.into(), source }),
        };
        let mut reader = stream.try_clone()?;
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || loop {
            let ev = match read_frame(&mut reader, MAX_FRAME_LEN) {
                Ok(body) => serde_json::from_slice::<Event>(&body).map_err(|e| ClientError::Unexpected(e.to_string())),
                Err(_) => Err(ClientError::Disconnected),
            };
            let stop = ev.is_err();
            if tx.send(ev).is_err() || stop {
                return;
            }
        });
        let mut client = Client { writer: stream, events, next_id: 1, plugins: Vec::new(), devices: Vec::new(), daemon: String::new() };
        let id = client.send(|id| Request::Hello { id, protocol: PROTOCOL_VERSION, client: format!("tessera-cli/{}", env!("CARGO_PKG_VERSION")), token: None })?;
        match client.reply(id)? {
            Event::Welcome { plugins, daemon, devices, .. } => (client.plugins, client.devices, client.daemon) = (plugins, devices, daemon),
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        }
        Ok(client)
    }

    fn send(&mut self, make: impl FnOnce(u64) -> Request) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        write_frame(&mut self.writer, &to_body(&make(id)))?;
        Ok(id)
    }

    /// The next event from the daemon, or `None` after `timeout`.
    pub fn next_event(&self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        match self.events.recv_timeout(timeout) {
            Ok(ev) => ev.map(Some),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ClientError::Disconnected),
        }
    }

    /// Waits for the answer to request `id`; errors become `ClientError::Daemon`.
    fn reply(&self, id: u64) -> Result<Event, ClientError> {
        loop {
            let ev = self.events.recv().map_err(|_| ClientError::Disconnected)??;
            match ev {
                Event::Error(e) if e.id == Some(id) || e.id.is_none() => return Err(ClientError::Daemon(e)),
                ev if ev.id() == Some(id) => return Ok(ev),
                _ => {}
            }
        }
    }

    pub fn alloc(&mut self, layout: LayoutRequest) -> Result<Mapped, ClientError> {
        let id = self.send(|id| Request::Alloc { id, layout })?;
        let Event::Allocated { buffer, .. } = self.reply(id)? else { return Err(ClientError::Unexpected("alloc".into())) };
        map(buffer)
    }

    /// Submits a job (on `device`, else the best one) and waits for `queued`; returns
    /// (request id, job id).
    pub fn submit(&mut self, model: &str, scale: u32, input: &str, params: Map<String, Value>, output_sample: SampleType, device: Option<&str>) -> Result<(u64, u64), ClientError> {
        let id = self.send(|id| {
            Request::Submit(Submit {
                id,
                plugin: None,
                model: model.into(),
                scale,
                input: input.into(),
                params,
                output_sample: Some(output_sample),
                device: device.map(String::from),
            })
        })?;
        match self.reply(id)? {
            Event::Queued { job, .. } => Ok((id, job)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// An exact render of finished job `job` at (λ_pix, λ_sem): a job of its own.
    pub fn render(&mut self, job: u64, lambda_pix: f64, lambda_sem: f64, output_sample: SampleType) -> Result<(u64, u64), ClientError> {
        let id = self.send(|id| Request::Render(tessera_protocol::Render { id, job, lambda_pix, lambda_sem, output_sample: Some(output_sample) }))?;
        match self.reply(id)? {
            Event::Queued { job, .. } => Ok((id, job)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Asks for a cancel; the job's own events say when it stopped.
    pub fn cancel(&mut self, job: u64) -> Result<(), ClientError> {
        self.send(|id| Request::Cancel { id, job })?;
        Ok(())
    }

    /// The daemon's workers: their devices, states and restarts.
    pub fn workers(&mut self) -> Result<Vec<tessera_protocol::WorkerInfo>, ClientError> {
        let id = self.send(|id| Request::List { id })?;
        match self.reply(id)? {
            Event::Listing { workers, .. } => Ok(workers),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub fn release(&mut self, buffer: &str) -> Result<(), ClientError> {
        let id = self.send(|id| Request::Release { id, buffer: buffer.into() })?;
        self.reply(id).map(|_| ())
    }
}

pub fn map(info: BufferInfo) -> Result<Mapped, ClientError> {
    let file = OpenOptions::new().read(true).write(true).open(&info.path)?;
    // SAFETY: the daemon owns the file and keeps its size until we release it.
    let map = unsafe { memmap2::MmapMut::map_mut(&file)? };
    if (map.len() as u64) < info.layout.byte_len() {
        return Err(ClientError::Unexpected(format!("buffer {} is smaller than its layout", info.id)));
    }
    Ok(Mapped { info, map })
}

/// tesserad next to this executable, else the one on PATH.
pub fn daemon_exe() -> PathBuf {
    if let Some(dir) = std::env::var_os("TESSERA_BIN_DIR") {
        let p = Path::new(&dir).join("tesserad");
        if p.exists() {
            return p;
        }
    }
    if let Some(p) = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("tesserad"))) {
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("tesserad")
}

/// How long a daemon started by a client waits, with no clients and no jobs, before it exits.
pub const AUTOSTART_IDLE_EXIT_SECS: &str = "600";

fn start_daemon(socket: &Path) -> Result<UnixStream, ClientError> {
    let exe = daemon_exe();
    let runtime = socket.parent().unwrap_or(Path::new("."));
    crate::paths::private_dir(runtime).map_err(|e| ClientError::Start(format!("cannot create {}: {e}", runtime.display())))?;
    let log = OpenOptions::new().create(true).append(true).open(runtime.join("tesserad.log"))?;
    Command::new(&exe)
        .arg("--socket")
        .arg(socket)
        // Started on demand, so it should not outlive its use by long.
        .args(["--idle-exit", AUTOSTART_IDLE_EXIT_SECS])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| ClientError::Start(format!("{}: {e} (put tesserad on PATH or set TESSERA_BIN_DIR)", exe.display())))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => {
                return Err(ClientError::Start(format!("it did not open {} within 15 s ({e}); see {}", socket.display(), runtime.join("tesserad.log").display())))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
