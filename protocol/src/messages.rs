//! Every message of the protocol. Requests carry a client-chosen `id` that replies and job
//! events echo; unknown fields are ignored; unknown types get an `error`, never a disconnect.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::describe::{LayerRole, PluginInfo};
use crate::layout::{Layout, LayoutRequest, Limits, SampleType};

/// Major protocol version. A client with another major is refused in `hello`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Client → daemon.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Hello {
        id: u64,
        protocol: u32,
        client: String,
        /// Required on TCP connections: the contents of the daemon's token file.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    Alloc { id: u64, layout: LayoutRequest },
    Release { id: u64, buffer: String },
    Submit(Submit),
    Cancel { id: u64, job: u64 },
    List { id: u64 },
    Ping { id: u64 },
    Render(Render),
    /// Ends a finished job's exact renders: what it kept for them is freed. Answered `ack`.
    ReleaseJob { id: u64, job: u64 },
}

pub const REQUEST_TYPES: &[&str] =
    &["hello", "alloc", "release", "submit", "cancel", "list", "ping", "render", "release_job"];

/// An exact render of a finished job of this connection at other parameters, without running
/// the job again where the model kept what it needs (PiSA-SR: its latents, one VAE decode).
/// Answered like a submit (`queued`, `progress`, then `result` with one `exact` layer, or
/// `error`), under a job id of its own.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Render {
    pub id: u64,
    /// The finished job to render again.
    pub job: u64,
    pub lambda_pix: f64,
    pub lambda_sem: f64,
    /// Sample type of the result layer; `f32` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_sample: Option<SampleType>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Submit {
    pub id: u64,
    /// Optional: model ids are unique across plugins. When given it must own the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    pub model: String,
    pub scale: u32,
    /// The input buffer: its id, or the path `allocated` returned.
    pub input: String,
    #[serde(default)]
    pub params: Map<String, Value>,
    /// Sample type of the result layers; `f32` when absent. Integer results store residual
    /// layers as `0.5 + R` (see `ResultLayer::offset`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_sample: Option<SampleType>,
    /// The device to run on (`cpu`, `cuda:0`, as `welcome` lists them); absent: the best
    /// device whose worker runs the model's plugin (a GPU before the CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

impl Request {
    pub fn id(&self) -> u64 {
        match self {
            Request::Hello { id, .. }
            | Request::Alloc { id, .. }
            | Request::Release { id, .. }
            | Request::Cancel { id, .. }
            | Request::List { id }
            | Request::Ping { id }
            | Request::ReleaseJob { id, .. } => *id,
            Request::Submit(s) => s.id,
            Request::Render(r) => r.id,
        }
    }
}

/// A daemon-owned pixel buffer, memory-mapped by path.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BufferInfo {
    pub id: String,
    pub path: String,
    /// File size in bytes (`layout.byte_len()`).
    pub size: u64,
    pub layout: Layout,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Blend {
    Normal,
    /// `out = below + layer − 0.5`: residuals stored as `0.5 + R` in integer buffers.
    GrainMerge,
    /// `out = below + layer`: signed residuals in float buffers.
    Addition,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ResultLayer {
    pub role: LayerRole,
    /// A name for people: `Tessera ×4 · pixel detail`.
    pub name: String,
    pub buffer: BufferInfo,
    pub blend: Blend,
    pub opacity: f32,
    /// Stored value = `offset + R`: 0.5 for residuals in integer buffers, else 0.
    pub offset: f32,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WorkerInfo {
    pub id: String,
    /// The id of the device it runs on (one of `welcome`'s `devices`).
    pub device: String,
    pub pid: Option<u32>,
    pub state: WorkerState,
    pub restarts: u32,
    pub queued: u32,
    /// The plugins it runs, as of its last start.
    #[serde(default)]
    pub plugins: Vec<String>,
    /// Why it is down, or what failed to load in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A device a worker runs on: the CPU always, and each CUDA card the driver reports.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    /// `cpu`, `cuda:0`, … as a submit's `device` names it.
    pub id: String,
    /// For people: `NVIDIA H100 80GB HBM3`, the CPU's model name.
    pub name: String,
    /// Total memory in bytes: the card's, or the machine's for the CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CUDA compute capability, `9.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_capability: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Starting,
    Idle,
    Busy,
    Down,
}

/// Daemon → client.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Welcome {
        id: u64,
        protocol: u32,
        daemon: String,
        plugins: Vec<PluginInfo>,
        limits: Limits,
        capabilities: Vec<String>,
        /// The devices that have a worker, best first.
        #[serde(default)]
        devices: Vec<DeviceInfo>,
    },
    Allocated { id: u64, buffer: BufferInfo },
    Released { id: u64, buffer: String },
    Queued { id: u64, job: u64, position: u32 },
    Progress {
        id: u64,
        job: u64,
        done: u64,
        total: u64,
        stage: String,
        /// Estimated seconds left, once there is a rate to go by.
        eta: Option<f64>,
    },
    Result { id: u64, job: u64, layers: Vec<ResultLayer>, seconds: f64 },
    Error(ErrorReply),
    /// The cancel request was taken; the job itself ends with `error {code: "cancelled"}`.
    Ack { id: u64 },
    Listing {
        id: u64,
        plugins: Vec<PluginInfo>,
        workers: Vec<WorkerInfo>,
        #[serde(default)]
        devices: Vec<DeviceInfo>,
    },
    Pong { id: u64 },
}

pub const EVENT_TYPES: &[&str] = &[
    "welcome", "allocated", "released", "queued", "progress", "result", "error", "ack", "listing",
    "pong",
];

impl Event {
    /// The request this event answers or belongs to (a job's events carry its submit's id);
    /// `None` only for errors about a frame whose id could not be read.
    pub fn id(&self) -> Option<u64> {
        Some(match self {
            Event::Welcome { id, .. }
            | Event::Allocated { id, .. }
            | Event::Released { id, .. }
            | Event::Queued { id, .. }
            | Event::Progress { id, .. }
            | Event::Result { id, .. }
            | Event::Ack { id }
            | Event::Listing { id, .. }
            | Event::Pong { id } => *id,
            Event::Error(e) => return e.id,
        })
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErrorReply {
    /// The request this answers, when it could be read.
    pub id: Option<u64>,
    /// The job this ends, for job errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
    /// What the user can do about it.
    pub hint: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Broken framing (truncated, oversized); the connection is closed after this reply.
    BadFrame,
    InvalidJson,
    /// Valid JSON that is not a valid message: missing or mistyped fields.
    BadRequest,
    UnknownType,
    /// The first message must be `hello`, and only the first.
    HandshakeRequired,
    ProtocolMismatch,
    Unauthorized,
    BadLayout,
    LimitExceeded,
    /// The buffer directory has no room left for the buffer.
    NoSpace,
    UnknownBuffer,
    /// A buffer path that does not name one of this client's buffers in the buffer directory.
    ForeignPath,
    /// The buffer is the input or output of a job that has not finished.
    BufferBusy,
    UnknownPlugin,
    UnknownModel,
    /// The engine knows the model but its weights are not in the model store.
    ModelNotInstalled,
    UnsupportedScale,
    BadParams,
    /// The submit named a device that has no worker, or whose worker does not run the plugin.
    DeviceUnavailable,
    UnknownJob,
    Cancelled,
    WorkerCrashed,
    EngineFailed,
    ShuttingDown,
    Internal,
}

impl ErrorReply {
    pub fn new(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> ErrorReply {
        ErrorReply { id, job: None, code, message: message.into(), hint: code.hint().into() }
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> ErrorReply {
        self.hint = hint.into();
        self
    }
    pub fn for_job(mut self, job: u64) -> ErrorReply {
        self.job = Some(job);
        self
    }
}

impl ErrorCode {
    /// The default advice for each code; call sites add a sharper hint where they know more.
    pub fn hint(self) -> &'static str {
        use ErrorCode::*;
        match self {
            BadFrame => "send a 4-byte little-endian length followed by that many bytes of JSON (at most 1 MiB); reconnect to continue",
            InvalidJson => "each frame must hold one UTF-8 JSON object",
            BadRequest => "see protocol/README.md for the fields of each message",
            UnknownType => "known request types: hello, alloc, release, submit, cancel, list, ping, render, release_job",
            HandshakeRequired => "send hello {protocol, client} as the first message, and only once",
            ProtocolMismatch => "update the adapter or the daemon so both speak the same protocol major version",
            Unauthorized => "TCP clients must send the token from the daemon's token file in hello",
            BadLayout => "check width, height, channels, sample type and stride",
            LimitExceeded => "work on a smaller layer, release buffers you no longer need or wait for a job to finish; tesserad's limits are set with --max-pixels, --max-buffer-bytes, --max-client-bytes, --max-client-buffers and --max-client-jobs",
            NoSpace => "free memory or disk in the buffer directory, or start tesserad with --runtime-dir on a larger filesystem",
            UnknownBuffer => "use a buffer id returned by alloc or result that has not been released",
            ForeignPath => "pass a buffer id (or the exact path) that alloc returned to this connection",
            BufferBusy => "wait for the job using the buffer to finish, or cancel it",
            UnknownPlugin => "send list to see the installed plugins",
            UnknownModel => "send list to see the installed models; install others with `tessera models fetch ID`",
            ModelNotInstalled => "install the model's weights with `tessera models fetch ID`",
            UnsupportedScale => "send list to see the scales each model supports",
            BadParams => "send list to see each model's parameters, their types and ranges",
            DeviceUnavailable => "send list to see the devices, their workers and the plugins each runs; leave `device` out to run on the best one",
            UnknownJob => "the job has already finished or was never submitted on this connection",
            Cancelled => "the job was cancelled; submit it again to rerun it",
            WorkerCrashed => "the worker process died and was restarted; submit the job again, and report a bug if it keeps happening",
            EngineFailed => "see the daemon log for details",
            ShuttingDown => "the daemon is stopping; start it again and resubmit",
            Internal => "this is a bug in tesserad; please report it with the daemon log",
        }
    }
}

/// Why a frame could not be read as a request, with the id to answer when one was readable.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
}

impl From<RequestError> for ErrorReply {
    fn from(e: RequestError) -> ErrorReply {
        ErrorReply::new(e.id, e.code, e.message)
    }
}

/// Parses one frame's body into a request, telling apart invalid JSON, an unknown type and
/// wrong fields, and recovering the request id wherever the JSON allows.
pub fn parse_request(body: &[u8]) -> Result<Request, RequestError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| RequestError {
        id: None,
        code: ErrorCode::InvalidJson,
        message: format!("the frame is not valid JSON: {e}"),
    })?;
    let Value::Object(obj) = &value else {
        return Err(RequestError {
            id: None,
            code: ErrorCode::BadRequest,
            message: "a message must be a JSON object".into(),
        });
    };
    let id = match obj.get("id") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(id) => Some(id),
            None => {
                return Err(RequestError {
                    id: None,
                    code: ErrorCode::BadRequest,
                    message: format!("`id` must be a non-negative integer, not {v}"),
                })
            }
        },
    };
    let bad = |code, message: String| RequestError { id, code, message };
    let ty = match obj.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(v) => return Err(bad(ErrorCode::BadRequest, format!("`type` must be a string, not {v}"))),
        None => return Err(bad(ErrorCode::BadRequest, "the message has no `type`".into())),
    };
    if !REQUEST_TYPES.contains(&ty) {
        return Err(bad(ErrorCode::UnknownType, format!("unknown message type `{ty}`")));
    }
    if id.is_none() {
        return Err(bad(ErrorCode::BadRequest, format!("`{ty}` needs an integer `id`")));
    }
    serde_json::from_value(value.clone())
        .map_err(|e| bad(ErrorCode::BadRequest, format!("bad `{ty}` message: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_are_told_apart() {
        let e = parse_request(b"{nope").unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::InvalidJson, None));
        let e = parse_request(b"[1,2]").unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = parse_request(br#"{"type":"frobnicate","id":4}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::UnknownType, Some(4)));
        let e = parse_request(br#"{"type":"alloc","id":5,"layout":{"width":"wide"}}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(5)));
        assert!(e.message.contains("alloc"), "{}", e.message);
        let e = parse_request(br#"{"type":"ping","id":-1}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = parse_request(br#"{"type":"ping"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let r = parse_request(br#"{"type":"ping","id":9,"future":true}"#).unwrap();
        assert_eq!(r, Request::Ping { id: 9 });
    }
}
