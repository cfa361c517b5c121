//! The C ABI, version 1. Everything here is `#[repr(C)]` and stable within a major version:
//! new fields and function pointers are only ever appended, and `struct_size` tells how much
//! of a table the other side knows.
//!
//! Thread rules: `describe` may be called from any thread. `create`, `process` and `destroy`
//! are called from one thread at a time per handle. During `process` the plugin may call the
//! host's `progress` and `log` from any of its own threads; never after `process` returns.

use std::ffi::{c_char, c_void};
use std::sync::atomic::AtomicBool;

pub const ABI_MAJOR: u16 = 1;
pub const ABI_MINOR: u16 = 1;

/// The one symbol a plugin exports: `extern "C" fn() -> *const TsPluginEntry`.
pub const ENTRY_SYMBOL: &std::ffi::CStr = c"tessera_plugin_entry_v1";

pub type EntryFn = unsafe extern "C" fn() -> *const TsPluginEntry;

pub const STATUS_OK: i32 = 0;
pub const STATUS_ERROR: i32 = 1;
pub const STATUS_CANCELLED: i32 = 2;

pub const SAMPLE_U8: u32 = 0;
pub const SAMPLE_U16: u32 = 1;
pub const SAMPLE_F16: u32 = 2;
pub const SAMPLE_F32: u32 = 3;

pub const ENCODING_SRGB: u32 = 0;
pub const ENCODING_LINEAR: u32 = 1;

pub const ROLE_BASE: u32 = 0;
pub const ROLE_PIXEL_DETAIL: u32 = 1;
pub const ROLE_SEMANTIC_DETAIL: u32 = 2;
/// A whole image rendered exactly at a job's chosen parameters (ABI 1.1).
pub const ROLE_EXACT: u32 = 3;

pub const LOG_ERROR: u32 = 1;
pub const LOG_WARN: u32 = 2;
pub const LOG_INFO: u32 = 3;
pub const LOG_DEBUG: u32 = 4;

/// A pixel buffer lent by the host for the duration of one call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TsBuffer {
    pub data: *mut u8,
    /// Bytes at `data`; at least `stride * (height - 1) + width * channels * sample size`.
    pub len: usize,
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    pub sample: u32,
    pub stride: u64,
    pub encoding: u32,
    /// Non-zero when the last channel is straight alpha.
    pub alpha: u32,
    /// Stored value = `offset + value`: 0.5 for residual layers in integer buffers.
    pub offset: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TsOutput {
    pub role: u32,
    pub buffer: TsBuffer,
}

/// One job. Outputs are allocated by the host, `scale` times the input's size.
#[repr(C)]
pub struct TsJob {
    pub struct_size: u32,
    pub model: *const c_char,
    pub scale: u32,
    /// The model's parameters as a JSON object, defaults already filled in by the host.
    pub params_json: *const c_char,
    pub input: TsBuffer,
    pub outputs: *const TsOutput,
    pub n_outputs: usize,
    /// Set by the host to ask the plugin to stop; check it at least once per tile.
    pub cancel: *const AtomicBool,
    /// ABI 1.1: the daemon's id of the job, unique while the daemon runs, so an engine can
    /// keep what a later exact render of this job needs.
    pub job_id: u64,
}

/// Callbacks the host offers. `ctx` is passed back unchanged.
#[repr(C)]
pub struct TsHost {
    pub struct_size: u32,
    pub abi_major: u16,
    pub abi_minor: u16,
    pub ctx: *mut c_void,
    pub log: unsafe extern "C" fn(ctx: *mut c_void, level: u32, msg: *const c_char),
    pub progress:
        unsafe extern "C" fn(ctx: *mut c_void, done: u64, total: u64, stage: *const c_char),
}

/// The table a plugin's entry symbol returns. It lives as long as the library (forever: hosts
/// never unload plugins).
#[repr(C)]
pub struct TsPluginEntry {
    pub abi_major: u16,
    pub abi_minor: u16,
    pub struct_size: u32,
    /// The plugin's `PluginInfo` as JSON, NUL-terminated, valid forever.
    pub describe: unsafe extern "C" fn() -> *const c_char,
    /// Returns a handle, or null on failure (then `last_error(null)` says why).
    pub create: unsafe extern "C" fn(config_json: *const c_char, host: *const TsHost) -> *mut c_void,
    /// Returns a `STATUS_*` code; on `STATUS_ERROR`, `last_error(handle)` says why.
    pub process:
        unsafe extern "C" fn(handle: *mut c_void, job: *const TsJob, host: *const TsHost) -> i32,
    /// NUL-terminated UTF-8, valid until the next call on the same handle.
    pub last_error: unsafe extern "C" fn(handle: *mut c_void) -> *const c_char,
    pub destroy: unsafe extern "C" fn(handle: *mut c_void),
}
