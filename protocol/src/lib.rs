//! The Tessera protocol between editor adapters and `tesserad`: length-prefixed JSON frames,
//! buffer layouts with limits, and every message type. `protocol/README.md` documents the wire
//! format; `protocol/golden/` holds one example per message, read by the Rust and Python tests.

pub mod describe;
pub mod frame;
pub mod layout;
pub mod messages;

pub use describe::{LayerRole, LayersWhen, ModelInfo, ParamInfo, ParamKind, PluginInfo};
pub use frame::{read_frame, write_frame, FrameError, MAX_FRAME_LEN};
pub use layout::{ColorEncoding, Layout, LayoutError, LayoutRequest, Limits, SampleType};
pub use messages::*;

/// Serialises an event for the wire. Our own types always serialise.
pub fn to_body<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    serde_json::to_vec(msg).expect("protocol types serialise")
}
