//! The job queue and the workers' supervision, a worker per device: start each (beside the
//! scheduler, so a slow start holds up no other device), hand it one job at a time, forward
//! its progress, and when it dies fail its job, start a new one, and go on.

use std::collections::{HashMap, VecDeque};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ipc_channel::ipc::{IpcOneShotServer, IpcReceiver, IpcSender};
use tessera_protocol::{Blend, BufferInfo, DeviceInfo, ErrorCode, ErrorReply, Event, LayerRole, PluginInfo, ResultLayer, WorkerInfo, WorkerState};

use super::Shared;
use crate::buffers::ClientId;
use crate::ipc::{BufSpec, FromWorker, OutSpec, RunJob, ToWorker};

pub(crate) enum Sched {
    Submit(QueuedJob),
    Cancel { client: ClientId, job: u64, req: u64 },
    ClientGone(ClientId),
    Worker { generation: u64, msg: FromWorker },
    WorkerGone { generation: u64 },
    /// A starting worker connected (its first message) or the wait for it failed.
    Hello { attempt: u64, accepted: Result<(IpcReceiver<FromWorker>, FromWorker), String> },
    /// Cancel everything, stop the worker, then answer on the channel.
    Shutdown(mpsc::Sender<()>),
}

pub(crate) struct JobOutput {
    pub role: LayerRole,
    pub name: String,
    pub info: BufferInfo,
    pub blend: Blend,
    pub offset: f32,
}

pub(crate) struct QueuedJob {
    pub job: u64,
    /// The submit request's id, echoed by every event of the job.
    pub req: u64,
    pub client: ClientId,
    pub plugin: String,
    pub model: String,
    pub scale: u32,
    pub params_json: String,
    pub input_id: String,
    pub input: BufSpec,
    pub outputs: Vec<JobOutput>,
    /// Keep the job for exact renders once it finishes (its model's `exact_render`).
    pub keep: bool,
    /// The device the submit asked for; `None`: the best that runs its plugin.
    pub device: Option<String>,
}

struct Running {
    job: QueuedJob,
    started: Instant,
    /// The start or the last progress report.
    progressed: Instant,
    /// Set when a cancel was sent: past it, the worker is killed to get the queue moving.
    cancel_deadline: Option<Instant>,
}

struct WorkerProc {
    child: Child,
    tx: IpcSender<ToWorker>,
    pid: u32,
    /// The last message of any kind from it.
    heard: Instant,
    /// Why it was killed, when the daemon killed it for hanging: the failed job says so.
    hung: Option<String>,
}

/// A worker process that has not said hello yet. Starts run beside the scheduler (a CUDA
/// worker can take seconds to open its card), so the other devices' jobs and events go on.
struct Starting {
    child: Child,
    /// The one-shot server's name: connecting to it ends the accept thread of a worker that
    /// never came (ipc-channel's accept has no timeout, #201).
    name: String,
    deadline: Instant,
    attempt: u64,
}

/// One device and its worker: the worker's process, its job, and its restarts.
struct Slot {
    device: DeviceInfo,
    worker: Option<WorkerProc>,
    starting: Option<Starting>,
    running: Option<Running>,
    /// The plugins its worker loaded at its last start; `None` before the first.
    plugins: Option<Vec<PluginInfo>>,
    /// What failed to load in it, or why it could not start.
    error: Option<String>,
    /// Of its current worker: messages from an older one are dropped.
    generation: u64,
    restarts: u32,
    /// Consecutive failed starts; sets the back-off before the next try.
    start_failures: u32,
    next_start: Instant,
}

impl Slot {
    fn new(device: DeviceInfo) -> Slot {
        Slot { device, worker: None, starting: None, running: None, plugins: None, error: None, generation: 0, restarts: 0, start_failures: 0, next_start: Instant::now() }
    }
    /// Three starts in a row failed: its jobs go elsewhere or fail until a start succeeds.
    fn down(&self) -> bool {
        self.start_failures >= 3
    }
    fn runs(&self, plugin: &str) -> bool {
        self.plugins.as_ref().is_some_and(|ps| ps.iter().any(|p| p.id == plugin))
    }
}

/// Where a queued job goes.
enum Route {
    Slot(usize),
    /// To the first device whose worker has not started yet, once it has said what it runs.
    Wait(usize),
    Nowhere(ErrorCode, String),
}

pub(crate) struct Scheduler {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Sched>,
    tx: mpsc::Sender<Sched>,
    queue: VecDeque<QueuedJob>,
    /// When each client last had a job started (a count of starts): the next job is the
    /// oldest of the client served longest ago, so one client's many jobs cannot hold back
    /// another's one.
    served: HashMap<ClientId, u64>,
    starts: u64,
    /// One per device, best first (GPUs before the CPU).
    slots: Vec<Slot>,
    generation: u64,
    /// Numbers worker starts, so a late hello of an abandoned start is recognised.
    attempts: u64,
    shutdown: Option<(mpsc::Sender<()>, Instant)>,
}

impl Scheduler {
    pub fn new(shared: Arc<Shared>, rx: mpsc::Receiver<Sched>, tx: mpsc::Sender<Sched>) -> Scheduler {
        Scheduler { shared, rx, tx, queue: VecDeque::new(), served: HashMap::new(), starts: 0, slots: Vec::new(), generation: 0, attempts: 0, shutdown: None }
    }

    /// Finds the devices (a probe in a child process: tesserad itself opens no driver), and
    /// starts a worker for each, all at once, returning when each has said hello or failed
    /// (so the first clients see every plugin).
    pub fn start_workers(&mut self) {
        let devices = plan_devices(&self.shared.config);
        *self.shared.devices.lock() = devices.clone();
        self.slots = devices.into_iter().map(Slot::new).collect();
        self.ensure_workers();
        while self.slots.iter().any(|s| s.starting.is_some()) {
            if let Ok(msg) = self.rx.recv_timeout(Duration::from_millis(50)) {
                self.handle(msg);
            }
            self.check_starts();
        }
        self.publish_state();
    }

    pub fn run(mut self) {
        loop {
            self.enforce_cancel_deadline();
            self.find_hung_workers();
            self.check_starts();
            if self.shutdown.is_none() {
                self.ensure_workers();
                self.start_next();
            }
            self.publish_state();
            let stop_now = self.shutdown.as_ref().is_some_and(|(_, deadline)| self.slots.iter().all(|s| s.running.is_none()) || Instant::now() > *deadline);
            if stop_now {
                for i in 0..self.slots.len() {
                    self.stop_worker(i);
                    self.abandon_start(i);
                }
                if let Some((done, _)) = self.shutdown.take() {
                    let _ = done.send(());
                }
                return;
            }
            // Wake up now and then to retry a worker that failed to start, and more often
            // while one is starting, to see it exit or miss its deadline.
            let tick = if self.slots.iter().any(|s| s.starting.is_some()) { 50 } else { 500 };
            let msg = match self.rx.recv_timeout(Duration::from_millis(tick)) {
                Ok(m) => m,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            self.handle(msg);
        }
    }

    fn slot_of(&self, generation: u64) -> Option<usize> {
        self.slots.iter().position(|s| s.generation == generation && s.worker.is_some())
    }

    fn running_of(&self, client: ClientId, job: u64) -> Option<usize> {
        self.slots.iter().position(|s| s.running.as_ref().is_some_and(|r| r.job.job == job && r.job.client == client))
    }

    fn handle(&mut self, msg: Sched) {
        match msg {
            Sched::Submit(job) => {
                if self.shutdown.is_some() {
                    self.finish_failed(job, ErrorCode::ShuttingDown, "tesserad is shutting down".into());
                    return;
                }
                let max = self.shared.config.limits.max_client_jobs as usize;
                let running = self.slots.iter().filter(|s| s.running.as_ref().is_some_and(|r| r.job.client == job.client)).count();
                let mine = self.queue.iter().filter(|j| j.client == job.client).count() + running;
                if mine >= max {
                    let message = format!("this connection already has {mine} jobs queued or running, its limit: wait for one to finish");
                    self.finish_failed(job, ErrorCode::LimitExceeded, message);
                    return;
                }
                if let Some(device) = &job.device {
                    if let Some(message) = self.refuse_device(device, &job.plugin) {
                        self.finish_failed(job, ErrorCode::DeviceUnavailable, message);
                        return;
                    }
                }
                let position = self.queue.len() as u32 + self.slots.iter().filter(|s| s.running.is_some()).count() as u32;
                self.shared.send(job.client, &Event::Queued { id: job.req, job: job.job, position });
                self.queue.push_back(job);
            }
            Sched::Cancel { client, job, req } => self.cancel(client, job, req),
            Sched::ClientGone(client) => {
                self.served.remove(&client);
                let (gone, kept): (Vec<_>, Vec<_>) = self.queue.drain(..).partition(|j| j.client == client);
                self.queue = kept.into();
                for job in gone {
                    self.release_job_buffers(&job, false);
                }
                for i in 0..self.slots.len() {
                    if self.slots[i].running.as_ref().is_some_and(|r| r.job.client == client) {
                        self.cancel_running(i);
                    }
                }
            }
            Sched::Worker { generation, msg } => {
                if let Some(i) = self.slot_of(generation) {
                    if let Some(w) = &mut self.slots[i].worker {
                        w.heard = Instant::now();
                    }
                    self.on_worker_message(i, msg)
                }
            }
            Sched::WorkerGone { generation } => {
                if let Some(i) = self.slot_of(generation) {
                    self.worker_died(i)
                }
            }
            Sched::Hello { attempt, accepted } => {
                if let Some(i) = self.slots.iter().position(|s| s.starting.as_ref().is_some_and(|st| st.attempt == attempt)) {
                    let starting = self.slots[i].starting.take().expect("found above");
                    let result = self.finish_start(i, starting, accepted);
                    self.started(i, result);
                }
            }
            Sched::Shutdown(done) => {
                for job in std::mem::take(&mut self.queue) {
                    self.finish_failed(job, ErrorCode::ShuttingDown, "tesserad is shutting down; the job was not started".into());
                }
                for i in 0..self.slots.len() {
                    self.cancel_running(i);
                }
                self.shutdown = Some((done, Instant::now() + Duration::from_secs(10)));
            }
        }
    }

    /// Why a job asking for `device` cannot run there, if it cannot.
    fn refuse_device(&self, device: &str, plugin: &str) -> Option<String> {
        let Some(slot) = self.slots.iter().find(|s| s.device.id == device) else {
            let known: Vec<&str> = self.slots.iter().map(|s| s.device.id.as_str()).collect();
            return Some(format!("no worker runs on device `{device}` (devices: {})", known.join(", ")));
        };
        match &slot.plugins {
            Some(_) if !slot.runs(plugin) => {
                let why = slot.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
                Some(format!("plugin `{plugin}` does not run on {device}{why}"))
            }
            _ => None,
        }
    }

    /// The device for `job`: the one it asked for, else the best device whose worker runs its
    /// plugin.
    fn route(&self, job: &QueuedJob) -> Route {
        if let Some(device) = &job.device {
            let slot = self.slots.iter().position(|s| &s.device.id == device);
            if let Some(i) = slot.filter(|&i| self.slots[i].down()) {
                return Route::Nowhere(ErrorCode::WorkerCrashed, format!("no worker could be started on {device}: {}", self.slots[i].error.as_deref().unwrap_or("unknown error")));
            }
            if let Some(message) = self.refuse_device(device, &job.plugin) {
                return Route::Nowhere(ErrorCode::DeviceUnavailable, message);
            }
            let i = slot.expect("refuse_device refuses a device without a slot");
            return if self.slots[i].plugins.is_none() { Route::Wait(i) } else { Route::Slot(i) };
        }
        for (i, s) in self.slots.iter().enumerate() {
            if s.down() {
                continue;
            }
            if s.plugins.is_none() {
                return Route::Wait(i);
            }
            if s.runs(&job.plugin) {
                return Route::Slot(i);
            }
        }
        match self.slots.iter().find(|s| s.down()) {
            Some(s) => Route::Nowhere(ErrorCode::WorkerCrashed, format!("no worker could be started: {}", s.error.as_deref().unwrap_or("unknown error"))),
            None => Route::Nowhere(ErrorCode::UnknownPlugin, format!("no worker runs plugin `{}`", job.plugin)),
        }
    }

    fn cancel(&mut self, client: ClientId, job: u64, req: u64) {
        if let Some(pos) = self.queue.iter().position(|j| j.job == job && j.client == client) {
            let queued = self.queue.remove(pos).expect("position is in range");
            self.shared.send(client, &Event::Ack { id: req });
            self.finish_failed(queued, ErrorCode::Cancelled, format!("job {job} was cancelled before it started"));
            return;
        }
        if let Some(i) = self.running_of(client, job) {
            self.shared.send(client, &Event::Ack { id: req });
            self.cancel_running(i);
            return;
        }
        self.shared.send(
            client,
            &Event::Error(ErrorReply::new(Some(req), ErrorCode::UnknownJob, format!("no unfinished job {job} on this connection"))),
        );
    }

    /// Asks slot `i`'s worker to stop its job, and starts the clock on it.
    fn cancel_running(&mut self, i: usize) {
        let grace = self.shared.config.cancel_grace;
        let Some(r) = &mut self.slots[i].running else { return };
        let job = r.job.job;
        r.cancel_deadline.get_or_insert(Instant::now() + grace);
        self.send_worker(i, ToWorker::Cancel { job });
    }

    /// An engine that ignores the cancel flag (hung, or stuck in a driver) must not block the
    /// queue: past the grace period its worker is killed and a new one started.
    fn enforce_cancel_deadline(&mut self) {
        let grace = self.shared.config.cancel_grace;
        for s in &mut self.slots {
            let overdue = s.running.as_ref().and_then(|r| r.cancel_deadline).is_some_and(|d| Instant::now() > d);
            if let (true, Some(w)) = (overdue, &mut s.worker) {
                tracing::warn!("worker {} ({}) did not stop its job within {grace:?} of a cancel; killing it", w.pid, s.device.id);
                let _ = w.child.kill();
            }
        }
    }

    /// A worker that falls silent (its heartbeat stops: stopped, deadlocked) or whose job
    /// reports nothing for `stall_timeout` (an engine stuck in a driver) is killed; its death
    /// fails the job, saying why, and a new worker starts. No cancel is needed for this.
    fn find_hung_workers(&mut self) {
        let config = &self.shared.config;
        for s in &mut self.slots {
            let Some(w) = &mut s.worker else { continue };
            if w.hung.is_some() {
                continue;
            }
            let silent = w.heard.elapsed();
            let stalled = s.running.as_ref().map(|r| (r.job.job, r.progressed.elapsed()));
            let why = if silent > config.heartbeat_timeout {
                format!("the worker stopped answering for {:.0} s (hung: stopped, deadlocked or stuck in a driver)", silent.as_secs_f64())
            } else if let Some((job, quiet)) = stalled.filter(|(_, quiet)| *quiet > config.stall_timeout) {
                format!("job {job} reported no progress for {:.0} s (its engine is stuck)", quiet.as_secs_f64())
            } else {
                continue;
            };
            tracing::error!("{why}: killing worker {} ({})", w.pid, s.device.id);
            let _ = w.child.kill();
            w.hung = Some(why);
        }
    }

    fn on_worker_message(&mut self, i: usize, msg: FromWorker) {
        match msg {
            FromWorker::Hello { .. } | FromWorker::Heartbeat => {}
            FromWorker::Progress { job, done, total, stage } => {
                let Some(r) = &mut self.slots[i].running else { return };
                if r.job.job != job {
                    return;
                }
                r.progressed = Instant::now();
                let elapsed = r.started.elapsed().as_secs_f64();
                let eta = (done > 0 && total >= done).then(|| elapsed * (total - done) as f64 / done as f64);
                self.shared.send(r.job.client, &Event::Progress { id: r.job.req, job, done, total, stage, eta });
            }
            FromWorker::Done { job } => {
                let Some(r) = self.slots[i].running.take_if(|r| r.job.job == job) else { return };
                let seconds = r.started.elapsed().as_secs_f64();
                self.release_job_buffers(&r.job, true);
                let layers = r
                    .job
                    .outputs
                    .iter()
                    .map(|o| ResultLayer {
                        role: o.role,
                        name: o.name.clone(),
                        buffer: o.info.clone(),
                        blend: o.blend,
                        opacity: 1.0,
                        offset: o.offset,
                    })
                    .collect();
                tracing::info!(job, seconds, device = self.slots[i].device.id, "job done");
                if r.job.keep {
                    let kept = super::kept::KeptJob {
                        job,
                        plugin: r.job.plugin.clone(),
                        model: r.job.model.clone(),
                        scale: r.job.scale,
                        params_json: r.job.params_json.clone(),
                        input: r.job.input.clone(),
                    };
                    let dir = self.shared.buffers.lock().dir().to_path_buf();
                    self.shared.kept.lock().keep(kept, &dir);
                }
                self.shared.send(r.job.client, &Event::Result { id: r.job.req, job, layers, seconds });
            }
            FromWorker::Failed { job, cancelled, message } => {
                let Some(r) = self.slots[i].running.take_if(|r| r.job.job == job) else { return };
                let code = match (cancelled, self.shutdown.is_some()) {
                    (true, true) => ErrorCode::ShuttingDown,
                    (true, false) => ErrorCode::Cancelled,
                    (false, _) => ErrorCode::EngineFailed,
                };
                let message = if cancelled { format!("job {job} was cancelled") } else { format!("job {job} failed: {message}") };
                self.finish_failed(r.job, code, message);
            }
        }
    }

    fn worker_died(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let Some(mut w) = slot.worker.take() else { return };
        let status = reap(&mut w.child);
        let device = slot.device.id.clone();
        tracing::error!("worker {} ({device}) died ({status})", w.pid);
        slot.restarts += 1;
        let Some(r) = slot.running.take() else { return };
        let job = r.job.job;
        let on = if self.slots.len() > 1 { format!(" on {device}") } else { String::new() };
        if r.cancel_deadline.is_some() {
            let code = if self.shutdown.is_some() { ErrorCode::ShuttingDown } else { ErrorCode::Cancelled };
            let message = format!("job {job} was cancelled; its engine did not stop in time, so its worker{on} was restarted");
            self.finish_failed(r.job, code, message);
        } else if let Some(why) = &w.hung {
            self.finish_failed(r.job, ErrorCode::WorkerCrashed, format!("{why}; it was restarted, and job {job} failed"));
        } else {
            self.finish_failed(r.job, ErrorCode::WorkerCrashed, format!("the worker process{on} died while running job {job} ({status})"));
        }
    }

    /// Ends a job with an error: its outputs are deleted, its input is free again.
    fn finish_failed(&mut self, job: QueuedJob, code: ErrorCode, message: String) {
        self.release_job_buffers(&job, false);
        tracing::info!(job = job.job, ?code, "{message}");
        self.shared.send(job.client, &Event::Error(ErrorReply::new(Some(job.req), code, message).for_job(job.job)));
    }

    fn release_job_buffers(&self, job: &QueuedJob, keep_outputs: bool) {
        let mut buffers = self.shared.buffers.lock();
        buffers.set_busy(&job.input_id, false);
        for o in &job.outputs {
            if keep_outputs {
                buffers.set_busy(&o.info.id, false);
            } else {
                buffers.remove(&o.info.id);
            }
        }
    }

    /// Gives each idle worker the fairest job routed to it, and fails the jobs no worker can
    /// run.
    fn start_next(&mut self) {
        let mut pos = 0;
        while pos < self.queue.len() {
            if let Route::Nowhere(code, message) = self.route(&self.queue[pos]) {
                let job = self.queue.remove(pos).expect("position is in range");
                self.finish_failed(job, code, message);
            } else {
                pos += 1;
            }
        }
        for i in 0..self.slots.len() {
            if self.slots[i].running.is_some() || self.slots[i].worker.is_none() {
                continue;
            }
            let fairest = self
                .queue
                .iter()
                .enumerate()
                .filter(|(_, j)| matches!(self.route(j), Route::Slot(s) if s == i))
                .min_by_key(|(p, j)| (self.served.get(&j.client).copied().unwrap_or(0), *p));
            let Some((pos, _)) = fairest else { continue };
            let job = self.queue.remove(pos).expect("position is in range");
            self.starts += 1;
            self.served.insert(job.client, self.starts);
            let run = RunJob {
                job: job.job,
                plugin: job.plugin.clone(),
                model: job.model.clone(),
                scale: job.scale,
                params_json: job.params_json.clone(),
                input: job.input.clone(),
                outputs: job
                    .outputs
                    .iter()
                    .map(|o| OutSpec { role: o.role, buf: BufSpec { path: o.info.path.clone(), layout: o.info.layout }, offset: o.offset })
                    .collect(),
            };
            self.slots[i].running = Some(Running { job, started: Instant::now(), progressed: Instant::now(), cancel_deadline: None });
            // If the send fails the worker is dead; its WorkerGone fails the job.
            self.send_worker(i, ToWorker::Run(run));
        }
    }

    fn send_worker(&self, i: usize, msg: ToWorker) {
        if let Some(w) = &self.slots[i].worker {
            if let Err(e) = w.tx.send(msg) {
                tracing::warn!("cannot reach worker {} ({}): {e}", w.pid, self.slots[i].device.id);
            }
        }
    }

    /// Starts a worker for every device that has none, with back-off after failed starts.
    fn ensure_workers(&mut self) {
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if slot.worker.is_some() || slot.starting.is_some() || Instant::now() < slot.next_start {
                continue;
            }
            match self.launch(i) {
                Ok(starting) => self.slots[i].starting = Some(starting),
                Err(e) => self.started(i, Err(e)),
            }
        }
    }

    /// Fails the starts whose worker exited or missed its deadline before saying hello.
    fn check_starts(&mut self) {
        for i in 0..self.slots.len() {
            let Some(st) = &mut self.slots[i].starting else { continue };
            let exited = matches!(st.child.try_wait(), Ok(Some(_)));
            if exited || Instant::now() > st.deadline {
                let status = self.abandon_start(i).unwrap_or_default();
                self.started(i, Err(anyhow::anyhow!("the worker did not say hello ({status})")));
            }
        }
    }

    /// Kills a worker that is starting and ends its accept thread; the exit status, if one
    /// was starting.
    fn abandon_start(&mut self, i: usize) -> Option<String> {
        let mut st = self.slots[i].starting.take()?;
        let _ = st.child.kill();
        let status = reap(&mut st.child);
        let _ = IpcSender::<FromWorker>::connect(st.name);
        Some(status)
    }

    /// Records how a start ended: the worker and its plugins, or the failure and the back-off.
    fn started(&mut self, i: usize, result: anyhow::Result<(WorkerProc, Vec<PluginInfo>, Vec<String>)>) {
        let slot = &mut self.slots[i];
        match result {
            Ok((w, plugins, load_errors)) => {
                tracing::info!("worker {} ready on {}", w.pid, slot.device.id);
                slot.start_failures = 0;
                slot.worker = Some(w);
                slot.plugins = Some(plugins);
                slot.error = (!load_errors.is_empty()).then(|| load_errors.join("; "));
                self.publish_plugins();
            }
            Err(e) => {
                slot.start_failures += 1;
                let wait = Duration::from_millis(250 << slot.start_failures.min(6));
                tracing::error!("cannot start a worker on {}: {e:#}; retrying in {wait:?}", slot.device.id);
                slot.next_start = Instant::now() + wait;
                slot.error = Some(format!("{e:#}"));
            }
        }
    }

    /// The plugins of every worker, each once: the best device's build of it first.
    fn publish_plugins(&self) {
        let mut all: Vec<PluginInfo> = Vec::new();
        for p in self.slots.iter().filter_map(|s| s.plugins.as_ref()).flatten() {
            if !all.iter().any(|q| q.id == p.id) {
                all.push(p.clone());
            }
        }
        *self.shared.plugins.write() = all;
    }

    /// Starts slot `i`'s worker process; its hello comes as [`Sched::Hello`].
    fn launch(&mut self, i: usize) -> anyhow::Result<Starting> {
        let device = self.slots[i].device.id.clone();
        let (server, name) = IpcOneShotServer::<FromWorker>::new()?;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("worker").arg("--ipc").arg(&name).arg("--device").arg(&device).stdin(Stdio::null());
        for dir in &self.shared.config.plugin_dirs {
            cmd.arg("--plugins").arg(dir);
        }
        let child = cmd.spawn()?;
        self.attempts += 1;
        let attempt = self.attempts;
        let tx = self.tx.clone();
        std::thread::Builder::new().name(format!("worker-{device}-accept")).spawn(move || {
            let accepted = server.accept().map_err(|e| e.to_string());
            let _ = tx.send(Sched::Hello { attempt, accepted });
        })?;
        Ok(Starting { child, name, deadline: Instant::now() + self.shared.config.worker_start_timeout, attempt })
    }

    /// The worker of slot `i` once it connected: its hello read, its messages forwarded.
    fn finish_start(&mut self, i: usize, starting: Starting, accepted: Result<(IpcReceiver<FromWorker>, FromWorker), String>) -> anyhow::Result<(WorkerProc, Vec<PluginInfo>, Vec<String>)> {
        let device = self.slots[i].device.id.clone();
        let Starting { mut child, .. } = starting;
        let (receiver, hello) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                let _ = child.kill();
                let status = reap(&mut child);
                anyhow::bail!("the worker did not say hello ({e}; {status})");
            }
        };
        let FromWorker::Hello { pid, device: _, plugins_json, load_errors, requests } = hello else {
            let _ = child.kill();
            reap(&mut child);
            anyhow::bail!("the worker's first message was not hello");
        };
        let plugins: Vec<PluginInfo> = plugins_json.iter().filter_map(|j| serde_json::from_str(j).ok()).collect();
        for e in &load_errors {
            tracing::error!("plugin failed to load on {device}: {e}");
        }
        if plugins.is_empty() {
            tracing::warn!("no plugins for {device} loaded from {:?}", self.shared.config.plugin_dirs);
        }
        tracing::debug!(device, "worker plugins: {:?}", plugins.iter().map(|p| &p.id).collect::<Vec<_>>());

        self.generation += 1;
        let generation = self.generation;
        self.slots[i].generation = generation;
        let tx = self.tx.clone();
        std::thread::Builder::new().name(format!("worker-{pid}-rx")).spawn(move || loop {
            match receiver.recv() {
                Ok(msg) => {
                    if tx.send(Sched::Worker { generation, msg }).is_err() {
                        return;
                    }
                }
                Err(_) => {
                    let _ = tx.send(Sched::WorkerGone { generation });
                    return;
                }
            }
        })?;
        Ok((WorkerProc { child, tx: requests, pid, heard: Instant::now(), hung: None }, plugins, load_errors))
    }

    fn stop_worker(&mut self, i: usize) {
        if let Some(mut w) = self.slots[i].worker.take() {
            let _ = w.tx.send(ToWorker::Shutdown);
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = w.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
    }

    fn publish_state(&self) {
        let mut queued = vec![0u32; self.slots.len()];
        for job in &self.queue {
            if let Route::Slot(i) | Route::Wait(i) = self.route(job) {
                queued[i] += 1;
            }
        }
        *self.shared.workers.lock() = self
            .slots
            .iter()
            .zip(queued)
            .map(|(s, queued)| WorkerInfo {
                id: s.device.id.clone(),
                device: s.device.id.clone(),
                pid: s.worker.as_ref().map(|w| w.pid),
                state: match (&s.worker, &s.running) {
                    (None, _) => if s.start_failures > 0 { WorkerState::Down } else { WorkerState::Starting },
                    (Some(_), Some(_)) => WorkerState::Busy,
                    (Some(_), None) => WorkerState::Idle,
                },
                restarts: s.restarts,
                queued,
                plugins: s.plugins.iter().flatten().map(|p| p.id.clone()).collect(),
                error: s.error.clone(),
            })
            .collect();
    }
}

/// The devices that get a worker, best first: the CUDA cards (each its own worker, so a
/// fault on one fails only its job), then the CPU, which is always there.
fn plan_devices(config: &super::Config) -> Vec<DeviceInfo> {
    let wants_cuda = config.devices.as_ref().is_none_or(|ids| ids.iter().any(|id| id.starts_with("cuda")));
    let probe = match (wants_cuda, std::env::current_exe()) {
        (true, Ok(exe)) => crate::devices::probe_in_child(&exe, Duration::from_secs(20)),
        (true, Err(e)) => crate::devices::Probe { cuda: Vec::new(), none_because: Some(format!("cannot find tesserad's own executable: {e}")) },
        (false, _) => crate::devices::Probe::default(),
    };
    let mut devices = match &config.devices {
        None => {
            if let Some(why) = &probe.none_because {
                tracing::info!("no CUDA device ({why}): jobs run on the CPU");
            }
            let mut all = probe.cuda.clone();
            all.push(crate::devices::cpu());
            all
        }
        Some(ids) => ids
            .iter()
            .map(|id| match (id.as_str(), probe.cuda.iter().find(|d| &d.id == id)) {
                ("cpu", _) => crate::devices::cpu(),
                (_, Some(found)) => found.clone(),
                (_, None) => {
                    let why = probe.none_because.as_deref().unwrap_or("the driver does not list it");
                    tracing::warn!("{id} was asked for but not found ({why}); its worker will run no GPU plugin");
                    DeviceInfo { id: id.clone(), name: format!("{id} (not found: {why})"), memory_bytes: None, compute_capability: None }
                }
            })
            .collect(),
    };
    for d in devices.iter().filter(|d| d.id != "cpu") {
        tracing::info!("{}: {} ({} MiB, compute capability {})", d.id, d.name, d.memory_bytes.unwrap_or(0) >> 20, d.compute_capability.as_deref().unwrap_or("?"));
    }
    devices.sort_by_key(|d| d.id == "cpu");
    devices
}

/// Waits briefly for a dead child and describes how it ended.
fn reap(child: &mut Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                use std::os::unix::process::ExitStatusExt;
                return match (status.code(), status.signal()) {
                    (_, Some(sig)) => format!("killed by signal {sig}"),
                    (Some(code), _) => format!("exit code {code}"),
                    _ => status.to_string(),
                };
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return "did not exit; killed".into();
            }
            Err(e) => return format!("status unknown: {e}"),
        }
    }
}
