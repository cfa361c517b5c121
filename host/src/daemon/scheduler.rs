//! The job queue of one worker, and the worker's supervision: spawn it, hand it one job at a
//! time, forward its progress, and when it dies fail its job, start a new one, and go on.

use std::collections::{HashMap, VecDeque};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ipc_channel::ipc::{IpcOneShotServer, IpcSender};
use tessera_protocol::{Blend, BufferInfo, ErrorCode, ErrorReply, Event, LayerRole, PluginInfo, ResultLayer, WorkerInfo, WorkerState};

use super::Shared;
use crate::buffers::ClientId;
use crate::ipc::{BufSpec, FromWorker, OutSpec, RunJob, ToWorker};

pub(crate) enum Sched {
    Submit(QueuedJob),
    Cancel { client: ClientId, job: u64, req: u64 },
    ClientGone(ClientId),
    Worker { generation: u64, msg: FromWorker },
    WorkerGone { generation: u64 },
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
    running: Option<Running>,
    worker: Option<WorkerProc>,
    generation: u64,
    restarts: u32,
    /// Consecutive failed starts; sets the back-off before the next try.
    start_failures: u32,
    next_start: Instant,
    shutdown: Option<(mpsc::Sender<()>, Instant)>,
}

impl Scheduler {
    pub fn new(shared: Arc<Shared>, rx: mpsc::Receiver<Sched>, tx: mpsc::Sender<Sched>) -> Scheduler {
        Scheduler {
            shared,
            rx,
            tx,
            queue: VecDeque::new(),
            served: HashMap::new(),
            starts: 0,
            running: None,
            worker: None,
            generation: 0,
            restarts: 0,
            start_failures: 0,
            next_start: Instant::now(),
            shutdown: None,
        }
    }

    pub fn run(mut self) {
        loop {
            self.enforce_cancel_deadline();
            self.find_hung_worker();
            if self.shutdown.is_none() {
                self.ensure_worker();
                self.start_next();
            }
            self.publish_state();
            let stop_now = self.shutdown.as_ref().is_some_and(|(_, deadline)| self.running.is_none() || Instant::now() > *deadline);
            if stop_now {
                self.stop_worker();
                if let Some((done, _)) = self.shutdown.take() {
                    let _ = done.send(());
                }
                return;
            }
            // Wake up now and then to retry a worker that failed to start.
            let msg = match self.rx.recv_timeout(Duration::from_millis(500)) {
                Ok(m) => m,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            self.handle(msg);
        }
    }

    fn handle(&mut self, msg: Sched) {
        match msg {
            Sched::Submit(job) => {
                if self.shutdown.is_some() {
                    self.finish_failed(job, ErrorCode::ShuttingDown, "tesserad is shutting down".into());
                    return;
                }
                let max = self.shared.config.limits.max_client_jobs as usize;
                let mine = self.queue.iter().filter(|j| j.client == job.client).count()
                    + self.running.as_ref().is_some_and(|r| r.job.client == job.client) as usize;
                if mine >= max {
                    let message = format!("this connection already has {mine} jobs queued or running, its limit: wait for one to finish");
                    self.finish_failed(job, ErrorCode::LimitExceeded, message);
                    return;
                }
                let position = self.queue.len() as u32 + self.running.is_some() as u32;
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
                if self.running.as_ref().is_some_and(|r| r.job.client == client) {
                    self.cancel_running();
                }
            }
            Sched::Worker { generation, msg } if generation == self.generation => {
                if let Some(w) = &mut self.worker {
                    w.heard = Instant::now();
                }
                self.on_worker_message(msg)
            }
            Sched::Worker { .. } => {}
            Sched::WorkerGone { generation } if generation == self.generation => self.worker_died(),
            Sched::WorkerGone { .. } => {}
            Sched::Shutdown(done) => {
                for job in std::mem::take(&mut self.queue) {
                    self.finish_failed(job, ErrorCode::ShuttingDown, "tesserad is shutting down; the job was not started".into());
                }
                self.cancel_running();
                self.shutdown = Some((done, Instant::now() + Duration::from_secs(10)));
            }
        }
    }

    fn cancel(&mut self, client: ClientId, job: u64, req: u64) {
        if let Some(pos) = self.queue.iter().position(|j| j.job == job && j.client == client) {
            let queued = self.queue.remove(pos).expect("position is in range");
            self.shared.send(client, &Event::Ack { id: req });
            self.finish_failed(queued, ErrorCode::Cancelled, format!("job {job} was cancelled before it started"));
            return;
        }
        if matches!(&self.running, Some(r) if r.job.job == job && r.job.client == client) {
            self.shared.send(client, &Event::Ack { id: req });
            self.cancel_running();
            return;
        }
        self.shared.send(
            client,
            &Event::Error(ErrorReply::new(Some(req), ErrorCode::UnknownJob, format!("no unfinished job {job} on this connection"))),
        );
    }

    /// Asks the worker to stop the running job, and starts the clock on it.
    fn cancel_running(&mut self) {
        let grace = self.shared.config.cancel_grace;
        let Some(r) = &mut self.running else { return };
        let job = r.job.job;
        r.cancel_deadline.get_or_insert(Instant::now() + grace);
        self.send_worker(ToWorker::Cancel { job });
    }

    /// An engine that ignores the cancel flag (hung, or stuck in a driver) must not block the
    /// queue: past the grace period its worker is killed and a new one started.
    fn enforce_cancel_deadline(&mut self) {
        let overdue = self.running.as_ref().and_then(|r| r.cancel_deadline).is_some_and(|d| Instant::now() > d);
        if let (true, Some(w)) = (overdue, &mut self.worker) {
            tracing::warn!("worker {} did not stop its job within {:?} of a cancel; killing it", w.pid, self.shared.config.cancel_grace);
            let _ = w.child.kill();
        }
    }

    /// A worker that falls silent (its heartbeat stops: stopped, deadlocked) or whose job
    /// reports nothing for `stall_timeout` (an engine stuck in a driver) is killed; its death
    /// fails the job, saying why, and a new worker starts. No cancel is needed for this.
    fn find_hung_worker(&mut self) {
        let config = &self.shared.config;
        let Some(w) = &mut self.worker else { return };
        if w.hung.is_some() {
            return;
        }
        let silent = w.heard.elapsed();
        let stalled = self.running.as_ref().map(|r| (r.job.job, r.progressed.elapsed()));
        let why = if silent > config.heartbeat_timeout {
            format!("the worker stopped answering for {:.0} s (hung: stopped, deadlocked or stuck in a driver)", silent.as_secs_f64())
        } else if let Some((job, quiet)) = stalled.filter(|(_, quiet)| *quiet > config.stall_timeout) {
            format!("job {job} reported no progress for {:.0} s (its engine is stuck)", quiet.as_secs_f64())
        } else {
            return;
        };
        tracing::error!("{why}: killing worker {}", w.pid);
        let _ = w.child.kill();
        w.hung = Some(why);
    }

    fn on_worker_message(&mut self, msg: FromWorker) {
        match msg {
            FromWorker::Hello { .. } | FromWorker::Heartbeat => {}
            FromWorker::Progress { job, done, total, stage } => {
                let Some(r) = &mut self.running else { return };
                if r.job.job != job {
                    return;
                }
                r.progressed = Instant::now();
                let elapsed = r.started.elapsed().as_secs_f64();
                let eta = (done > 0 && total >= done).then(|| elapsed * (total - done) as f64 / done as f64);
                self.shared.send(r.job.client, &Event::Progress { id: r.job.req, job, done, total, stage, eta });
            }
            FromWorker::Done { job } => {
                let Some(r) = self.running.take_if(|r| r.job.job == job) else { return };
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
                tracing::info!(job, seconds, "job done");
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
                let Some(r) = self.running.take_if(|r| r.job.job == job) else { return };
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

    fn worker_died(&mut self) {
        let Some(mut w) = self.worker.take() else { return };
        let status = reap(&mut w.child);
        tracing::error!("worker {} died ({status})", w.pid);
        self.restarts += 1;
        if let Some(r) = self.running.take() {
            let job = r.job.job;
            if r.cancel_deadline.is_some() {
                let code = if self.shutdown.is_some() { ErrorCode::ShuttingDown } else { ErrorCode::Cancelled };
                let message = format!("job {job} was cancelled; its engine did not stop in time, so its worker was restarted");
                self.finish_failed(r.job, code, message);
            } else if let Some(why) = &w.hung {
                self.finish_failed(r.job, ErrorCode::WorkerCrashed, format!("{why}; it was restarted, and job {job} failed"));
            } else {
                self.finish_failed(r.job, ErrorCode::WorkerCrashed, format!("the worker process died while running job {job} ({status})"));
            }
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

    fn start_next(&mut self) {
        if self.running.is_some() || self.worker.is_none() {
            return;
        }
        let fairest = self.queue.iter().enumerate().min_by_key(|(i, j)| (self.served.get(&j.client).copied().unwrap_or(0), *i));
        let Some((pos, _)) = fairest else { return };
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
        self.running = Some(Running { job, started: Instant::now(), progressed: Instant::now(), cancel_deadline: None });
        // If the send fails the worker is dead; its WorkerGone fails the job.
        self.send_worker(ToWorker::Run(run));
    }

    fn send_worker(&self, msg: ToWorker) {
        if let Some(w) = &self.worker {
            if let Err(e) = w.tx.send(msg) {
                tracing::warn!("cannot reach worker {}: {e}", w.pid);
            }
        }
    }

    /// Starts a worker if there is none, with back-off after failed starts.
    pub fn ensure_worker(&mut self) {
        if self.worker.is_some() || Instant::now() < self.next_start {
            return;
        }
        match self.spawn_worker() {
            Ok(w) => {
                tracing::info!("worker {} ready", w.pid);
                self.start_failures = 0;
                self.worker = Some(w);
            }
            Err(e) => {
                self.start_failures += 1;
                let wait = Duration::from_millis(250 << self.start_failures.min(6));
                tracing::error!("cannot start a worker: {e:#}; retrying in {wait:?}");
                self.next_start = Instant::now() + wait;
                // Jobs cannot wait forever for a worker that will not start.
                if self.start_failures >= 3 {
                    for job in std::mem::take(&mut self.queue) {
                        self.finish_failed(job, ErrorCode::WorkerCrashed, format!("no worker could be started: {e:#}"));
                    }
                }
            }
        }
    }

    fn spawn_worker(&mut self) -> anyhow::Result<WorkerProc> {
        let (server, name) = IpcOneShotServer::<FromWorker>::new()?;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("worker").arg("--ipc").arg(&name).stdin(Stdio::null());
        for dir in &self.shared.config.plugin_dirs {
            cmd.arg("--plugins").arg(dir);
        }
        let mut child = cmd.spawn()?;
        // accept() has no timeout (ipc-channel #201): run it aside, and unblock it by
        // connecting ourselves if the worker never comes.
        let (acc_tx, acc_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = acc_tx.send(server.accept());
        });
        let deadline = Instant::now() + self.shared.config.worker_start_timeout;
        let accepted = loop {
            match acc_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(r) => break Some(r),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
                        break None;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break None,
            }
        };
        let (receiver, hello) = match accepted {
            Some(Ok(pair)) => pair,
            other => {
                let _ = child.kill();
                let status = reap(&mut child);
                if other.is_none() {
                    let _ = IpcSender::<FromWorker>::connect(name);
                }
                anyhow::bail!("the worker did not say hello ({status})");
            }
        };
        let FromWorker::Hello { pid, device, plugins_json, load_errors, requests } = hello else {
            let _ = child.kill();
            reap(&mut child);
            anyhow::bail!("the worker's first message was not hello");
        };
        let plugins: Vec<PluginInfo> = plugins_json.iter().filter_map(|j| serde_json::from_str(j).ok()).collect();
        for e in &load_errors {
            tracing::error!("plugin failed to load: {e}");
        }
        if plugins.is_empty() {
            tracing::warn!("no plugins loaded from {:?}", self.shared.config.plugin_dirs);
        }
        tracing::debug!(device, "worker plugins: {:?}", plugins.iter().map(|p| &p.id).collect::<Vec<_>>());
        *self.shared.plugins.write() = plugins;

        self.generation += 1;
        let generation = self.generation;
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
        Ok(WorkerProc { child, tx: requests, pid, heard: Instant::now(), hung: None })
    }

    fn stop_worker(&mut self) {
        if let Some(mut w) = self.worker.take() {
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
        let state = match (&self.worker, &self.running) {
            (None, _) => if self.start_failures > 0 { WorkerState::Down } else { WorkerState::Starting },
            (Some(_), Some(_)) => WorkerState::Busy,
            (Some(_), None) => WorkerState::Idle,
        };
        *self.shared.workers.lock() = vec![WorkerInfo {
            id: "cpu".into(),
            device: "cpu".into(),
            pid: self.worker.as_ref().map(|w| w.pid),
            state,
            restarts: self.restarts,
            queued: self.queue.len() as u32,
        }];
    }
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
