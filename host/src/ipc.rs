//! Messages between tesserad and its worker processes, over ipc-channel. Pixels never travel
//! here: buffers are passed as paths of the daemon's memory-mapped files. Anything with
//! JSON-shaped content (plugin descriptions, params) travels as JSON text, because
//! ipc-channel's postcard encoding cannot carry self-describing values.

use ipc_channel::ipc::IpcSender;
use serde::{Deserialize, Serialize};
use tessera_protocol::{LayerRole, Layout};

#[derive(Serialize, Deserialize, Debug)]
pub enum ToWorker {
    Run(RunJob),
    Cancel { job: u64 },
    Shutdown,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct BufSpec {
    pub path: String,
    pub layout: Layout,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct OutSpec {
    pub role: LayerRole,
    pub buf: BufSpec,
    pub offset: f32,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RunJob {
    pub job: u64,
    pub plugin: String,
    pub model: String,
    pub scale: u32,
    /// JSON object, defaults filled in.
    pub params_json: String,
    pub input: BufSpec,
    pub outputs: Vec<OutSpec>,
}

/// How often a worker says it is alive (`FromWorker::Heartbeat`).
pub const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

#[derive(Serialize, Deserialize, Debug)]
pub enum FromWorker {
    /// The first message: who the worker is and what it loaded.
    Hello {
        pid: u32,
        device: String,
        /// `PluginInfo` JSON of each loaded plugin.
        plugins_json: Vec<String>,
        /// Plugins that failed to load, one message each.
        load_errors: Vec<String>,
        requests: IpcSender<ToWorker>,
    },
    Progress { job: u64, done: u64, total: u64, stage: String },
    /// Sent every `HEARTBEAT_INTERVAL` by a thread of its own: a worker that stops sending it
    /// (stopped, deadlocked, out of threads) is hung, busy or not.
    Heartbeat,
    Done { job: u64 },
    Failed { job: u64, cancelled: bool, message: String },
}
