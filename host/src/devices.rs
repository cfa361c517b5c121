//! The devices workers can run on: the CPU always, and the CUDA cards the NVIDIA driver
//! reports. tesserad links no GPU code: the cards are listed by `tesserad worker
//! --probe-devices`, a child process that opens the driver library (`libcuda.so.1`) at run
//! time and prints what it found, so a driver that faults takes down the probe alone.

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tessera_protocol::DeviceInfo;

/// What the probe found: the CUDA cards, or why there are none to use.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Probe {
    pub cuda: Vec<DeviceInfo>,
    /// Why no card is listed (no driver, no card, a driver error); `None` when cards are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub none_because: Option<String>,
}

/// The CPU as a device: its model name and the machine's memory.
pub fn cpu() -> DeviceInfo {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_string()));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|kib| kib << 10);
    DeviceInfo {
        id: "cpu".into(),
        name: format!("{} ({threads} threads)", model.unwrap_or_else(|| std::env::consts::ARCH.into())),
        memory_bytes: memory,
        compute_capability: None,
    }
}

/// Runs the probe in a child process (`exe worker --probe-devices`), waiting at most
/// `timeout`; a probe that crashes or hangs means no card is used.
pub fn probe_in_child(exe: &Path, timeout: Duration) -> Probe {
    let none = |why: String| Probe { cuda: Vec::new(), none_because: Some(why) };
    let mut child = match Command::new(exe).args(["worker", "--probe-devices"]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn() {
        Ok(c) => c,
        Err(e) => return none(format!("the device probe could not start: {e}")),
    };
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return none(format!("the device probe did not answer within {timeout:?} (a driver that hangs)"));
            }
        }
    };
    let mut out = String::new();
    let _ = child.stdout.take().map(|mut s| s.read_to_string(&mut out));
    if !status.success() {
        return none(format!("the device probe failed ({status}): the NVIDIA driver faulted while listing cards"));
    }
    serde_json::from_str(&out).unwrap_or_else(|e| none(format!("the device probe said something unreadable: {e}")))
}

/// Lists the CUDA cards through the driver library, in this process (the probe's main).
pub fn probe_here() -> Probe {
    match cuda_devices() {
        Ok(cuda) if cuda.is_empty() => Probe { cuda, none_because: Some("the NVIDIA driver reports no CUDA card".into()) },
        Ok(cuda) => Probe { cuda, none_because: None },
        Err(why) => Probe { cuda: Vec::new(), none_because: Some(why) },
    }
}

type CuResult = c_int;
const CUDA_SUCCESS: CuResult = 0;
const CUDA_ERROR_STUB_LIBRARY: CuResult = 34;
const CUDA_ERROR_NO_DEVICE: CuResult = 100;
const ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
const ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: c_int = 76;

fn cuda_devices() -> Result<Vec<DeviceInfo>, String> {
    // SAFETY: loading the driver runs its initialisers; a driver that faults kills this probe
    // process only, which is why the daemon runs the probe as a child.
    let lib = unsafe { libloading::Library::new("libcuda.so.1").or_else(|_| libloading::Library::new("libcuda.so")) }
        .map_err(|_| "no NVIDIA driver (libcuda.so.1 is not installed)".to_string())?;
    // SAFETY: the signatures are the CUDA driver API's (cuda.h), stable since CUDA 3.2.
    unsafe {
        let init = lib.get::<unsafe extern "C" fn(c_uint) -> CuResult>(b"cuInit").map_err(|e| format!("the NVIDIA driver lacks cuInit: {e}"))?;
        let count_fn = lib.get::<unsafe extern "C" fn(*mut c_int) -> CuResult>(b"cuDeviceGetCount").map_err(|e| e.to_string())?;
        let get = lib.get::<unsafe extern "C" fn(*mut c_int, c_int) -> CuResult>(b"cuDeviceGet").map_err(|e| e.to_string())?;
        let name_fn = lib.get::<unsafe extern "C" fn(*mut c_char, c_int, c_int) -> CuResult>(b"cuDeviceGetName").map_err(|e| e.to_string())?;
        let mem_fn = lib.get::<unsafe extern "C" fn(*mut usize, c_int) -> CuResult>(b"cuDeviceTotalMem_v2").map_err(|e| e.to_string())?;
        let attr_fn = lib.get::<unsafe extern "C" fn(*mut c_int, c_int, c_int) -> CuResult>(b"cuDeviceGetAttribute").map_err(|e| e.to_string())?;
        match init(0) {
            CUDA_SUCCESS => {}
            CUDA_ERROR_NO_DEVICE => return Ok(Vec::new()),
            CUDA_ERROR_STUB_LIBRARY => return Err("no NVIDIA driver (the libcuda.so.1 found is the CUDA toolkit's link stub)".into()),
            code => return Err(format!("the NVIDIA driver failed to start (cuInit error {code}): check `nvidia-smi`")),
        }
        let mut count = 0;
        if count_fn(&mut count) != CUDA_SUCCESS {
            return Err("the NVIDIA driver could not count its cards".into());
        }
        let mut devices = Vec::new();
        for ordinal in 0..count {
            let mut dev = 0;
            if get(&mut dev, ordinal) != CUDA_SUCCESS {
                continue;
            }
            let mut name = [0 as c_char; 256];
            let name = if name_fn(name.as_mut_ptr(), name.len() as c_int, dev) == CUDA_SUCCESS {
                CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned()
            } else {
                format!("CUDA device {ordinal}")
            };
            let mut bytes = 0usize;
            let memory = (mem_fn(&mut bytes, dev) == CUDA_SUCCESS).then_some(bytes as u64);
            let (mut major, mut minor) = (0, 0);
            let cc = (attr_fn(&mut major, ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev) == CUDA_SUCCESS
                && attr_fn(&mut minor, ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev) == CUDA_SUCCESS)
                .then(|| format!("{major}.{minor}"));
            devices.push(DeviceInfo { id: format!("cuda:{ordinal}"), name, memory_bytes: memory, compute_capability: cc });
        }
        Ok(devices)
    }
}

/// Parses `--devices`: `auto`, or a comma-separated list of `cpu` and `cuda:N`.
pub fn parse_list(spec: &str) -> Result<Option<Vec<String>>, String> {
    if spec == "auto" {
        return Ok(None);
    }
    let mut ids = Vec::new();
    for id in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let ok = id == "cpu" || id.strip_prefix("cuda:").is_some_and(|n| n.parse::<u32>().is_ok());
        if !ok {
            return Err(format!("unknown device `{id}` in --devices: use auto, or a list of cpu and cuda:N"));
        }
        if !ids.iter().any(|i| i == id) {
            ids.push(id.to_string());
        }
    }
    if ids.is_empty() {
        return Err("--devices names no device".into());
    }
    Ok(Some(ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists_parse() {
        assert_eq!(parse_list("auto").unwrap(), None);
        assert_eq!(parse_list("cuda:1, cpu,cuda:1").unwrap(), Some(vec!["cuda:1".to_string(), "cpu".to_string()]));
        assert!(parse_list("gpu").unwrap_err().contains("unknown device `gpu`"));
        assert!(parse_list(",").unwrap_err().contains("names no device"));
    }

    #[test]
    fn the_cpu_is_described() {
        let cpu = cpu();
        assert_eq!(cpu.id, "cpu");
        assert!(cpu.name.contains("threads") && cpu.memory_bytes.unwrap_or(0) > 0, "{cpu:?}");
    }

    #[test]
    fn a_probe_answers_with_cards_or_a_reason() {
        let p = probe_here();
        assert_eq!(p.cuda.is_empty(), p.none_because.is_some(), "{p:?}");
    }
}
