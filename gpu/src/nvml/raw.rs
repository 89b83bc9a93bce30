//! NVML calls that nvml-wrapper 0.13 lacks or wraps lossily, made through
//! the function table of the library the wrapper loaded
//! ([`Nvml::lib`](nvml_wrapper::Nvml::lib), an `nvml_wrapper_sys::bindings::NvmlLib`).
//!
//! | call | why raw |
//! | --- | --- |
//! | `nvmlDeviceGetGpuInstanceId`, `nvmlDeviceGetComputeInstanceId` | not wrapped |
//! | `nvmlDeviceGetGpuInstanceById` + `nvmlGpuInstanceGetInfo` | not wrapped (GPU-instance profile id, for the `+me`/`-me`/`+gfx` suffix of a profile name) |
//! | `nvmlDeviceGetRemappedRows` | not wrapped |
//! | `nvmlDeviceGetMemoryInfo` (v1) | the wrapper calls only v2; v1 is the fallback where v2 is refused |
//! | `nvmlSystemGetConfComputeState`, `nvmlSystemGetConfComputeCapabilities` | wrapped only as booleans that drop the environment and capability fields |
//! | `nvmlDeviceGetCurrentClocksEventReasons` (or the older `…ThrottleReasons`) | the wrapper truncates bits it does not know |
//! | `nvmlDeviceRegisterEvents` | the wrapper frees the whole set when one registration fails |
//! | `nvmlEventSetWait_v2` | the wrapper drops `gpuInstanceId` and `computeInstanceId` |
//! | `nvmlDeviceGetConfComputeGpuAttestationReport` | the wrapper slices the buffer with the driver's size unchecked (a panic on a size over the buffer) |
//! | `nvmlDeviceGetConfComputeGpuCertificate` | as above; here a size over the buffer is `NvmlError::Unknown` |
//!
//! Every symbol is looked up before use (a missing one is
//! [`NvmlError::FailedToLoadSymbol`], never a panic), and return codes go
//! through the wrapper's own [`nvml_try`], so errors here are the same
//! [`NvmlError`] values the wrapper gives.
//!
//! Nothing here changes GPU state: no instance is created or destroyed, and
//! GPU-instance handles from `nvmlDeviceGetGpuInstanceById` need no release.

use std::mem;
use std::os::raw::{c_uint, c_ulonglong};

use nvml_wrapper::error::{nvml_sym, nvml_try, NvmlError};
use nvml_wrapper::{Device, EventSet, Nvml};
use nvml_wrapper_sys::bindings::{
    nvmlConfComputeGpuAttestationReport_t, nvmlConfComputeGpuCertificate_t,
    nvmlConfComputeSystemCaps_t, nvmlConfComputeSystemState_t, nvmlDevice_t, nvmlEventData_t,
    nvmlGpuInstanceInfo_t, nvmlGpuInstance_t, nvmlMemory_t,
};

/// The raw handle of a device, for calls the wrapper lacks and for matching
/// the device of an event.
pub(super) fn handle(device: &Device<'_>) -> nvmlDevice_t {
    // SAFETY: `handle` only copies the pointer out; it is marked unsafe so
    // that callers think before passing it to C. Every use in this module
    // passes it to an NVML call of the library that issued it, while the
    // `Nvml` it borrows (a process-wide static) is alive.
    unsafe { device.handle() }
}

/// GPU-instance id of a MIG device handle.
pub(super) fn gpu_instance_id(device: &Device<'_>) -> Result<u32, NvmlError> {
    let f = nvml_sym(device.nvml().lib().nvmlDeviceGetGpuInstanceId.as_ref())?;
    let mut id: c_uint = 0;
    // SAFETY: `f` is `nvmlDeviceGetGpuInstanceId(nvmlDevice_t, unsigned int *)`
    // from the loaded library; the handle is valid (see `handle`) and `id`
    // is a live, writable `c_uint` for the duration of the call.
    nvml_try(unsafe { f(handle(device), &mut id) })?;
    Ok(id)
}

/// Compute-instance id of a MIG device handle.
pub(super) fn compute_instance_id(device: &Device<'_>) -> Result<u32, NvmlError> {
    let f = nvml_sym(device.nvml().lib().nvmlDeviceGetComputeInstanceId.as_ref())?;
    let mut id: c_uint = 0;
    // SAFETY: as in `gpu_instance_id`: valid handle, one writable `c_uint`.
    nvml_try(unsafe { f(handle(device), &mut id) })?;
    Ok(id)
}

/// The profile id (`NVML_GPU_INSTANCE_PROFILE_*`) of GPU instance
/// `gpu_instance_id` on `parent`. NVML documents the lookup as needing a
/// privileged user; callers treat a failure as "no suffix known".
pub(super) fn gpu_instance_profile_id(
    parent: &Device<'_>,
    gpu_instance_id: u32,
) -> Result<u32, NvmlError> {
    let lib = parent.nvml().lib();
    let by_id = nvml_sym(lib.nvmlDeviceGetGpuInstanceById.as_ref())?;
    let get_info = nvml_sym(lib.nvmlGpuInstanceGetInfo.as_ref())?;
    // SAFETY: `nvmlGpuInstance_t` is a plain pointer; all-zero is a null
    // handle, overwritten by the call below before any use.
    let mut gi: nvmlGpuInstance_t = unsafe { mem::zeroed() };
    // SAFETY: `by_id` is `nvmlDeviceGetGpuInstanceById(nvmlDevice_t,
    // unsigned int, nvmlGpuInstance_t *)`; the parent handle is valid and
    // `gi` is writable. It only looks the instance up.
    nvml_try(unsafe { by_id(handle(parent), gpu_instance_id, &mut gi) })?;
    // SAFETY: `nvmlGpuInstanceInfo_t` is a C struct of a pointer and
    // integers, for which all-zero is a valid value.
    let mut info: nvmlGpuInstanceInfo_t = unsafe { mem::zeroed() };
    // SAFETY: `get_info` is `nvmlGpuInstanceGetInfo(nvmlGpuInstance_t,
    // nvmlGpuInstanceInfo_t *)`; `gi` was just returned by NVML for a live
    // instance and `info` is a writable struct of the bound layout.
    nvml_try(unsafe { get_info(gi, &mut info) })?;
    Ok(info.profileId)
}

/// Row remapping counters, as NVML returns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RawRemappedRows {
    pub correctable: u32,
    pub uncorrectable: u32,
    pub pending: bool,
    pub failure: bool,
}

/// `nvmlDeviceGetRemappedRows` (Ampere and later; `NotSupported` before).
pub(super) fn remapped_rows(device: &Device<'_>) -> Result<RawRemappedRows, NvmlError> {
    let f = nvml_sym(device.nvml().lib().nvmlDeviceGetRemappedRows.as_ref())?;
    let (mut corr, mut unc, mut pending, mut failure): (c_uint, c_uint, c_uint, c_uint) =
        (0, 0, 0, 0);
    // SAFETY: `f` is `nvmlDeviceGetRemappedRows(nvmlDevice_t, unsigned int *
    // x4)`; the handle is valid and the four out-parameters are distinct,
    // writable `c_uint`s that outlive the call.
    nvml_try(unsafe {
        f(
            handle(device),
            &mut corr,
            &mut unc,
            &mut pending,
            &mut failure,
        )
    })?;
    Ok(RawRemappedRows {
        correctable: corr,
        uncorrectable: unc,
        pending: pending != 0,
        failure: failure != 0,
    })
}

/// `nvmlDeviceGetMemoryInfo` (v1): total, free and used bytes, where used
/// includes what the driver reserves.
pub(super) fn memory_info_v1(device: &Device<'_>) -> Result<nvmlMemory_t, NvmlError> {
    let f = nvml_sym(device.nvml().lib().nvmlDeviceGetMemoryInfo.as_ref())?;
    let mut memory = nvmlMemory_t {
        total: 0,
        free: 0,
        used: 0,
    };
    // SAFETY: `f` is `nvmlDeviceGetMemoryInfo(nvmlDevice_t, nvmlMemory_t *)`
    // (the unversioned v1 struct, which `memory` is); the handle is valid
    // and `memory` is writable.
    nvml_try(unsafe { f(handle(device), &mut memory) })?;
    Ok(memory)
}

/// The full clocks-event (throttle) reason bitmask. Tries
/// `nvmlDeviceGetCurrentClocksEventReasons` (drivers 535 and later) and
/// falls back to the older name when the symbol is absent.
pub(super) fn clocks_event_reasons(device: &Device<'_>) -> Result<u64, NvmlError> {
    let lib = device.nvml().lib();
    let f = match lib.nvmlDeviceGetCurrentClocksEventReasons.as_ref() {
        Ok(f) => f,
        Err(_) => nvml_sym(lib.nvmlDeviceGetCurrentClocksThrottleReasons.as_ref())?,
    };
    let mut reasons: c_ulonglong = 0;
    // SAFETY: both symbols have the signature `(nvmlDevice_t, unsigned long
    // long *)`; the handle is valid and `reasons` is writable.
    nvml_try(unsafe { f(handle(device), &mut reasons) })?;
    Ok(reasons)
}

/// The system's confidential-computing state and capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RawCcState {
    /// `NVML_CC_SYSTEM_FEATURE_*`.
    pub feature: u32,
    /// `NVML_CC_SYSTEM_DEVTOOLS_MODE_*`.
    pub devtools: u32,
    /// `NVML_CC_SYSTEM_ENVIRONMENT_*`.
    pub environment: u32,
    /// `NVML_CC_SYSTEM_GPUS_CC_*`; `None` when the capabilities call failed.
    pub gpus_capable: Option<u32>,
}

/// `nvmlSystemGetConfComputeState`, plus `nvmlSystemGetConfComputeCapabilities`
/// where it answers.
pub(super) fn cc_state(nvml: &Nvml) -> Result<RawCcState, NvmlError> {
    let lib = nvml.lib();
    let state_fn = nvml_sym(lib.nvmlSystemGetConfComputeState.as_ref())?;
    // SAFETY: a C struct of three `unsigned int`s: all-zero is valid.
    let mut state: nvmlConfComputeSystemState_t = unsafe { mem::zeroed() };
    // SAFETY: `state_fn` is `nvmlSystemGetConfComputeState(
    // nvmlConfComputeSystemState_t *)` and `state` is writable.
    nvml_try(unsafe { state_fn(&mut state) })?;
    let gpus_capable = match nvml_sym(lib.nvmlSystemGetConfComputeCapabilities.as_ref()) {
        Ok(caps_fn) => {
            // SAFETY: a C struct of two `unsigned int`s: all-zero is valid.
            let mut caps: nvmlConfComputeSystemCaps_t = unsafe { mem::zeroed() };
            // SAFETY: `caps_fn` is `nvmlSystemGetConfComputeCapabilities(
            // nvmlConfComputeSystemCaps_t *)` and `caps` is writable.
            match nvml_try(unsafe { caps_fn(&mut caps) }) {
                Ok(()) => Some(caps.gpusCaps),
                Err(e) => {
                    tracing::debug!(error = %e, "nvmlSystemGetConfComputeCapabilities failed");
                    None
                }
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "nvmlSystemGetConfComputeCapabilities is missing");
            None
        }
    };
    Ok(RawCcState {
        feature: state.ccFeature,
        devtools: state.devToolsMode,
        environment: state.environment,
        gpus_capable,
    })
}

/// Adds `event_types` (`nvmlEventType*` bits) of `device` to `set`.
///
/// NVML says that after an `Unknown` error the set is undefined and must be
/// freed; the caller drops it on any error it cannot attribute to the
/// device.
pub(super) fn register_events(
    set: &EventSet<'_>,
    device: &Device<'_>,
    event_types: u64,
) -> Result<(), NvmlError> {
    let f = nvml_sym(device.nvml().lib().nvmlDeviceRegisterEvents.as_ref())?;
    // SAFETY: `set.handle()` only copies the set's pointer out; the set is
    // alive for the whole call because we borrow it.
    let set_handle = unsafe { set.handle() };
    // SAFETY: `f` is `nvmlDeviceRegisterEvents(nvmlDevice_t, unsigned long
    // long, nvmlEventSet_t)`; the device handle and the set were issued by
    // the same loaded library and are both alive.
    nvml_try(unsafe { f(handle(device), event_types, set_handle) })
}

/// One event as NVML delivers it.
#[derive(Debug, Clone, Copy)]
pub(super) struct RawEvent {
    pub device: nvmlDevice_t,
    pub event_type: u64,
    pub event_data: u64,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
}

/// `nvmlEventSetWait_v2`: the next event of `set`, waiting up to
/// `timeout_ms`. `Err(NvmlError::Timeout)` when none arrived.
pub(super) fn wait(set: &EventSet<'_>, timeout_ms: u32) -> Result<RawEvent, NvmlError> {
    let f = nvml_sym(set.nvml.lib().nvmlEventSetWait_v2.as_ref())?;
    // SAFETY: a C struct of a pointer and integers: all-zero is valid.
    let mut data: nvmlEventData_t = unsafe { mem::zeroed() };
    // SAFETY: as in `register_events`, this only copies the pointer out of
    // a live, borrowed set.
    let set_handle = unsafe { set.handle() };
    // SAFETY: `f` is `nvmlEventSetWait_v2(nvmlEventSet_t, nvmlEventData_t *,
    // unsigned int)`; the set is alive and `data` is a writable struct of
    // the bound (v2) layout, which has the MIG id fields.
    nvml_try(unsafe { f(set_handle, &mut data, timeout_ms) })?;
    Ok(RawEvent {
        device: data.device,
        event_type: data.eventType,
        event_data: data.eventData,
        gpu_instance_id: data.gpuInstanceId,
        compute_instance_id: data.computeInstanceId,
    })
}

/// The device an event is about, as a wrapper `Device` (for the MIG parent
/// and UUID lookups that match it to a GPU). `None` for a null handle.
pub(super) fn event_device<'n>(nvml: &'n Nvml, event: &RawEvent) -> Option<Device<'n>> {
    if event.device.is_null() {
        return None;
    }
    // SAFETY: `Device::new` needs a valid handle. This one is not null and
    // was written by `nvmlEventSetWait_v2` of this library into an event it
    // delivered; NVML device handles stay valid while NVML is initialised,
    // which it is for the life of the process (the `Nvml` is a static).
    Some(unsafe { Device::new(event.device, nvml) })
}

/// The first `size` bytes of `buf`, or `Unknown` when the driver's size is
/// over the buffer.
fn sized(buf: &[u8], size: c_uint) -> Result<Vec<u8>, NvmlError> {
    usize::try_from(size)
        .ok()
        .and_then(|n| buf.get(..n))
        .map(<[u8]>::to_vec)
        .ok_or(NvmlError::Unknown)
}

/// `nvmlDeviceGetConfComputeGpuAttestationReport` for `nonce`: the SPDM
/// request and response (the CEC report, where present, is dropped).
pub(super) fn attestation_report(
    device: &Device<'_>,
    nonce: &[u8; 32],
) -> Result<Vec<u8>, NvmlError> {
    let f = nvml_sym(
        device
            .nvml()
            .lib()
            .nvmlDeviceGetConfComputeGpuAttestationReport
            .as_ref(),
    )?;
    // SAFETY: a C struct of `unsigned int`s and byte arrays: all-zero is
    // valid.
    let mut report: nvmlConfComputeGpuAttestationReport_t = unsafe { mem::zeroed() };
    report.nonce = *nonce;
    // SAFETY: `f` is `nvmlDeviceGetConfComputeGpuAttestationReport(
    // nvmlDevice_t, nvmlConfComputeGpuAttestationReport_t *)`; the handle is
    // valid and `report` is a writable struct of the bound layout, with the
    // nonce set as the call expects.
    nvml_try(unsafe { f(handle(device), &mut report) })?;
    sized(&report.attestationReport, report.attestationReportSize)
}

/// `nvmlDeviceGetConfComputeGpuCertificate`: the attestation certificate
/// chain (PEM), not the device-identity `certChain`.
pub(super) fn attestation_cert_chain(device: &Device<'_>) -> Result<Vec<u8>, NvmlError> {
    let f = nvml_sym(
        device
            .nvml()
            .lib()
            .nvmlDeviceGetConfComputeGpuCertificate
            .as_ref(),
    )?;
    // SAFETY: a C struct of `unsigned int`s and byte arrays: all-zero is
    // valid.
    let mut cert: nvmlConfComputeGpuCertificate_t = unsafe { mem::zeroed() };
    // SAFETY: `f` is `nvmlDeviceGetConfComputeGpuCertificate(nvmlDevice_t,
    // nvmlConfComputeGpuCertificate_t *)`; the handle is valid and `cert` is
    // a writable struct of the bound layout.
    nvml_try(unsafe { f(handle(device), &mut cert) })?;
    sized(&cert.attestationCertChain, cert.attestationCertChainSize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_over_the_buffer_are_errors() {
        assert_eq!(sized(&[1, 2, 3], 2).unwrap(), vec![1, 2]);
        assert_eq!(sized(&[1, 2, 3], 3).unwrap(), vec![1, 2, 3]);
        assert!(matches!(sized(&[1, 2, 3], 4), Err(NvmlError::Unknown)));
        assert!(matches!(sized(&[], c_uint::MAX), Err(NvmlError::Unknown)));
    }
}
