//! Driver drift: what is installed compared with what the policy pinned.
//!
//! A driver can be replaced or reloaded under a running daemon, so the
//! comparison runs at start and on every poll. Each differing field is one
//! [`Drift`]; fields the baseline leaves unset are not compared.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{CcMode, Inventory, MigMode, ScrubOnFree};

/// The pinned baseline (`[gpu.baseline]` in ccnoded's config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Baseline {
    pub driver_version: Option<String>,
    pub cuda_driver_version: Option<String>,
    /// VBIOS version per GPU model (the product name NVML reports).
    pub vbios: BTreeMap<String, String>,
    /// InfoROM image version per GPU model.
    pub inforom: BTreeMap<String, String>,
    pub gsp_firmware_version: Option<String>,
    pub cc_mode: Option<CcMode>,
    pub mig_mode: Option<MigMode>,
    /// Require the driver's scrub-on-free (default: required).
    pub require_scrub_on_free: bool,
}

impl Default for Baseline {
    fn default() -> Self {
        Baseline {
            driver_version: None,
            cuda_driver_version: None,
            vbios: BTreeMap::new(),
            inforom: BTreeMap::new(),
            gsp_firmware_version: None,
            cc_mode: None,
            mig_mode: None,
            require_scrub_on_free: true,
        }
    }
}

/// A field that can drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftField {
    DriverVersion,
    CudaDriverVersion,
    Vbios,
    Inforom,
    GspFirmwareVersion,
    CcMode,
    MigMode,
    ScrubOnFree,
}

impl DriftField {
    pub const ALL: [DriftField; 8] = [
        DriftField::DriverVersion,
        DriftField::CudaDriverVersion,
        DriftField::Vbios,
        DriftField::Inforom,
        DriftField::GspFirmwareVersion,
        DriftField::CcMode,
        DriftField::MigMode,
        DriftField::ScrubOnFree,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DriftField::DriverVersion => "driver_version",
            DriftField::CudaDriverVersion => "cuda_driver_version",
            DriftField::Vbios => "vbios",
            DriftField::Inforom => "inforom",
            DriftField::GspFirmwareVersion => "gsp_firmware_version",
            DriftField::CcMode => "cc_mode",
            DriftField::MigMode => "mig_mode",
            DriftField::ScrubOnFree => "scrub_on_free",
        }
    }
}

impl fmt::Display for DriftField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One difference between the baseline and the host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Drift {
    pub field: DriftField,
    /// The GPU's index, for per-GPU fields.
    pub gpu: Option<u32>,
    pub uuid: Option<String>,
    pub expected: String,
    pub found: String,
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(gpu) = self.gpu {
            write!(f, "gpu {gpu} ")?;
        }
        write!(
            f,
            "{}: expected {}, found {}",
            self.field, self.expected, self.found
        )
    }
}

/// Compares `inv` with `baseline`. The result is sorted and stable, so two
/// polls of an unchanged host give equal lists.
pub fn compare(baseline: &Baseline, inv: &Inventory) -> Vec<Drift> {
    let mut out = Vec::new();
    let mut host = |field, expected: &str, found: &str| {
        if expected != found {
            out.push(Drift {
                field,
                gpu: None,
                uuid: None,
                expected: expected.to_owned(),
                found: found.to_owned(),
            });
        }
    };
    if let Some(v) = &baseline.driver_version {
        host(DriftField::DriverVersion, v, &inv.driver_version);
    }
    if let Some(v) = &baseline.cuda_driver_version {
        host(DriftField::CudaDriverVersion, v, &inv.cuda_driver_version);
    }
    if baseline.require_scrub_on_free && inv.scrub_on_free != ScrubOnFree::Enabled {
        let found = match &inv.scrub_on_free {
            ScrubOnFree::Unknown(why) => format!("unknown ({why})"),
            other => other.as_str().to_owned(),
        };
        host(DriftField::ScrubOnFree, "enabled", &found);
    }
    for gpu in &inv.gpus {
        let mut per_gpu = |field, expected: &str, found: &str| {
            if expected != found {
                out.push(Drift {
                    field,
                    gpu: Some(gpu.index),
                    uuid: Some(gpu.uuid.clone()),
                    expected: expected.to_owned(),
                    found: found.to_owned(),
                });
            }
        };
        if let Some(v) = baseline.vbios.get(&gpu.name) {
            per_gpu(DriftField::Vbios, v, &gpu.vbios_version);
        }
        if let Some(v) = baseline.inforom.get(&gpu.name) {
            per_gpu(
                DriftField::Inforom,
                v,
                gpu.inforom_version.as_deref().unwrap_or("none"),
            );
        }
        if let Some(v) = &baseline.gsp_firmware_version {
            per_gpu(
                DriftField::GspFirmwareVersion,
                v,
                gpu.gsp_firmware_version.as_deref().unwrap_or("none"),
            );
        }
        if let Some(v) = baseline.cc_mode {
            per_gpu(DriftField::CcMode, v.as_str(), gpu.cc_mode.as_str());
        }
        if let Some(v) = baseline.mig_mode {
            per_gpu(DriftField::MigMode, v.as_str(), gpu.mig_mode.as_str());
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GpuInfo;

    fn inventory() -> Inventory {
        Inventory {
            driver_version: "550.127.05".into(),
            cuda_driver_version: "12.4".into(),
            scrub_on_free: ScrubOnFree::Enabled,
            gpus: (0..2)
                .map(|i| GpuInfo {
                    index: i,
                    uuid: format!("GPU-{i}"),
                    pci_bus_id: format!("00000000:{:02x}:00.0", i + 0x17),
                    name: "NVIDIA H100 80GB HBM3".into(),
                    minor_number: Some(i),
                    memory_total_bytes: 80 << 30,
                    mig_mode: MigMode::Disabled,
                    mig_devices: vec![],
                    cc_mode: CcMode::On,
                    vbios_version: "96.00.99.00.01".into(),
                    inforom_version: Some("G520.0200.00.05".into()),
                    gsp_firmware_version: Some("550.127.05".into()),
                    lost: false,
                })
                .collect(),
        }
    }

    fn pinned() -> Baseline {
        Baseline {
            driver_version: Some("550.127.05".into()),
            cuda_driver_version: Some("12.4".into()),
            vbios: [("NVIDIA H100 80GB HBM3".into(), "96.00.99.00.01".into())].into(),
            inforom: [("NVIDIA H100 80GB HBM3".into(), "G520.0200.00.05".into())].into(),
            gsp_firmware_version: Some("550.127.05".into()),
            cc_mode: Some(CcMode::On),
            mig_mode: Some(MigMode::Disabled),
            require_scrub_on_free: true,
        }
    }

    #[test]
    fn a_host_equal_to_its_baseline_has_no_drift() {
        assert_eq!(compare(&pinned(), &inventory()), vec![]);
        assert_eq!(compare(&Baseline::default(), &inventory()), vec![]);
    }

    #[test]
    fn every_field_is_compared() {
        let mut inv = inventory();
        inv.driver_version = "560.35.03".into();
        inv.cuda_driver_version = "12.6".into();
        inv.scrub_on_free = ScrubOnFree::Disabled;
        let g = &mut inv.gpus[1];
        g.vbios_version = "96.00.AA.00.01".into();
        g.inforom_version = None;
        g.gsp_firmware_version = Some("560.35.03".into());
        g.cc_mode = CcMode::Devtools;
        g.mig_mode = MigMode::Enabled;
        let drift = compare(&pinned(), &inv);
        let fields: Vec<_> = drift.iter().map(|d| (d.field, d.gpu)).collect();
        assert_eq!(
            fields,
            vec![
                (DriftField::DriverVersion, None),
                (DriftField::CudaDriverVersion, None),
                (DriftField::Vbios, Some(1)),
                (DriftField::Inforom, Some(1)),
                (DriftField::GspFirmwareVersion, Some(1)),
                (DriftField::CcMode, Some(1)),
                (DriftField::MigMode, Some(1)),
                (DriftField::ScrubOnFree, None),
            ]
        );
        assert_eq!(
            drift[0].to_string(),
            "driver_version: expected 550.127.05, found 560.35.03"
        );
        assert_eq!(
            drift[5].to_string(),
            "gpu 1 cc_mode: expected on, found devtools"
        );
        assert_eq!(drift[3].found, "none");
    }

    #[test]
    fn unknown_scrub_state_is_drift_when_scrub_is_required() {
        let mut inv = inventory();
        inv.scrub_on_free = ScrubOnFree::Unknown("no /proc/driver/nvidia/params".into());
        let d = compare(&Baseline::default(), &inv);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].found, "unknown (no /proc/driver/nvidia/params)");
        let relaxed = Baseline {
            require_scrub_on_free: false,
            ..Baseline::default()
        };
        assert!(compare(&relaxed, &inv).is_empty());
    }
}
