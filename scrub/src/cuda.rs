//! The CUDA scrub, through cudarc's driver API loaded at run time.
//!
//! Every call here goes to libcuda, which [`scrub`] checks is present
//! before the first one. Allocation: `cuMemAlloc` in chunks of the given
//! size, halved on `CUDA_ERROR_OUT_OF_MEMORY` down to [`MIN_CHUNK`], until
//! even that fails: then the device's free memory is what this process
//! holds. Each chunk is zeroed (`cuMemsetD8`), checked by the
//! `ccnode_nonzero` kernel (`nonzero.ptx`) and sampled back to the host.

use std::ffi::{c_void, CStr};
use std::time::Instant;

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;

use ccnode_gpu::device_id::{same_device, uuid_string};
use ccnode_gpu::scrub::{ScrubFailure, ScrubReport, REPORT_VERSION};

use crate::failure;

/// Smallest allocation tried before the scrub calls the memory taken.
const MIN_CHUNK: u64 = 2 << 20;
/// Bytes read back per sample.
const SAMPLE: usize = 64 * 1024;
/// Threads per block of the check kernel.
const BLOCK: u32 = 256;
/// Blocks of the check kernel (grid-stride: enough to fill an H200).
const GRID: u32 = 132 * 16;
/// The check kernel, NUL-terminated for `cuModuleLoadData`.
const PTX: &str = concat!(include_str!("nonzero.ptx"), "\0");

fn cuda_error(device: &str, call: &str, e: DriverError) -> ScrubFailure {
    failure(device, "cuda_error", format!("{call}: {e}"))
}

pub fn scrub(device: &str, chunk: u64) -> Result<ScrubReport, ScrubFailure> {
    // SAFETY: only dlopen()s the driver library to see that it exists;
    // no symbol is called.
    if !unsafe { sys::is_culib_present() } {
        return Err(failure(
            device,
            "no_driver",
            "libcuda is not installed (no NVIDIA driver on this host)".into(),
        ));
    }
    let err = |call: &'static str| move |e: DriverError| cuda_error(device, call, e);
    result::init().map_err(err("cuInit"))?;
    let count = result::device::get_count().map_err(err("cuDeviceGetCount"))?;
    if count != 1 {
        return Err(failure(
            device,
            "device_mismatch",
            format!("CUDA shows {count} devices; the scrub must see exactly {device} (CUDA_VISIBLE_DEVICES)"),
        ));
    }
    let dev = result::device::get(0).map_err(err("cuDeviceGet"))?;
    let mut uuid = std::mem::MaybeUninit::<sys::CUuuid>::uninit();
    // SAFETY: `uuid` is a valid place for one CUuuid; `dev` came from
    // cuDeviceGet. The _v2 call gives a MIG device's own UUID.
    unsafe { sys::cuDeviceGetUuid_v2(uuid.as_mut_ptr(), dev) }
        .result()
        .map_err(err("cuDeviceGetUuid_v2"))?;
    // SAFETY: initialised by the successful call above.
    let raw = unsafe { uuid.assume_init() }.bytes.map(|b| b as u8);
    let shown = uuid_string(&raw);
    if !same_device(&shown, device) {
        return Err(failure(
            device,
            "device_mismatch",
            format!("CUDA shows device {shown}, not {device}"),
        ));
    }
    // SAFETY: `dev` came from cuDeviceGet; released below.
    let ctx =
        unsafe { result::primary_ctx::retain(dev) }.map_err(err("cuDevicePrimaryCtxRetain"))?;
    // SAFETY: `ctx` is the primary context retained above, alive until the
    // release below.
    let out = match unsafe { result::ctx::set_current(ctx) } {
        Ok(()) => run(device, chunk),
        Err(e) => Err(cuda_error(device, "cuCtxSetCurrent", e)),
    };
    // SAFETY: retained above; every allocation of run() is freed by then.
    unsafe {
        let _ = result::primary_ctx::release(dev);
    }
    out
}

/// The device memory this scrub holds, freed on drop.
struct Chunks(Vec<(sys::CUdeviceptr, u64)>);

impl Drop for Chunks {
    fn drop(&mut self) {
        for (p, _) in self.0.drain(..) {
            // SAFETY: each pointer came from cuMemAlloc in this context and
            // is freed once.
            unsafe {
                let _ = result::free_sync(p);
            }
        }
    }
}

fn run(device: &str, chunk: u64) -> Result<ScrubReport, ScrubFailure> {
    let err = |call: &'static str| move |e: DriverError| cuda_error(device, call, e);
    let (free, total) = result::mem_get_info().map_err(err("cuMemGetInfo"))?;
    let (free, total) = (free as u64, total as u64);
    // The kernel and the flag first: they take memory the chunks cannot.
    let ptx = CStr::from_bytes_with_nul(PTX.as_bytes()).expect("one NUL, at the end");
    // SAFETY: `ptx` is a NUL-terminated PTX text, alive for the call.
    let module = unsafe { result::module::load_data(ptx.as_ptr() as *const c_void) }
        .map_err(err("cuModuleLoadData"))?;
    // SAFETY: `module` was loaded above; the name is NUL-terminated.
    let func = unsafe { result::module::get_function(module, c"ccnode_nonzero".into()) }
        .map_err(err("cuModuleGetFunction"))?;
    let mut held = Chunks(Vec::new());
    // SAFETY: allocates 8 bytes in the current context; freed by `held`.
    let flag = unsafe { result::malloc_sync(8) }.map_err(err("cuMemAlloc"))?;
    held.0.push((flag, 8));

    let start = Instant::now();
    let mut size = chunk.max(MIN_CHUNK);
    let mut scrubbed = 0u64;
    let mut chunks = 0u64;
    loop {
        // SAFETY: an allocation in the current context; freed by `held`.
        match unsafe { result::malloc_sync(size as usize) } {
            Ok(p) => {
                held.0.push((p, size));
                // SAFETY: `p` holds `size` bytes, just allocated.
                unsafe { result::memset_d8_sync(p, 0, size as usize) }
                    .map_err(err("cuMemsetD8"))?;
                scrubbed += size;
                chunks += 1;
            }
            Err(DriverError(sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY)) if size > MIN_CHUNK => {
                size = (size / 2).max(MIN_CHUNK);
            }
            Err(DriverError(sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY)) => break,
            Err(e) => return Err(cuda_error(device, "cuMemAlloc", e)),
        }
    }
    // The on-device check of every chunk into one flag.
    // SAFETY: `flag` holds 8 bytes.
    unsafe { result::memset_d8_sync(flag, 0, 8) }.map_err(err("cuMemsetD8"))?;
    for &(p, n) in held.0.iter().skip(1) {
        let mut buf = p;
        let mut words = n / 8;
        let mut out = flag;
        let mut params = [
            &mut buf as *mut _ as *mut c_void,
            &mut words as *mut _ as *mut c_void,
            &mut out as *mut _ as *mut c_void,
        ];
        // SAFETY: `func` takes (u64 pointer, u64 count, u64 pointer); the
        // buffer holds `words` 64-bit words and `out` 8 bytes, all alive
        // until the synchronise below; the parameters outlive the call.
        unsafe {
            result::launch_kernel(
                func,
                (GRID, 1, 1),
                (BLOCK, 1, 1),
                0,
                result::stream::null(),
                &mut params,
            )
        }
        .map_err(err("cuLaunchKernel"))?;
    }
    result::ctx::synchronize().map_err(err("cuCtxSynchronize"))?;
    let mut flag_host = [0u64; 1];
    // SAFETY: `flag` holds one u64.
    unsafe { result::memcpy_dtoh_sync(&mut flag_host, flag) }.map_err(err("cuMemcpyDtoH"))?;
    // Sampled read-back: the start, middle and end of every chunk.
    let mut sample = vec![0u8; SAMPLE];
    let (mut sampled, mut sampled_nonzero) = (0u64, 0u64);
    for &(p, n) in held.0.iter().skip(1) {
        let len = (SAMPLE as u64).min(n);
        for off in [0, (n - len) / 2 / 8 * 8, n - len] {
            let dst = &mut sample[..len as usize];
            // SAFETY: `p + off .. p + off + len` lies inside the chunk.
            unsafe { result::memcpy_dtoh_sync(dst, p + off) }.map_err(err("cuMemcpyDtoH"))?;
            sampled += len;
            sampled_nonzero += dst.iter().filter(|&&b| b != 0).count() as u64;
        }
    }
    drop(held);
    // SAFETY: the module is loaded and no kernel of it is running.
    unsafe {
        let _ = result::module::unload(module);
    }
    let secs = start.elapsed().as_secs_f64();
    if flag_host[0] != 0 || sampled_nonzero != 0 {
        return Err(failure(
            device,
            "not_zero",
            format!(
                "memory not zero after the scrub (device check {:#x}, {sampled_nonzero} sampled bytes)",
                flag_host[0]
            ),
        ));
    }
    let scrubbed = scrubbed.min(free);
    Ok(ScrubReport {
        version: REPORT_VERSION,
        device: device.to_owned(),
        backend: "cuda".into(),
        bytes_total: total,
        bytes_free: free,
        bytes_scrubbed: scrubbed,
        coverage: scrubbed as f64 / total as f64,
        chunks,
        nonzero_bytes: 0,
        sampled_bytes: sampled.min(scrubbed),
        sampled_nonzero: 0,
        duration_ms: secs * 1e3,
        throughput_bytes_per_s: if secs > 0.0 {
            scrubbed as f64 / secs
        } else {
            0.0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_text_is_one_nul_terminated_string() {
        assert!(CStr::from_bytes_with_nul(PTX.as_bytes()).is_ok());
        assert!(PTX.contains(".entry ccnode_nonzero("));
    }
}
