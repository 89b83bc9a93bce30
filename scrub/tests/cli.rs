//! The `ccnode-scrub` binary as ccnoded runs it: one JSON line on stdout,
//! exit 0 with a report, exit 1 with a failure and its code.

use std::process::Command;

use ccnode_gpu::scrub::{ScrubFailure, ScrubReport};

const BIN: &str = env!("CARGO_BIN_EXE_ccnode-scrub");

#[test]
fn sim_vram_is_scrubbed_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let vram = dir.path().join("MIG-x");
    std::fs::write(&vram, vec![0x5Au8; 64 << 10]).unwrap();
    let out = Command::new(BIN)
        .args(["--device", "MIG-x", "--chunk-mib", "2", "--sim-vram"])
        .arg(&vram)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: ScrubReport = serde_json::from_slice(&out.stdout).unwrap();
    r.check("MIG-x").unwrap();
    assert_eq!((r.backend.as_str(), r.bytes_scrubbed), ("sim", 64 << 10));
    assert!(std::fs::read(&vram).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn without_a_driver_the_cuda_scrub_fails_with_a_code_and_never_simulates() {
    // This machine has no NVIDIA driver: the scrub must say so (it checks
    // for libcuda before any call), not crash and not fall back.
    if std::path::Path::new("/dev/nvidiactl").exists() {
        eprintln!("an NVIDIA driver is present: this check is for hosts without one");
        return;
    }
    let out = Command::new(BIN)
        .args(["--device", "GPU-00000000-0000-0000-0000-000000000000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let f: ScrubFailure = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(f.error, "no_driver", "{f:?}");
}

#[test]
fn bad_arguments_are_refused() {
    let out = Command::new(BIN).output().unwrap();
    assert!(!out.status.success());
    let out = Command::new(BIN)
        .args(["--device", "MIG-x", "--chunk-mib", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let help = Command::new(BIN).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--sim-vram"));
}
