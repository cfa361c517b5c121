//! The plugin author's side: implement [`Engine`], call [`export_plugin!`], write no `unsafe`.

use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use serde_json::{Map, Value};
use tessera_protocol::{LayerRole, PluginInfo};

use crate::ffi::{self, TsHost, TsJob, TsPluginEntry};
use crate::pixels::{layout_of, ImageMut, ImageRef};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
}

/// A model engine. One instance serves many jobs, one at a time.
pub trait Engine: Sized + 'static {
    fn describe() -> PluginInfo;
    /// `config` is a JSON object from the host (model store path and the like).
    fn create(config: &Value) -> Result<Self, String>;
    fn process(&mut self, job: &mut Job<'_>) -> Result<(), EngineError>;
}

/// Host services during one `process` call. Shareable across the engine's threads.
pub struct HostCalls<'a> {
    host: &'a TsHost,
    cancel: &'a AtomicBool,
}

// SAFETY: the ABI requires the host's callbacks to be callable from any thread during
// `process`, and `ctx` is the host's to synchronise.
unsafe impl Sync for HostCalls<'_> {}

impl HostCalls<'_> {
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
    /// Err(Cancelled) once the host asked to stop: `job.calls.check_cancel()?` between tiles.
    pub fn check_cancel(&self) -> Result<(), EngineError> {
        if self.is_cancelled() {
            Err(EngineError::Cancelled)
        } else {
            Ok(())
        }
    }
    pub fn progress(&self, done: u64, total: u64, stage: &str) {
        let stage = CString::new(stage.replace('\0', "")).unwrap_or_default();
        // SAFETY: the host table is valid for the duration of `process`.
        unsafe { (self.host.progress)(self.host.ctx, done, total, stage.as_ptr()) }
    }
    pub fn log(&self, level: u32, msg: &str) {
        let msg = CString::new(msg.replace('\0', "")).unwrap_or_default();
        // SAFETY: as above.
        unsafe { (self.host.log)(self.host.ctx, level, msg.as_ptr()) }
    }
}

pub struct Job<'a> {
    /// The daemon's id of this job (ABI 1.1).
    pub id: u64,
    pub model: String,
    pub scale: u32,
    pub params: Map<String, Value>,
    pub input: ImageRef<'a>,
    /// Output images by role, in the order the host allocated them.
    pub outputs: Vec<(LayerRole, ImageMut<'a>)>,
    pub calls: HostCalls<'a>,
}

impl<'a> Job<'a> {
    pub fn output(&mut self, role: LayerRole) -> Option<&mut ImageMut<'a>> {
        self.outputs.iter_mut().find(|(r, _)| *r == role).map(|(_, img)| img)
    }
    pub fn param_str(&self, name: &str) -> Option<&str> {
        self.params.get(name).and_then(Value::as_str)
    }
}

/// What `export_plugin!` keeps per plugin. Not for direct use.
#[doc(hidden)]
pub struct Statics {
    pub describe: OnceLock<CString>,
    pub create_error: Mutex<Option<CString>>,
}

impl Statics {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Statics {
        Statics { describe: OnceLock::new(), create_error: Mutex::new(None) }
    }
}

struct Handle<E> {
    engine: E,
    last_error: CString,
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("plugin panicked: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("plugin panicked: {s}")
    } else {
        "plugin panicked".into()
    }
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

#[doc(hidden)]
pub fn describe_impl<E: Engine>(statics: &'static Statics) -> *const c_char {
    statics
        .describe
        .get_or_init(|| {
            let info = catch_unwind(E::describe).ok();
            cstring(&info.map(|i| serde_json::to_string(&i).unwrap_or_default()).unwrap_or_default())
        })
        .as_ptr()
}

/// # Safety
/// `config` is null or a NUL-terminated string; `host` is valid for the call.
#[doc(hidden)]
pub unsafe fn create_impl<E: Engine>(statics: &'static Statics, config: *const c_char) -> *mut c_void {
    let result = catch_unwind(|| {
        let text = if config.is_null() { "{}".into() } else { unsafe { CStr::from_ptr(config) }.to_string_lossy().into_owned() };
        let value: Value = serde_json::from_str(&text).map_err(|e| format!("bad plugin config: {e}"))?;
        E::create(&value)
    });
    let err = match result {
        Ok(Ok(engine)) => {
            return Box::into_raw(Box::new(Handle { engine, last_error: CString::default() })) as *mut c_void
        }
        Ok(Err(e)) => e,
        Err(p) => panic_message(p),
    };
    if let Ok(mut slot) = statics.create_error.lock() {
        *slot = Some(cstring(&err));
    }
    std::ptr::null_mut()
}

/// # Safety
/// `handle` came from `create_impl::<E>`; `job` and `host` are valid for the call.
#[doc(hidden)]
pub unsafe fn process_impl<E: Engine>(handle: *mut c_void, job: *const TsJob, host: *const TsHost) -> i32 {
    if handle.is_null() || job.is_null() || host.is_null() {
        return ffi::STATUS_ERROR;
    }
    let handle = unsafe { &mut *(handle as *mut Handle<E>) };
    let result = catch_unwind(AssertUnwindSafe(|| {
        let (job, host) = unsafe { (&*job, &*host) };
        let mut job = unsafe { job_from_ffi(job, host) }?;
        handle.engine.process(&mut job)
    }));
    let err = match result {
        Ok(Ok(())) => return ffi::STATUS_OK,
        Ok(Err(EngineError::Cancelled)) => return ffi::STATUS_CANCELLED,
        Ok(Err(EngineError::Failed(e))) => e,
        Err(p) => panic_message(p),
    };
    handle.last_error = cstring(&err);
    ffi::STATUS_ERROR
}

unsafe fn job_from_ffi<'a>(job: &'a TsJob, host: &'a TsHost) -> Result<Job<'a>, EngineError> {
    let fail = |m: String| EngineError::Failed(m);
    if (job.struct_size as usize) < std::mem::size_of::<TsJob>() || job.cancel.is_null() {
        return Err(fail("job table from an incompatible host".into()));
    }
    let model = unsafe { CStr::from_ptr(job.model) }.to_string_lossy().into_owned();
    let params_text = unsafe { CStr::from_ptr(job.params_json) }.to_string_lossy();
    let params: Map<String, Value> =
        serde_json::from_str(&params_text).map_err(|e| fail(format!("bad params: {e}")))?;
    let in_layout = layout_of(&job.input).map_err(fail)?;
    let input = ImageRef::new(in_layout, unsafe { std::slice::from_raw_parts(job.input.data, job.input.len) });
    let mut outputs = Vec::new();
    let raw = if job.n_outputs == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(job.outputs, job.n_outputs) } };
    for out in raw {
        let role = match out.role {
            ffi::ROLE_BASE => LayerRole::Base,
            ffi::ROLE_PIXEL_DETAIL => LayerRole::PixelDetail,
            ffi::ROLE_SEMANTIC_DETAIL => LayerRole::SemanticDetail,
            ffi::ROLE_EXACT => LayerRole::Exact,
            r => return Err(fail(format!("unknown layer role code {r}"))),
        };
        let layout = layout_of(&out.buffer).map_err(fail)?;
        // SAFETY: the host lends each output exclusively for this call, and outputs never alias.
        let data = unsafe { std::slice::from_raw_parts_mut(out.buffer.data, out.buffer.len) };
        outputs.push((role, ImageMut::new(layout, out.buffer.offset, data)));
    }
    Ok(Job {
        id: job.job_id,
        model,
        scale: job.scale,
        params,
        input,
        outputs,
        calls: HostCalls { host, cancel: unsafe { &*job.cancel } },
    })
}

/// # Safety
/// `handle` is null (create errors) or came from `create_impl::<E>`.
#[doc(hidden)]
pub unsafe fn last_error_impl<E: Engine>(statics: &'static Statics, handle: *mut c_void) -> *const c_char {
    if handle.is_null() {
        // The CString inside the mutex lives as long as the static; callers copy it at once.
        return match statics.create_error.lock() {
            Ok(slot) => slot.as_ref().map_or(c"".as_ptr(), |s| s.as_ptr()),
            Err(_) => c"plugin state poisoned".as_ptr(),
        };
    }
    unsafe { &*(handle as *mut Handle<E>) }.last_error.as_ptr()
}

/// # Safety
/// `handle` came from `create_impl::<E>` and is not used again.
#[doc(hidden)]
pub unsafe fn destroy_impl<E: Engine>(handle: *mut c_void) {
    if !handle.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(handle as *mut Handle<E>) })));
    }
}

#[doc(hidden)]
pub const fn entry_table(
    describe: unsafe extern "C" fn() -> *const c_char,
    create: unsafe extern "C" fn(*const c_char, *const TsHost) -> *mut c_void,
    process: unsafe extern "C" fn(*mut c_void, *const TsJob, *const TsHost) -> i32,
    last_error: unsafe extern "C" fn(*mut c_void) -> *const c_char,
    destroy: unsafe extern "C" fn(*mut c_void),
) -> TsPluginEntry {
    TsPluginEntry {
        abi_major: ffi::ABI_MAJOR,
        abi_minor: ffi::ABI_MINOR,
        struct_size: std::mem::size_of::<TsPluginEntry>() as u32,
        describe,
        create,
        process,
        last_error,
        destroy,
    }
}

/// Exports `$engine` (a type implementing [`Engine`]) as a Tessera plugin: defines the
/// `tessera_plugin_entry_v1` symbol and the C functions behind it.
#[macro_export]
macro_rules! export_plugin {
    ($engine:ty) => {
        const _: () = {
            use ::std::ffi::{c_char, c_void};
            use $crate::ffi::{TsHost, TsJob, TsPluginEntry};
            static STATICS: $crate::plugin::Statics = $crate::plugin::Statics::new();
            unsafe extern "C" fn describe() -> *const c_char {
                $crate::plugin::describe_impl::<$engine>(&STATICS)
            }
            unsafe extern "C" fn create(config: *const c_char, _host: *const TsHost) -> *mut c_void {
                unsafe { $crate::plugin::create_impl::<$engine>(&STATICS, config) }
            }
            unsafe extern "C" fn process(h: *mut c_void, job: *const TsJob, host: *const TsHost) -> i32 {
                unsafe { $crate::plugin::process_impl::<$engine>(h, job, host) }
            }
            unsafe extern "C" fn last_error(h: *mut c_void) -> *const c_char {
                unsafe { $crate::plugin::last_error_impl::<$engine>(&STATICS, h) }
            }
            unsafe extern "C" fn destroy(h: *mut c_void) {
                unsafe { $crate::plugin::destroy_impl::<$engine>(h) }
            }
            static ENTRY: TsPluginEntry =
                $crate::plugin::entry_table(describe, create, process, last_error, destroy);
            #[no_mangle]
            pub extern "C" fn tessera_plugin_entry_v1() -> *const TsPluginEntry {
                &ENTRY
            }
        };
    };
}
