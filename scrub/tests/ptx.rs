//! ccnode-scrub's check kernel (`src/nonzero.ptx`) is hand-written PTX that
//! the driver compiles at run time; nothing in the build assembles it. This
//! test does, with NVIDIA's own `ptxas` (PyPI `nvidia-cuda-nvcc-cu12`, in
//! the tests' virtual environment, CCNODE_VENV, default `<repo>/.venv`),
//! for the GPUs ccnode runs on (Hopper, sm_90; Ampere, sm_80) and the PTX's
//! own target (sm_70). No GPU is needed. A broken copy must be refused, so
//! the check can fail.

use std::path::{Path, PathBuf};
use std::process::Command;

const PTX: &str = include_str!("../src/nonzero.ptx");

fn ptxas() -> PathBuf {
    let venv = std::env::var_os("CCNODE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"));
    let lib = venv.join("lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|dirs| {
        dirs.filter_map(|d| d.ok())
            .map(|d| d.path().join("site-packages/nvidia/cuda_nvcc/bin/ptxas"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "no ptxas under {} (scripts/test.sh installs nvidia-cuda-nvcc-cu12 there; or set CCNODE_VENV)",
            lib.display()
        )
    })
}

fn assemble(text: &str, arch: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("k.ptx");
    std::fs::write(&src, text).unwrap();
    let out = Command::new(ptxas())
        .arg(format!("-arch={arch}"))
        .arg(&src)
        .arg("-o")
        .arg(dir.path().join("k.cubin"))
        .output()
        .expect("run ptxas");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn the_check_kernel_assembles_for_the_gpus_ccnode_runs_on() {
    for arch in ["sm_70", "sm_80", "sm_90"] {
        assemble(PTX, arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
    }
}

#[test]
fn a_broken_kernel_is_refused() {
    let broken = PTX.replace("or.b64 \t%rd10", "orr.b64 \t%rd10");
    assert_ne!(broken, PTX, "the test must change the kernel");
    assert!(assemble(&broken, "sm_90").is_err());
    let undeclared = PTX.replace(".reg .b64 \t%rd<16>;", ".reg .b64 \t%rd<8>;");
    assert_ne!(undeclared, PTX);
    assert!(assemble(&undeclared, "sm_90").is_err());
}
