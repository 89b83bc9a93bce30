//! ccnode-scrub: scrubs one GPU or MIG device's free memory and proves
//! it, for ccnoded to run between tenants.
//!
//! It allocates the device's free memory in chunks until allocation fails,
//! writes zeros over every chunk, checks on the device that every byte is
//! zero (a reduction kernel, loaded as PTX), reads samples of every chunk
//! back to the host, frees, and prints one JSON line: a
//! [`ScrubReport`](ccnode_gpu::scrub::ScrubReport) on success (exit 0), or
//! a [`ScrubFailure`](ccnode_gpu::scrub::ScrubFailure) with a stable code
//! (exit 1). One process per device: one CUDA process sees one MIG device.
//! ccnoded sets `CUDA_VISIBLE_DEVICES` to the device's UUID; the scrub
//! checks that CUDA shows it exactly that device before touching memory.
//!
//! `--sim-vram FILE` scrubs the sim backend's stand-in for the device's
//! memory instead (see `ccnode_gpu::scrub`).

use std::path::PathBuf;
use std::process::ExitCode;

use ccnode_gpu::scrub::{ScrubFailure, REPORT_VERSION};
use clap::Parser;

#[cfg(feature = "cuda")]
mod cuda;

/// Scrubs one GPU or MIG device's free VRAM and verifies it is zero.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// The device to scrub: `GPU-…` or `MIG-…` (must be the only device
    /// CUDA shows this process; ccnoded sets CUDA_VISIBLE_DEVICES to it).
    #[arg(long)]
    device: String,
    /// Scrub this sim-backend VRAM file instead of a CUDA device.
    #[arg(long, value_name = "FILE")]
    sim_vram: Option<PathBuf>,
    /// Largest allocation, MiB (halved down to 2 MiB when the driver
    /// refuses, so the last free bytes are taken too).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(2..=65536))]
    chunk_mib: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match &args.sim_vram {
        Some(path) => ccnode_gpu::scrub::scrub_sim(&args.device, path, args.chunk_mib << 20),
        None => scrub_cuda(&args),
    };
    match result {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string(&report).expect("a report serialises")
            );
            ExitCode::SUCCESS
        }
        Err(f) => {
            println!(
                "{}",
                serde_json::to_string(&f).expect("a failure serialises")
            );
            eprintln!("ccnode-scrub: {}: {}", f.error, f.message);
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "cuda")]
fn scrub_cuda(args: &Args) -> Result<ccnode_gpu::scrub::ScrubReport, ScrubFailure> {
    cuda::scrub(&args.device, args.chunk_mib << 20)
}

#[cfg(not(feature = "cuda"))]
fn scrub_cuda(args: &Args) -> Result<ccnode_gpu::scrub::ScrubReport, ScrubFailure> {
    Err(failure(
        &args.device,
        "no_driver",
        "built without the cuda feature: only --sim-vram scrubs".into(),
    ))
}

/// A failure report for `device`.
pub(crate) fn failure(device: &str, error: &str, message: String) -> ScrubFailure {
    ScrubFailure {
        version: REPORT_VERSION,
        device: device.to_owned(),
        error: error.to_owned(),
        message,
    }
}
