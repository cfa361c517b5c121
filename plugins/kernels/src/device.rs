//! The device an engine runs on, from the host's `device` config entry (`cpu`, `cuda:N`), and
//! what a build of an engine can run on. A build without the `cuda` feature compiles no CUDA
//! code: asking it for a CUDA device is an error that says which build to install.

use candle_core::Device;

/// The device kinds this build runs on, for a plugin's description: `cpu`, and `cuda` in a
/// build with the `cuda` feature.
pub fn kinds() -> Vec<&'static str> {
    let mut kinds = vec!["cpu"];
    if cfg!(feature = "cuda") {
        kinds.push("cuda");
    }
    kinds
}

/// The device named by `spec`: `cpu`, `cuda` (the first card) or `cuda:N`.
pub fn open(spec: &str) -> Result<Device, String> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        s => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| format!("unknown device `{s}`: use cpu or cuda:N"))?,
    };
    if !cfg!(feature = "cuda") {
        return Err(format!("this build of the engine has no CUDA support, so it cannot run on `{spec}`; install the CUDA build of the plugins"));
    }
    Device::new_cuda(ordinal).map_err(|e| format!("cannot open CUDA device {ordinal}: {e}"))
}

/// The free and total memory of `device` in bytes, where the device can tell (a CUDA card);
/// `None` for the CPU, whose memory the caller reads from the system.
pub fn memory(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = device.as_cuda_device() {
        return cuda.cuda_stream().context().mem_get_info().ok().map(|(free, total)| (free as u64, total as u64));
    }
    let _ = device;
    None
}

/// The free memory of `device` in bytes (see [`memory`]).
pub fn free_memory(device: &Device) -> Option<u64> {
    memory(device).map(|(free, _)| free)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_a_cpu_build_refuses_cuda_clearly() {
        assert!(open("cpu").unwrap().is_cpu());
        assert!(open("gpu").unwrap_err().contains("use cpu or cuda:N"));
        assert!(open("cuda:x").unwrap_err().contains("unknown device"));
        if !cfg!(feature = "cuda") {
            assert_eq!(kinds(), ["cpu"]);
            assert!(open("cuda:0").unwrap_err().contains("no CUDA support"));
        } else {
            assert_eq!(kinds(), ["cpu", "cuda"]);
            // Without a card (CI's GPU build beside the driver stub) the error says which device.
            if let Err(e) = open("cuda:0") {
                assert!(e.contains("cannot open CUDA device 0"), "{e}");
            }
        }
        assert_eq!(free_memory(&Device::Cpu), None);
    }
}
