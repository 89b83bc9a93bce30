//! The worker's side of the control socket: take the `load`, map the
//! sealed model fds, load the engine, say `ready`, then serve `generate`
//! one at a time while a reader thread answers `health` and applies
//! `cancel` and `shutdown` at once.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::Device;
use ccnode_sandbox::control::{self, FrameError, FrameReader};
use serde_json::Value;

use crate::engine::{Engine, EngineError, Request};
use crate::protocol::{self, codes, Done, Generate, Load, ModelFile, Ready};

/// Exit codes (sysexits.h).
pub const EXIT_OK: u8 = 0;
/// The model could not be loaded (an `error` was sent first).
pub const EXIT_LOAD_FAILED: u8 = 65;
/// ccnoded broke the protocol or went away.
pub const EXIT_PROTOCOL: u8 = 76;

/// Largest frame the worker reads (a `generate` carries the prompt).
pub const MAX_FRAME: usize = protocol::MAX_FRAME_TO_WORKER;

/// The sealed fd's mapping, read-only, for the engine's whole life.
struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
    _fd: OwnedFd,
}

// SAFETY: the mapping is read-only and backed by a sealed memfd nobody can
// write, so sharing the pointer across threads is sound.
unsafe impl Send for Mapped {}

impl Mapped {
    fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` maps `len` readable bytes for as long as `self`
        // lives; the memfd is sealed against writes, growth and shrinking,
        // so the bytes cannot change or vanish under the slice.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the region mmap returned; no slice of
            // it outlives `self` (bytes() borrows self).
            unsafe {
                libc::munmap(self.ptr, self.len);
            }
        }
    }
}

const REQUIRED_SEALS: libc::c_int =
    libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;

/// Takes fd `f.fd` (which must be a sealed memfd of `f.size` bytes) and
/// maps it read-only. `fd_min` is the lowest fd number model files may
/// use (the worker's fds below are stdio and the control socket).
fn map_file(f: &ModelFile, fd_min: RawFd) -> Result<Mapped, EngineError> {
    let unsealed = |m: String| EngineError::new(codes::UNSEALED_INPUT, m);
    if f.fd < fd_min {
        return Err(unsealed(format!("{}: fd {} is reserved", f.name, f.fd)));
    }
    // SAFETY: fcntl(F_GETFD) only asks whether the descriptor is open.
    if unsafe { libc::fcntl(f.fd, libc::F_GETFD) } < 0 {
        return Err(unsealed(format!("{}: fd {} is not open", f.name, f.fd)));
    }
    // SAFETY: the fd is open (checked above) and was handed to this process
    // for this file; the `load` message names each fd once (checked by the
    // caller), so nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(f.fd) };
    // SAFETY: F_GET_SEALS on an open descriptor; fails on non-memfds.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & REQUIRED_SEALS != REQUIRED_SEALS {
        return Err(unsealed(format!(
            "{}: fd {} is not a sealed memfd (seals {seals:#x})",
            f.name, f.fd
        )));
    }
    let size = nix::sys::stat::fstat(fd.as_raw_fd())
        .map_err(|e| unsealed(format!("{}: fstat: {e}", f.name)))?
        .st_size;
    if u64::try_from(size).ok() != Some(f.size) {
        return Err(unsealed(format!(
            "{}: {} bytes, the load says {}",
            f.name, size, f.size
        )));
    }
    let len = usize::try_from(f.size).map_err(|_| unsealed(format!("{}: too large", f.name)))?;
    if len == 0 {
        return Ok(Mapped {
            ptr: std::ptr::null_mut(),
            len: 0,
            _fd: fd,
        });
    }
    // SAFETY: a fresh read-only shared mapping of `len` bytes of an open
    // fd; the kernel picks the address. The result is checked below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(unsealed(format!(
            "{}: mmap: {}",
            f.name,
            std::io::Error::last_os_error()
        )));
    }
    Ok(Mapped { ptr, len, _fd: fd })
}

/// The device the `load` asks for, after checking it is exactly the one
/// granted.
fn open_device(load: &Load) -> Result<Device, EngineError> {
    match load.device.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda::open(&load.gpus),
        other => Err(EngineError::new(
            codes::DEVICE_UNAVAILABLE,
            format!("unknown device {other:?} (cpu or cuda)"),
        )),
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use super::*;

    pub fn open(_gpus: &[String]) -> Result<Device, EngineError> {
        Err(EngineError::new(
            codes::DEVICE_UNAVAILABLE,
            "this ccnode-worker was built without CUDA (cargo feature `cuda`)",
        ))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use candle_core::cuda_backend::cudarc::driver::{result, sys};

    use ccnode_gpu::device_id;

    /// CUDA must show exactly one device, and it must be the one granted
    /// (by UUID: `GPU-…` or `MIG-…`, as CUDA_VISIBLE_DEVICES names it).
    pub fn open(gpus: &[String]) -> Result<Device, EngineError> {
        let unavailable = |m: String| EngineError::new(codes::DEVICE_UNAVAILABLE, m);
        let mismatch = |m: String| EngineError::new(codes::DEVICE_MISMATCH, m);
        if gpus.len() != 1 {
            return Err(mismatch(format!(
                "a worker serves on exactly one granted device, the load names {}",
                gpus.len()
            )));
        }
        result::init().map_err(|e| unavailable(format!("cuInit: {e}")))?;
        let count = result::device::get_count().map_err(|e| unavailable(e.to_string()))?;
        if count != 1 {
            return Err(mismatch(format!(
                "CUDA shows {count} devices; exactly the granted {} was expected",
                gpus[0]
            )));
        }
        let dev = result::device::get(0).map_err(|e| unavailable(e.to_string()))?;
        // Not result::device::get_uuid: below CUDA 13 it calls
        // cuDeviceGetUuid (v1), which gives a MIG device its parent GPU's
        // UUID; only the _v2 call gives the MIG device's own.
        let mut uuid = std::mem::MaybeUninit::<sys::CUuuid>::uninit();
        // SAFETY: `uuid` is a valid place for one CUuuid; `dev` came from
        // cuDeviceGet after a successful cuInit.
        unsafe { sys::cuDeviceGetUuid_v2(uuid.as_mut_ptr(), dev) }
            .result()
            .map_err(|e| unavailable(format!("cuDeviceGetUuid_v2: {e}")))?;
        // SAFETY: initialised by the successful call above.
        let raw = unsafe { uuid.assume_init() }.bytes.map(|c| c as u8);
        let shown = device_id::uuid_string(&raw);
        if !device_id::same_device(&shown, &gpus[0]) {
            return Err(mismatch(format!(
                "CUDA device 0 is {shown}, the granted device is {}",
                gpus[0]
            )));
        }
        Device::new_cuda(0).map_err(|e| unavailable(e.to_string()))
    }
}

/// Loads what `load` names: each fd once, sealed, mapped; then the engine.
/// Returns the engine and the mappings it was built from (kept alive).
fn load_engine(load: &Load, fd_min: RawFd) -> Result<Engine, EngineError> {
    if load.files.len() > protocol::MAX_MODEL_FILES {
        return Err(EngineError::new(
            codes::INVALID_MODEL,
            format!("more than {} model files", protocol::MAX_MODEL_FILES),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for f in &load.files {
        if !seen.insert(f.fd) {
            return Err(EngineError::new(
                codes::UNSEALED_INPUT,
                format!("fd {} is named twice", f.fd),
            ));
        }
    }
    let device = open_device(load)?;
    let mapped = load
        .files
        .iter()
        .map(|f| map_file(f, fd_min))
        .collect::<Result<Vec<_>, _>>()?;
    let files: Vec<(&str, &[u8])> = load
        .files
        .iter()
        .zip(&mapped)
        .map(|(f, m)| (f.name.as_str(), m.bytes()))
        .collect();
    // The engine copies the tensors out; the mappings are dropped after.
    Engine::load(&files, &device)
}

/// Test hook, debug builds only: `CCNODE_WORKER_TEST_FAULT=seccomp` makes
/// a forbidden system call right after `ready` (the sandbox kills the
/// worker with SIGSYS), `exit` exits with code 1. Release builds ignore it.
fn test_fault_after_ready() {
    #[cfg(debug_assertions)]
    match std::env::var("CCNODE_WORKER_TEST_FAULT").as_deref() {
        Ok("seccomp") => {
            // SAFETY: unshare(CLONE_NEWUSER) touches no memory of ours; the
            // worker's seccomp filter answers it with SIGSYS.
            unsafe {
                libc::unshare(libc::CLONE_NEWUSER);
            }
        }
        Ok("exit") => std::process::exit(1),
        _ => {}
    }
}

enum Work {
    /// With when its frame was read.
    Generate(Generate, Instant),
    Shutdown,
}

struct Shared {
    writer: Mutex<UnixStream>,
    /// The generation taken and not yet answered (0: none), and whether
    /// it is cancelled. The reader sets both when it takes a `generate`
    /// (so a `cancel` right behind it finds it, even before it runs);
    /// `serve_one` clears `current` before it answers.
    current: AtomicU64,
    cancelled: AtomicBool,
    shutdown: AtomicBool,
}

impl Shared {
    fn send(&self, v: &Value) -> bool {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        control::write_frame(&mut *w, v).is_ok()
    }
}

/// Serves on `sock` until shutdown or ccnoded goes away. `fd_min` is the
/// lowest fd a `load` may name ([`protocol::FIRST_MODEL_FD`] in the
/// jail).
pub fn run(sock: UnixStream, fd_min: RawFd) -> ExitCode {
    let mut reader = match sock.try_clone() {
        Ok(s) => FrameReader::new(s, MAX_FRAME),
        Err(_) => return ExitCode::from(EXIT_PROTOCOL),
    };
    let shared = Arc::new(Shared {
        writer: Mutex::new(sock),
        current: AtomicU64::new(0),
        cancelled: AtomicBool::new(false),
        shutdown: AtomicBool::new(false),
    });
    // The first frame is the load.
    let load = match reader.next_frame() {
        Ok(f) if f["type"] == "load" => match protocol::parse::<Load>(&f) {
            Ok(l) => l,
            Err(e) => {
                shared.send(&protocol::error(None, codes::PROTOCOL, &e));
                return ExitCode::from(EXIT_PROTOCOL);
            }
        },
        Ok(f) => {
            let msg = format!("expected load, got {}", f["type"]);
            shared.send(&protocol::error(None, codes::PROTOCOL, &msg));
            return ExitCode::from(EXIT_PROTOCOL);
        }
        Err(_) => return ExitCode::from(EXIT_PROTOCOL),
    };
    let engine = match load_engine(&load, fd_min) {
        Ok(e) => e,
        Err(e) => {
            shared.send(&protocol::error(None, e.code, &e.message));
            return ExitCode::from(EXIT_LOAD_FAILED);
        }
    };
    let ready = Ready {
        model: load.model.clone(),
        parameters: engine.parameters(),
        context_length: engine.context_length(),
        device: load.device.clone(),
    };
    if !shared.send(&protocol::with_body("ready", &ready)) {
        return ExitCode::from(EXIT_PROTOCOL);
    }
    test_fault_after_ready();
    let (tx, rx) = mpsc::channel::<Work>();
    let r_shared = shared.clone();
    std::thread::spawn(move || read_loop(reader, r_shared, tx));
    while let Ok(work) = rx.recv() {
        match work {
            Work::Shutdown => break,
            Work::Generate(g, read_at) => {
                if !serve_one(&engine, &shared, g, read_at) {
                    return ExitCode::from(EXIT_PROTOCOL);
                }
                if shared.shutdown.load(Ordering::Acquire) {
                    break;
                }
            }
        }
    }
    if shared.shutdown.load(Ordering::Acquire) {
        ExitCode::from(EXIT_OK)
    } else {
        ExitCode::from(EXIT_PROTOCOL)
    }
}

/// Runs one generation, which the reader has made `current`; false when
/// ccnoded can no longer be told.
fn serve_one(engine: &Engine, shared: &Shared, g: Generate, read_at: Instant) -> bool {
    if let Err(e) = g.check() {
        shared.current.store(0, Ordering::Release);
        return shared.send(&protocol::error(Some(g.id), codes::INVALID_REQUEST, &e));
    }
    let req = Request {
        prompt: g.prompt,
        max_tokens: g.max_tokens,
        temperature: g.temperature,
        top_p: g.top_p,
        seed: g.seed,
        stop: g.stop,
    };
    let mut alive = true;
    let mut first_token_us = None;
    let cancelled = || shared.cancelled.load(Ordering::Acquire);
    let result = engine.generate(&req, &cancelled, &mut |text| {
        alive &= shared.send(&protocol::token(g.id, text));
        first_token_us.get_or_insert_with(|| {
            u64::try_from(read_at.elapsed().as_micros()).unwrap_or(u64::MAX)
        });
    });
    shared.current.store(0, Ordering::Release);
    alive
        && match result {
            Ok(o) => shared.send(&protocol::with_body(
                "done",
                &Done {
                    id: g.id,
                    finish: o.finish,
                    prompt_tokens: o.prompt_tokens,
                    completion_tokens: o.completion_tokens,
                    first_token_us,
                },
            )),
            Err(e) => shared.send(&protocol::error(Some(g.id), e.code, &e.message)),
        }
}

fn read_loop(mut reader: FrameReader<UnixStream>, shared: Arc<Shared>, tx: mpsc::Sender<Work>) {
    loop {
        let frame = reader.next_frame();
        let read_at = Instant::now();
        let frame = match frame {
            Ok(f) => f,
            Err(FrameError::Closed) | Err(FrameError::Io(_)) => {
                // ccnoded is gone: stop what runs and end.
                shared.cancelled.store(true, Ordering::Release);
                return;
            }
            Err(e) => {
                shared.send(&protocol::error(None, codes::PROTOCOL, &e.to_string()));
                shared.cancelled.store(true, Ordering::Release);
                return;
            }
        };
        match frame["type"].as_str().unwrap_or("") {
            "health" => {
                shared.send(&control::message("healthy"));
            }
            "generate" => match protocol::parse::<Generate>(&frame) {
                Ok(g) if g.id == 0 => {
                    shared.send(&protocol::error(None, codes::PROTOCOL, "id 0 is reserved"));
                }
                Ok(g) => {
                    // Taken here, not when it starts: a `cancel` read
                    // before serve_one runs must find it. Only this thread
                    // sets `current` to an id and `cancelled` to true, so
                    // no cancel can fall between the claim and the reset.
                    if shared
                        .current
                        .compare_exchange(0, g.id, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        shared.send(&protocol::error(
                            Some(g.id),
                            codes::BUSY,
                            "a generation is running",
                        ));
                        continue;
                    }
                    shared.cancelled.store(false, Ordering::Release);
                    if tx.send(Work::Generate(g, read_at)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let id = frame["id"].as_u64();
                    shared.send(&protocol::error(id, codes::PROTOCOL, &e));
                }
            },
            "cancel" => {
                let id = frame["id"].as_u64().unwrap_or(0);
                if id != 0 && shared.current.load(Ordering::Acquire) == id {
                    shared.cancelled.store(true, Ordering::Release);
                }
            }
            "shutdown" => {
                shared.shutdown.store(true, Ordering::Release);
                let _ = tx.send(Work::Shutdown);
            }
            other => {
                let msg = format!("unknown message type {other:?}");
                shared.send(&protocol::error(None, codes::PROTOCOL, &msg));
            }
        }
    }
}

/// The control socket the jail hands over at fd 3.
///
/// # Safety
/// Only in the worker process started by ccnoded, where fd 3 is the
/// control socket and nothing else owns it; call once.
pub unsafe fn inherited_socket() -> Option<UnixStream> {
    // SAFETY: F_GETFD only checks whether fd 3 is open.
    if unsafe { libc::fcntl(3, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the caller guarantees fd 3 is the control socket, owned by
    // nobody else in this process.
    Some(unsafe { UnixStream::from_raw_fd(3) })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::IntoRawFd;

    use super::*;
    use crate::testmodel::{self, Shape};

    /// A sealed memfd holding `bytes`, as ccnoded hands it over.
    fn sealed(bytes: &[u8]) -> RawFd {
        let fd = nix::sys::memfd::memfd_create(
            c"t",
            nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .unwrap();
        let mut f = std::fs::File::from(fd);
        f.write_all(bytes).unwrap();
        let seals =
            libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
        // SAFETY: F_ADD_SEALS on our own open memfd.
        let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert_eq!(rc, 0);
        f.into_raw_fd()
    }

    /// A plain file (writable by whoever holds it): never accepted.
    fn unsealed(bytes: &[u8]) -> RawFd {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f.into_raw_fd()
    }

    fn model_files(sealed_fds: bool) -> Vec<ModelFile> {
        let dir = tempfile::tempdir().unwrap();
        testmodel::write_model(dir.path(), &Shape::tiny(), 1).unwrap();
        ["config.json", "tokenizer.json", "model.safetensors"]
            .iter()
            .map(|n| {
                let b = std::fs::read(dir.path().join(n)).unwrap();
                ModelFile {
                    name: (*n).to_owned(),
                    fd: if sealed_fds { sealed(&b) } else { unsealed(&b) },
                    size: b.len() as u64,
                }
            })
            .collect()
    }

    fn load(files: Vec<ModelFile>) -> Load {
        Load {
            model: "t".into(),
            device: "cpu".into(),
            gpus: vec![],
            files,
        }
    }

    #[test]
    fn sealed_model_fds_load_and_serve() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let worker = std::thread::spawn(move || run(theirs, 3));
        let mut w = ours.try_clone().unwrap();
        control::write_frame(
            &mut w,
            &protocol::with_body("load", &load(model_files(true))),
        )
        .unwrap();
        let mut r = FrameReader::new(ours, MAX_FRAME);
        let ready = r.next_frame().unwrap();
        assert_eq!(ready["type"], "ready", "{ready}");
        assert_eq!(ready["context_length"], 512);
        control::write_frame(&mut w, &control::message("health")).unwrap();
        assert_eq!(r.next_frame().unwrap()["type"], "healthy");
        let g = Generate {
            id: 5,
            prompt: "hi".into(),
            max_tokens: 3,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: vec![],
        };
        control::write_frame(&mut w, &protocol::with_body("generate", &g)).unwrap();
        let done = loop {
            let f = r.next_frame().unwrap();
            if f["type"] != "token" {
                break f;
            }
            assert_eq!(f["id"], 5);
        };
        assert_eq!(done["type"], "done", "{done}");
        assert!(done["completion_tokens"].as_u64().unwrap() <= 3);
        // Out of bounds, and an id 0: refused, the worker goes on.
        let bad = Generate {
            max_tokens: 0,
            ..g.clone()
        };
        control::write_frame(&mut w, &protocol::with_body("generate", &bad)).unwrap();
        let e = r.next_frame().unwrap();
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some(codes::INVALID_REQUEST))
        );
        control::write_frame(&mut w, &control::message("nonsense")).unwrap();
        assert_eq!(r.next_frame().unwrap()["code"], codes::PROTOCOL);
        control::write_frame(&mut w, &control::message("shutdown")).unwrap();
        assert_eq!(worker.join().unwrap(), ExitCode::from(EXIT_OK));
    }

    fn refused(l: Load) -> Value {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let worker = std::thread::spawn(move || run(theirs, 3));
        let mut w = ours.try_clone().unwrap();
        control::write_frame(&mut w, &protocol::with_body("load", &l)).unwrap();
        let mut r = FrameReader::new(ours, MAX_FRAME);
        let e = r.next_frame().unwrap();
        assert_eq!(worker.join().unwrap(), ExitCode::from(EXIT_LOAD_FAILED));
        e
    }

    #[test]
    fn fds_that_are_not_sealed_memfds_of_the_declared_size_are_refused() {
        let e = refused(load(model_files(false)));
        assert_eq!(e["code"], codes::UNSEALED_INPUT, "{e}");
        assert!(e["message"]
            .as_str()
            .unwrap()
            .contains("not a sealed memfd"));

        let mut files = model_files(true);
        files[2].size += 1;
        let e = refused(load(files));
        assert_eq!(e["code"], codes::UNSEALED_INPUT, "{e}");

        let mut files = model_files(true);
        files[1].fd = files[0].fd;
        let e = refused(load(files));
        assert_eq!(e["code"], codes::UNSEALED_INPUT, "{e}");
        assert!(e["message"].as_str().unwrap().contains("named twice"));

        let mut files = model_files(true);
        files[0].fd = 2;
        let e = refused(load(files));
        assert!(e["message"].as_str().unwrap().contains("reserved"), "{e}");

        let mut files = model_files(true);
        files[0].fd = 100_000;
        let e = refused(load(files));
        assert!(e["message"].as_str().unwrap().contains("not open"), "{e}");
    }

    #[test]
    fn a_model_missing_a_tensor_or_of_another_kind_is_refused_not_a_panic() {
        // The tokenizer where the weights should be: no safetensors.
        let mut files = model_files(true);
        files.truncate(2);
        let e = refused(load(files));
        assert_eq!(e["code"], codes::INVALID_MODEL, "{e}");

        // config.json promising a layer the weights do not hold.
        let mut files = model_files(true);
        let mut cfg: Value = serde_json::from_slice(
            &std::fs::read(format!("/proc/self/fd/{}", files[0].fd)).unwrap(),
        )
        .unwrap();
        cfg["num_hidden_layers"] = 3.into();
        let bytes = serde_json::to_vec(&cfg).unwrap();
        files[0] = ModelFile {
            name: "config.json".into(),
            fd: sealed(&bytes),
            size: bytes.len() as u64,
        };
        let e = refused(load(files));
        assert_eq!(e["code"], codes::INVALID_MODEL, "{e}");
        assert!(
            e["message"].as_str().unwrap().contains("model.layers.2"),
            "{e}"
        );

        let mut files = model_files(true);
        let bytes = br#"{"architectures":["MistralForCausalLM"]}"#;
        files[0] = ModelFile {
            name: "config.json".into(),
            fd: sealed(bytes),
            size: bytes.len() as u64,
        };
        assert_eq!(
            refused(load(files))["code"],
            codes::UNSUPPORTED_ARCHITECTURE
        );

        let e = refused(Load {
            device: "cuda".into(),
            ..load(model_files(true))
        });
        #[cfg(not(feature = "cuda"))]
        assert_eq!(e["code"], codes::DEVICE_UNAVAILABLE, "{e}");
        #[cfg(feature = "cuda")]
        {
            // No granted device named: refused before CUDA is asked.
            assert_eq!(e["code"], codes::DEVICE_MISMATCH, "{e}");
            let two = refused(Load {
                device: "cuda".into(),
                gpus: vec!["GPU-a".into(), "GPU-b".into()],
                ..load(model_files(true))
            });
            assert_eq!(two["code"], codes::DEVICE_MISMATCH, "{two}");
            let one = refused(Load {
                device: "cuda".into(),
                gpus: vec!["GPU-00000000-0000-0000-0000-000000000000".into()],
                ..load(model_files(true))
            });
            // One named: where CUDA starts it shows some device, and this
            // UUID is none of them; where it cannot (CI, a driver without a
            // GPU), the worker cannot either.
            use candle_core::cuda_backend::cudarc::driver::result;
            let want = if result::init().is_ok() {
                codes::DEVICE_MISMATCH
            } else {
                codes::DEVICE_UNAVAILABLE
            };
            assert_eq!(one["code"], want, "{one}");
        }
    }

    /// What the worker's reader shares with the generation loop, writing
    /// to `sock`.
    fn shared(sock: &UnixStream) -> Arc<Shared> {
        Arc::new(Shared {
            writer: Mutex::new(sock.try_clone().unwrap()),
            current: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
        })
    }

    fn generate(id: u64) -> Value {
        let g = Generate {
            id,
            prompt: "hi".into(),
            max_tokens: 8,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: vec![],
        };
        protocol::with_body("generate", &g)
    }

    /// Starts a reader on `theirs` after writing `frames` to `ours`.
    fn reader_after(
        ours: &UnixStream,
        theirs: UnixStream,
        frames: &[Value],
    ) -> (
        Arc<Shared>,
        mpsc::Receiver<Work>,
        std::thread::JoinHandle<()>,
    ) {
        let shared = shared(&theirs);
        let mut w = ours.try_clone().unwrap();
        for f in frames {
            control::write_frame(&mut w, f).unwrap();
        }
        let (tx, rx) = mpsc::channel();
        let reader = {
            let shared = shared.clone();
            std::thread::spawn(move || read_loop(FrameReader::new(theirs, MAX_FRAME), shared, tx))
        };
        (shared, rx, reader)
    }

    #[test]
    fn a_cancel_right_behind_its_generate_is_not_lost() {
        let engine = load_engine(&load(model_files(true)), 3).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut cancel = control::message("cancel");
        cancel["id"] = 7.into();
        let frames = [generate(7), cancel, control::message("shutdown")];
        let (shared, rx, reader) = reader_after(&ours, theirs, &frames);
        // The generation starts only once the reader has read all three
        // frames: the shutdown behind the cancel is queued after it.
        let Ok(Work::Generate(g, read_at)) = rx.recv() else {
            panic!("the generate is not queued first");
        };
        assert!(matches!(rx.recv(), Ok(Work::Shutdown)));
        assert!(serve_one(&engine, &shared, g, read_at));
        let done = FrameReader::new(ours.try_clone().unwrap(), MAX_FRAME)
            .next_frame()
            .unwrap();
        assert_eq!(done["type"], "done", "{done}");
        assert_eq!(done["id"], 7);
        assert_eq!(done["finish"], "cancelled", "{done}");
        assert_eq!(done["completion_tokens"], 0);
        assert_eq!(shared.current.load(Ordering::Acquire), 0);
        ours.shutdown(std::net::Shutdown::Both).unwrap();
        reader.join().unwrap();
    }

    #[test]
    fn a_generate_behind_one_not_yet_answered_is_refused_busy() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let frames = [generate(7), generate(8), control::message("shutdown")];
        let (_shared, rx, reader) = reader_after(&ours, theirs, &frames);
        assert!(matches!(rx.recv(), Ok(Work::Generate(g, _)) if g.id == 7));
        assert!(
            matches!(rx.recv(), Ok(Work::Shutdown)),
            "one generate queued"
        );
        let busy = FrameReader::new(ours.try_clone().unwrap(), MAX_FRAME)
            .next_frame()
            .unwrap();
        assert_eq!(busy["type"], "error", "{busy}");
        assert_eq!(busy["id"], 8);
        assert_eq!(busy["code"], codes::BUSY);
        ours.shutdown(std::net::Shutdown::Both).unwrap();
        reader.join().unwrap();
    }

    #[test]
    fn the_first_frame_must_be_a_load() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let worker = std::thread::spawn(move || run(theirs, 3));
        let mut w = ours.try_clone().unwrap();
        control::write_frame(&mut w, &control::message("generate")).unwrap();
        let mut r = FrameReader::new(ours, MAX_FRAME);
        assert_eq!(r.next_frame().unwrap()["code"], codes::PROTOCOL);
        assert_eq!(worker.join().unwrap(), ExitCode::from(EXIT_PROTOCOL));
    }
}
