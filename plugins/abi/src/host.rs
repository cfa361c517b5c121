//! The host's side: load a plugin library, check its ABI, and call it safely.
//! Libraries are never unloaded (unloading Rust dylibs is unsound); restarting the worker
//! process is how plugins are reloaded.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use serde_json::{Map, Value};
use tessera_protocol::{ColorEncoding, LayerRole, Layout, PluginInfo, SampleType};

use crate::ffi::{self, TsBuffer, TsHost, TsJob, TsOutput, TsPluginEntry};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot load plugin {path}: {source}")]
    Open { path: PathBuf, source: libloading::Error },
    #[error("{path} is not a Tessera plugin: it has no `tessera_plugin_entry_v1` symbol")]
    NoEntry { path: PathBuf },
    #[error("plugin {path} speaks plugin ABI {major}.x, this host speaks {host}.x; rebuild the plugin against this Tessera")]
    AbiMismatch { path: PathBuf, major: u16, host: u16 },
    #[error("plugin {path} described itself badly: {message}")]
    BadDescribe { path: PathBuf, message: String },
    #[error("plugin `{plugin}` failed to start: {message}")]
    CreateFailed { plugin: String, message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
}

/// A loaded plugin library and what it says about itself.
pub struct Plugin {
    pub path: PathBuf,
    pub info: PluginInfo,
    entry: &'static TsPluginEntry,
}

impl Plugin {
    pub fn load(path: &Path) -> Result<Plugin, LoadError> {
        // SAFETY: loading runs the library's initialisers; plugins come from the plugin
        // directory the user installed, inside the disposable worker process.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|source| LoadError::Open { path: path.into(), source })?;
        let entry_fn: ffi::EntryFn = *unsafe { lib.get::<ffi::EntryFn>(ffi::ENTRY_SYMBOL) }
            .map_err(|_| LoadError::NoEntry { path: path.into() })?;
        // Never unload: the entry table and every function pointer must stay valid.
        std::mem::forget(lib);
        let entry = unsafe { entry_fn() };
        if entry.is_null() {
            return Err(LoadError::NoEntry { path: path.into() });
        }
        let entry: &'static TsPluginEntry = unsafe { &*entry };
        if entry.abi_major != ffi::ABI_MAJOR {
            return Err(LoadError::AbiMismatch { path: path.into(), major: entry.abi_major, host: ffi::ABI_MAJOR });
        }
        if (entry.struct_size as usize) < std::mem::size_of::<TsPluginEntry>() {
            return Err(LoadError::BadDescribe { path: path.into(), message: "entry table too small".into() });
        }
        let text = unsafe { CStr::from_ptr((entry.describe)()) }.to_string_lossy().into_owned();
        let info: PluginInfo = serde_json::from_str(&text)
            .map_err(|e| LoadError::BadDescribe { path: path.into(), message: e.to_string() })?;
        Ok(Plugin { path: path.into(), info, entry })
    }

    pub fn instantiate(&self, config: &Value) -> Result<Instance, LoadError> {
        let config = CString::new(config.to_string()).unwrap_or_default();
        let host = host_table(std::ptr::null_mut());
        let handle = unsafe { (self.entry.create)(config.as_ptr(), &host) };
        if handle.is_null() {
            let message = unsafe { CStr::from_ptr((self.entry.last_error)(std::ptr::null_mut())) }
                .to_string_lossy()
                .into_owned();
            return Err(LoadError::CreateFailed { plugin: self.info.id.clone(), message });
        }
        Ok(Instance { entry: self.entry, handle, plugin: self.info.id.clone() })
    }
}

/// One output the host lends to a job.
pub struct OutputBuf<'a> {
    pub role: LayerRole,
    pub layout: Layout,
    pub offset: f32,
    pub data: &'a mut [u8],
}

pub struct ProcessRequest<'a> {
    pub job_id: u64,
    pub model: &'a str,
    pub scale: u32,
    pub params: &'a Map<String, Value>,
    pub input: (&'a Layout, &'a [u8]),
    pub outputs: Vec<OutputBuf<'a>>,
    pub cancel: &'a AtomicBool,
    pub progress: &'a (dyn Fn(u64, u64, &str) + Sync),
}

/// A plugin's engine instance; `process` one job at a time.
pub struct Instance {
    entry: &'static TsPluginEntry,
    handle: *mut c_void,
    plugin: String,
}

// SAFETY: the ABI allows create/process/destroy from any one thread at a time; `&mut self`
// on `process` and ownership on drop give exactly that.
unsafe impl Send for Instance {}

impl Instance {
    pub fn process(&mut self, req: ProcessRequest<'_>) -> Result<(), ProcessError> {
        let (in_layout, in_data) = req.input;
        if (in_data.len() as u64) < in_layout.byte_len() {
            return Err(ProcessError::Failed("input buffer smaller than its layout".into()));
        }
        let mut outputs = Vec::with_capacity(req.outputs.len());
        for out in req.outputs {
            if (out.data.len() as u64) < out.layout.byte_len() {
                return Err(ProcessError::Failed("output buffer smaller than its layout".into()));
            }
            outputs.push(TsOutput {
                role: match out.role {
                    LayerRole::Base => ffi::ROLE_BASE,
                    LayerRole::PixelDetail => ffi::ROLE_PIXEL_DETAIL,
                    LayerRole::SemanticDetail => ffi::ROLE_SEMANTIC_DETAIL,
                    LayerRole::Exact => ffi::ROLE_EXACT,
                },
                buffer: ts_buffer(&out.layout, out.data.as_mut_ptr(), out.data.len(), out.offset),
            });
        }
        let model = CString::new(req.model).map_err(|_| ProcessError::Failed("model id has a NUL".into()))?;
        let params = CString::new(Value::Object(req.params.clone()).to_string())
            .map_err(|_| ProcessError::Failed("params have a NUL".into()))?;
        let job = TsJob {
            struct_size: std::mem::size_of::<TsJob>() as u32,
            model: model.as_ptr(),
            scale: req.scale,
            params_json: params.as_ptr(),
            // The plugin only reads the input; the ABI's pointer is *mut for symmetry.
            input: ts_buffer(in_layout, in_data.as_ptr() as *mut u8, in_data.len(), 0.0),
            outputs: outputs.as_ptr(),
            n_outputs: outputs.len(),
            cancel: req.cancel as *const AtomicBool,
            job_id: req.job_id,
        };
        let mut ctx = Ctx { progress: req.progress, plugin: &self.plugin };
        let host = host_table(&mut ctx as *mut Ctx as *mut c_void);
        let status = unsafe { (self.entry.process)(self.handle, &job, &host) };
        match status {
            ffi::STATUS_OK => Ok(()),
            ffi::STATUS_CANCELLED => Err(ProcessError::Cancelled),
            _ => {
                let msg = unsafe { CStr::from_ptr((self.entry.last_error)(self.handle)) };
                Err(ProcessError::Failed(msg.to_string_lossy().into_owned()))
            }
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        unsafe { (self.entry.destroy)(self.handle) }
    }
}

struct Ctx<'a> {
    progress: &'a (dyn Fn(u64, u64, &str) + Sync),
    plugin: &'a str,
}

fn ts_buffer(layout: &Layout, data: *mut u8, len: usize, offset: f32) -> TsBuffer {
    TsBuffer {
        data,
        len,
        width: layout.width,
        height: layout.height,
        channels: layout.channels as u32,
        sample: match layout.sample {
            SampleType::U8 => ffi::SAMPLE_U8,
            SampleType::U16 => ffi::SAMPLE_U16,
            SampleType::F16 => ffi::SAMPLE_F16,
            SampleType::F32 => ffi::SAMPLE_F32,
        },
        stride: layout.stride,
        encoding: match layout.encoding {
            ColorEncoding::Srgb => ffi::ENCODING_SRGB,
            ColorEncoding::Linear => ffi::ENCODING_LINEAR,
        },
        alpha: layout.alpha as u32,
        offset,
    }
}

fn host_table(ctx: *mut c_void) -> TsHost {
    TsHost {
        struct_size: std::mem::size_of::<TsHost>() as u32,
        abi_major: ffi::ABI_MAJOR,
        abi_minor: ffi::ABI_MINOR,
        ctx,
        log: host_log,
        progress: host_progress,
    }
}

unsafe extern "C" fn host_log(ctx: *mut c_void, level: u32, msg: *const c_char) {
    let _ = std::panic::catch_unwind(|| {
        let msg = if msg.is_null() { "".into() } else { unsafe { CStr::from_ptr(msg) }.to_string_lossy() };
        let plugin = if ctx.is_null() { "?" } else { unsafe { &*(ctx as *const Ctx) }.plugin };
        match level {
            ffi::LOG_ERROR => tracing::error!(plugin, "{msg}"),
            ffi::LOG_WARN => tracing::warn!(plugin, "{msg}"),
            ffi::LOG_INFO => tracing::info!(plugin, "{msg}"),
            _ => tracing::debug!(plugin, "{msg}"),
        }
    });
}

unsafe extern "C" fn host_progress(ctx: *mut c_void, done: u64, total: u64, stage: *const c_char) {
    if ctx.is_null() {
        return;
    }
    let _ = std::panic::catch_unwind(|| {
        let ctx = unsafe { &*(ctx as *const Ctx) };
        let stage = if stage.is_null() { "".into() } else { unsafe { CStr::from_ptr(stage) }.to_string_lossy() };
        (ctx.progress)(done, total, &stage);
    });
}
