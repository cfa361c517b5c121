//! Tessera's plugin ABI, version 1 (see README.md): a tiny C entry table in the manner of CLAP.
//!
//! - [`ffi`]: the `#[repr(C)]` types and constants: the contract itself.
//! - [`plugin`]: implement [`plugin::Engine`] and call [`export_plugin!`]; no `unsafe` needed.
//! - [`pixels`]: views of host-lent buffers with f32 conversion for every sample type.
//! - `host` (feature `host`): load a plugin with libloading and call it.

pub mod ffi;
pub mod pixels;
pub mod plugin;
#[cfg(feature = "host")]
pub mod host;

pub use plugin::{Engine, EngineError, Job};
