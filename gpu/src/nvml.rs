//! The NVML backend: the host's NVIDIA GPUs through nvml-wrapper.
//!
//! nvml-wrapper loads `libnvidia-ml.so.1` with `dlopen` when
//! [`NvmlBackend::open`] runs, so this module builds, and the crate's tests
//! run, on hosts without an NVIDIA driver. On such a host `open` fails with
//! [`GpuError::LibraryMissing`] (the message names the library and why it
//! could not be used); with the library but no GPU it fails with
//! [`GpuError::NoGpu`]. It never falls back to anything else.
//!
//! # Ownership
//!
//! NVML is process-wide state (`nvmlInit` is reference-counted per process),
//! and nvml-wrapper's `Device` and `EventSet` borrow the `Nvml` they came
//! from. The `Nvml` therefore lives in a process-wide [`OnceLock`],
//! initialised by the first successful `open` and shared by every backend,
//! so a backend can keep an `EventSet<'static>` and `Device<'static>`s
//! without a self-referential struct. `nvmlShutdown` is never called; the
//! driver releases what NVML held when the process exits. A failed
//! initialisation is not cached, so a later `open` tries again.
//!
//! NVML is thread-safe and `Nvml` is `Send + Sync`; the only mutexes guard
//! this backend's own state: the last-known inventory per GPU (so that a GPU
//! that falls off the bus keeps its identity, with `lost` set) and the event
//! set, which NVML says must not be used from two threads at once.
//!
//! # Values
//!
//! A value NVML cannot give on a device (`NotSupported`, or a function the
//! installed driver lacks) is `None`, never 0. Any other error on a single
//! value is also `None`, with a `debug` log line. A GPU that answers
//! `GPU_IS_LOST` is [`SampleStatus::Lost`] in a sample and `lost` in the
//! inventory. Failing to get a GPU's handle (or, in the inventory, its UUID,
//! PCI bus id, name or memory size) for another reason is an error for that
//! GPU: [`SampleStatus::Failed`] in a sample, [`GpuError::Call`] for the
//! inventory.
//!
//! - **CC mode** is the system's (`nvmlSystemGetConfComputeState`): NVML
//!   reports it for the host, not per GPU, so every GPU shows the same mode.
//!   Feature on with devtools on, or in the simulated CC environment, is
//!   [`CcMode::Devtools`] (not confidential); GPUs that the capabilities call
//!   reports as not CC-capable, or a driver without the calls, are
//!   [`CcMode::Unsupported`].
//! - **MIG profile names** follow mig-parted and go-nvlib: `{G}g.{GB}gb`, or
//!   `{C}c.{G}g.{GB}gb` when the compute instance uses fewer slices than its
//!   GPU instance, from the MIG device's attributes (slice counts and memory
//!   size) and the parent's total memory, with go-nvlib's rounding (the
//!   share of the GPU's memory rounded up to eighths, times the total in
//!   whole GiB rounded up). The `+me`, `+me.all`, `-me` and `+gfx` suffixes
//!   need the GPU-instance profile id, which NVML gives only to privileged
//!   users; without it the name has no suffix (`1g.10gb` where
//!   `nvidia-smi` says `1g.10gb+me`). Names are derived, not read from the
//!   driver, so a future GPU whose memory does not divide into eighths may
//!   be named differently from `nvidia-smi`.
//! - **ECC events** carry no count in NVML; each event is `count: 1`. The
//!   XID code is NVML's `eventData` (999: an XID NVML does not know). MIG
//!   ids of an event are NVML's `gpuInstanceId`/`computeInstanceId`, with
//!   `0xFFFFFFFF` (and any id on a GPU known not to be in MIG mode) as none.
//! - **Memory** is `nvmlDeviceGetMemoryInfo_v2` (used, free and reserved;
//!   drivers 510 and later), or v1 where a driver or MIG handle refuses v2:
//!   then reserved is `None` and used includes it.
//!
//! # Testing
//!
//! Without a GPU, the tests cover the error on a host without the library
//! and the pure helpers (CUDA version text, MIG profile names, CC mode,
//! event mapping, the registry-parameter read). Everything that needs a GPU
//! (inventory, samples, events, the raw calls in `nvml/raw.rs`) is exercised by
//! `cargo run -p ccnode-gpu --example nvml_probe`, which prints the
//! inventory and one sample as JSON, on a host with NVIDIA GPUs.

mod raw;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, PerformanceState, RetirementCause, TemperatureSensor,
};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::NVML_FI_DEV_MEMORY_TEMP;
use nvml_wrapper::{Device, EventSet, Nvml};
use nvml_wrapper_sys::bindings as sys;

use crate::{
    BackendKind, CcAttestation, CcMode, GpuBackend, GpuError, GpuEvent, GpuEventKind, GpuInfo,
    GpuSample, Inventory, MigDevice, MigMode, MigTelemetry, RemappedRows, RetiredPages,
    SampleStatus, ScrubOnFree, Telemetry,
};

/// The library NVML is loaded from.
pub const LIBRARY: &str = "libnvidia-ml.so.1";
/// The NVIDIA driver's registry parameters (for scrub-on-free).
pub const PARAMS_PATH: &str = "/proc/driver/nvidia/params";
/// Largest parameters file read (it is about 2 KiB).
pub const MAX_PARAMS_BYTES: u64 = 64 * 1024;
/// Most events returned by one [`GpuBackend::wait_events`] call; the rest
/// stay queued in NVML for the next call.
pub const MAX_EVENTS_PER_WAIT: usize = 1024;

/// NVML's "no GPU/compute instance" in event data.
const NO_INSTANCE: u32 = 0xFFFF_FFFF;
const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

/// The event types registered on every GPU that supports them.
const EVENT_TYPES: [u64; 4] = [
    sys::nvmlEventTypeXidCriticalError as u64,
    sys::nvmlEventTypeSingleBitEccError as u64,
    sys::nvmlEventTypeDoubleBitEccError as u64,
    sys::nvmlEventMigConfigChange as u64,
];

/// The process's NVML, see "Ownership" above.
static NVML: OnceLock<Nvml> = OnceLock::new();

/// The NVML backend. Cheap to share: every method takes `&self`.
pub struct NvmlBackend {
    nvml: &'static Nvml,
    /// GPUs NVML counted at open; NVML does not change it without a new
    /// initialisation.
    count: u32,
    /// The last inventory read of each GPU, by index.
    known: Mutex<BTreeMap<u32, GpuInfo>>,
    events: Mutex<Events>,
}

impl std::fmt::Debug for NvmlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlBackend")
            .field("gpus", &self.count)
            .finish_non_exhaustive()
    }
}

/// State of the event thread.
#[derive(Default)]
struct Events {
    /// Registered lazily by the first `wait_events`; dropped (and
    /// registered again) after a GPU is lost, so that the lost GPU no
    /// longer makes every wait fail.
    set: Option<Registered>,
    /// GPUs already reported lost; each is reported once.
    lost: BTreeSet<u32>,
}

struct Registered {
    set: EventSet<'static>,
    gpus: Vec<EventGpu>,
}

struct EventGpu {
    index: u32,
    uuid: String,
    device: Device<'static>,
}

/// Why a GPU could not be read.
#[derive(Debug)]
enum DeviceError {
    /// NVML: GPU is lost.
    Lost,
    /// A call the GPU's record cannot do without failed.
    Failed {
        call: &'static str,
        error: NvmlError,
    },
}

type DeviceResult<T> = Result<T, DeviceError>;

impl NvmlBackend {
    /// Loads and initialises NVML and counts the GPUs.
    pub fn open() -> Result<NvmlBackend, GpuError> {
        let nvml = shared_nvml()?;
        let count = nvml
            .device_count()
            .map_err(|e| call_error("nvmlDeviceGetCount", e))?;
        if count == 0 {
            return Err(GpuError::NoGpu);
        }
        Ok(NvmlBackend {
            nvml,
            count,
            known: Mutex::new(BTreeMap::new()),
            events: Mutex::new(Events::default()),
        })
    }

    fn read_gpu(&self, index: u32, cc_mode: CcMode) -> DeviceResult<GpuInfo> {
        let device = required(
            "nvmlDeviceGetHandleByIndex",
            self.nvml.device_by_index(index),
        )?;
        let uuid = required("nvmlDeviceGetUUID", device.uuid())?;
        let pci_bus_id = required("nvmlDeviceGetPciInfo", device.pci_info())?.bus_id;
        let name = required("nvmlDeviceGetName", device.name())?;
        let memory_total_bytes = required("nvmlDeviceGetMemoryInfo", memory_info(&device))?.total;
        let minor_number = optional(index, "nvmlDeviceGetMinorNumber", device.minor_number())?;
        let (mig_mode, mig_live) = read_mig_mode(index, &device)?;
        // MIG devices exist while the current mode is enabled, a change to
        // disabled pending or not: they are listed (and granted nothing,
        // `devices::grant`, while the mode is pending).
        let mig_devices = if mig_live {
            read_mig_devices(index, &device, memory_total_bytes)?
        } else {
            Vec::new()
        };
        let vbios_version = optional(index, "nvmlDeviceGetVbiosVersion", device.vbios_version())?
            .unwrap_or_default();
        let inforom_version = optional(
            index,
            "nvmlDeviceGetInforomImageVersion",
            device.info_rom_image_version(),
        )?
        .filter(|v| !v.is_empty());
        let gsp_firmware_version = read_gsp_version(index, &device)?;
        Ok(GpuInfo {
            index,
            uuid,
            pci_bus_id,
            name,
            minor_number,
            memory_total_bytes,
            mig_mode,
            mig_devices,
            cc_mode,
            vbios_version,
            inforom_version,
            gsp_firmware_version,
            lost: false,
        })
    }

    /// What is known about a GPU that is lost: its last inventory, or a
    /// record with only the index when it was lost before the first one.
    fn lost_gpu(&self, index: u32, cc_mode: CcMode) -> GpuInfo {
        let known = lock(&self.known);
        match known.get(&index) {
            Some(info) => GpuInfo {
                lost: true,
                ..info.clone()
            },
            None => GpuInfo {
                index,
                uuid: String::new(),
                pci_bus_id: String::new(),
                name: String::new(),
                minor_number: None,
                memory_total_bytes: 0,
                mig_mode: MigMode::Unsupported,
                mig_devices: Vec::new(),
                cc_mode,
                vbios_version: String::new(),
                inforom_version: None,
                gsp_firmware_version: None,
                lost: true,
            },
        }
    }

    fn cc_mode(&self) -> CcMode {
        match raw::cc_state(self.nvml) {
            Ok(state) => cc_mode_from(&state),
            Err(e) => {
                if !is_unsupported(&e) {
                    tracing::debug!(error = %e, "nvmlSystemGetConfComputeState failed");
                }
                CcMode::Unsupported
            }
        }
    }

    fn read_telemetry(&self, index: u32) -> DeviceResult<Telemetry> {
        let device = required(
            "nvmlDeviceGetHandleByIndex",
            self.nvml.device_by_index(index),
        )?;
        let d = &device;
        let utilization = optional(
            index,
            "nvmlDeviceGetUtilizationRates",
            d.utilization_rates(),
        )?;
        let memory = optional(index, "nvmlDeviceGetMemoryInfo", memory_info(d))?;
        let ecc = |error_type| {
            optional(
                index,
                "nvmlDeviceGetTotalEccErrors",
                d.total_ecc_errors(error_type, EccCounter::Volatile),
            )
        };
        let mig = if read_mig_mode(index, d)?.1 {
            read_mig_telemetry(index, d)?
        } else {
            Vec::new()
        };
        Ok(Telemetry {
            gpu_temp_celsius: optional(
                index,
                "nvmlDeviceGetTemperature",
                d.temperature(TemperatureSensor::Gpu),
            )?
            .map(f64::from),
            memory_temp_celsius: read_memory_temp(index, d)?,
            power_watts: optional(index, "nvmlDeviceGetPowerUsage", d.power_usage())?
                .map(|mw| f64::from(mw) / 1000.0),
            energy_joules: optional(
                index,
                "nvmlDeviceGetTotalEnergyConsumption",
                d.total_energy_consumption(),
            )?
            .map(|mj| mj as f64 / 1000.0),
            sm_clock_mhz: optional(index, "nvmlDeviceGetClockInfo", d.clock_info(Clock::SM))?,
            memory_clock_mhz: optional(
                index,
                "nvmlDeviceGetClockInfo",
                d.clock_info(Clock::Memory),
            )?,
            gpu_utilization: utilization.as_ref().map(|u| percent_to_ratio(u.gpu)),
            memory_utilization: utilization.as_ref().map(|u| percent_to_ratio(u.memory)),
            fb_used_bytes: memory.as_ref().map(|m| m.used),
            fb_free_bytes: memory.as_ref().map(|m| m.free),
            fb_reserved_bytes: memory.as_ref().and_then(|m| m.reserved),
            ecc_corrected_total: ecc(MemoryError::Corrected)?,
            ecc_uncorrected_total: ecc(MemoryError::Uncorrected)?,
            retired_pages: read_retired_pages(index, d)?,
            remapped_rows: optional(index, "nvmlDeviceGetRemappedRows", raw::remapped_rows(d))?
                .map(|r| RemappedRows {
                    correctable: u64::from(r.correctable),
                    uncorrectable: u64::from(r.uncorrectable),
                    pending: r.pending,
                    failure: r.failure,
                }),
            pcie_replays_total: optional(
                index,
                "nvmlDeviceGetPcieReplayCounter",
                d.pcie_replay_counter(),
            )?
            .map(u64::from),
            throttle_reasons: optional(
                index,
                "nvmlDeviceGetCurrentClocksEventReasons",
                raw::clocks_event_reasons(d),
            )?,
            pstate: optional(
                index,
                "nvmlDeviceGetPerformanceState",
                d.performance_state(),
            )?
            .and_then(pstate_number),
            mig,
        })
    }

    /// Creates the event set and registers every GPU that is not lost for
    /// the event types it supports. GPUs found lost are added to `lost`
    /// and reported in `out`.
    fn register(
        &self,
        lost: &mut BTreeSet<u32>,
        out: &mut Vec<GpuEvent>,
    ) -> Result<Registered, GpuError> {
        let set = self
            .nvml
            .create_event_set()
            .map_err(|e| call_error("nvmlEventSetCreate", e))?;
        let mut gpus = Vec::new();
        for index in 0..self.count {
            if lost.contains(&index) {
                continue;
            }
            match self.register_gpu(&set, index) {
                Ok(Some(gpu)) => gpus.push(gpu),
                Ok(None) => {}
                Err(DeviceError::Lost) => self.report_lost(index, lost, out),
                Err(DeviceError::Failed { call, error }) => {
                    // NVML: after an unknown error the set is undefined and
                    // must be freed; it is dropped here and built again by
                    // the next call.
                    return Err(call_error_on(index, call, error));
                }
            }
        }
        tracing::info!(
            gpus = gpus.len(),
            of = self.count,
            "NVML XID, ECC and MIG configuration events registered"
        );
        Ok(Registered { set, gpus })
    }

    /// Registers one GPU. `Ok(None)`: it supports none of the event types.
    /// `Err(Failed)` only for the error after which NVML says the set must
    /// be freed; a GPU that cannot be registered otherwise is skipped.
    fn register_gpu(&self, set: &EventSet<'static>, index: u32) -> DeviceResult<Option<EventGpu>> {
        let Some(device) = optional(
            index,
            "nvmlDeviceGetHandleByIndex",
            self.nvml.device_by_index(index),
        )?
        else {
            return Ok(None);
        };
        let uuid = optional(index, "nvmlDeviceGetUUID", device.uuid())?.unwrap_or_default();
        let Some(supported) = optional(
            index,
            "nvmlDeviceGetSupportedEventTypes",
            device.supported_event_types(),
        )?
        else {
            return Ok(None);
        };
        let mut registered = 0;
        for event_type in EVENT_TYPES {
            if supported.bits() & event_type == 0 {
                continue;
            }
            match raw::register_events(set, &device, event_type) {
                Ok(()) => registered += 1,
                Err(NvmlError::GpuLost) => return Err(DeviceError::Lost),
                Err(NvmlError::Unknown) => {
                    return Err(DeviceError::Failed {
                        call: "nvmlDeviceRegisterEvents",
                        error: NvmlError::Unknown,
                    })
                }
                Err(e) => {
                    tracing::debug!(gpu = index, event_type, error = %e, "nvmlDeviceRegisterEvents failed");
                }
            }
        }
        Ok((registered > 0).then_some(EventGpu {
            index,
            uuid,
            device,
        }))
    }

    fn report_lost(&self, index: u32, lost: &mut BTreeSet<u32>, out: &mut Vec<GpuEvent>) {
        if !lost.insert(index) {
            return;
        }
        let uuid = lock(&self.known)
            .get(&index)
            .map(|g| g.uuid.clone())
            .unwrap_or_default();
        out.push(GpuEvent {
            gpu_index: index,
            uuid,
            gpu_instance_id: None,
            compute_instance_id: None,
            kind: GpuEventKind::Lost,
        });
    }

    /// After a wait answered GPU_IS_LOST (which does not say which GPU):
    /// finds the GPUs that are now lost and reports those not reported yet.
    fn find_lost(&self, lost: &mut BTreeSet<u32>, out: &mut Vec<GpuEvent>) {
        for index in 0..self.count {
            if lost.contains(&index) {
                continue;
            }
            let gone = match self.nvml.device_by_index(index) {
                Err(NvmlError::GpuLost) => true,
                Err(_) => false,
                Ok(device) => matches!(
                    device.temperature(TemperatureSensor::Gpu),
                    Err(NvmlError::GpuLost)
                ),
            };
            if gone {
                self.report_lost(index, lost, out);
            }
        }
    }

    /// Turns one raw event into [`GpuEvent`]s.
    fn push_event(&self, registered: &Registered, event: &raw::RawEvent, out: &mut Vec<GpuEvent>) {
        let Some(gpu) = self.event_gpu(registered, event) else {
            // Not logged above debug: a tenant can cause XIDs.
            tracing::debug!(
                event_type = event.event_type,
                "NVML event for an unknown device"
            );
            return;
        };
        let mig_enabled = lock(&self.known)
            .get(&gpu.index)
            .map(|g| g.mig_mode == MigMode::Enabled);
        out.extend(events_from_raw(
            gpu.index,
            &gpu.uuid,
            event.event_type,
            event.event_data,
            event.gpu_instance_id,
            event.compute_instance_id,
            mig_enabled,
        ));
    }

    /// The registered GPU an event is about: by handle, then through the
    /// parent of a MIG device handle, then by UUID.
    fn event_gpu<'r>(
        &self,
        registered: &'r Registered,
        event: &raw::RawEvent,
    ) -> Option<&'r EventGpu> {
        let by_handle = |h| registered.gpus.iter().find(|g| raw::handle(&g.device) == h);
        if let Some(gpu) = by_handle(event.device) {
            return Some(gpu);
        }
        let device = raw::event_device(self.nvml, event)?;
        if let Ok(parent) = device.mig_parent_device() {
            if let Some(gpu) = by_handle(raw::handle(&parent)) {
                return Some(gpu);
            }
        }
        let uuid = device.uuid().ok()?;
        registered.gpus.iter().find(|g| g.uuid == uuid)
    }
}

impl GpuBackend for NvmlBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Nvml
    }

    fn inventory(&self) -> Result<Inventory, GpuError> {
        let driver_version = self
            .nvml
            .sys_driver_version()
            .map_err(|e| call_error("nvmlSystemGetDriverVersion", e))?;
        let cuda_driver_version = self
            .nvml
            .sys_cuda_driver_version()
            .map_err(|e| call_error("nvmlSystemGetCudaDriverVersion", e))?;
        let cc_mode = self.cc_mode();
        let mut gpus = Vec::with_capacity(self.count as usize);
        for index in 0..self.count {
            match self.read_gpu(index, cc_mode) {
                Ok(info) => {
                    lock(&self.known).insert(index, info.clone());
                    gpus.push(info);
                }
                Err(DeviceError::Lost) => gpus.push(self.lost_gpu(index, cc_mode)),
                Err(DeviceError::Failed { call, error }) => {
                    return Err(call_error_on(index, call, error))
                }
            }
        }
        Ok(Inventory {
            driver_version,
            cuda_driver_version: cuda_version_text(cuda_driver_version),
            scrub_on_free: scrub_on_free_at(Path::new(PARAMS_PATH)),
            gpus,
        })
    }

    fn sample(&self) -> Result<Vec<GpuSample>, GpuError> {
        Ok((0..self.count)
            .map(|index| GpuSample {
                index,
                status: match self.read_telemetry(index) {
                    Ok(t) => SampleStatus::Ok(Box::new(t)),
                    Err(DeviceError::Lost) => SampleStatus::Lost,
                    Err(DeviceError::Failed { call, error }) => {
                        SampleStatus::Failed(format!("{call}: {error}"))
                    }
                },
            })
            .collect())
    }

    fn cc_attestation(&self, index: u32, nonce: &[u8; 32]) -> Result<CcAttestation, GpuError> {
        let device = self
            .nvml
            .device_by_index(index)
            .map_err(|e| call_error_on(index, "nvmlDeviceGetHandleByIndex", e))?;
        let on_error = |call: &'static str| {
            move |e: NvmlError| {
                if is_unsupported(&e) {
                    GpuError::Unsupported(format!(
                        "gpu {index}: {call}: {e} (not in confidential-computing mode, or the driver lacks it)"
                    ))
                } else {
                    call_error_on(index, call, e)
                }
            }
        };
        let report = raw::attestation_report(&device, nonce)
            .map_err(on_error("nvmlDeviceGetConfComputeGpuAttestationReport"))?;
        let cert_chain = raw::attestation_cert_chain(&device)
            .map_err(on_error("nvmlDeviceGetConfComputeGpuCertificate"))?;
        Ok(CcAttestation { report, cert_chain })
    }

    fn wait_events(&self, timeout: Duration) -> Result<Vec<GpuEvent>, GpuError> {
        let deadline = Instant::now() + timeout;
        let mut events = lock(&self.events);
        let Events { set, lost } = &mut *events;
        let mut out = Vec::new();
        if set.is_none() {
            *set = Some(self.register(lost, &mut out)?);
            if !out.is_empty() {
                return Ok(out);
            }
        }
        let Some(registered) = set.as_ref() else {
            return Ok(out);
        };
        match raw::wait(&registered.set, timeout_ms(timeout)) {
            Ok(event) => self.push_event(registered, &event, &mut out),
            Err(NvmlError::Timeout) => return Ok(out),
            Err(NvmlError::GpuLost) => {
                self.find_lost(lost, &mut out);
                // The set still holds the lost GPU; build it again without.
                *set = None;
                if out.is_empty() {
                    // Lost, but not a GPU we can name (or already reported):
                    // wait out the timeout rather than spin on the error.
                    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                }
                return Ok(out);
            }
            Err(e) => return Err(call_error("nvmlEventSetWait", e)),
        }
        // Take what else is already queued without waiting.
        while out.len() < MAX_EVENTS_PER_WAIT {
            match raw::wait(&registered.set, 0) {
                Ok(event) => self.push_event(registered, &event, &mut out),
                Err(NvmlError::Timeout) => break,
                Err(NvmlError::GpuLost) => {
                    self.find_lost(lost, &mut out);
                    *set = None;
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "nvmlEventSetWait failed while draining");
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// The process's NVML, initialised on first use.
fn shared_nvml() -> Result<&'static Nvml, GpuError> {
    if let Some(nvml) = NVML.get() {
        return Ok(nvml);
    }
    let nvml = init_nvml(OsStr::new(LIBRARY))?;
    // Another thread may have won the race; then this one is dropped, which
    // only decrements NVML's reference count.
    Ok(NVML.get_or_init(|| nvml))
}

/// Loads `library` and initialises NVML through it.
fn init_nvml(library: &OsStr) -> Result<Nvml, GpuError> {
    Nvml::builder()
        .lib_path(library)
        .init()
        .map_err(|e| library_missing(&library.to_string_lossy(), e))
}

fn library_missing(library: &str, error: NvmlError) -> GpuError {
    GpuError::LibraryMissing(match error {
        NvmlError::LibloadingError(e) => format!("cannot load {library}: {e}"),
        NvmlError::FailedToLoadSymbol(e) => format!("{library} has no nvmlInit_v2: {e}"),
        e => format!("{library} loaded but NVML did not initialise: {e}"),
    })
}

fn call_error(call: &'static str, error: NvmlError) -> GpuError {
    GpuError::Call {
        call,
        message: error.to_string(),
    }
}

fn call_error_on(index: u32, call: &'static str, error: NvmlError) -> GpuError {
    GpuError::Call {
        call,
        message: format!("gpu {index}: {error}"),
    }
}

/// Framebuffer memory of a GPU or MIG device.
#[derive(Debug, Clone, Copy)]
struct Memory {
    total: u64,
    free: u64,
    used: u64,
    /// `None` from the v1 call, which counts reserved memory as used.
    reserved: Option<u64>,
}

/// `nvmlDeviceGetMemoryInfo_v2`, or v1 where the driver refuses v2 for
/// this handle (old drivers, some MIG handles).
fn memory_info(device: &Device<'_>) -> Result<Memory, NvmlError> {
    match device.memory_info() {
        Ok(m) => Ok(Memory {
            total: m.total,
            free: m.free,
            used: m.used,
            reserved: Some(m.reserved),
        }),
        Err(e) if is_unsupported(&e) || matches!(e, NvmlError::InvalidArg | NvmlError::Unknown) => {
            let m = raw::memory_info_v1(device)?;
            Ok(Memory {
                total: m.total,
                free: m.free,
                used: m.used,
                reserved: None,
            })
        }
        Err(e) => Err(e),
    }
}

/// A value the GPU's record cannot do without.
fn required<T>(call: &'static str, result: Result<T, NvmlError>) -> DeviceResult<T> {
    match result {
        Ok(v) => Ok(v),
        Err(NvmlError::GpuLost) => Err(DeviceError::Lost),
        Err(error) => Err(DeviceError::Failed { call, error }),
    }
}

/// A value that may be missing: `None` when NVML cannot give it.
fn optional<T>(
    index: u32,
    call: &'static str,
    result: Result<T, NvmlError>,
) -> DeviceResult<Option<T>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(NvmlError::GpuLost) => Err(DeviceError::Lost),
        Err(e) if is_unsupported(&e) => Ok(None),
        Err(e) => {
            tracing::debug!(gpu = index, call, error = %e, "NVML call failed");
            Ok(None)
        }
    }
}

/// Errors that mean "this device or driver cannot do that".
fn is_unsupported(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::NotSupported | NvmlError::FunctionNotFound | NvmlError::FailedToLoadSymbol(_)
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are replaced whole, never left half-written, so a
    // panic elsewhere cannot leave them inconsistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The GPU's MIG mode, and whether MIG is on now (its MIG devices exist,
/// whatever is pending).
fn read_mig_mode(index: u32, device: &Device<'_>) -> DeviceResult<(MigMode, bool)> {
    Ok(
        match optional(index, "nvmlDeviceGetMigMode", device.mig_mode())? {
            Some(m) => (
                mig_mode_of(m.current, m.pending),
                m.current == sys::NVML_DEVICE_MIG_ENABLE,
            ),
            None => (MigMode::Unsupported, false),
        },
    )
}

/// NVML's current and pending MIG modes as one: settled only when both
/// agree on a mode ccnode knows (fail closed: an unknown value is not
/// "disabled").
fn mig_mode_of(current: u32, pending: u32) -> MigMode {
    match (current, pending) {
        (sys::NVML_DEVICE_MIG_ENABLE, sys::NVML_DEVICE_MIG_ENABLE) => MigMode::Enabled,
        (sys::NVML_DEVICE_MIG_DISABLE, sys::NVML_DEVICE_MIG_DISABLE) => MigMode::Disabled,
        _ => MigMode::Pending,
    }
}

/// The MIG devices of `parent`, in NVML's MIG device index order.
fn mig_devices<'n>(index: u32, parent: &Device<'n>) -> DeviceResult<Vec<(u32, Device<'n>)>> {
    let Some(max) = optional(
        index,
        "nvmlDeviceGetMaxMigDeviceCount",
        parent.mig_device_count(),
    )?
    else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for mig_index in 0..max {
        match parent.mig_device_by_index(mig_index) {
            Ok(d) => out.push((mig_index, d)),
            // No MIG device at this index.
            Err(NvmlError::NotFound | NvmlError::InvalidArg) => {}
            Err(NvmlError::GpuLost) => return Err(DeviceError::Lost),
            Err(e) => {
                tracing::debug!(gpu = index, mig_index, error = %e, "nvmlDeviceGetMigDeviceHandleByIndex failed");
            }
        }
    }
    Ok(out)
}

/// A MIG device's GPU-instance and compute-instance ids; `None` when the
/// driver does not report one of them.
fn instance_ids(index: u32, mig: &Device<'_>) -> DeviceResult<Option<(u32, u32)>> {
    let gi = optional(
        index,
        "nvmlDeviceGetGpuInstanceId",
        raw::gpu_instance_id(mig),
    )?;
    let ci = optional(
        index,
        "nvmlDeviceGetComputeInstanceId",
        raw::compute_instance_id(mig),
    )?;
    Ok(gi.zip(ci))
}

fn read_mig_devices(
    index: u32,
    parent: &Device<'_>,
    parent_memory: u64,
) -> DeviceResult<Vec<MigDevice>> {
    let mut profile_ids: BTreeMap<u32, Option<u32>> = BTreeMap::new();
    let mut out = Vec::new();
    for (mig_index, mig) in mig_devices(index, parent)? {
        let (Some(uuid), Some((gpu_instance_id, compute_instance_id))) = (
            optional(index, "nvmlDeviceGetUUID", mig.uuid())?,
            instance_ids(index, &mig)?,
        ) else {
            continue;
        };
        let attributes = optional(index, "nvmlDeviceGetAttributes", mig.attributes())?;
        let memory = optional(index, "nvmlDeviceGetMemoryInfo", memory_info(&mig))?;
        let gi_profile = match profile_ids.get(&gpu_instance_id) {
            Some(p) => *p,
            None => {
                let p = optional(
                    index,
                    "nvmlGpuInstanceGetInfo",
                    raw::gpu_instance_profile_id(parent, gpu_instance_id),
                )?;
                profile_ids.insert(gpu_instance_id, p);
                p
            }
        };
        let profile = match &attributes {
            Some(a) => mig_profile_name(
                a.compute_instance_slice_count,
                a.gpu_instance_slice_count,
                mig_memory_size_gb(parent_memory, a.memory_size_mb),
                gi_profile,
            ),
            None => "unknown".to_owned(),
        };
        let memory_total_bytes = memory
            .map(|m| m.total)
            .or(attributes.map(|a| a.memory_size_mb * MIB))
            .unwrap_or(0);
        out.push(MigDevice {
            index: mig_index,
            uuid,
            gpu_instance_id,
            compute_instance_id,
            profile,
            memory_total_bytes,
        });
    }
    Ok(out)
}

fn read_mig_telemetry(index: u32, parent: &Device<'_>) -> DeviceResult<Vec<MigTelemetry>> {
    let mut out = Vec::new();
    for (_, mig) in mig_devices(index, parent)? {
        let Some((gpu_instance_id, compute_instance_id)) = instance_ids(index, &mig)? else {
            continue;
        };
        let memory = optional(index, "nvmlDeviceGetMemoryInfo", memory_info(&mig))?;
        out.push(MigTelemetry {
            gpu_instance_id,
            compute_instance_id,
            fb_used_bytes: memory.as_ref().map(|m| m.used),
            fb_total_bytes: memory.as_ref().map(|m| m.total),
        });
    }
    Ok(out)
}

/// The GSP firmware version; `None` when the GPU does not run GSP firmware.
fn read_gsp_version(index: u32, device: &Device<'_>) -> DeviceResult<Option<String>> {
    let mode = optional(
        index,
        "nvmlDeviceGetGspFirmwareMode",
        device.gsp_firmware_mode(),
    )?;
    if mode.is_some_and(|m| !m.enabled) {
        return Ok(None);
    }
    Ok(optional(
        index,
        "nvmlDeviceGetGspFirmwareVersion",
        device.gsp_firmware_version(),
    )?
    .filter(|v| !v.is_empty() && v != "N/A"))
}

/// Memory (HBM) temperature, a field value that not every GPU has.
fn read_memory_temp(index: u32, device: &Device<'_>) -> DeviceResult<Option<f64>> {
    let Some(values) = optional(
        index,
        "nvmlDeviceGetFieldValues",
        device.field_values_for(&[FieldId(NVML_FI_DEV_MEMORY_TEMP)]),
    )?
    else {
        return Ok(None);
    };
    let Some(Ok(sample)) = values.into_iter().next() else {
        return Ok(None);
    };
    Ok(
        optional(index, "NVML_FI_DEV_MEMORY_TEMP", sample.value)?.map(|v| match v {
            SampleValue::F64(v) => v,
            SampleValue::U32(v) => f64::from(v),
            SampleValue::U64(v) => v as f64,
            SampleValue::I64(v) => v as f64,
        }),
    )
}

/// Retired pages (before Ampere; NotSupported on later GPUs, which remap
/// rows instead).
fn read_retired_pages(index: u32, device: &Device<'_>) -> DeviceResult<Option<RetiredPages>> {
    let single = optional(
        index,
        "nvmlDeviceGetRetiredPages",
        device.retired_pages(RetirementCause::MultipleSingleBitEccErrors),
    )?;
    let double = optional(
        index,
        "nvmlDeviceGetRetiredPages",
        device.retired_pages(RetirementCause::DoubleBitEccError),
    )?;
    let pending = optional(
        index,
        "nvmlDeviceGetRetiredPagesPendingStatus",
        device.are_pages_pending_retired(),
    )?;
    Ok(match (single, double, pending) {
        (Some(s), Some(d), Some(pending)) => Some(RetiredPages {
            single_bit: s.len() as u64,
            double_bit: d.len() as u64,
            pending,
        }),
        _ => None,
    })
}

/// Reads the scrub-on-free setting from the driver's registry parameters
/// at `path`, reading at most [`MAX_PARAMS_BYTES`].
pub(crate) fn scrub_on_free_at(path: &Path) -> ScrubOnFree {
    let read = || -> Result<String, String> {
        let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let mut bytes = Vec::new();
        file.take(MAX_PARAMS_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if bytes.len() as u64 > MAX_PARAMS_BYTES {
            return Err(format!(
                "{} is larger than {MAX_PARAMS_BYTES} bytes",
                path.display()
            ));
        }
        String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8", path.display()))
    };
    match read() {
        Ok(text) => crate::scrub_on_free_from_params(&text),
        Err(reason) => ScrubOnFree::Unknown(reason),
    }
}

/// NVML's CUDA driver version (`12040`) as `major.minor` (`12.4`).
fn cuda_version_text(version: i32) -> String {
    format!("{}.{}", version / 1000, (version % 1000) / 10)
}

fn percent_to_ratio(percent: u32) -> f64 {
    f64::from(percent.min(100)) / 100.0
}

fn pstate_number(state: PerformanceState) -> Option<u32> {
    use PerformanceState::*;
    Some(match state {
        Zero => 0,
        One => 1,
        Two => 2,
        Three => 3,
        Four => 4,
        Five => 5,
        Six => 6,
        Seven => 7,
        Eight => 8,
        Nine => 9,
        Ten => 10,
        Eleven => 11,
        Twelve => 12,
        Thirteen => 13,
        Fourteen => 14,
        Fifteen => 15,
        Unknown => return None,
    })
}

/// The system CC state as a [`CcMode`] (see "Values" above).
fn cc_mode_from(state: &raw::RawCcState) -> CcMode {
    if state.gpus_capable == Some(sys::NVML_CC_SYSTEM_GPUS_CC_NOT_CAPABLE) {
        return CcMode::Unsupported;
    }
    if state.feature != sys::NVML_CC_SYSTEM_FEATURE_ENABLED {
        return CcMode::Off;
    }
    if state.devtools == sys::NVML_CC_SYSTEM_DEVTOOLS_MODE_ON
        || state.environment == sys::NVML_CC_SYSTEM_ENVIRONMENT_SIM
    {
        return CcMode::Devtools;
    }
    CcMode::On
}

/// A MIG instance's memory in whole GB as mig-parted names it: go-nvlib's
/// `getMigMemorySizeGB` (the instance's share of the GPU's memory rounded
/// up to eighths, times the GPU's memory in GiB rounded up, rounded).
fn mig_memory_size_gb(device_memory_bytes: u64, mig_memory_mb: u64) -> u64 {
    if device_memory_bytes == 0 {
        return mig_memory_mb.div_ceil(1024);
    }
    let share = (mig_memory_mb * MIB) as f64 / device_memory_bytes as f64;
    let share = (share * 8.0).ceil() / 8.0;
    let total_gb = device_memory_bytes.div_ceil(GIB) as f64;
    (share * total_gb).round() as u64
}

/// The mig-parted suffix of a GPU-instance profile id.
fn profile_suffix(gi_profile_id: u32) -> &'static str {
    match gi_profile_id {
        sys::NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1
        | sys::NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1 => "+me",
        sys::NVML_GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME
        | sys::NVML_GPU_INSTANCE_PROFILE_2_SLICE_ALL_ME => "+me.all",
        sys::NVML_GPU_INSTANCE_PROFILE_1_SLICE_GFX
        | sys::NVML_GPU_INSTANCE_PROFILE_2_SLICE_GFX
        | sys::NVML_GPU_INSTANCE_PROFILE_4_SLICE_GFX => "+gfx",
        sys::NVML_GPU_INSTANCE_PROFILE_1_SLICE_NO_ME
        | sys::NVML_GPU_INSTANCE_PROFILE_2_SLICE_NO_ME => "-me",
        _ => "",
    }
}

/// A MIG profile name in mig-parted's vocabulary (`1g.10gb`,
/// `1c.2g.20gb`, `1g.10gb+me`).
fn mig_profile_name(
    compute_slices: u32,
    gpu_slices: u32,
    memory_gb: u64,
    gi_profile_id: Option<u32>,
) -> String {
    let suffix = gi_profile_id.map_or("", profile_suffix);
    if compute_slices == gpu_slices || compute_slices == 0 {
        format!("{gpu_slices}g.{memory_gb}gb{suffix}")
    } else {
        format!("{compute_slices}c.{gpu_slices}g.{memory_gb}gb{suffix}")
    }
}

/// An NVML MIG id from event data: `None` for "no instance", and for any
/// id on a GPU known not to be in MIG mode.
fn instance_id(id: u32, mig_enabled: Option<bool>) -> Option<u32> {
    (id != NO_INSTANCE && mig_enabled != Some(false)).then_some(id)
}

/// The events in one NVML event record (its type is a bitmask, though NVML
/// sets one bit per record).
fn events_from_raw(
    gpu_index: u32,
    uuid: &str,
    event_type: u64,
    event_data: u64,
    gpu_instance_id: u32,
    compute_instance_id: u32,
    mig_enabled: Option<bool>,
) -> Vec<GpuEvent> {
    let mut kinds = Vec::new();
    if event_type & u64::from(sys::nvmlEventTypeXidCriticalError) != 0 {
        kinds.push(GpuEventKind::Xid { code: event_data });
    }
    if event_type & u64::from(sys::nvmlEventTypeSingleBitEccError) != 0 {
        kinds.push(GpuEventKind::EccCorrected { count: 1 });
    }
    if event_type & u64::from(sys::nvmlEventTypeDoubleBitEccError) != 0 {
        kinds.push(GpuEventKind::EccUncorrected { count: 1 });
    }
    if event_type & u64::from(sys::nvmlEventMigConfigChange) != 0 {
        kinds.push(GpuEventKind::MigConfigChange);
    }
    kinds
        .into_iter()
        .map(|kind| GpuEvent {
            gpu_index,
            uuid: uuid.to_owned(),
            gpu_instance_id: instance_id(gpu_instance_id, mig_enabled),
            compute_instance_id: instance_id(compute_instance_id, mig_enabled),
            kind,
        })
        .collect()
}

/// A wait timeout in whole milliseconds, rounded up, as NVML takes it.
fn timeout_ms(timeout: Duration) -> u32 {
    let ms = timeout.as_nanos().div_ceil(1_000_000);
    u32::try_from(ms).unwrap_or(u32::MAX).min(i32::MAX as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_settled_known_mig_mode_is_enabled_or_disabled() {
        let (on, off) = (sys::NVML_DEVICE_MIG_ENABLE, sys::NVML_DEVICE_MIG_DISABLE);
        assert_eq!(mig_mode_of(on, on), MigMode::Enabled);
        assert_eq!(mig_mode_of(off, off), MigMode::Disabled);
        assert_eq!(mig_mode_of(off, on), MigMode::Pending);
        assert_eq!(mig_mode_of(on, off), MigMode::Pending);
        assert_eq!(mig_mode_of(7, 7), MigMode::Pending);
        assert_eq!(mig_mode_of(off, 7), MigMode::Pending);
    }

    #[test]
    fn a_missing_library_is_named_in_the_error() {
        let path = "/nonexistent/ccnode-test/libnvidia-ml.so.1";
        match init_nvml(OsStr::new(path)) {
            Err(e @ GpuError::LibraryMissing(_)) => {
                let text = e.to_string();
                assert!(text.contains(path), "{text}");
                assert!(text.contains("No such file"), "{text}");
                assert_eq!(e.code(), "nvml_missing");
            }
            other => panic!("expected LibraryMissing, got {other:?}"),
        }
    }

    /// On a host without the NVIDIA driver (CI, this repository's dev
    /// machines) `open` must fail naming the library, never fall back. On a
    /// host with the driver it must find GPUs or say there are none.
    #[test]
    fn open_without_the_driver_fails_naming_the_library() {
        let driver_loaded = Path::new("/proc/driver/nvidia/version").exists();
        match NvmlBackend::open() {
            Err(GpuError::LibraryMissing(message)) => {
                assert!(message.contains(LIBRARY), "{message}");
            }
            Ok(backend) => {
                assert!(driver_loaded, "NVML opened without the NVIDIA driver");
                assert!(backend.count > 0);
            }
            Err(GpuError::NoGpu) => assert!(driver_loaded),
            Err(e) => panic!("unexpected error: {e:?}"),
        }
        if !driver_loaded {
            assert!(matches!(
                NvmlBackend::open(),
                Err(GpuError::LibraryMissing(_))
            ));
        }
    }

    #[test]
    fn backend_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<NvmlBackend>();
    }

    #[test]
    fn cuda_versions_are_major_dot_minor() {
        assert_eq!(cuda_version_text(12040), "12.4");
        assert_eq!(cuda_version_text(12020), "12.2");
        assert_eq!(cuda_version_text(11080), "11.8");
        assert_eq!(cuda_version_text(12090), "12.9");
        assert_eq!(cuda_version_text(13000), "13.0");
        assert_eq!(cuda_version_text(12100), "12.10");
    }

    #[test]
    fn mig_memory_is_named_like_mig_parted() {
        const GB: u64 = GIB;
        // A100 40GB (40960 MiB): 1g.5gb is 4864 MiB, 3g.20gb 19968, 7g.40gb 40192.
        let a100 = 40960 * MIB;
        assert_eq!(mig_memory_size_gb(a100, 4864), 5);
        assert_eq!(mig_memory_size_gb(a100, 9856), 10);
        assert_eq!(mig_memory_size_gb(a100, 19968), 20);
        assert_eq!(mig_memory_size_gb(a100, 40192), 40);
        // H100 80GB (81559 MiB): 1g.10gb 9984, 1g.20gb 19968, 3g.40gb 40448, 7g.80gb 80896.
        let h100 = 81559 * MIB;
        assert_eq!(mig_memory_size_gb(h100, 9984), 10);
        assert_eq!(mig_memory_size_gb(h100, 19968), 20);
        assert_eq!(mig_memory_size_gb(h100, 40448), 40);
        assert_eq!(mig_memory_size_gb(h100, 80896), 80);
        // H200 141GB (143771 MiB): 1g.18gb, 1g.35gb, 3g.71gb, 7g.141gb.
        let h200 = 143771 * MIB;
        assert_eq!(mig_memory_size_gb(h200, 16384), 18);
        assert_eq!(mig_memory_size_gb(h200, 32768), 35);
        assert_eq!(mig_memory_size_gb(h200, 71424), 71);
        assert_eq!(mig_memory_size_gb(h200, 143104), 141);
        // go-nvlib's own table: every 1/32 GiB step on 24/40/80 GiB GPUs
        // names the smallest eighth of the GPU that holds it.
        for total_gb in [24u64, 40, 80] {
            let total = total_gb * GB;
            let slice = total / 8;
            let mut size = GB / 32;
            while size <= total {
                let expected = size.div_ceil(slice) * slice / GB;
                assert_eq!(
                    mig_memory_size_gb(total, size / MIB),
                    expected,
                    "{size} of {total}"
                );
                size += GB / 32;
            }
        }
        // No parent size known: whole GiB rounded up.
        assert_eq!(mig_memory_size_gb(0, 9984), 10);
    }

    #[test]
    fn mig_profiles_are_named_like_mig_parted() {
        assert_eq!(mig_profile_name(1, 1, 10, None), "1g.10gb");
        assert_eq!(
            mig_profile_name(7, 7, 141, Some(sys::NVML_GPU_INSTANCE_PROFILE_7_SLICE)),
            "7g.141gb"
        );
        assert_eq!(mig_profile_name(1, 2, 20, None), "1c.2g.20gb");
        assert_eq!(
            mig_profile_name(1, 1, 10, Some(sys::NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1)),
            "1g.10gb+me"
        );
        assert_eq!(
            mig_profile_name(1, 1, 20, Some(sys::NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2)),
            "1g.20gb"
        );
        assert_eq!(
            mig_profile_name(
                1,
                1,
                23,
                Some(sys::NVML_GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME)
            ),
            "1g.23gb+me.all"
        );
        assert_eq!(
            mig_profile_name(1, 2, 12, Some(sys::NVML_GPU_INSTANCE_PROFILE_2_SLICE_NO_ME)),
            "1c.2g.12gb-me"
        );
        assert_eq!(
            mig_profile_name(4, 4, 48, Some(sys::NVML_GPU_INSTANCE_PROFILE_4_SLICE_GFX)),
            "4g.48gb+gfx"
        );
        // A compute-slice count of 0 (attribute not filled in) is the whole GI.
        assert_eq!(mig_profile_name(0, 3, 40, None), "3g.40gb");
    }

    #[test]
    fn cc_state_maps_to_modes() {
        let state = |feature, devtools, environment, gpus_capable| raw::RawCcState {
            feature,
            devtools,
            environment,
            gpus_capable,
        };
        let on = sys::NVML_CC_SYSTEM_FEATURE_ENABLED;
        let off = sys::NVML_CC_SYSTEM_FEATURE_DISABLED;
        let prod = sys::NVML_CC_SYSTEM_ENVIRONMENT_PROD;
        let sim = sys::NVML_CC_SYSTEM_ENVIRONMENT_SIM;
        let dev_on = sys::NVML_CC_SYSTEM_DEVTOOLS_MODE_ON;
        let dev_off = sys::NVML_CC_SYSTEM_DEVTOOLS_MODE_OFF;
        let capable = Some(sys::NVML_CC_SYSTEM_GPUS_CC_CAPABLE);
        let incapable = Some(sys::NVML_CC_SYSTEM_GPUS_CC_NOT_CAPABLE);
        assert_eq!(cc_mode_from(&state(on, dev_off, prod, capable)), CcMode::On);
        assert_eq!(cc_mode_from(&state(on, dev_off, prod, None)), CcMode::On);
        assert_eq!(
            cc_mode_from(&state(on, dev_on, prod, capable)),
            CcMode::Devtools
        );
        assert_eq!(
            cc_mode_from(&state(on, dev_off, sim, capable)),
            CcMode::Devtools
        );
        assert_eq!(
            cc_mode_from(&state(off, dev_off, prod, capable)),
            CcMode::Off
        );
        assert_eq!(
            cc_mode_from(&state(off, dev_off, 0, incapable)),
            CcMode::Unsupported
        );
    }

    #[test]
    fn raw_events_map_to_gpu_events() {
        let xid = u64::from(sys::nvmlEventTypeXidCriticalError);
        let sbe = u64::from(sys::nvmlEventTypeSingleBitEccError);
        let dbe = u64::from(sys::nvmlEventTypeDoubleBitEccError);
        let uuid = "GPU-00000000-0000-0000-0000-000000000001";

        // An XID outside MIG: NVML says "no instance" with all ones.
        let e = events_from_raw(2, uuid, xid, 79, NO_INSTANCE, NO_INSTANCE, Some(false));
        assert_eq!(
            e,
            vec![GpuEvent {
                gpu_index: 2,
                uuid: uuid.to_owned(),
                gpu_instance_id: None,
                compute_instance_id: None,
                kind: GpuEventKind::Xid { code: 79 },
            }]
        );

        // An XID inside a MIG device; GI 0 (the 7g instance) is a real id.
        let e = events_from_raw(0, uuid, xid, 31, 0, 0, Some(true));
        assert_eq!(e[0].gpu_instance_id, Some(0));
        assert_eq!(e[0].compute_instance_id, Some(0));
        assert_eq!(e[0].kind, GpuEventKind::Xid { code: 31 });
        let e = events_from_raw(0, uuid, xid, 43, 9, NO_INSTANCE, None);
        assert_eq!(
            (e[0].gpu_instance_id, e[0].compute_instance_id),
            (Some(9), None)
        );

        // Ids on a GPU known not to be in MIG mode are ignored.
        let e = events_from_raw(0, uuid, xid, 13, 0, 0, Some(false));
        assert_eq!(
            (e[0].gpu_instance_id, e[0].compute_instance_id),
            (None, None)
        );

        // NVML's "unknown XID" stays visible as 999.
        let e = events_from_raw(0, uuid, xid, 999, NO_INSTANCE, NO_INSTANCE, None);
        assert_eq!(e[0].kind, GpuEventKind::Xid { code: 999 });

        // ECC events carry no count; each is one.
        let e = events_from_raw(1, uuid, sbe, 0, NO_INSTANCE, NO_INSTANCE, None);
        assert_eq!(e[0].kind, GpuEventKind::EccCorrected { count: 1 });
        let e = events_from_raw(1, uuid, dbe, 0, NO_INSTANCE, NO_INSTANCE, None);
        assert_eq!(e[0].kind, GpuEventKind::EccUncorrected { count: 1 });

        // A MIG reconfiguration, alone or with another type in one event.
        let mig = u64::from(sys::nvmlEventMigConfigChange);
        let e = events_from_raw(0, uuid, mig, 0, NO_INSTANCE, NO_INSTANCE, Some(true));
        assert_eq!(e[0].kind, GpuEventKind::MigConfigChange);
        let e = events_from_raw(0, uuid, dbe | mig, 0, NO_INSTANCE, NO_INSTANCE, None);
        let kinds: Vec<_> = e.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                GpuEventKind::EccUncorrected { count: 1 },
                GpuEventKind::MigConfigChange
            ]
        );

        // Types we did not register for produce nothing.
        let pstate = u64::from(sys::nvmlEventTypePState);
        assert!(events_from_raw(1, uuid, pstate, 0, 0, 0, None).is_empty());
    }

    #[test]
    fn values_convert_without_inventing_zeroes() {
        assert_eq!(percent_to_ratio(0), 0.0);
        assert_eq!(percent_to_ratio(57), 0.57);
        assert_eq!(percent_to_ratio(100), 1.0);
        assert_eq!(percent_to_ratio(250), 1.0);
        assert_eq!(pstate_number(PerformanceState::Zero), Some(0));
        assert_eq!(pstate_number(PerformanceState::Eight), Some(8));
        assert_eq!(pstate_number(PerformanceState::Fifteen), Some(15));
        assert_eq!(pstate_number(PerformanceState::Unknown), None);
        assert_eq!(instance_id(NO_INSTANCE, Some(true)), None);
        assert_eq!(instance_id(3, Some(true)), Some(3));
    }

    #[test]
    fn wait_timeouts_round_up_to_milliseconds() {
        assert_eq!(timeout_ms(Duration::ZERO), 0);
        assert_eq!(timeout_ms(Duration::from_micros(1)), 1);
        assert_eq!(timeout_ms(Duration::from_millis(1500)), 1500);
        assert_eq!(timeout_ms(Duration::from_secs(u64::MAX)), i32::MAX as u32);
    }

    #[test]
    fn scrub_on_free_is_read_from_a_bounded_file() {
        let dir = tempfile::tempdir().unwrap();
        let params = dir.path().join("params");
        std::fs::write(
            &params,
            "ResmanDebugLevel: 4294967295\nRegistryDwords: \"RmDisableScrubOnFree=1\"\n",
        )
        .unwrap();
        assert_eq!(scrub_on_free_at(&params), ScrubOnFree::Disabled);
        std::fs::write(&params, "RegistryDwords: \"\"\n").unwrap();
        assert_eq!(scrub_on_free_at(&params), ScrubOnFree::Enabled);

        let ScrubOnFree::Unknown(reason) = scrub_on_free_at(&dir.path().join("absent")) else {
            panic!("a missing file must be unknown");
        };
        assert!(reason.contains("cannot open"), "{reason}");

        std::fs::write(&params, vec![b'x'; MAX_PARAMS_BYTES as usize + 1]).unwrap();
        let ScrubOnFree::Unknown(reason) = scrub_on_free_at(&params) else {
            panic!("an oversized file must be unknown");
        };
        assert!(reason.contains("larger than"), "{reason}");

        std::fs::write(&params, [0xff, 0xfe]).unwrap();
        assert!(matches!(scrub_on_free_at(&params), ScrubOnFree::Unknown(_)));
    }
}
