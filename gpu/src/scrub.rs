//! VRAM scrubbing: what `ccnode-scrub` reports, how ccnoded checks a
//! report, the devices a host has to scrub, and the simulated VRAM the sim
//! backend gives each device.
//!
//! A scrub runs in a short-lived child per device (`ccnode-scrub`, crate
//! `scrub/`), because one CUDA process sees one MIG device. The child
//! allocates the device's free memory in chunks until allocation fails,
//! writes zeros over all of it, verifies on the device that every byte is
//! zero, frees, and prints one [`ScrubReport`] as a JSON line. ccnoded
//! trusts nothing it says: [`ScrubReport::check`] refuses a report whose
//! figures do not add up, and the policy's coverage threshold is applied
//! to what is left.
//!
//! On the sim backend VRAM is host memory: one file per device under the
//! device tree, `<device_root>/sim-vram/<UUID>`, one byte per MiB of the
//! device's memory (an 80 GiB GPU has 80 KiB), granted to that device's
//! worker with its device nodes. The sim scrub ([`scrub_sim`]) writes and
//! verifies that file the way the CUDA scrub does device memory; the
//! driver's own reservation, which no allocation reaches, is simulated by a
//! `<UUID>.reserved` file holding a byte count at the start of the file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::{Inventory, MigMode};

/// The report format's version.
pub const REPORT_VERSION: u32 = 1;
/// Longest report line ccnoded reads from a scrub child.
pub const MAX_REPORT_BYTES: usize = 16 * 1024;
/// Sim VRAM: one byte per this many bytes of device memory.
pub const SIM_SCALE: u64 = 1 << 20;
/// Largest sim VRAM file (a device of 4 PiB).
pub const MAX_SIM_VRAM: u64 = 4 << 30;
/// The directory under a sim device tree that holds the VRAM files.
pub const SIM_VRAM_DIR: &str = "sim-vram";

/// What one scrub found, as the child prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScrubReport {
    pub version: u32,
    /// The device scrubbed: `GPU-…` or `MIG-…`.
    pub device: String,
    /// `cuda` or `sim`.
    pub backend: String,
    /// The device's memory.
    pub bytes_total: u64,
    /// Memory free when the scrub started (what the driver said).
    pub bytes_free: u64,
    /// Memory the scrub allocated, zeroed and verified.
    pub bytes_scrubbed: u64,
    /// `bytes_scrubbed / bytes_total`.
    pub coverage: f64,
    /// Chunks allocated.
    pub chunks: u64,
    /// Bytes found non-zero by the on-device check after zeroing (must
    /// be 0).
    pub nonzero_bytes: u64,
    /// Bytes read back to the host to check, sampled across every chunk.
    pub sampled_bytes: u64,
    /// Non-zero bytes among those (must be 0).
    pub sampled_nonzero: u64,
    /// Wall time of allocation, writing, verification and freeing.
    pub duration_ms: f64,
    /// `bytes_scrubbed / duration`.
    pub throughput_bytes_per_s: f64,
}

/// What the child prints instead of a report when it cannot scrub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScrubFailure {
    pub version: u32,
    pub device: String,
    /// A stable code: `no_driver`, `device_mismatch`, `cuda_error`,
    /// `not_zero`, `sim_vram`, `usage`.
    pub error: String,
    pub message: String,
}

impl ScrubReport {
    /// Whether the figures are consistent with each other and with the
    /// device asked for; `Err` says what is wrong. A report that passes
    /// may still fall below the policy's coverage threshold.
    pub fn check(&self, device: &str) -> Result<(), String> {
        if self.version != REPORT_VERSION {
            return Err(format!(
                "report version {}, expected {REPORT_VERSION}",
                self.version
            ));
        }
        if !self.device.eq_ignore_ascii_case(device) {
            return Err(format!("report for {:?}, expected {device:?}", self.device));
        }
        if self.bytes_total == 0 {
            return Err("bytes_total is 0".into());
        }
        if self.bytes_scrubbed > self.bytes_free || self.bytes_free > self.bytes_total {
            return Err(format!(
                "bytes scrubbed {} > free {} or free > total {}",
                self.bytes_scrubbed, self.bytes_free, self.bytes_total
            ));
        }
        let want = self.bytes_scrubbed as f64 / self.bytes_total as f64;
        if !self.coverage.is_finite() || (self.coverage - want).abs() > 1e-6 {
            return Err(format!(
                "coverage {} is not bytes_scrubbed / bytes_total ({want})",
                self.coverage
            ));
        }
        if self.bytes_scrubbed > 0 && (self.chunks == 0 || self.sampled_bytes == 0) {
            return Err("bytes scrubbed in no chunk, or none sampled".into());
        }
        if self.sampled_bytes > self.bytes_scrubbed || self.sampled_nonzero > self.sampled_bytes {
            return Err("sampled figures exceed what was scrubbed".into());
        }
        if self.nonzero_bytes > 0 || self.sampled_nonzero > 0 {
            return Err(format!(
                "memory not zero after the scrub: {} bytes on the device, {} sampled",
                self.nonzero_bytes, self.sampled_nonzero
            ));
        }
        if !self.duration_ms.is_finite()
            || self.duration_ms < 0.0
            || !self.throughput_bytes_per_s.is_finite()
            || self.throughput_bytes_per_s < 0.0
        {
            return Err("duration or throughput is not a non-negative number".into());
        }
        Ok(())
    }
}

/// Every device a host's workers can be given: each GPU with MIG off,
/// each MIG device of a GPU with MIG on; GPUs lost from the bus are left
/// out (nothing can reach their memory).
pub fn devices(inv: &Inventory) -> Vec<String> {
    let mut out = Vec::new();
    for g in inv.gpus.iter().filter(|g| !g.lost) {
        // MIG devices also of a GPU whose change to MIG off is pending:
        // they exist until the reset.
        if g.mig_mode == MigMode::Enabled || !g.mig_devices.is_empty() {
            out.extend(g.mig_devices.iter().map(|m| m.uuid.clone()));
        } else {
            out.push(g.uuid.clone());
        }
    }
    out
}

/// The sim VRAM file of `uuid` under `vram_dir`, or `None` when the UUID
/// could not be a file name.
pub fn sim_vram_path(vram_dir: &Path, uuid: &str) -> Option<PathBuf> {
    let ok = !uuid.is_empty()
        && uuid.len() <= 128
        && uuid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then(|| vram_dir.join(uuid))
}

/// The size of the sim VRAM of a device of `memory_bytes`.
pub fn sim_vram_size(memory_bytes: u64) -> u64 {
    (memory_bytes / SIM_SCALE).clamp(4096, MAX_SIM_VRAM)
}

/// Creates `uuid`'s sim VRAM of `memory_bytes / SIM_SCALE` bytes (at
/// least 4 KiB) if it is missing or of another size, mode 0666 like the
/// driver's device nodes (`NVreg_DeviceFileMode`), so an unprivileged
/// worker granted it can write it. An existing file of the right size is
/// left as it is: what a tenant wrote stays there until a scrub.
pub fn ensure_sim_vram(vram_dir: &Path, uuid: &str, memory_bytes: u64) -> std::io::Result<()> {
    let Some(path) = sim_vram_path(vram_dir, uuid) else {
        return Ok(());
    };
    let size = sim_vram_size(memory_bytes);
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.len() == size) {
        return Ok(());
    }
    std::fs::create_dir_all(vram_dir)?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    f.set_len(size)?;
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
}

/// Bytes of sim VRAM the "driver" keeps (`<UUID>.reserved`, a decimal
/// count; absent: none).
fn sim_reserved(path: &Path) -> Result<u64, String> {
    let mut p = path.as_os_str().to_owned();
    p.push(".reserved");
    match std::fs::read_to_string(&p) {
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("{}: not a byte count", Path::new(&p).display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("{}: {e}", Path::new(&p).display())),
    }
}

/// Scrubs sim VRAM the way the CUDA scrub does a device: "allocates"
/// everything after the reserved part in chunks of `chunk` bytes, writes
/// zeros over it, reads all of it back to verify (the sim's stand-in for
/// the on-device reduction), and samples it again.
pub fn scrub_sim(device: &str, path: &Path, chunk: u64) -> Result<ScrubReport, ScrubFailure> {
    let fail = |error: &str, message: String| ScrubFailure {
        version: REPORT_VERSION,
        device: device.to_owned(),
        error: error.to_owned(),
        message,
    };
    let start = Instant::now();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| fail("sim_vram", format!("{}: {e}", path.display())))?;
    let meta = f
        .metadata()
        .map_err(|e| fail("sim_vram", format!("{}: {e}", path.display())))?;
    if !meta.is_file() || meta.len() == 0 || meta.len() > MAX_SIM_VRAM {
        return Err(fail(
            "sim_vram",
            format!("{} is not a sim VRAM file", path.display()),
        ));
    }
    let total = meta.len();
    let reserved = sim_reserved(path)
        .map_err(|m| fail("sim_vram", m))?
        .min(total);
    let free = total - reserved;
    let chunk = chunk.clamp(4096, 1 << 30);
    let io = |e: std::io::Error| fail("sim_vram", format!("{}: {e}", path.display()));
    let zeros = vec![0u8; chunk as usize];
    let mut chunks = 0u64;
    let mut at = reserved;
    f.seek(SeekFrom::Start(at)).map_err(io)?;
    while at < total {
        let n = chunk.min(total - at);
        f.write_all(&zeros[..n as usize]).map_err(io)?;
        at += n;
        chunks += 1;
    }
    f.sync_data().map_err(io)?;
    // Verify every byte (the CUDA scrub's reduction over each chunk).
    let mut nonzero = 0u64;
    let mut buf = vec![0u8; chunk as usize];
    f.seek(SeekFrom::Start(reserved)).map_err(io)?;
    let mut left = free;
    while left > 0 {
        let n = chunk.min(left) as usize;
        f.read_exact(&mut buf[..n]).map_err(io)?;
        nonzero += buf[..n].iter().filter(|&&b| b != 0).count() as u64;
        left -= n as u64;
    }
    // Sampled read-back: the first and last 4 KiB of every chunk.
    let (mut sampled, mut sampled_nonzero) = (0u64, 0u64);
    let mut c = reserved;
    while c < total {
        let end = (c + chunk).min(total);
        for off in [c, end.saturating_sub(4096).max(c)] {
            let n = 4096.min(end - off) as usize;
            f.seek(SeekFrom::Start(off)).map_err(io)?;
            f.read_exact(&mut buf[..n]).map_err(io)?;
            sampled += n as u64;
            sampled_nonzero += buf[..n].iter().filter(|&&b| b != 0).count() as u64;
        }
        c = end;
    }
    let sampled = sampled.min(free);
    let secs = start.elapsed().as_secs_f64();
    let report = ScrubReport {
        version: REPORT_VERSION,
        device: device.to_owned(),
        backend: "sim".into(),
        bytes_total: total,
        bytes_free: free,
        bytes_scrubbed: free,
        coverage: free as f64 / total as f64,
        chunks,
        nonzero_bytes: nonzero,
        sampled_bytes: sampled,
        sampled_nonzero: sampled_nonzero.min(sampled),
        duration_ms: secs * 1e3,
        throughput_bytes_per_s: if secs > 0.0 { free as f64 / secs } else { 0.0 },
    };
    if nonzero > 0 || sampled_nonzero > 0 {
        return Err(fail(
            "not_zero",
            format!("{nonzero} bytes not zero after writing zeros"),
        ));
    }
    Ok(report)
}

/// Reads `path` whole (tests, diagnostics): at most [`MAX_SIM_VRAM`].
pub fn read_sim_vram(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    File::open(path)?.take(MAX_SIM_VRAM).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> ScrubReport {
        ScrubReport {
            version: REPORT_VERSION,
            device: "MIG-1".into(),
            backend: "sim".into(),
            bytes_total: 1000,
            bytes_free: 900,
            bytes_scrubbed: 800,
            coverage: 0.8,
            chunks: 2,
            nonzero_bytes: 0,
            sampled_bytes: 100,
            sampled_nonzero: 0,
            duration_ms: 1.0,
            throughput_bytes_per_s: 8e5,
        }
    }

    #[test]
    fn a_consistent_report_passes_and_each_inconsistency_is_refused() {
        assert_eq!(report().check("mig-1"), Ok(()));
        type Spoil = Box<dyn Fn(&mut ScrubReport)>;
        let cases: Vec<(&str, Spoil)> = vec![
            ("version", Box::new(|r| r.version = 2)),
            ("device", Box::new(|r| r.device = "MIG-2".into())),
            ("total", Box::new(|r| r.bytes_total = 0)),
            ("more than free", Box::new(|r| r.bytes_scrubbed = 950)),
            ("free over total", Box::new(|r| r.bytes_free = 1001)),
            ("coverage", Box::new(|r| r.coverage = 0.99)),
            ("nan", Box::new(|r| r.coverage = f64::NAN)),
            ("chunks", Box::new(|r| r.chunks = 0)),
            ("sampled", Box::new(|r| r.sampled_bytes = 801)),
            ("nonzero", Box::new(|r| r.nonzero_bytes = 1)),
            ("sampled nonzero", Box::new(|r| r.sampled_nonzero = 1)),
            ("duration", Box::new(|r| r.duration_ms = -1.0)),
            (
                "throughput",
                Box::new(|r| r.throughput_bytes_per_s = f64::INFINITY),
            ),
        ];
        for (what, f) in cases {
            let mut r = report();
            f(&mut r);
            assert!(r.check("MIG-1").is_err(), "{what} accepted");
        }
    }

    #[test]
    fn the_sim_scrub_zeroes_everything_it_can_allocate_and_reports_coverage() {
        let dir = tempfile::tempdir().unwrap();
        ensure_sim_vram(dir.path(), "GPU-a", 80 << 30).unwrap();
        let path = dir.path().join("GPU-a");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 80 << 10);
        std::fs::write(&path, vec![0xA5u8; 80 << 10]).unwrap();
        // Recreating leaves a tenant's bytes in place (only a scrub clears).
        ensure_sim_vram(dir.path(), "GPU-a", 80 << 30).unwrap();
        assert!(read_sim_vram(&path).unwrap().iter().all(|&b| b == 0xA5));

        let r = scrub_sim("GPU-a", &path, 12288).unwrap();
        r.check("GPU-a").unwrap();
        assert_eq!(
            (r.bytes_scrubbed, r.bytes_total, r.coverage),
            (80 << 10, 80 << 10, 1.0)
        );
        assert_eq!(r.chunks, (80u64 << 10).div_ceil(12288));
        assert!(read_sim_vram(&path).unwrap().iter().all(|&b| b == 0));

        // The driver keeps the first 20 KiB: untouched, and not covered.
        std::fs::write(&path, vec![0xA5u8; 80 << 10]).unwrap();
        std::fs::write(dir.path().join("GPU-a.reserved"), "20480\n").unwrap();
        let r = scrub_sim("GPU-a", &path, 1 << 20).unwrap();
        assert_eq!(r.bytes_scrubbed, 60 << 10);
        assert!((r.coverage - 0.75).abs() < 1e-9);
        let bytes = read_sim_vram(&path).unwrap();
        assert!(bytes[..20480].iter().all(|&b| b == 0xA5));
        assert!(bytes[20480..].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_sim_scrub_refuses_what_is_not_sim_vram() {
        let dir = tempfile::tempdir().unwrap();
        let e = scrub_sim("GPU-a", &dir.path().join("GPU-a"), 4096).unwrap_err();
        assert_eq!(e.error, "sim_vram");
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("GPU-b")).unwrap();
        let e = scrub_sim("GPU-b", &dir.path().join("GPU-b"), 4096).unwrap_err();
        assert_eq!(e.error, "sim_vram");
        std::fs::write(dir.path().join("GPU-c"), b"").unwrap();
        assert_eq!(
            scrub_sim("GPU-c", &dir.path().join("GPU-c"), 4096)
                .unwrap_err()
                .error,
            "sim_vram"
        );
        assert!(sim_vram_path(dir.path(), "../etc").is_none());
    }
}
