//! One client connection: the handshake, then requests until the client leaves. Bad frames
//! get an error reply; only broken framing closes the connection, because after it there is
//! no telling where the next frame starts.

use std::sync::{mpsc, Arc};

use tessera_protocol::{
    parse_request, read_frame, to_body, write_frame, Blend, ErrorCode, ErrorReply, Event, FrameError, LayerRole,
    LayoutError, Request, SampleType, Submit, MAX_FRAME_LEN, PROTOCOL_VERSION,
};

use super::scheduler::{JobOutput, QueuedJob, Sched};
use super::{ClientOut, Outgoing, Shared, Stream, MAX_UNREAD_FRAMES};
use crate::buffers::{BufferError, ClientId};
use crate::ipc::BufSpec;

pub(super) fn serve(shared: Arc<Shared>, client: ClientId, stream: Stream, needs_token: bool) {
    let (tx, rx) = mpsc::sync_channel::<Outgoing>(MAX_UNREAD_FRAMES);
    let (Ok(mut writer), Ok(socket)) = (stream.try_clone(), stream.try_clone()) else { return };
    let tx = ClientOut { client, tx, socket: Arc::new(socket), dropped: Default::default() };
    shared.clients.lock().insert(client, tx.clone());
    // A writer thread per client, so a slow reader never stalls the scheduler or other clients.
    std::thread::spawn(move || {
        for out in rx {
            match out {
                Outgoing::Frame(body) => {
                    if write_frame(&mut writer, &body).is_err() {
                        break;
                    }
                }
                Outgoing::Close => break,
            }
        }
        writer.shutdown();
    });
    tracing::debug!(client, "connected");

    let mut session = Session { shared: shared.clone(), client, tx, greeted: false, needs_token };
    let mut reader = stream;
    loop {
        match read_frame(&mut reader, MAX_FRAME_LEN) {
            Ok(body) => {
                if !session.handle(&body) {
                    break;
                }
            }
            Err(FrameError::Closed) | Err(FrameError::Io(_)) => break,
            Err(e) => {
                session.reply_error(ErrorReply::new(None, ErrorCode::BadFrame, e.to_string()));
                session.tx.send(Outgoing::Close);
                break;
            }
        }
    }
    // The client is gone: its jobs are cancelled and its buffers deleted.
    shared.clients.lock().remove(&client);
    shared.schedule(Sched::ClientGone(client));
    shared.buffers.lock().drop_client(client);
    tracing::debug!(client, "disconnected");
}

struct Session {
    shared: Arc<Shared>,
    client: ClientId,
    tx: ClientOut,
    greeted: bool,
    needs_token: bool,
}

impl Session {
    fn reply(&self, event: Event) {
        self.tx.send(Outgoing::Frame(to_body(&event)));
    }
    fn reply_error(&self, e: ErrorReply) {
        tracing::debug!(client = self.client, code = ?e.code, "{}", e.message);
        self.reply(Event::Error(e));
    }

    /// Handles one frame; false closes the connection.
    fn handle(&mut self, body: &[u8]) -> bool {
        let req = match parse_request(body) {
            Ok(r) => r,
            Err(e) => {
                self.reply_error(e.into());
                return true;
            }
        };
        let id = req.id();
        if !self.greeted {
            return self.hello(req);
        }
        // `None`: nothing to say now (submit's `queued` and cancel's `ack` come from the
        // scheduler, in order with the job's own events).
        let result: Result<Option<Event>, ErrorReply> = match req {
            Request::Hello { .. } => {
                Err(ErrorReply::new(Some(id), ErrorCode::HandshakeRequired, "hello was already sent on this connection"))
            }
            Request::Ping { id } => Ok(Some(Event::Pong { id })),
            Request::List { id } => Ok(Some(Event::Listing {
                id,
                plugins: self.shared.plugins(),
                workers: self.shared.workers.lock().clone(),
                devices: self.shared.devices.lock().clone(),
            })),
            Request::Alloc { id, layout } => self.alloc(id, layout).map(Some),
            Request::Release { id, buffer } => self
                .shared
                .buffers
                .lock()
                .release(self.client, &buffer)
                .map(|buffer| Some(Event::Released { id, buffer }))
                .map_err(|e| buffer_error(id, e)),
            Request::Submit(s) => self.submit(s).map(|()| None),
            Request::Render(r) => self.render(r).map(|()| None),
            Request::ReleaseJob { id, job } => {
                if self.shared.kept.lock().release(job) {
                    Ok(Some(Event::Ack { id }))
                } else {
                    Err(ErrorReply::new(Some(id), ErrorCode::UnknownJob, format!("no finished job {job} is kept for exact renders")))
                }
            }
            Request::Cancel { id, job } => {
                self.shared.schedule(Sched::Cancel { client: self.client, job, req: id });
                Ok(None)
            }
        };
        match result {
            Ok(Some(event)) => self.reply(event),
            Ok(None) => {}
            Err(e) => self.reply_error(e),
        }
        true
    }

    fn hello(&mut self, req: Request) -> bool {
        let id = req.id();
        let Request::Hello { protocol, client, token, .. } = req else {
            self.reply_error(ErrorReply::new(Some(id), ErrorCode::HandshakeRequired, "the first message must be hello"));
            return true;
        };
        if protocol != PROTOCOL_VERSION {
            self.reply_error(ErrorReply::new(
                Some(id),
                ErrorCode::ProtocolMismatch,
                format!("client `{client}` speaks protocol {protocol}, tesserad {} speaks {PROTOCOL_VERSION}", env!("CARGO_PKG_VERSION")),
            ));
            self.tx.send(Outgoing::Close);
            return false;
        }
        if self.needs_token {
            let expected = self.shared.token.as_deref().unwrap_or_default();
            let ok = token.as_deref().is_some_and(|t| constant_time_eq(t.as_bytes(), expected.as_bytes()));
            if !ok {
                self.reply_error(ErrorReply::new(Some(id), ErrorCode::Unauthorized, "missing or wrong token").with_hint(format!(
                    "TCP clients must send the token stored in {} in hello",
                    self.shared.config.token_path.display()
                )));
                self.tx.send(Outgoing::Close);
                return false;
            }
        }
        self.greeted = true;
        tracing::info!(client = self.client, "hello from {client}");
        self.reply(Event::Welcome {
            id,
            protocol: PROTOCOL_VERSION,
            daemon: format!("tesserad {}", env!("CARGO_PKG_VERSION")),
            plugins: self.shared.plugins(),
            limits: self.shared.config.limits,
            capabilities: vec!["shm-file".into(), "progress".into(), "cancel".into(), "devices".into()],
            devices: self.shared.devices.lock().clone(),
        });
        true
    }

    fn alloc(&self, id: u64, layout: tessera_protocol::LayoutRequest) -> Result<Event, ErrorReply> {
        let layout = layout.resolve(&self.shared.config.limits).map_err(|e| layout_error(id, e))?;
        let mut infos = self
            .shared
            .buffers
            .lock()
            .alloc(self.client, &[layout], &self.shared.config.limits)
            .map_err(|e| buffer_error(id, e))?;
        Ok(Event::Allocated { id, buffer: infos.remove(0) })
    }

    /// Checks everything about a submit and allocates its outputs; the scheduler answers.
    fn submit(&self, s: Submit) -> Result<(), ErrorReply> {
        let id = s.id;
        let err = |code, msg: String| ErrorReply::new(Some(id), code, msg);
        let (plugin, model) = {
            let plugins = self.shared.plugins();
            let found = plugins.iter().find_map(|p| p.models.iter().find(|m| m.id == s.model).map(|m| (p.id.clone(), m.clone())));
            match (&s.plugin, found) {
                (Some(want), _) if !plugins.iter().any(|p| &p.id == want) => {
                    return Err(err(ErrorCode::UnknownPlugin, format!("no plugin `{want}` is installed")))
                }
                (Some(want), Some((owner, _))) if &owner != want => {
                    return Err(err(ErrorCode::UnknownModel, format!("plugin `{want}` has no model `{}` (plugin `{owner}` has)", s.model)))
                }
                (_, Some(found)) => found,
                (_, None) => {
                    let hint = if plugins.is_empty() {
                        "no plugins are loaded: check the worker's log and the plugin directories (--plugins or TESSERA_PLUGIN_DIR)".to_string()
                    } else {
                        format!("installed models: {}; install others with `tessera models fetch ID`",
                            plugins.iter().flat_map(|p| p.models.iter().map(|m| m.id.as_str())).collect::<Vec<_>>().join(", "))
                    };
                    return Err(err(ErrorCode::UnknownModel, format!("model `{}` is not installed", s.model)).with_hint(hint));
                }
            }
        };
        let install = match crate::models::imported::install_command(&plugin, &model.id) {
            Some(import) => Some(import),
            None => crate::models::catalog::find(&model.id).map(|_| format!("tessera models fetch {}", model.id)),
        };
        if let Some(install) = install {
            let store = crate::models::store::store_dir();
            if let Err(e) = crate::models::store::verify_cached(&store, &model.id) {
                return Err(err(ErrorCode::ModelNotInstalled, e.to_string())
                    .with_hint(format!("run `{install}` to install it (model store: {})", store.display())));
            }
        }
        if !model.scales.contains(&s.scale) {
            return Err(err(ErrorCode::UnsupportedScale, format!("model `{}` supports scales {:?}, not {}", model.id, model.scales, s.scale)));
        }
        let params = model.resolve_params(&s.params).map_err(|m| err(ErrorCode::BadParams, m))?;
        let sample = s.output_sample.unwrap_or(SampleType::F32);

        let mut buffers = self.shared.buffers.lock();
        let input = buffers.resolve(self.client, &s.input).map_err(|e| buffer_error(id, e))?;
        let (input_id, input_spec) = (input.info.id.clone(), BufSpec { path: input.info.path.clone(), layout: input.info.layout });
        // A client can truncate its own buffer file; the worker would then fault reading it.
        let file_len = std::fs::metadata(&input_spec.path).map(|m| m.len()).unwrap_or(0);
        if file_len < input_spec.layout.byte_len() {
            return Err(err(
                ErrorCode::BadLayout,
                format!("buffer `{input_id}` holds {file_len} bytes but its layout needs {}", input_spec.layout.byte_len()),
            )
            .with_hint("do not resize buffer files; release the buffer and alloc a new one"));
        }
        let out_layout = input_spec.layout.scaled(s.scale, sample);
        out_layout.validate(&self.shared.config.limits).map_err(|e| {
            let mut r = layout_error(id, e);
            r.message = format!("the ×{} result would be too large: {}", s.scale, r.message);
            r
        })?;
        let roles = model.layers_for(&params).to_vec();
        let layouts = vec![out_layout; roles.len()];
        let infos = buffers.alloc(self.client, &layouts, &self.shared.config.limits).map_err(|e| buffer_error(id, e))?;
        buffers.set_busy(&input_id, true);
        for info in &infos {
            buffers.set_busy(&info.id, true);
        }
        drop(buffers);

        // With a single detail layer it holds all the detail, whatever its role says.
        let one_detail = roles.iter().filter(|r| r.is_residual()).count() == 1;
        let outputs = roles
            .iter()
            .zip(infos)
            .map(|(&role, info)| {
                let (blend, offset) = match role {
                    LayerRole::Base => (Blend::Normal, 0.0),
                    _ if sample.is_integer() => (Blend::GrainMerge, 0.5),
                    _ => (Blend::Addition, 0.0),
                };
                let label = if one_detail && role.is_residual() { "detail" } else { role.label() };
                JobOutput { role, name: format!("Tessera ×{} · {label}", s.scale), info, blend, offset }
            })
            .collect();
        let job = self.shared.next_job.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.shared.schedule(Sched::Submit(QueuedJob {
            job,
            req: id,
            client: self.client,
            plugin,
            model: model.id,
            scale: s.scale,
            params_json: serde_json::Value::Object(params).to_string(),
            input_id,
            input: input_spec,
            outputs,
            keep: model.exact_render,
            device: s.device,
        }));
        Ok(())
    }

    /// An exact render of a kept job: a job of its own on the kept input, with the render's
    /// λ in its parameters (`render`), and one `exact` output layer.
    fn render(&self, r: tessera_protocol::Render) -> Result<(), ErrorReply> {
        let id = r.id;
        let err = |code, msg: String| ErrorReply::new(Some(id), code, msg);
        let kept = self.shared.kept.lock().get(r.job).cloned().ok_or_else(|| {
            err(ErrorCode::UnknownJob, format!("no finished job {} can be rendered exactly", r.job)).with_hint(format!(
                "render a job that finished with a model whose exact_render is true; tesserad keeps the last {} until release_job (and forgets them when it restarts): run the job again",
                super::kept::MAX_KEPT
            ))
        })?;
        if !r.lambda_pix.is_finite() || !r.lambda_sem.is_finite() || r.lambda_pix.abs() > 10.0 || r.lambda_sem.abs() > 10.0 {
            return Err(err(ErrorCode::BadParams, format!("λ_pix {} and λ_sem {} must be numbers within ±10", r.lambda_pix, r.lambda_sem)));
        }
        let mut params: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&kept.params_json).unwrap_or_default();
        params.insert("render".into(), serde_json::json!({"job": r.job, "lambda_pix": r.lambda_pix, "lambda_sem": r.lambda_sem}));
        let sample = r.output_sample.unwrap_or(SampleType::F32);
        let layout = kept.input.layout.scaled(kept.scale, sample);
        let info = self
            .shared
            .buffers
            .lock()
            .alloc(self.client, &[layout], &self.shared.config.limits)
            .map_err(|e| buffer_error(id, e))?
            .remove(0);
        self.shared.buffers.lock().set_busy(&info.id, true);
        let name = format!("Tessera ×{} · exact λ {:.2}/{:.2}", kept.scale, r.lambda_pix, r.lambda_sem);
        let output = JobOutput { role: LayerRole::Exact, name, info, blend: Blend::Normal, offset: 0.0 };
        let job = self.shared.next_job.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.shared.schedule(Sched::Submit(QueuedJob {
            job,
            req: id,
            client: self.client,
            plugin: kept.plugin,
            model: kept.model,
            scale: kept.scale,
            params_json: serde_json::Value::Object(params).to_string(),
            // Not a client buffer: nothing to mark busy.
            input_id: String::new(),
            input: kept.input,
            outputs: vec![output],
            keep: false,
            // Renders are a decode alone: the best device that runs the plugin.
            device: None,
        }));
        Ok(())
    }
}

fn layout_error(id: u64, e: LayoutError) -> ErrorReply {
    let code = match e {
        LayoutError::TooWide { .. } | LayoutError::TooManyPixels { .. } | LayoutError::TooManyBytes { .. } => ErrorCode::LimitExceeded,
        _ => ErrorCode::BadLayout,
    };
    ErrorReply::new(Some(id), code, e.to_string())
}

fn buffer_error(id: u64, e: BufferError) -> ErrorReply {
    ErrorReply::new(Some(id), e.code(), e.to_string())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
