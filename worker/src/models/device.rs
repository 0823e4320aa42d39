//! Where the models compute (`text.embed`, `finetune.train`, `model.classify`): the CPU, or
//! a CUDA GPU for a worker built with the `cuda` feature and started with
//! `--device cuda[:N]` (`CAPIBARA_DEVICE`). docs/models.md, "GPU workers".
//!
//! Chosen once, at startup, before any model loads: every tensor of the models lives there.

use std::{fmt, str::FromStr, sync::OnceLock};

use candle_core::Device;

/// What `--device` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    /// The CUDA GPU of this ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("`{other}` is not a device: use cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

static DEVICE: OnceLock<Device> = OnceLock::new();

/// Open the device `choice` names and make it the models' one. A GPU that cannot be opened (a
/// worker built without the `cuda` feature, no driver, no such ordinal) is an error, never a
/// silent fall back to the CPU. Call once, before any model loads.
pub fn init(choice: DeviceChoice) -> Result<&'static Device, String> {
    let device = match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda(n) => Device::new_cuda(n).map_err(|e| {
            let built = if cfg!(feature = "cuda") {
                ""
            } else {
                " (this worker was built without the `cuda` feature: \
                 cargo build --release -p capibara-worker --features cuda)"
            };
            format!("cannot open CUDA device {n}: {e}{built}")
        })?,
    };
    Ok(DEVICE.get_or_init(|| device))
}

/// The models' device: what [`init`] opened, else the CPU.
pub fn get() -> &'static Device {
    DEVICE.get_or_init(|| Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_named_and_a_missing_gpu_is_an_error() {
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:2".parse(), Ok(DeviceChoice::Cuda(2)));
        for bad in ["gpu", "cuda:", "cuda:x", ""] {
            assert!(bad.parse::<DeviceChoice>().is_err(), "{bad}");
        }
        if !cfg!(feature = "cuda") {
            let e = init(DeviceChoice::Cuda(0)).unwrap_err();
            assert!(e.contains("--features cuda"), "{e}");
        }
        assert!(get().is_cpu());
    }
}
