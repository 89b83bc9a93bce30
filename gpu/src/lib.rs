//! ccnode's GPU access: inventory, telemetry, events and driver drift,
//! behind one trait ([`GpuBackend`]) with two implementations:
//!
//! - [`nvml`]: NVIDIA's management library through nvml-wrapper, loaded at
//!   run time, so the crate builds and its tests run on hosts without
//!   NVIDIA drivers. A missing library or GPU is an error, never a reason to
//!   simulate.
//! - [`sim`]: simulated GPUs described by a file, for tests and dev mode,
//!   with hooks to inject faults (XIDs, ECC errors, a GPU lost from the bus,
//!   a driver or MIG layout change).
//!
//! Every backend call may block (NVML does): callers run them on their own
//! threads, never on an async runtime. [`drift`] compares an inventory with
//! a pinned baseline; it is pure. [`devices`] resolves what a worker given
//! one GPU or MIG device may open. [`scrub`] is what a VRAM scrub reports
//! and the simulated VRAM.

pub mod device_id;
pub mod devices;
pub mod drift;
pub mod nvml;
pub mod scrub;
pub mod sim;
mod types;

use std::time::Duration;

pub use types::*;

/// Errors from a backend.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The NVIDIA management library could not be loaded or initialised.
    #[error("NVML is not available: {0}")]
    LibraryMissing(String),
    /// The library loaded but reports no GPU.
    #[error("NVML found no GPU on this host")]
    NoGpu,
    /// The simulation file is missing or invalid.
    #[error("GPU simulation file {path}: {message}")]
    SimSpec { path: String, message: String },
    /// A backend call failed.
    #[error("{call}: {message}")]
    Call { call: &'static str, message: String },
    /// The backend or GPU cannot do this (a simulated GPU, a GPU not in
    /// confidential-computing mode, a driver without the call).
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl GpuError {
    /// A stable code for logs, metrics and the admin protocol.
    pub fn code(&self) -> &'static str {
        match self {
            GpuError::LibraryMissing(_) => "nvml_missing",
            GpuError::NoGpu => "no_gpu",
            GpuError::SimSpec { .. } => "sim_spec",
            GpuError::Call { .. } => "call_failed",
            GpuError::Unsupported(_) => "unsupported",
        }
    }
}

/// Which backend is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Nvml,
    Sim,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Nvml => "nvml",
            BackendKind::Sim => "sim",
        }
    }
}

/// Access to the host's GPUs. Every method may block.
pub trait GpuBackend: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> BackendKind;

    /// What is installed: driver, GPUs, MIG devices, versions. A GPU that
    /// has fallen off the bus stays listed with `lost` set, so that it
    /// shows as lost rather than disappearing.
    fn inventory(&self) -> Result<Inventory, GpuError>;

    /// One sample per GPU of the last inventory, in the same order.
    fn sample(&self) -> Result<Vec<GpuSample>, GpuError>;

    /// Waits up to `timeout` for XID, ECC and bus events; returns those
    /// that arrived (possibly none). Called from one dedicated thread.
    fn wait_events(&self, timeout: Duration) -> Result<Vec<GpuEvent>, GpuError>;

    /// Where this backend's device nodes and MIG minor table are: the
    /// host's, or (simulated) a tree the simulation writes.
    fn device_roots(&self) -> devices::DeviceRoots {
        devices::DeviceRoots::default()
    }

    /// The confidential-computing attestation of GPU `index` (an index of
    /// the inventory): NVML's SPDM GET_MEASUREMENTS report for `nonce` and
    /// the GPU's attestation certificate chain. Verified by
    /// `ccnode_attest::nvidia`, not here.
    fn cc_attestation(&self, index: u32, nonce: &[u8; 32]) -> Result<CcAttestation, GpuError>;
}

/// A GPU's confidential-computing attestation, as the driver returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CcAttestation {
    /// The SPDM GET_MEASUREMENTS request followed by the response
    /// (`attestationReport`, at most 8192 bytes).
    pub report: Vec<u8>,
    /// The attestation certificate chain, PEM (`attestationCertChain`, at
    /// most 5120 bytes).
    pub cert_chain: Vec<u8>,
}

/// Reads the scrub-on-free setting from the text of
/// `/proc/driver/nvidia/params`: the driver scrubs freed memory unless
/// `RmDisableScrubOnFree` is set to a non-zero value in `RegistryDwords`
/// (or `RegistryDwordsPerDevice`, which applies to some GPUs and is treated
/// as disabling it for the host).
pub fn scrub_on_free_from_params(params: &str) -> ScrubOnFree {
    let mut disabled = false;
    for line in params.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if !matches!(key.trim(), "RegistryDwords" | "RegistryDwordsPerDevice") {
            continue;
        }
        let value = value.trim().trim_matches('"');
        for entry in value.split(';') {
            let Some((k, v)) = entry.split_once('=') else {
                continue;
            };
            if k.trim().eq_ignore_ascii_case("RmDisableScrubOnFree") {
                let v = v.trim();
                let n = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => v.parse(),
                };
                // An unparsable value is treated as set: fail closed.
                disabled |= n != Ok(0);
            }
        }
    }
    if disabled {
        ScrubOnFree::Disabled
    } else {
        ScrubOnFree::Enabled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_on_free_is_read_from_the_registry_parameters() {
        let stock =
            "ResmanDebugLevel: 4294967295\nRegistryDwords: \"\"\nRegistryDwordsPerDevice: \"\"\n";
        assert_eq!(scrub_on_free_from_params(stock), ScrubOnFree::Enabled);
        let off = "RegistryDwords: \"RMForceStaticBar1=1;RmDisableScrubOnFree=1\"\n";
        assert_eq!(scrub_on_free_from_params(off), ScrubOnFree::Disabled);
        let hex = "RegistryDwords: \"rmdisablescrubonfree=0x1\"\n";
        assert_eq!(scrub_on_free_from_params(hex), ScrubOnFree::Disabled);
        let zero = "RegistryDwords: \"RmDisableScrubOnFree=0\"\n";
        assert_eq!(scrub_on_free_from_params(zero), ScrubOnFree::Enabled);
        let junk = "RegistryDwords: \"RmDisableScrubOnFree=yes\"\n";
        assert_eq!(scrub_on_free_from_params(junk), ScrubOnFree::Disabled);
        let per_dev = "RegistryDwordsPerDevice: \"pci=0000:17:00.0;RmDisableScrubOnFree=1\"\n";
        assert_eq!(scrub_on_free_from_params(per_dev), ScrubOnFree::Disabled);
    }
}
