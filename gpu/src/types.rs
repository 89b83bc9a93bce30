//! What the backends report. Field names are the ones `ccnodectl gpus`
//! and the attestation claims use; values NVML cannot give on a device
//! (`NotSupported`) are `None`, never a made-up zero.

use serde::{Deserialize, Serialize};

/// The host's GPUs and the driver that runs them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    /// The kernel driver's version (`550.127.05`).
    pub driver_version: String,
    /// The CUDA driver API version (`12.4`).
    pub cuda_driver_version: String,
    /// Whether the driver scrubs device memory when it is freed.
    pub scrub_on_free: ScrubOnFree,
    pub gpus: Vec<GpuInfo>,
}

/// The driver's scrub-on-free setting, read from its registry parameters
/// (`RmDisableScrubOnFree`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum ScrubOnFree {
    /// `RmDisableScrubOnFree` is absent or 0.
    Enabled,
    /// `RmDisableScrubOnFree` is set to a non-zero value.
    Disabled,
    /// The parameters could not be read (the reason says why).
    Unknown(String),
}

impl ScrubOnFree {
    pub fn as_str(&self) -> &'static str {
        match self {
            ScrubOnFree::Enabled => "enabled",
            ScrubOnFree::Disabled => "disabled",
            ScrubOnFree::Unknown(_) => "unknown",
        }
    }
}

/// One physical GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: String,
    /// `00000000:17:00.0`.
    pub pci_bus_id: String,
    /// The product name (`NVIDIA H100 80GB HBM3`).
    pub name: String,
    /// N of `/dev/nvidiaN`.
    pub minor_number: Option<u32>,
    pub memory_total_bytes: u64,
    pub mig_mode: MigMode,
    pub mig_devices: Vec<MigDevice>,
    pub cc_mode: CcMode,
    pub vbios_version: String,
    /// The InfoROM image version.
    pub inforom_version: Option<String>,
    /// The GSP firmware version; `None` when GSP firmware is not in use.
    pub gsp_firmware_version: Option<String>,
    /// The GPU has fallen off the bus (NVML: GPU is lost); the other fields
    /// are the last values read before that.
    pub lost: bool,
}

/// The current MIG mode of a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigMode {
    Disabled,
    Enabled,
    /// The GPU has no MIG support.
    Unsupported,
    /// A change of MIG mode waits for the next GPU reset, or NVML reports
    /// a mode ccnode does not know: the layout is not settled, so no
    /// worker is given the GPU or any MIG device of it until it is.
    Pending,
}

impl MigMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MigMode::Disabled => "disabled",
            MigMode::Enabled => "enabled",
            MigMode::Unsupported => "unsupported",
            MigMode::Pending => "pending",
        }
    }
}

/// The confidential-computing mode of a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CcMode {
    Off,
    On,
    /// CC with developer tools enabled: not confidential.
    Devtools,
    /// The GPU or driver has no CC support.
    Unsupported,
}

impl CcMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CcMode::Off => "off",
            CcMode::On => "on",
            CcMode::Devtools => "devtools",
            CcMode::Unsupported => "unsupported",
        }
    }
}

/// One MIG device (a compute instance inside a GPU instance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigDevice {
    /// NVML's MIG device index within the parent GPU.
    pub index: u32,
    /// `MIG-…`, what `CUDA_VISIBLE_DEVICES` takes.
    pub uuid: String,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
    /// The profile in mig-parted's vocabulary (`1g.10gb`).
    pub profile: String,
    pub memory_total_bytes: u64,
}

/// One poll of one GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSample {
    pub index: u32,
    pub status: SampleStatus,
}

/// Whether a GPU could be read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleStatus {
    Ok(Box<Telemetry>),
    /// The GPU has fallen off the bus.
    Lost,
    /// Reading it failed (the message says how).
    Failed(String),
}

/// Telemetry of one GPU. `None`: not supported on this GPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub gpu_temp_celsius: Option<f64>,
    pub memory_temp_celsius: Option<f64>,
    pub power_watts: Option<f64>,
    /// Energy since the driver was loaded (a counter).
    pub energy_joules: Option<f64>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    /// Fraction of the last sample period the GPU was busy, 0 to 1.
    pub gpu_utilization: Option<f64>,
    /// Fraction of the last sample period memory was read or written.
    pub memory_utilization: Option<f64>,
    pub fb_used_bytes: Option<u64>,
    pub fb_free_bytes: Option<u64>,
    pub fb_reserved_bytes: Option<u64>,
    /// Volatile (since driver load) ECC error counts.
    pub ecc_corrected_total: Option<u64>,
    pub ecc_uncorrected_total: Option<u64>,
    pub retired_pages: Option<RetiredPages>,
    pub remapped_rows: Option<RemappedRows>,
    pub pcie_replays_total: Option<u64>,
    /// NVML's clocks-event (throttle) reason bitmask.
    pub throttle_reasons: Option<u64>,
    /// Performance state, 0 (fastest) to 15; `None` when unknown.
    pub pstate: Option<u32>,
    /// Per MIG device, in inventory order.
    pub mig: Vec<MigTelemetry>,
}

/// Pages retired for ECC errors (pre-Ampere GPUs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredPages {
    pub single_bit: u64,
    pub double_bit: u64,
    pub pending: bool,
}

/// Row remapping state (Ampere and later).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemappedRows {
    pub correctable: u64,
    pub uncorrectable: u64,
    /// A remap waits for a GPU reset.
    pub pending: bool,
    /// A remap failed: the GPU needs service.
    pub failure: bool,
}

/// Telemetry of one MIG device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigTelemetry {
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
    pub fb_used_bytes: Option<u64>,
    pub fb_total_bytes: Option<u64>,
}

/// Throttle (clocks event) reasons, NVML's bit for each and the name ccnode
/// exports.
pub const THROTTLE_REASONS: [(u64, &str); 9] = [
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
];

/// Something that happened to a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuEvent {
    pub gpu_index: u32,
    pub uuid: String,
    /// For events inside a MIG device, where NVML says which.
    pub gpu_instance_id: Option<u32>,
    pub compute_instance_id: Option<u32>,
    pub kind: GpuEventKind,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum GpuEventKind {
    /// An XID (critical error) reported by the driver.
    Xid { code: u64 },
    /// Single-bit (corrected) ECC errors.
    EccCorrected { count: u64 },
    /// Double-bit (uncorrected) ECC errors.
    EccUncorrected { count: u64 },
    /// The GPU fell off the bus.
    Lost,
    /// The GPU's MIG configuration changed (instances created or
    /// destroyed, or the mode toggled): the layout is to be compared again
    /// now, not at the next poll.
    MigConfigChange,
}

/// Formats a 128-bit value as an NVIDIA-style UUID body
/// (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`).
pub(crate) fn uuid_body(v: u128) -> String {
    crate::device_id::uuid_string(&v.to_be_bytes())
}
