//! Device selection: `cpu`, `cuda` or `cuda:N`, as given to `--device` or configuration.

use crate::error::{LmError, Result};
use candle_core::Device;

/// Parses a device spec and opens the device. A CUDA spec fails clearly in a build without
/// the `cuda` feature, or when the GPU is missing.
pub fn open(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| bad(spec))?,
        None => return Err(bad(spec)),
    };
    open_cuda(spec, ordinal)
}

fn bad(spec: &str) -> LmError {
    LmError::InvalidInput(format!(
        "unknown device `{spec}`: use `cpu`, `cuda` or `cuda:<ordinal>` (e.g. `cuda:0`)"
    ))
}

#[cfg(feature = "cuda")]
fn open_cuda(spec: &str, ordinal: usize) -> Result<Device> {
    let device = Device::new_cuda_with_stream(ordinal).map_err(|e| {
        // candle appends a backtrace to driver errors; the first line says what failed.
        let e = e.to_string();
        let why = e.lines().next().unwrap_or_default();
        LmError::Device(format!(
            "cannot open CUDA device `{spec}`: {why}; check the GPU, its driver (CUDA 13.0+) and the ordinal"
        ))
    })?;
    if let Device::Cuda(d) = &device {
        // SAFETY: this crate runs all work of a device on its single stream, so cudarc's
        // cross-stream events are not needed; without them a decode step can be captured as a
        // CUDA graph (events recorded outside a capture cannot be waited on inside it).
        unsafe { d.disable_event_tracking() };
    }
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(spec: &str, _ordinal: usize) -> Result<Device> {
    Err(LmError::InvalidInput(format!(
        "device `{spec}` needs a CUDA build: rebuild with `--features cuda` (see README, GPU build), or use `--device cpu`"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_parses_and_bad_specs_name_the_forms() {
        assert!(open("cpu").unwrap().is_cpu());
        for bad in ["gpu", "cuda:x", "cuda0", "cuda:"] {
            let e = open(bad).unwrap_err().to_string();
            assert!(e.contains("cuda:<ordinal>"), "{bad}: {e}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build() {
        let e = open("cuda:0").unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}
