//! Hashing straight from the page cache, safe against a file that shrinks
//! (or fails to read) under the verifier.
//!
//! Reading a file through `pread` copies every byte out of the page cache
//! before the hash sees it; on a machine whose copy runs at a few GB/s that
//! copy costs a quarter of the verification time. Mapping the file lets the
//! hash read the page cache itself. The catch is `SIGBUS`: a mapped page
//! past the end of a file that was truncated after it was opened, or one the
//! kernel cannot read, faults, and the default action kills the process.
//!
//! So every mapping the verifier reads is a [`Window`] registered in a small
//! table. A process-wide `SIGBUS` handler, installed on first use, looks the
//! faulting address up there. Inside a window it maps anonymous zero pages
//! over the rest of that window, marks it faulted and returns: the access is
//! retried, reads zeros, and the caller, which checks [`Window::faulted`]
//! before it uses the hash, refuses the file as changed. A fault anywhere
//! else goes to the handler that was installed before (Rust's own stack
//! overflow handler, or the default action), so real crashes still crash.
//!
//! Where no slot is free or mapping fails the caller falls back to `pread`;
//! the verdict is the same either way.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// How many windows may be live at once: each hashing thread holds one of
/// the file and, when copying, one of the memfd (BLAKE3's multi-threaded
/// update reads one window from several threads). Past this, `pread`.
const SLOTS: usize = 1024;

struct Slot {
    /// Claimed by a live window.
    taken: AtomicBool,
    /// A sequence count, odd while `start`/`end` are being changed, so the
    /// handler never acts on a torn pair (one window's start, another's end).
    seq: AtomicUsize,
    /// The mapping's address range; `end == 0` while not registered.
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    taken: AtomicBool::new(false),
    seq: AtomicUsize::new(0),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];

/// The `SIGBUS` action in place before ours, to pass foreign faults on to.
/// Written once, before our handler is installed, and only read after.
static PREVIOUS: OnceLock<Result<PreviousAction, i32>> = OnceLock::new();

struct PreviousAction(libc::sigaction);

// SAFETY: a `sigaction` is plain data (a handler address, flags and a
// mask); it is written once before being shared and never mutated.
unsafe impl Send for PreviousAction {}
// SAFETY: as above; shared reads of immutable plain data.
unsafe impl Sync for PreviousAction {}

/// `si_code` values of a SIGBUS raised by the faulting access itself
/// (asm-generic/siginfo.h): a nonexistent physical address (a page past the
/// end of a file), an object error (the page could not be read), a machine
/// check the access consumed.
const BUS_ADRERR: libc::c_int = 2;
const BUS_OBJERR: libc::c_int = 3;
const BUS_MCEERR_AR: libc::c_int = 4;

/// The page size, read once before the handler is installed (the handler
/// itself calls nothing that is not async-signal-safe).
static PAGE: AtomicUsize = AtomicUsize::new(4096);

fn page_size() -> usize {
    PAGE.load(Ordering::Relaxed)
}

/// The action that installs [`on_sigbus`].
fn our_action() -> libc::sigaction {
    // SAFETY: zeroed is a valid bit pattern for sigaction (no handler, no
    // flags, empty mask); the fields are then set as the kernel expects for
    // an SA_SIGINFO handler.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigbus;
    act.sa_sigaction = handler as usize;
    act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
    act
}

/// Installs the handler once; false if it could not be installed (the
/// caller then reads with `pread`).
fn install() -> bool {
    let r = PREVIOUS.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if let Some(n) = usize::try_from(n).ok().filter(|n| n.is_power_of_two()) {
            PAGE.store(n, Ordering::SeqCst);
        }
        let act = our_action();
        // SAFETY: zeroed is a valid sigaction bit pattern; the kernel fills
        // in the old action.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are to live, properly aligned sigaction
        // values; the handler it installs is async-signal-safe (below).
        let rc = unsafe { libc::sigaction(libc::SIGBUS, &act, &mut old) };
        if rc == 0 {
            Ok(PreviousAction(old))
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        }
    });
    r.is_ok()
}

/// Puts SIGBUS back to its default action (async-signal-safe).
fn default_action() {
    // SAFETY: zeroed is a valid sigaction for SIG_DFL (0).
    let mut dfl: libc::sigaction = unsafe { std::mem::zeroed() };
    dfl.sa_sigaction = libc::SIG_DFL;
    // SAFETY: a valid sigaction pointer; a null old pointer.
    unsafe { libc::sigaction(libc::SIGBUS, &dfl, ptr::null_mut()) };
}

/// The `SIGBUS` handler. Async-signal-safe: it reads and writes atomics,
/// calls `mmap` (a plain system call on Linux) and `sigaction`, and calls the
/// previous handler; it allocates nothing and takes no lock.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler;
    // for SIGBUS si_addr is the faulting address.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // Only a synchronous fault of this very thread's access (the window it
    // reads is then alive: the reader holds it): not a SIGBUS sent with
    // kill or sigqueue, nor an asynchronous machine-check report.
    let synchronous = matches!(code, BUS_ADRERR | BUS_OBJERR | BUS_MCEERR_AR);
    let mut ours = false;
    for slot in TABLE.iter().filter(|_| synchronous) {
        let before = slot.seq.load(Ordering::SeqCst);
        let end = slot.end.load(Ordering::SeqCst);
        let start = slot.start.load(Ordering::SeqCst);
        if before % 2 == 1 || slot.seq.load(Ordering::SeqCst) != before {
            // Being changed: not the faulting thread's window, which is
            // registered and stays so while it is read.
            continue;
        }
        if end != 0 && start <= addr && addr < end {
            let page = addr & !(page_size() - 1);
            slot.faulted.store(true, Ordering::SeqCst);
            // SAFETY: [page, end) lies inside a live window's own mapping
            // (registered before it is read, unregistered before it is
            // unmapped), which nothing else refers to; replacing it with
            // private zero pages changes only what the window reads.
            let p = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    end - page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                ours = true;
            }
        }
    }
    if ours {
        return;
    }
    match PREVIOUS.get() {
        Some(Ok(PreviousAction(old))) => {
            let h = old.sa_sigaction;
            if h == libc::SIG_DFL || h == libc::SIG_IGN {
                // Back to the default action. For a fault, returning retries
                // the access, which faults again and ends the process as it
                // would have; a sent SIGBUS is raised again (delivered once
                // this handler returns) and ends it the same way.
                default_action();
                if !synchronous {
                    // SAFETY: raise is async-signal-safe.
                    unsafe { libc::raise(libc::SIGBUS) };
                }
                return;
            } else if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed as an
                // SA_SIGINFO handler with exactly this signature, and gets
                // the arguments the kernel gave us.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain handler takes the signal number only.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
                f(sig);
            }
            if !synchronous {
                // A sent SIGBUS that the previous handler survived (Rust's
                // own resets SIGBUS to the default and returns): keep the
                // guard in place for the faults that matter.
                let act = our_action();
                // SAFETY: a valid sigaction pointer; a null old pointer.
                unsafe { libc::sigaction(libc::SIGBUS, &act, ptr::null_mut()) };
            }
        }
        // Not reachable (we are only installed after PREVIOUS is set), but
        // fail the same way as the default action would.
        _ => default_action(),
    }
}

/// A read-only mapping of part of a file, registered with the `SIGBUS`
/// handler for as long as it lives.
#[derive(Debug)]
pub(crate) struct Window {
    map: *mut libc::c_void,
    map_len: usize,
    /// Offset of the requested start inside the mapping (page alignment).
    skew: usize,
    len: usize,
    slot: usize,
}

// SAFETY: the window owns its mapping; reading it from any thread is fine
// (BLAKE3 reads one window from several), and the slot is only touched
// through atomics.
unsafe impl Send for Window {}
// SAFETY: as above; `bytes` only hands out shared reads.
unsafe impl Sync for Window {}

impl Window {
    /// Maps `len` bytes of `file` at `offset`, pages populated from the
    /// page cache at once. `Ok(None)` where the guard is unavailable (no
    /// handler, no free slot, nothing to map): read with `pread` instead.
    pub(crate) fn map(file: &File, offset: u64, len: usize) -> std::io::Result<Option<Window>> {
        Self::map_with(file, offset, len, libc::MAP_POPULATE)
    }

    /// [`Window::map`] without populating: for a memfd whose pages are
    /// written (through `write`, which allocates them without zeroing)
    /// before they are read here.
    pub(crate) fn map_lazy(
        file: &File,
        offset: u64,
        len: usize,
    ) -> std::io::Result<Option<Window>> {
        Self::map_with(file, offset, len, 0)
    }

    fn map_with(
        file: &File,
        offset: u64,
        len: usize,
        flags: libc::c_int,
    ) -> std::io::Result<Option<Window>> {
        if len == 0 || !install() {
            return Ok(None);
        }
        let Some(slot) = (0..SLOTS).find(|&i| {
            TABLE[i]
                .taken
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        }) else {
            return Ok(None);
        };
        let page = page_size() as u64;
        let aligned = offset & !(page - 1);
        let skew = (offset - aligned) as usize;
        let Some(map_len) = len.checked_add(skew) else {
            TABLE[slot].taken.store(false, Ordering::SeqCst);
            return Ok(None);
        };
        let Ok(file_off) = libc::off_t::try_from(aligned) else {
            TABLE[slot].taken.store(false, Ordering::SeqCst);
            return Ok(None);
        };
        // SAFETY: a fresh read-only shared mapping chosen by the kernel
        // (no MAP_FIXED), of a file we hold open; it aliases no Rust object.
        let map = unsafe {
            libc::mmap(
                ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_SHARED | flags,
                file.as_raw_fd(),
                file_off,
            )
        };
        if map == libc::MAP_FAILED {
            // Not mappable here (a file system without mmap, the map count
            // or address space exhausted): the caller reads with pread.
            TABLE[slot].taken.store(false, Ordering::SeqCst);
            return Ok(None);
        }
        let s = &TABLE[slot];
        s.faulted.store(false, Ordering::SeqCst);
        s.seq.fetch_add(1, Ordering::SeqCst);
        s.start.store(map as usize, Ordering::SeqCst);
        s.end.store(map as usize + map_len, Ordering::SeqCst);
        s.seq.fetch_add(1, Ordering::SeqCst);
        Ok(Some(Window {
            map,
            map_len,
            skew,
            len,
            slot,
        }))
    }

    /// The mapped bytes. If the file shrank (or a page could not be read)
    /// some of them read as zeros: check [`Window::faulted`] after use.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is live and readable for map_len bytes while
        // self lives, and skew + len == map_len. Pages that would fault are
        // replaced with zero pages by the handler, so every read completes.
        // Another process writing the file can change what the bytes read
        // (as with pread, the verdict is about what was read), which is why
        // the hand-over path copies into a private memfd instead of mapping.
        unsafe { std::slice::from_raw_parts((self.map as *const u8).add(self.skew), self.len) }
    }

    /// Whether any read of this window faulted (the file shrank under it or
    /// could not be read): what was hashed is not the file.
    pub(crate) fn faulted(&self) -> bool {
        TABLE[self.slot].faulted.load(Ordering::SeqCst)
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        let s = &TABLE[self.slot];
        // Unregister before unmapping, so the handler can never match an
        // address range that has been handed to another mapping.
        s.seq.fetch_add(1, Ordering::SeqCst);
        s.end.store(0, Ordering::SeqCst);
        s.start.store(0, Ordering::SeqCst);
        s.seq.fetch_add(1, Ordering::SeqCst);
        // SAFETY: map/map_len are exactly what mmap returned; no slice from
        // `bytes` outlives self.
        unsafe { libc::munmap(self.map, self.map_len) };
        s.taken.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(len: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        (dir, path, data)
    }

    /// Truncates the file at `path` through another open file description,
    /// as another process would.
    fn shrink(path: &std::path::Path, len: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(len)
            .unwrap();
    }

    /// Runs the test `name` of this binary again as a child process with
    /// `marker` set (the part that may end the process runs there).
    fn in_child(name: &str, marker: &str) -> std::process::Output {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(marker, "1")
            .output()
            .unwrap()
    }

    #[test]
    fn window_reads_the_file_at_any_offset() {
        let (_d, path, data) = file_of(3 * 65536 + 123);
        let f = File::open(&path).unwrap();
        for (off, len) in [(0usize, data.len()), (1, 5000), (65537, 70000), (4095, 1)] {
            let w = Window::map(&f, off as u64, len).unwrap().unwrap();
            assert_eq!(w.bytes(), &data[off..off + len]);
            assert!(!w.faulted());
        }
    }

    #[test]
    fn a_file_truncated_under_a_window_reads_zeros_and_is_flagged() {
        let (_d, path, data) = file_of(4 << 20);
        let f = File::open(&path).unwrap();
        let w = Window::map(&f, 0, data.len()).unwrap().unwrap();
        shrink(&path, 1 << 20);
        let bytes = w.bytes();
        // Reading past the new end would kill the process without the guard.
        let tail_sum: u64 = bytes[2 << 20..].iter().map(|&b| u64::from(b)).sum();
        assert_eq!(tail_sum, 0);
        assert_eq!(&bytes[..1 << 20], &data[..1 << 20]);
        assert!(w.faulted());
        drop(w);
        // The slot is free and clean for the next window.
        let w = Window::map(&f, 0, 1 << 20).unwrap().unwrap();
        assert_eq!(w.bytes(), &data[..1 << 20]);
        assert!(!w.faulted());
    }

    /// A SIGBUS sent to the process (not a fault) does not take the guard
    /// away: a truncation read afterwards is still caught. Runs itself as a
    /// child process, since the sent signal may end it (the test says how).
    #[test]
    fn a_sent_sigbus_leaves_the_guard_in_place() {
        const CHILD: &str = "CCNODE_SIGBUS_SENT_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let (_d, path, _) = file_of(1 << 20);
            let f = File::open(&path).unwrap();
            drop(Window::map(&f, 0, 4096).unwrap().unwrap());
            // SAFETY: raise has no preconditions; the handler chains it.
            unsafe { libc::raise(libc::SIGBUS) };
            let w = Window::map(&f, 0, 1 << 20).unwrap().unwrap();
            shrink(&path, 0);
            let sum: u64 = w.bytes().iter().map(|&b| u64::from(b)).sum();
            println!("guarded sum {sum} faulted {}", w.faulted());
            std::process::exit(0);
        }
        let out = in_child(
            "oms::mapped::tests::a_sent_sigbus_leaves_the_guard_in_place",
            CHILD,
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("guarded sum 0 faulted true"),
            "child: {:?} {stdout}",
            out.status
        );
    }

    /// A SIGBUS outside every window still ends the process: the guard must
    /// not swallow real faults. Runs itself as a child process.
    #[test]
    fn a_fault_outside_any_window_still_kills() {
        const CHILD: &str = "CCNODE_SIGBUS_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let (_d, path, _) = file_of(1 << 20);
            let f = File::open(&path).unwrap();
            // Install the guard and use it once.
            drop(Window::map(&f, 0, 4096).unwrap().unwrap());
            // SAFETY: test-only raw mapping, read after the file is
            // truncated to provoke a SIGBUS outside any window.
            let p = unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    1 << 20,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            shrink(&path, 0);
            // SAFETY: deliberately reads a page past the end of the file.
            let b = unsafe { ptr::read_volatile((p as *const u8).add(8192)) };
            println!("read {b} without a fault");
            std::process::exit(0);
        }
        let out = in_child(
            "oms::mapped::tests::a_fault_outside_any_window_still_kills",
            CHILD,
        );
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGBUS),
            "child: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
