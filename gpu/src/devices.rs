//! What a worker is given for the one GPU or MIG device it is assigned: the
//! `CUDA_VISIBLE_DEVICES` value that names it and the device nodes that
//! let CUDA open it, and nothing else.
//!
//! - A whole GPU (MIG off): `/dev/nvidia<minor>`.
//! - A MIG device: its parent's `/dev/nvidia<minor>`, and the capability
//!   nodes of its GPU instance and compute instance,
//!   `/dev/nvidia-caps/nvidia-cap<N>`, where N is the minor the driver lists
//!   for `gpu<minor>/gi<G>/access` and `gpu<minor>/gi<G>/ci<C>/access` in
//!   `/proc/driver/nvidia-caps/mig-minors` (as NVIDIA's Kubernetes device
//!   plugin resolves them). A GPU with MIG on is never handed out whole: its
//!   workers get one MIG device each.
//! - Both: the driver's shared nodes that exist (`/dev/nvidiactl`,
//!   `/dev/nvidia-uvm`, `/dev/nvidia-uvm-tools`).
//!
//! Every node must exist; a missing one is an error naming it. The roots
//! are configurable ([`DeviceRoots`]) so the tests (and the simulated
//! backend, [`crate::sim::write_device_tree`]) resolve against a temporary
//! tree.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{GpuInfo, Inventory, MigMode};

/// Largest mig-minors file read (the driver's lists a few thousand lines).
pub const MAX_MIG_MINORS: usize = 1 << 20;
/// The driver nodes every worker on a GPU needs, where present.
pub const SHARED_NODES: [&str; 3] = ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"];

/// Where device nodes and the driver's MIG minor table are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRoots {
    /// `/dev`.
    pub dev: PathBuf,
    /// `/proc/driver/nvidia-caps/mig-minors`.
    pub mig_minors: PathBuf,
    /// The simulated VRAM files ([`crate::scrub`]), on the sim backend
    /// only; each device's is granted with its nodes.
    pub sim_vram: Option<PathBuf>,
}

impl Default for DeviceRoots {
    fn default() -> Self {
        DeviceRoots {
            dev: PathBuf::from("/dev"),
            mig_minors: PathBuf::from("/proc/driver/nvidia-caps/mig-minors"),
            sim_vram: None,
        }
    }
}

impl DeviceRoots {
    /// The roots under a directory standing for `/` (tests, simulation).
    pub fn under(root: &Path) -> DeviceRoots {
        DeviceRoots {
            dev: root.join("dev"),
            mig_minors: root.join("proc/driver/nvidia-caps/mig-minors"),
            sim_vram: Some(root.join(crate::scrub::SIM_VRAM_DIR)),
        }
    }
}

/// What one worker is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The UUID of what was granted: `GPU-…` or `MIG-…`.
    pub uuid: String,
    /// The (parent) GPU's index.
    pub gpu_index: u32,
    /// The MIG device's GPU-instance and compute-instance ids.
    pub mig: Option<(u32, u32)>,
    /// For the worker's environment: the UUID, so CUDA sees this device
    /// and no other.
    pub cuda_visible_devices: String,
    /// The device nodes, in a stable order.
    pub nodes: Vec<PathBuf>,
}

/// Why a device cannot be granted.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no GPU or MIG device {0:?} on this host (give a GPU index, a GPU-… or a MIG-… UUID)")]
    Unknown(String),
    #[error(
        "GPU {index} ({uuid}) has MIG enabled: assign one of its MIG devices, not the whole GPU"
    )]
    MigEnabled { index: u32, uuid: String },
    #[error(
        "GPU {index} ({uuid}) has a MIG mode change pending (or a mode ccnode does not know): nothing on it is granted until the GPU is reset and the mode settles"
    )]
    MigPending { index: u32, uuid: String },
    #[error("GPU {0} has no device minor number")]
    NoMinor(u32),
    #[error("device node {0} does not exist")]
    Missing(String),
    #[error("cannot read {path}")]
    MigMinors {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_MIG_MINORS} bytes")]
    MigMinorsTooLarge { path: String },
    #[error("{path} line {line}: {text:?} is not \"<name> <minor>\"")]
    MigMinorsLine {
        path: String,
        line: usize,
        text: String,
    },
    #[error("{path} lists no minor for {key}")]
    NoCapability { path: String, key: String },
}

/// Parses the driver's MIG minor table: one `<name> <minor>` per line
/// (`config 1`, `gpu0/gi1/access 12`, `gpu0/gi1/ci0/access 13`).
pub fn parse_mig_minors(path: &str, text: &str) -> Result<BTreeMap<String, u32>, DeviceError> {
    let mut out = BTreeMap::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() {
            continue;
        }
        let bad = || DeviceError::MigMinorsLine {
            path: path.to_owned(),
            line: i + 1,
            text: l.chars().take(80).collect(),
        };
        let (name, minor) = l.split_once(char::is_whitespace).ok_or_else(bad)?;
        let minor: u32 = minor.trim().parse().map_err(|_| bad())?;
        out.insert(name.to_owned(), minor);
    }
    Ok(out)
}

fn read_mig_minors(path: &Path) -> Result<BTreeMap<String, u32>, DeviceError> {
    let shown = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|source| DeviceError::MigMinors {
        path: shown.clone(),
        source,
    })?;
    let mut text = String::new();
    f.take(MAX_MIG_MINORS as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|source| DeviceError::MigMinors {
            path: shown.clone(),
            source,
        })?;
    if text.len() > MAX_MIG_MINORS {
        return Err(DeviceError::MigMinorsTooLarge { path: shown });
    }
    parse_mig_minors(&shown, &text)
}

fn existing(p: PathBuf) -> Result<PathBuf, DeviceError> {
    if p.exists() {
        Ok(p)
    } else {
        Err(DeviceError::Missing(p.display().to_string()))
    }
}

/// Finds `target` (a GPU index, a `GPU-…` UUID or a `MIG-…` UUID) in `inv`.
pub fn find<'a>(
    inv: &'a Inventory,
    target: &str,
) -> Result<(&'a GpuInfo, Option<&'a crate::MigDevice>), DeviceError> {
    let unknown = || DeviceError::Unknown(target.chars().take(128).collect());
    if let Ok(i) = target.parse::<u32>() {
        return inv
            .gpus
            .iter()
            .find(|g| g.index == i)
            .map(|g| (g, None))
            .ok_or_else(unknown);
    }
    for g in &inv.gpus {
        if g.uuid == target {
            return Ok((g, None));
        }
        if let Some(m) = g.mig_devices.iter().find(|m| m.uuid == target) {
            return Ok((g, Some(m)));
        }
    }
    Err(unknown())
}

/// What a worker assigned `target` gets, resolved against `roots`.
pub fn grant(inv: &Inventory, target: &str, roots: &DeviceRoots) -> Result<Grant, DeviceError> {
    let (gpu, mig) = find(inv, target)?;
    if gpu.lost {
        return Err(DeviceError::Unknown(format!(
            "{target} (lost from the bus)"
        )));
    }
    if gpu.mig_mode == MigMode::Pending {
        return Err(DeviceError::MigPending {
            index: gpu.index,
            uuid: gpu.uuid.clone(),
        });
    }
    let minor = gpu.minor_number.ok_or(DeviceError::NoMinor(gpu.index))?;
    let mut nodes = vec![existing(roots.dev.join(format!("nvidia{minor}")))?];
    let (uuid, ids) = match mig {
        None => {
            if gpu.mig_mode == MigMode::Enabled {
                return Err(DeviceError::MigEnabled {
                    index: gpu.index,
                    uuid: gpu.uuid.clone(),
                });
            }
            (gpu.uuid.clone(), None)
        }
        Some(m) => {
            let table = read_mig_minors(&roots.mig_minors)?;
            let gi = format!("gpu{minor}/gi{}/access", m.gpu_instance_id);
            let ci = format!(
                "gpu{minor}/gi{}/ci{}/access",
                m.gpu_instance_id, m.compute_instance_id
            );
            for key in [gi, ci] {
                let cap = table.get(&key).ok_or_else(|| DeviceError::NoCapability {
                    path: roots.mig_minors.display().to_string(),
                    key: key.clone(),
                })?;
                nodes.push(existing(
                    roots.dev.join(format!("nvidia-caps/nvidia-cap{cap}")),
                )?);
            }
            (
                m.uuid.clone(),
                Some((m.gpu_instance_id, m.compute_instance_id)),
            )
        }
    };
    for shared in SHARED_NODES {
        let p = roots.dev.join(shared);
        if p.exists() {
            nodes.push(p);
        }
    }
    // The sim's stand-in for the device's memory, which its worker may
    // write like VRAM (and which is scrubbed after it).
    if let Some(p) = roots
        .sim_vram
        .as_deref()
        .and_then(|d| crate::scrub::sim_vram_path(d, &uuid))
    {
        nodes.push(existing(p)?);
    }
    Ok(Grant {
        cuda_visible_devices: uuid.clone(),
        uuid,
        gpu_index: gpu.index,
        mig: ids,
        nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::write_device_tree;
    use crate::{CcMode, MigDevice};

    fn inventory() -> Inventory {
        let gpu = |index: u32, mig: &[(u32, u32, &str)]| GpuInfo {
            index,
            uuid: format!("GPU-{index:08x}-0000-0000-0000-000000000000"),
            pci_bus_id: format!("00000000:{:02x}:00.0", 0x17 + index),
            name: "NVIDIA H100 80GB HBM3".into(),
            // Minors differ from indexes, as they may on a host: the nodes
            // and the mig-minors keys go by minor.
            minor_number: Some(index + 2),
            memory_total_bytes: 80 << 30,
            mig_mode: if mig.is_empty() {
                MigMode::Disabled
            } else {
                MigMode::Enabled
            },
            mig_devices: mig
                .iter()
                .enumerate()
                .map(|(i, (gi, ci, p))| MigDevice {
                    index: i as u32,
                    uuid: format!("MIG-{index}-{gi}-{ci}"),
                    gpu_instance_id: *gi,
                    compute_instance_id: *ci,
                    profile: (*p).into(),
                    memory_total_bytes: 10 << 30,
                })
                .collect(),
            cc_mode: CcMode::On,
            vbios_version: "96.00.99.00.01".into(),
            inforom_version: None,
            gsp_firmware_version: None,
            lost: false,
        };
        Inventory {
            driver_version: "550.127.05".into(),
            cuda_driver_version: "12.4".into(),
            scrub_on_free: crate::ScrubOnFree::Enabled,
            gpus: vec![
                gpu(0, &[]),
                gpu(
                    1,
                    &[(7, 0, "1g.10gb"), (8, 0, "1g.10gb"), (9, 0, "2g.20gb")],
                ),
            ],
        }
    }

    #[test]
    fn a_mig_device_gets_its_parent_and_its_two_capabilities_only() {
        let root = tempfile::tempdir().unwrap();
        let inv = inventory();
        write_device_tree(&inv, root.path()).unwrap();
        let roots = DeviceRoots::under(root.path());
        let g = grant(&inv, "MIG-1-8-0", &roots).unwrap();
        assert_eq!(g.cuda_visible_devices, "MIG-1-8-0");
        assert_eq!((g.gpu_index, g.mig), (1, Some((8, 0))));
        let table =
            parse_mig_minors("t", &std::fs::read_to_string(&roots.mig_minors).unwrap()).unwrap();
        let dev = |n: &str| roots.dev.join(n);
        let cap = |k: &str| dev(&format!("nvidia-caps/nvidia-cap{}", table[k]));
        assert_eq!(
            g.nodes,
            vec![
                dev("nvidia3"),
                cap("gpu3/gi8/access"),
                cap("gpu3/gi8/ci0/access"),
                dev("nvidiactl"),
                dev("nvidia-uvm"),
                dev("nvidia-uvm-tools"),
                // The sim's stand-in for its memory, its own only.
                root.path().join("sim-vram/MIG-1-8-0"),
            ]
        );
        // Its siblings' capabilities and memory are not among them.
        for other in ["gpu3/gi7/access", "gpu3/gi9/ci0/access"] {
            assert!(!g.nodes.contains(&cap(other)), "{other}");
        }
        assert!(root.path().join("sim-vram/MIG-1-7-0").is_file());
        assert!(!g.nodes.iter().any(|n| n.ends_with("MIG-1-7-0")));
        // A whole GPU with MIG off, by index or UUID: its node, no caps.
        let whole = grant(&inv, "0", &roots).unwrap();
        assert_eq!(whole.cuda_visible_devices, inv.gpus[0].uuid);
        assert!(whole
            .nodes
            .iter()
            .all(|n| !n.starts_with(dev("nvidia-caps"))));
        assert_eq!(grant(&inv, &inv.gpus[0].uuid, &roots).unwrap(), whole);
    }

    #[test]
    fn what_cannot_be_granted_is_refused_by_name() {
        let root = tempfile::tempdir().unwrap();
        let mut inv = inventory();
        write_device_tree(&inv, root.path()).unwrap();
        let roots = DeviceRoots::under(root.path());
        let err = grant(&inv, "MIG-9-9-9", &roots).unwrap_err();
        assert!(err.to_string().contains("MIG-9-9-9"), "{err}");
        assert!(matches!(
            grant(&inv, "7", &roots),
            Err(DeviceError::Unknown(_))
        ));
        // MIG on: the whole GPU is not handed out.
        assert!(matches!(
            grant(&inv, "1", &roots),
            Err(DeviceError::MigEnabled { index: 1, .. })
        ));
        // A MIG mode change pending: neither the GPU nor a MIG device of
        // it is handed out.
        let mut pending = inv.clone();
        pending.gpus[0].mig_mode = MigMode::Pending;
        pending.gpus[1].mig_mode = MigMode::Pending;
        let mig = pending.gpus[1].mig_devices[0].uuid.clone();
        // Its MIG devices still exist until the reset: the scrub ledger
        // keeps them, not the whole GPU, which CUDA cannot see as one.
        let listed = crate::scrub::devices(&pending);
        assert!(listed.contains(&mig), "{listed:?}");
        assert!(!listed.contains(&pending.gpus[1].uuid), "{listed:?}");
        assert!(listed.contains(&pending.gpus[0].uuid), "{listed:?}");
        for target in ["0".to_string(), mig] {
            let err = grant(&pending, &target, &roots).unwrap_err();
            assert!(
                matches!(err, DeviceError::MigPending { .. }),
                "{target}: {err}"
            );
        }
        // A node gone: named.
        std::fs::remove_file(roots.dev.join("nvidia3")).unwrap();
        let err = grant(&inv, "MIG-1-7-0", &roots).unwrap_err();
        assert!(err.to_string().ends_with("nvidia3 does not exist"), "{err}");
        write_device_tree(&inv, root.path()).unwrap();
        // The driver's table lacks the compute instance.
        let text = std::fs::read_to_string(&roots.mig_minors).unwrap();
        let cut: String = text
            .lines()
            .filter(|l| !l.starts_with("gpu3/gi7/ci0/"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&roots.mig_minors, cut).unwrap();
        let err = grant(&inv, "MIG-1-7-0", &roots).unwrap_err();
        assert!(
            matches!(&err, DeviceError::NoCapability { key, .. } if key == "gpu3/gi7/ci0/access"),
            "{err}"
        );
        std::fs::write(&roots.mig_minors, "config one\n").unwrap();
        assert!(matches!(
            grant(&inv, "MIG-1-7-0", &roots),
            Err(DeviceError::MigMinorsLine { line: 1, .. })
        ));
        std::fs::remove_file(&roots.mig_minors).unwrap();
        assert!(matches!(
            grant(&inv, "MIG-1-7-0", &roots),
            Err(DeviceError::MigMinors { .. })
        ));
        // A GPU lost from the bus is not granted.
        inv.gpus[0].lost = true;
        assert!(grant(&inv, "0", &roots).is_err());
    }

    #[test]
    fn the_mig_minor_table_parses_strictly() {
        let t = parse_mig_minors("t", "config 1\nmonitor 2\n\ngpu0/gi1/access 3\n").unwrap();
        assert_eq!(t["gpu0/gi1/access"], 3);
        assert_eq!(t.len(), 3);
        for bad in ["config", "config x", "gpu0/gi1/access -1", "a 1 2"] {
            assert!(parse_mig_minors("t", bad).is_err(), "{bad}");
        }
    }
}
