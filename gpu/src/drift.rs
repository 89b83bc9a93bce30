//! Driver drift: what is installed compared with what the policy pinned.
//!
//! A driver can be replaced or reloaded under a running daemon, so the
//! comparison runs at start, on every poll, and on every MIG configuration
//! change event (which wakes the poller). Each differing field is one
//! [`Drift`]; fields the baseline leaves unset are not compared.
//!
//! The MIG layout is compared the same way: `mig_layout` declares, per GPU
//! (by index, or by model), the instances expected by profile and count in
//! mig-parted's vocabulary (`"1g.10gb" = 7`), or MIG off (an empty table).
//! ccnode never repartitions a GPU; a layout that differs is drift.

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
    /// The MIG layout expected per GPU: keyed by index (`"0"`) or by model
    /// (the product name), an index winning over a model; profile → count.
    /// An empty table: MIG off. GPUs matching no key are not compared.
    pub mig_layout: BTreeMap<String, BTreeMap<String, u32>>,
    /// Require the driver's scrub-on-free (default: required).
    pub require_scrub_on_free: bool,
}

/// Most MIG instances of one profile on one GPU (NVIDIA's GPUs have at
/// most seven).
pub const MAX_MIG_INSTANCES: u32 = 7;

impl Baseline {
    /// Checks what serde cannot: MIG layout keys and counts. The error
    /// names the offending entry.
    pub fn validate(&self) -> Result<(), String> {
        if self.mig_mode == Some(MigMode::Pending) {
            return Err(
                "mig_mode: \"pending\" is a transition, not a mode to pin (enabled, disabled, unsupported)"
                    .into(),
            );
        }
        for (gpu, layout) in &self.mig_layout {
            if gpu.trim().is_empty() {
                return Err("mig_layout: a GPU key is empty".into());
            }
            if gpu.bytes().all(|b| b.is_ascii_digit())
                && gpu.parse::<u32>().map(|i| i.to_string()) != Ok(gpu.clone())
            {
                return Err(format!(
                    "mig_layout: GPU index {gpu:?} is not written as GPU indexes are (\"0\", \"1\", ...)"
                ));
            }
            for (profile, n) in layout {
                if !valid_profile(profile) {
                    return Err(format!(
                        "mig_layout.{gpu:?}: {profile:?} is not a MIG profile like \"1g.10gb\""
                    ));
                }
                if *n == 0 || *n > MAX_MIG_INSTANCES {
                    return Err(format!(
                        "mig_layout.{gpu:?}.{profile}: {n} instances, expected 1 to {MAX_MIG_INSTANCES}"
                    ));
                }
            }
            // Each count is at most 7 now, so this cannot overflow.
            let total: u32 = layout.values().sum();
            if total > MAX_MIG_INSTANCES {
                return Err(format!(
                    "mig_layout.{gpu:?}: {total} instances in all, a GPU holds at most {MAX_MIG_INSTANCES}"
                ));
            }
        }
        Ok(())
    }

    /// The layout expected for `gpu`, if the baseline declares one.
    pub fn mig_layout_for(&self, gpu: &crate::GpuInfo) -> Option<&BTreeMap<String, u32>> {
        self.mig_layout
            .get(&gpu.index.to_string())
            .or_else(|| self.mig_layout.get(&gpu.name))
    }
}

/// `<n>g.<m>gb`, optionally with a suffix as the inventory names them
/// (`1g.10gb+me`, `1g.10gb+me.all`, `1g.10gb-me`, `2g.20gb+gfx`,
/// `1c.2g.20gb`).
fn valid_profile(p: &str) -> bool {
    p.len() <= 32
        && p.contains('g')
        && p.starts_with(|c: char| c.is_ascii_digit())
        && p.ends_with(|c: char| c.is_ascii_alphanumeric())
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-'))
}

/// A MIG layout as text: `off`, or `1g.10gb x4, 2g.20gb x1` in profile
/// order.
pub fn layout_string(layout: &BTreeMap<String, u32>) -> String {
    if layout.is_empty() {
        return "off".into();
    }
    layout
        .iter()
        .map(|(p, n)| format!("{p} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The layout drift reports as found. A GPU whose MIG mode change is
/// pending matches no declared layout, whatever it lists now: the reset
/// that completes the change replaces it (`pending (1g.10gb x7)` or
/// `pending (off)`, with what it lists until then).
fn found_layout(gpu: &crate::GpuInfo) -> String {
    if gpu.mig_mode != MigMode::Pending {
        return layout_string(&current_layout(gpu));
    }
    let mut listed = BTreeMap::new();
    for d in &gpu.mig_devices {
        *listed.entry(d.profile.clone()).or_insert(0) += 1;
    }
    format!("pending ({})", layout_string(&listed))
}

/// The layout a GPU has now: empty when MIG is not enabled.
pub fn current_layout(gpu: &crate::GpuInfo) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    if gpu.mig_mode == MigMode::Enabled {
        for d in &gpu.mig_devices {
            *out.entry(d.profile.clone()).or_insert(0) += 1;
        }
    }
    out
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
            mig_layout: BTreeMap::new(),
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
    MigLayout,
    ScrubOnFree,
}

impl DriftField {
    pub const ALL: [DriftField; 9] = [
        DriftField::DriverVersion,
        DriftField::CudaDriverVersion,
        DriftField::Vbios,
        DriftField::Inforom,
        DriftField::GspFirmwareVersion,
        DriftField::CcMode,
        DriftField::MigMode,
        DriftField::MigLayout,
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
            DriftField::MigLayout => "mig_layout",
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
        if let Some(want) = baseline.mig_layout_for(gpu) {
            per_gpu(
                DriftField::MigLayout,
                &layout_string(want),
                &found_layout(gpu),
            );
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
            mig_layout: BTreeMap::new(),
            require_scrub_on_free: true,
        }
    }

    fn mig(gpu: &mut GpuInfo, profiles: &[&str]) {
        gpu.mig_mode = MigMode::Enabled;
        gpu.mig_devices = profiles
            .iter()
            .enumerate()
            .map(|(i, p)| crate::MigDevice {
                index: i as u32,
                uuid: format!("MIG-{}-{i}", gpu.uuid),
                gpu_instance_id: i as u32 + 1,
                compute_instance_id: 0,
                profile: (*p).into(),
                memory_total_bytes: 10 << 30,
            })
            .collect();
    }

    fn layout(entries: &[(&str, u32)]) -> BTreeMap<String, u32> {
        entries
            .iter()
            .map(|(p, n)| ((*p).to_string(), *n))
            .collect()
    }

    #[test]
    fn the_mig_layout_is_compared_by_index_then_by_model() {
        let mut inv = inventory();
        mig(&mut inv.gpus[0], &["1g.10gb"; 7]);
        mig(&mut inv.gpus[1], &["3g.40gb", "3g.40gb"]);
        let mut b = Baseline::default();
        b.mig_layout
            .insert("NVIDIA H100 80GB HBM3".into(), layout(&[("1g.10gb", 7)]));
        b.mig_layout.insert("1".into(), layout(&[("3g.40gb", 2)]));
        assert_eq!(compare(&b, &inv), vec![]);
        // One instance gone on GPU 0, and GPU 1 repartitioned.
        inv.gpus[0].mig_devices.pop();
        mig(&mut inv.gpus[1], &["3g.40gb", "2g.20gb", "1g.10gb"]);
        let d = compare(&b, &inv);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(d[0].field, DriftField::MigLayout);
        assert_eq!(
            d[0].to_string(),
            "gpu 0 mig_layout: expected 1g.10gb x7, found 1g.10gb x6"
        );
        assert_eq!(d[1].expected, "3g.40gb x2");
        assert_eq!(d[1].found, "1g.10gb x1, 2g.20gb x1, 3g.40gb x1");
        // MIG turned off where instances are expected, and on where not.
        inv.gpus[0].mig_mode = MigMode::Disabled;
        b.mig_layout.insert("1".into(), BTreeMap::new());
        let d = compare(&b, &inv);
        assert_eq!(d[0].found, "off");
        assert_eq!(d[1].expected, "off");
        // GPUs matching no key are not compared.
        assert!(compare(&Baseline::default(), &inv).is_empty());
    }

    #[test]
    fn a_pending_mig_change_matches_no_layout() {
        // The reset that completes the change replaces what is listed now:
        // drift even where the listing still equals the declared layout.
        let mut inv = inventory();
        mig(&mut inv.gpus[0], &["1g.10gb"; 7]);
        inv.gpus[0].mig_mode = MigMode::Pending;
        inv.gpus[1].mig_mode = MigMode::Pending;
        let mut b = Baseline::default();
        b.mig_layout.insert("0".into(), layout(&[("1g.10gb", 7)]));
        b.mig_layout.insert("1".into(), BTreeMap::new());
        let d = compare(&b, &inv);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(d[0].found, "pending (1g.10gb x7)");
        assert_eq!(d[1].expected, "off");
        assert_eq!(d[1].found, "pending (off)");
    }

    #[test]
    fn bad_mig_layouts_are_refused_naming_the_entry() {
        let mut b = Baseline::default();
        assert!(b.validate().is_ok());
        for (key, l, needle) in [
            ("0", layout(&[("1g.10gb", 8)]), "8 instances"),
            ("0", layout(&[("1g.10gb", 0)]), "0 instances"),
            (
                "0",
                layout(&[("1g.10gb", 4), ("2g.20gb", 4)]),
                "8 instances in all",
            ),
            ("0", layout(&[("big slice", 1)]), "not a MIG profile"),
            ("0", layout(&[("1g.10gb\n", 1)]), "not a MIG profile"),
            ("0", layout(&[("-1g.10gb", 1)]), "not a MIG profile"),
            ("0", layout(&[("1g.10gb-", 1)]), "not a MIG profile"),
            (" ", layout(&[("1g.10gb", 1)]), "empty"),
            (
                "00",
                layout(&[("1g.10gb", 1)]),
                "not written as GPU indexes are",
            ),
            (
                "0",
                layout(&[("1g.10gb", u32::MAX), ("2g.20gb", 1)]),
                "instances, expected 1 to 7",
            ),
        ] {
            b.mig_layout = [(key.to_string(), l)].into();
            let e = b.validate().unwrap_err();
            assert!(e.contains(needle), "{needle:?} not in {e}");
        }
        b.mig_layout = [(
            "0".to_string(),
            layout(&[("1g.10gb+me", 1), ("1c.2g.20gb", 2)]),
        )]
        .into();
        assert!(b.validate().is_ok());
        // Every suffix the inventory writes (profile_suffix in nvml.rs).
        b.mig_layout = [(
            "0".to_string(),
            layout(&[("1g.10gb-me", 1), ("1g.10gb+me.all", 1), ("2g.20gb+gfx", 1)]),
        )]
        .into();
        assert!(b.validate().is_ok(), "{:?}", b.validate());

        let pending = Baseline {
            mig_mode: Some(MigMode::Pending),
            ..Baseline::default()
        };
        assert!(pending.validate().unwrap_err().contains("transition"));
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
