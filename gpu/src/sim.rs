//! Simulated GPUs, described by a TOML file, for tests and dev mode.
//!
//! The file is read again at every [`GpuBackend::inventory`] call, so a
//! test changes the host under a running daemon by rewriting it (write a
//! temporary file and rename it over): a new driver version, a MIG layout
//! change, a GPU marked `lost`. Events (XIDs, ECC errors, a GPU falling off
//! the bus) are lines appended to the events file, one JSON object each,
//! which [`GpuBackend::wait_events`] follows like `tail -f` from where the
//! file ended when the backend was opened:
//!
//! ```text
//! {"gpu": 0, "xid": 79}
//! {"gpu": 2, "xid": 31, "gpu_instance": 1, "compute_instance": 0}
//! {"gpu": 1, "ecc": "uncorrected", "count": 2}
//! {"gpu": 3, "lost": true}
//! ```
//!
//! Telemetry moves with time (temperatures, power, utilisation follow slow
//! waves; energy only grows), and ECC events add to the ECC counters, so the
//! series behave like a real GPU's.
//!
//! ```toml
//! driver_version = "550.127.05"
//! cuda_driver_version = "12.4"
//! scrub_on_free = true
//! events_file = "gpu-events.jsonl"   # relative to this file
//! device_root = "devtree"             # optional, relative to this file:
//!                                     # fake /dev nodes and mig-minors
//!
//! [[gpus]]
//! count = 8                           # eight GPUs like this one
//! name = "NVIDIA H100 80GB HBM3"
//! memory_gib = 80                     # 1 to 4096; MIG instances fit in it
//! vbios_version = "96.00.99.00.01"
//! inforom_version = "G520.0200.00.05"
//! gsp_firmware_version = "550.127.05"
//! cc_mode = "on"
//! mig = { "1g.10gb" = 7 }             # absent or empty: MIG disabled
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::{
    BackendKind, CcAttestation, CcMode, GpuBackend, GpuError, GpuEvent, GpuEventKind, GpuInfo,
    GpuSample, Inventory, MigDevice, MigMode, MigTelemetry, RemappedRows, SampleStatus,
    ScrubOnFree, Telemetry,
};

/// Largest simulation file read.
pub const MAX_SPEC_BYTES: u64 = 1024 * 1024;
/// Largest events line; longer lines are skipped.
pub const MAX_EVENT_LINE: usize = 4096;
/// Most GPUs a simulation may describe (NVML's own limit is 64).
pub const MAX_GPUS: u32 = 64;
/// MIG compute slices per GPU (A100, H100, H200).
pub const MIG_SLICES: u32 = 7;
/// Largest simulated GPU memory, GiB (sizes are shifted into bytes; a
/// larger value would wrap).
pub const MAX_MEMORY_GIB: u64 = 4096;

/// The simulation file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    driver_version: String,
    cuda_driver_version: String,
    #[serde(default = "yes")]
    scrub_on_free: bool,
    events_file: Option<PathBuf>,
    /// Where to write the simulated device nodes and MIG minor table
    /// ([`write_device_tree`]), rewritten with every inventory.
    device_root: Option<PathBuf>,
    #[serde(default)]
    gpus: Vec<GpuSpec>,
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuSpec {
    #[serde(default = "one")]
    count: u32,
    name: String,
    memory_gib: u64,
    vbios_version: String,
    inforom_version: Option<String>,
    gsp_firmware_version: Option<String>,
    #[serde(default = "cc_off")]
    cc_mode: CcMode,
    /// Overrides the mode implied by `mig` (`unsupported` for GPUs
    /// without MIG).
    mig_mode: Option<MigMode>,
    /// MIG instances by profile (`1g.10gb = 7`).
    #[serde(default)]
    mig: BTreeMap<String, u32>,
    /// The GPU has fallen off the bus.
    #[serde(default)]
    lost: bool,
}

fn cc_off() -> CcMode {
    CcMode::Off
}

/// One line of the events file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventLine {
    gpu: u32,
    xid: Option<u64>,
    ecc: Option<String>,
    count: Option<u64>,
    lost: Option<bool>,
    mig_config_change: Option<bool>,
    gpu_instance: Option<u32>,
    compute_instance: Option<u32>,
}

#[derive(Debug)]
struct State {
    inventory: Option<Inventory>,
    events_file: Option<PathBuf>,
    events_offset: u64,
    partial: Vec<u8>,
    /// Injected ECC errors per GPU: (corrected, uncorrected).
    ecc: BTreeMap<u32, (u64, u64)>,
    /// GPUs lost through an event; lost until the daemon restarts.
    lost: BTreeSet<u32>,
    /// The simulated device tree, when the file names one.
    device_root: Option<PathBuf>,
}

/// The simulated backend.
#[derive(Debug)]
pub struct SimBackend {
    path: PathBuf,
    started: Instant,
    state: Mutex<State>,
}

impl SimBackend {
    /// Opens the simulation described by `path`; the file must be valid
    /// now. Events already in the events file are not replayed.
    pub fn open(path: &Path) -> Result<SimBackend, GpuError> {
        let spec = read_spec(path)?;
        let events_file = spec.events_file.as_ref().map(|f| resolve(path, f));
        let events_offset = events_file
            .as_ref()
            .and_then(|f| std::fs::metadata(f).ok())
            .map_or(0, |m| m.len());
        let backend = SimBackend {
            path: path.to_owned(),
            started: Instant::now(),
            state: Mutex::new(State {
                inventory: None,
                events_file,
                events_offset,
                device_root: None,
                partial: Vec::new(),
                ecc: BTreeMap::new(),
                lost: BTreeSet::new(),
            }),
        };
        backend.inventory()?;
        Ok(backend)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state torn in a
        // way that matters for a simulation.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn resolve(spec_path: &Path, file: &Path) -> PathBuf {
    if file.is_absolute() {
        file.to_owned()
    } else {
        spec_path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(file)
    }
}

fn spec_error(path: &Path, message: impl Into<String>) -> GpuError {
    GpuError::SimSpec {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn read_spec(path: &Path) -> Result<Spec, GpuError> {
    let file = std::fs::File::open(path).map_err(|e| spec_error(path, e.to_string()))?;
    let mut text = String::new();
    file.take(MAX_SPEC_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| spec_error(path, e.to_string()))?;
    if text.len() as u64 > MAX_SPEC_BYTES {
        return Err(spec_error(
            path,
            format!("larger than {MAX_SPEC_BYTES} bytes"),
        ));
    }
    let spec: Spec = toml::from_str(&text).map_err(|e| spec_error(path, e.message()))?;
    let total: u32 = spec
        .gpus
        .iter()
        .try_fold(0u32, |n, g| n.checked_add(g.count))
        .unwrap_or(u32::MAX);
    if total > MAX_GPUS {
        return Err(spec_error(
            path,
            format!("{total} GPUs, more than {MAX_GPUS}"),
        ));
    }
    for g in &spec.gpus {
        if !(1..=MAX_MEMORY_GIB).contains(&g.memory_gib) {
            return Err(spec_error(
                path,
                format!(
                    "{}: memory_gib {} is not between 1 and {MAX_MEMORY_GIB}",
                    g.name, g.memory_gib
                ),
            ));
        }
        let mut slices = 0u32;
        let mut mig_gib = 0u64;
        for (profile, n) in &g.mig {
            let (s, gib) = parse_profile(profile).ok_or_else(|| {
                spec_error(
                    path,
                    format!("MIG profile `{profile}` is not of the form <N>g.<M>gb"),
                )
            })?;
            slices = slices.saturating_add(s.saturating_mul(*n));
            mig_gib = mig_gib.saturating_add(gib.saturating_mul(u64::from(*n)));
        }
        if slices > MIG_SLICES {
            return Err(spec_error(
                path,
                format!(
                    "MIG layout of {} uses {slices} compute slices, more than {MIG_SLICES}",
                    g.name
                ),
            ));
        }
        if mig_gib > g.memory_gib {
            return Err(spec_error(
                path,
                format!(
                    "MIG layout of {} takes {mig_gib} GiB, more than its memory_gib {}",
                    g.name, g.memory_gib
                ),
            ));
        }
        if !g.mig.is_empty() && matches!(g.mig_mode, Some(m) if m != MigMode::Enabled) {
            return Err(spec_error(
                path,
                "MIG devices on a GPU whose MIG mode is not enabled",
            ));
        }
    }
    Ok(spec)
}

/// `3g.40gb` → (3 compute slices, 40 GiB).
fn parse_profile(p: &str) -> Option<(u32, u64)> {
    let (g, mem) = p.split_once("g.")?;
    let mem = mem.strip_suffix("gb")?;
    let g: u32 = g.parse().ok()?;
    let mem: u64 = mem.parse().ok()?;
    (g >= 1 && mem >= 1).then_some((g, mem))
}

/// A stable 128-bit value from a string (FNV-1a, twice): simulated UUIDs
/// stay the same across restarts.
fn stable_id(s: &str) -> u128 {
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x6c62_272e_07bb_0142;
    for byte in s.bytes() {
        a = (a ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        b = (b ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3 ^ 0x10);
    }
    (u128::from(a) << 64) | u128::from(b)
}

fn build_inventory(spec: &Spec, lost_by_event: &BTreeSet<u32>) -> Inventory {
    let mut gpus = Vec::new();
    let mut index = 0u32;
    for g in &spec.gpus {
        for _ in 0..g.count {
            let uuid = format!(
                "GPU-{}",
                crate::types::uuid_body(stable_id(&format!("gpu/{index}/{}", g.name)))
            );
            let mig_mode = g.mig_mode.unwrap_or(if g.mig.is_empty() {
                MigMode::Disabled
            } else {
                MigMode::Enabled
            });
            let mut mig_devices = Vec::new();
            let mut gi = 1u32;
            // Larger instances first, as nvidia-smi lists them.
            let mut profiles: Vec<_> = g.mig.iter().collect();
            profiles.sort_by_key(|(p, _)| std::cmp::Reverse(parse_profile(p)));
            for (profile, n) in profiles {
                let (_, mem_gib) = parse_profile(profile).unwrap_or((1, 1));
                for _ in 0..*n {
                    mig_devices.push(MigDevice {
                        index: gi - 1,
                        uuid: format!(
                            "MIG-{}",
                            crate::types::uuid_body(stable_id(&format!("{uuid}/{gi}/0")))
                        ),
                        gpu_instance_id: gi,
                        compute_instance_id: 0,
                        profile: profile.clone(),
                        memory_total_bytes: mem_gib << 30,
                    });
                    gi += 1;
                }
            }
            gpus.push(GpuInfo {
                index,
                uuid,
                // Eight GPUs per PCI domain, like an HGX board.
                pci_bus_id: format!("{:08X}:{:02X}:00.0", index / 8, 0x17 + (index % 8) * 0x10),
                name: g.name.clone(),
                minor_number: Some(index),
                memory_total_bytes: g.memory_gib << 30,
                mig_mode,
                mig_devices,
                cc_mode: g.cc_mode,
                vbios_version: g.vbios_version.clone(),
                inforom_version: g.inforom_version.clone(),
                gsp_firmware_version: g.gsp_firmware_version.clone(),
                lost: g.lost || lost_by_event.contains(&index),
            });
            index += 1;
        }
    }
    Inventory {
        driver_version: spec.driver_version.clone(),
        cuda_driver_version: spec.cuda_driver_version.clone(),
        scrub_on_free: if spec.scrub_on_free {
            ScrubOnFree::Enabled
        } else {
            ScrubOnFree::Disabled
        },
        gpus,
    }
}

/// Telemetry of simulated GPU `g` at `t` seconds after the backend opened.
fn telemetry(g: &GpuInfo, t: f64, ecc: (u64, u64)) -> Telemetry {
    let phase = f64::from(g.index);
    let wave = |period: f64| (t / period + phase).sin();
    let util = 0.5 + 0.4 * wave(45.0);
    let reserved = 512u64 << 20;
    let used = ((g.memory_total_bytes - reserved) as f64 * (0.2 + 0.3 * util)) as u64;
    let mig = g
        .mig_devices
        .iter()
        .map(|m| MigTelemetry {
            gpu_instance_id: m.gpu_instance_id,
            compute_instance_id: m.compute_instance_id,
            fb_used_bytes: Some((m.memory_total_bytes as f64 * 0.25 * (1.0 + util)) as u64),
            fb_total_bytes: Some(m.memory_total_bytes),
        })
        .collect();
    Telemetry {
        gpu_temp_celsius: Some((40.0 + 8.0 * wave(60.0)).round()),
        memory_temp_celsius: Some((46.0 + 6.0 * wave(75.0)).round()),
        power_watts: Some(300.0 + 120.0 * util),
        // An average of 360 W: only ever grows.
        energy_joules: Some(1.0e6 + 360.0 * t),
        sm_clock_mhz: Some(1980),
        memory_clock_mhz: Some(2619),
        gpu_utilization: Some(util),
        memory_utilization: Some(util * 0.6),
        fb_used_bytes: Some(used),
        fb_free_bytes: Some(g.memory_total_bytes - reserved - used),
        fb_reserved_bytes: Some(reserved),
        ecc_corrected_total: Some(ecc.0),
        ecc_uncorrected_total: Some(ecc.1),
        retired_pages: None,
        remapped_rows: Some(RemappedRows {
            correctable: 0,
            uncorrectable: ecc.1.min(1),
            pending: ecc.1 > 0,
            failure: false,
        }),
        pcie_replays_total: Some(0),
        throttle_reasons: Some(if util < 0.2 { 0x1 } else { 0x0 }),
        pstate: Some(0),
        mig,
    }
}

impl State {
    /// Reads complete new lines of the events file.
    fn read_events(&mut self, log_path: &Path) -> Vec<GpuEvent> {
        let Some(path) = self.events_file.clone() else {
            return Vec::new();
        };
        let Ok(mut file) = std::fs::File::open(&path) else {
            return Vec::new();
        };
        let len = file.metadata().map_or(0, |m| m.len());
        if len < self.events_offset {
            // Truncated or replaced: start again from its beginning.
            self.events_offset = 0;
            self.partial.clear();
        }
        if len == self.events_offset || file.seek(SeekFrom::Start(self.events_offset)).is_err() {
            return Vec::new();
        }
        let mut chunk = Vec::new();
        let Ok(n) = file.take(1024 * 1024).read_to_end(&mut chunk) else {
            return Vec::new();
        };
        self.events_offset += n as u64;
        self.partial.extend_from_slice(&chunk);
        let mut out = Vec::new();
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            if line.len() > MAX_EVENT_LINE {
                tracing::warn!(file = %path.display(), "simulated GPU event line too long: skipped");
                continue;
            }
            let text = String::from_utf8_lossy(&line);
            if text.trim().is_empty() {
                continue;
            }
            match self.parse_event(text.trim()) {
                Ok(e) => out.push(e),
                Err(why) => tracing::warn!(
                    file = %path.display(),
                    spec = %log_path.display(),
                    error = %why,
                    "simulated GPU event skipped"
                ),
            }
        }
        if self.partial.len() > MAX_EVENT_LINE {
            tracing::warn!(file = %path.display(), "simulated GPU event line too long: skipped");
            self.partial.clear();
        }
        out
    }

    fn parse_event(&mut self, line: &str) -> Result<GpuEvent, String> {
        let e: EventLine = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let inv = self.inventory.as_ref().ok_or("no inventory yet")?;
        let gpu = inv
            .gpus
            .iter()
            .find(|g| g.index == e.gpu)
            .ok_or_else(|| format!("no simulated GPU {}", e.gpu))?;
        let kind = match (e.xid, e.ecc.as_deref(), e.lost, e.mig_config_change) {
            (Some(code), None, None, None) => GpuEventKind::Xid { code },
            (None, Some(which), None, None) => {
                let count = e.count.unwrap_or(1);
                let c = self.ecc.entry(e.gpu).or_default();
                match which {
                    "corrected" => {
                        c.0 = c.0.saturating_add(count);
                        GpuEventKind::EccCorrected { count }
                    }
                    "uncorrected" => {
                        c.1 = c.1.saturating_add(count);
                        GpuEventKind::EccUncorrected { count }
                    }
                    other => {
                        return Err(format!("ecc must be corrected or uncorrected, not {other}"))
                    }
                }
            }
            (None, None, Some(true), None) => {
                self.lost.insert(e.gpu);
                GpuEventKind::Lost
            }
            (None, None, None, Some(true)) => GpuEventKind::MigConfigChange,
            _ => {
                return Err(
                    "exactly one of xid, ecc, lost=true, mig_config_change=true is required".into(),
                )
            }
        };
        Ok(GpuEvent {
            gpu_index: e.gpu,
            uuid: gpu.uuid.clone(),
            gpu_instance_id: e.gpu_instance,
            compute_instance_id: e.compute_instance,
            kind,
        })
    }
}

impl GpuBackend for SimBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Sim
    }

    fn inventory(&self) -> Result<Inventory, GpuError> {
        let spec = read_spec(&self.path)?;
        let mut st = self.lock();
        st.events_file = spec.events_file.as_ref().map(|f| resolve(&self.path, f));
        let inv = build_inventory(&spec, &st.lost);
        st.device_root = spec.device_root.as_ref().map(|d| resolve(&self.path, d));
        if let Some(root) = &st.device_root {
            write_device_tree(&inv, root).map_err(|e| GpuError::SimSpec {
                path: self.path.display().to_string(),
                message: format!("device_root {}: {e}", root.display()),
            })?;
        }
        st.inventory = Some(inv.clone());
        Ok(inv)
    }

    fn device_roots(&self) -> crate::devices::DeviceRoots {
        match &self.lock().device_root {
            Some(root) => crate::devices::DeviceRoots::under(root),
            // Nothing simulated: no node of the host's can be granted.
            None => crate::devices::DeviceRoots::under(Path::new("/nonexistent/ccnode-sim")),
        }
    }

    fn sample(&self) -> Result<Vec<GpuSample>, GpuError> {
        let t = self.started.elapsed().as_secs_f64();
        let st = self.lock();
        let inv = st.inventory.as_ref().ok_or(GpuError::Call {
            call: "sample",
            message: "no inventory read yet".into(),
        })?;
        Ok(inv
            .gpus
            .iter()
            .map(|g| GpuSample {
                index: g.index,
                status: if g.lost || st.lost.contains(&g.index) {
                    SampleStatus::Lost
                } else {
                    let ecc = st.ecc.get(&g.index).copied().unwrap_or_default();
                    SampleStatus::Ok(Box::new(telemetry(g, t, ecc)))
                },
            })
            .collect())
    }

    fn cc_attestation(&self, _index: u32, _nonce: &[u8; 32]) -> Result<CcAttestation, GpuError> {
        Err(GpuError::Unsupported(
            "simulated gpus have no attestation report".into(),
        ))
    }

    fn wait_events(&self, timeout: Duration) -> Result<Vec<GpuEvent>, GpuError> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.lock().read_events(&self.path);
            if !events.is_empty() {
                return Ok(events);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(100)));
        }
    }
}

/// Writes the device nodes and the driver's MIG minor table that `inv`
/// would have on a host, as plain files under `root` (standing for `/`):
/// `dev/nvidia<minor>` per GPU, the shared driver nodes,
/// `dev/nvidia-caps/nvidia-cap<N>` and `proc/driver/nvidia-caps/mig-minors`
/// with one GPU-instance and one compute-instance capability per MIG device
/// (after the driver's `config 1` and `monitor 2`), and each device's sim
/// VRAM under `sim-vram/` ([`crate::scrub`]). Existing nodes are replaced,
/// so a test can restore a tree it broke; existing VRAM of the right size
/// is kept (what a tenant left there stays until a scrub).
/// [`crate::devices::grant`] resolves against such a tree as against the
/// real one; only plain files stand in for the nodes.
pub fn write_device_tree(inv: &crate::Inventory, root: &Path) -> std::io::Result<()> {
    let dev = root.join("dev");
    std::fs::create_dir_all(dev.join("nvidia-caps"))?;
    for n in crate::devices::SHARED_NODES {
        std::fs::write(dev.join(n), "")?;
    }
    let mut table = String::from("config 1\nmonitor 2\n");
    let mut next = 3u32;
    let mut cap = |key: String, table: &mut String| -> std::io::Result<()> {
        table.push_str(&format!("{key} {next}\n"));
        std::fs::write(dev.join(format!("nvidia-caps/nvidia-cap{next}")), "")?;
        next += 1;
        Ok(())
    };
    for g in &inv.gpus {
        let Some(minor) = g.minor_number else {
            continue;
        };
        std::fs::write(dev.join(format!("nvidia{minor}")), "")?;
        let mut gis = BTreeSet::new();
        for m in &g.mig_devices {
            if gis.insert(m.gpu_instance_id) {
                cap(
                    format!("gpu{minor}/gi{}/access", m.gpu_instance_id),
                    &mut table,
                )?;
            }
            cap(
                format!(
                    "gpu{minor}/gi{}/ci{}/access",
                    m.gpu_instance_id, m.compute_instance_id
                ),
                &mut table,
            )?;
        }
    }
    let vram = root.join(crate::scrub::SIM_VRAM_DIR);
    for g in inv.gpus.iter().filter(|g| !g.lost) {
        if g.mig_mode == MigMode::Enabled {
            for m in &g.mig_devices {
                crate::scrub::ensure_sim_vram(&vram, &m.uuid, m.memory_total_bytes)?;
            }
        } else {
            crate::scrub::ensure_sim_vram(&vram, &g.uuid, g.memory_total_bytes)?;
        }
    }
    let minors = root.join("proc/driver/nvidia-caps");
    std::fs::create_dir_all(&minors)?;
    std::fs::write(minors.join("mig-minors"), table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const SPEC: &str = r#"
driver_version = "550.127.05"
cuda_driver_version = "12.4"
events_file = "events.jsonl"

[[gpus]]
count = 2
name = "NVIDIA H100 80GB HBM3"
memory_gib = 80
vbios_version = "96.00.99.00.01"
inforom_version = "G520.0200.00.05"
gsp_firmware_version = "550.127.05"
cc_mode = "on"
mig = { "1g.10gb" = 3, "2g.20gb" = 2 }

[[gpus]]
name = "NVIDIA L4"
memory_gib = 24
vbios_version = "95.04.29.00.06"
mig_mode = "unsupported"
"#;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn append(path: &Path, line: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(line.as_bytes()).unwrap();
    }

    #[test]
    fn simulated_gpus_have_no_attestation_report() {
        let dir = tempfile::tempdir().unwrap();
        let spec = write(dir.path(), "gpus.toml", SPEC);
        let sim = SimBackend::open(&spec).unwrap();
        sim.inventory().unwrap();
        let e = sim.cc_attestation(0, &[7; 32]).unwrap_err();
        assert!(matches!(&e, GpuError::Unsupported(_)), "{e}");
        assert_eq!(e.code(), "unsupported");
        assert!(e
            .to_string()
            .contains("simulated gpus have no attestation report"));
    }

    #[test]
    fn inventory_follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let spec = write(dir.path(), "gpus.toml", SPEC);
        let sim = SimBackend::open(&spec).unwrap();
        let inv = sim.inventory().unwrap();
        assert_eq!(inv.gpus.len(), 3);
        assert_eq!(inv.scrub_on_free, ScrubOnFree::Enabled);
        let h = &inv.gpus[0];
        assert_eq!(h.mig_mode, MigMode::Enabled);
        let profiles: Vec<_> = h.mig_devices.iter().map(|m| m.profile.as_str()).collect();
        assert_eq!(
            profiles,
            ["2g.20gb", "2g.20gb", "1g.10gb", "1g.10gb", "1g.10gb"]
        );
        assert!(h.uuid.starts_with("GPU-") && h.uuid.len() == 40);
        assert!(h.mig_devices[0].uuid.starts_with("MIG-"));
        assert_ne!(inv.gpus[0].uuid, inv.gpus[1].uuid);
        assert_eq!(inv.gpus[2].mig_mode, MigMode::Unsupported);
        assert_eq!(inv.gpus[2].cc_mode, CcMode::Off);
        // Stable across opens: the same file names the same GPUs.
        let again = SimBackend::open(&spec).unwrap().inventory().unwrap();
        assert_eq!(again, inv);

        let changed = SPEC
            .replace("550.127.05\"\ncuda", "560.35.03\"\ncuda")
            .replace("\"1g.10gb\" = 3, \"2g.20gb\" = 2", "\"3g.40gb\" = 2")
            + "lost = true\n";
        write(dir.path(), "gpus.toml", &changed);
        let inv = sim.inventory().unwrap();
        assert_eq!(inv.driver_version, "560.35.03");
        assert_eq!(inv.gpus[0].mig_devices.len(), 2);
        assert!(inv.gpus[2].lost);
        let samples = sim.sample().unwrap();
        assert!(matches!(samples[0].status, SampleStatus::Ok(_)));
        assert_eq!(samples[2].status, SampleStatus::Lost);
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("", "missing field `driver_version`"),
            (
                "driver_version = \"1\"\ncuda_driver_version = \"1\"\ncolour = 1\n",
                "unknown field `colour`",
            ),
            (
                &SPEC.replace("\"1g.10gb\" = 3", "\"1g.10gb\" = 5"),
                "9 compute slices",
            ),
            (&SPEC.replace("1g.10gb", "big"), "`big` is not of the form"),
            (&SPEC.replace("count = 2", "count = 65"), "66 GPUs"),
            (
                &SPEC.replace("memory_gib = 80", "memory_gib = 0"),
                "memory_gib 0 is not between 1 and 4096",
            ),
            (
                &SPEC.replace("memory_gib = 80", "memory_gib = 17179869184"),
                "is not between 1 and 4096",
            ),
            (
                &SPEC.replace("memory_gib = 80", "memory_gib = 60"),
                "takes 70 GiB, more than its memory_gib 60",
            ),
        ];
        for (text, want) in cases {
            let p = write(dir.path(), "bad.toml", text);
            let err = SimBackend::open(&p).unwrap_err().to_string();
            assert!(err.contains(want), "{err} lacks {want}");
        }
        let err = SimBackend::open(&dir.path().join("absent.toml")).unwrap_err();
        assert_eq!(err.code(), "sim_spec");
    }

    #[test]
    fn telemetry_moves_and_energy_only_grows() {
        let g = build_inventory(&toml::from_str(SPEC).unwrap(), &BTreeSet::new()).gpus[0].clone();
        let a = telemetry(&g, 10.0, (0, 0));
        let b = telemetry(&g, 40.0, (0, 0));
        assert_ne!(a.power_watts, b.power_watts);
        assert!(b.energy_joules > a.energy_joules);
        let used =
            a.fb_used_bytes.unwrap() + a.fb_free_bytes.unwrap() + a.fb_reserved_bytes.unwrap();
        assert_eq!(used, g.memory_total_bytes);
        assert_eq!(a.mig.len(), 5);
    }

    #[test]
    fn events_are_followed_from_the_end_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let spec = write(dir.path(), "gpus.toml", SPEC);
        let events = dir.path().join("events.jsonl");
        append(&events, "{\"gpu\": 0, \"xid\": 48}\n");
        let sim = SimBackend::open(&spec).unwrap();
        assert!(
            sim.wait_events(Duration::ZERO).unwrap().is_empty(),
            "old events are not replayed"
        );
        append(
            &events,
            "{\"gpu\": 1, \"xid\": 31, \"gpu_instance\": 2, \"compute_instance\": 0}\n\
             {\"gpu\": 0, \"ecc\": \"uncorrected\", \"count\": 2}\n\
             not json\n\
             {\"gpu\": 9, \"xid\": 1}\n\
             {\"gpu\": 0, \"xid\": 1, \"lost\": true}\n\
             {\"gpu\": 2, \"lost\": true}\n\
             {\"gpu\": 0, \"xid\"",
        );
        let got = sim.wait_events(Duration::ZERO).unwrap();
        let kinds: Vec<_> = got.iter().map(|e| (e.gpu_index, e.kind)).collect();
        assert_eq!(
            kinds,
            [
                (1, GpuEventKind::Xid { code: 31 }),
                (0, GpuEventKind::EccUncorrected { count: 2 }),
                (2, GpuEventKind::Lost),
            ]
        );
        assert_eq!(got[0].gpu_instance_id, Some(2));
        // The half-written line completes later.
        append(&events, ": 79}\n");
        let got = sim.wait_events(Duration::ZERO).unwrap();
        assert_eq!(got[0].kind, GpuEventKind::Xid { code: 79 });
        // ECC events count in the telemetry; a lost event sticks.
        sim.inventory().unwrap();
        let s = sim.sample().unwrap();
        let SampleStatus::Ok(t) = &s[0].status else {
            panic!("gpu 0 readable")
        };
        assert_eq!(t.ecc_uncorrected_total, Some(2));
        assert_eq!(s[2].status, SampleStatus::Lost);
        assert!(sim.inventory().unwrap().gpus[2].lost);
    }
}
