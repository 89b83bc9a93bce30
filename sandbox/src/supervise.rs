//! Supervision of one jailed worker: its lifecycle, its control socket
//! (bounded: frame size, frame rate, deadlines), why it ended, and restarts
//! with exponential backoff.
//!
//! ```text
//! starting ──(jail reports started)──▶ loading ──(worker sends ready)──▶ ready
//!    │                                   │                                │
//!    └──────────────(exit, kill, violation, deadline)────────────────────┴──▶ exited
//!                                         stop: ready ──▶ stopping ──▶ exited
//! ```
//!
//! One thread per worker: every call here blocks (fork, pipes, the control
//! socket), and a node runs a handful of workers, one per GPU or MIG slice.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::control::{self, FrameError};
use crate::profile::Profile;

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Starting,
    Loading,
    Ready,
    Stopping,
    Exited,
}

/// Why a worker ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// It exited by itself with this code.
    Code(i32),
    /// It was killed by a signal other than SIGSYS.
    Signal(i32),
    /// It made a forbidden system call (SIGSYS from seccomp).
    Seccomp,
    /// The jail could not start it.
    SetupFailed { stage: String, message: String },
    /// It did not say `ready` in time.
    ReadyTimeout,
    /// It did not answer a health check in time.
    Unresponsive,
    /// It sent a frame that is too large or malformed.
    ProtocolViolation(String),
    /// It sent frames faster than allowed.
    ControlFlood,
    /// It was stopped on request (drain).
    Stopped,
    /// It was killed on request (quarantine).
    Killed,
}

impl ExitReason {
    /// A stable label for metrics and audit records.
    pub fn label(&self) -> &'static str {
        match self {
            ExitReason::Code(0) => "exited_ok",
            ExitReason::Code(_) => "exited_error",
            ExitReason::Signal(_) => "signal",
            ExitReason::Seccomp => "seccomp_violation",
            ExitReason::SetupFailed { .. } => "setup_failed",
            ExitReason::ReadyTimeout => "ready_timeout",
            ExitReason::Unresponsive => "unresponsive",
            ExitReason::ProtocolViolation(_) => "protocol_violation",
            ExitReason::ControlFlood => "control_flood",
            ExitReason::Stopped => "stopped",
            ExitReason::Killed => "killed",
        }
    }
}

/// What the supervisor tells its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    State(WorkerState),
    /// A line the worker (or its jail) wrote to stderr, as it wrote it
    /// (invalid UTF-8 replaced), cut at [`MAX_STDERR_LINE`] bytes; at most
    /// [`MAX_STDERR_LINES`] a life, then one saying how many more there
    /// were. Untrusted text: escape it before it is logged.
    Stderr(String),
    /// The worker ended; it restarts after `restart_in`, or never.
    Exited {
        reason: ExitReason,
        restart_in: Option<Duration>,
        /// The jail did not end its namespace in time and was SIGKILLed:
        /// the worker may still be running (stuck in the kernel, say),
        /// with its device open. Never restarted then; its device must
        /// not be given to anyone else.
        outlived: bool,
    },
}

/// Limits and restart policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// How long the jail has to set the worker up and start it (a second
    /// or so is usual); longer, it is ended and the life fails
    /// (`SetupFailed`, stage `start`, no restart).
    pub setup_timeout: Duration,
    pub ready_timeout: Duration,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub max_frame: usize,
    pub max_frames_per_sec: u32,
    /// Restarts after unexpected ends before giving up; the count starts
    /// again after a life longer than `backoff_max`.
    pub max_restarts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How long a stopped worker has to exit before SIGTERM, then SIGKILL.
    pub stop_grace: Duration,
    /// How long a jail asked to end its worker has before it is SIGKILLed
    /// (then the worker may outlive it: [`Event::Exited`]'s `outlived`).
    pub kill_grace: Duration,
    /// Exit codes that mean a restart cannot help (the worker refused its
    /// input, e.g. a model it cannot load): no restart after them.
    pub no_restart_codes: Vec<i32>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            setup_timeout: Duration::from_secs(30),
            ready_timeout: Duration::from_secs(120),
            health_interval: Duration::from_secs(5),
            health_timeout: Duration::from_secs(5),
            max_frame: control::DEFAULT_MAX_FRAME,
            max_frames_per_sec: 1000,
            max_restarts: 5,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            stop_grace: Duration::from_secs(30),
            kill_grace: KILL_GRACE,
            no_restart_codes: Vec::new(),
        }
    }
}

/// What to run. The control socket is passed first (the worker's fd 3),
/// then `extra_fds` (4, 5, ...); `profile.passed_fds` is set accordingly.
#[derive(Debug)]
pub struct Spec {
    pub jail: PathBuf,
    pub jail_args: Vec<String>,
    pub profile: Profile,
    pub extra_fds: Vec<OwnedFd>,
    /// Sent to the worker as its first frame in every life (e.g. the
    /// inference `load`), as soon as the jail reports it started.
    pub init: Option<Value>,
    /// Gets every frame the worker sends except `healthy` (including
    /// `ready`), on the supervision thread, in order.
    pub frames: Option<FrameSink>,
}

/// A receiver of worker frames (see [`Spec::frames`]). It returns whether
/// the frame was expected (an answer to something asked): those do not
/// count against `Policy::max_frames_per_sec`.
#[derive(Clone)]
pub struct FrameSink(pub Arc<dyn Fn(Value) -> bool + Send + Sync>);

impl std::fmt::Debug for FrameSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameSink")
    }
}

/// How long a jail asked to end its worker ([`crate::jail::KILL_SIGNAL`])
/// has to kill its namespace, remove the cgroups and exit before it is
/// itself SIGKILLed: the default of [`Policy::kill_grace`].
pub const KILL_GRACE: Duration = Duration::from_secs(10);

/// Frames queued for one worker before [`ControlSender::send`] refuses
/// more: a generation's request, its cancel and the health checks fit many
/// times over; a worker that stops reading fills it at once.
pub const SEND_QUEUE: usize = 16;

/// Writes frames to the worker's control socket from any thread, without
/// waiting for the supervision loop or for the worker: frames go to a
/// bounded queue that a writer thread of this worker's life empties into
/// the socket (with the policy's write timeout), so a worker that stops
/// reading never blocks the caller (an async runtime's thread, say).
#[derive(Debug, Clone, Default)]
pub struct ControlSender {
    queue: Arc<Mutex<Option<mpsc::SyncSender<Vec<u8>>>>>,
    /// Set by the writer when a write to this life failed (and it shut the
    /// socket down): the end of file the supervision loop then reads is
    /// ccnoded's doing, not the worker's.
    write_failed: Arc<AtomicBool>,
}

impl ControlSender {
    /// Queues `v` for the worker; never waits. `false` when no worker is
    /// alive, when its socket has failed (a write timed out or the worker
    /// closed it: the writer then shuts the socket down, which the
    /// supervision loop sees), or when [`SEND_QUEUE`] frames are waiting.
    pub fn send(&self, v: &Value) -> bool {
        let Ok(frame) = control::encode_frame(v) else {
            return false;
        };
        let guard = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().is_some_and(|q| q.try_send(frame).is_ok())
    }

    /// Whether this life's writer gave up (see `write_failed`).
    fn write_failed(&self) -> bool {
        self.write_failed.load(Ordering::Acquire)
    }

    /// Starts writing to `s` (a new life's socket), or stops (`None`): the
    /// old writer ends once what it has queued is written or fails.
    fn set(&self, s: Option<UnixStream>) {
        self.write_failed.store(false, Ordering::Release);
        let failed = self.write_failed.clone();
        let queue = s.and_then(|mut s| {
            let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(SEND_QUEUE);
            std::thread::Builder::new()
                .name("ccnode-ctl-write".into())
                .spawn(move || {
                    for frame in rx {
                        if std::io::Write::write_all(&mut s, &frame).is_err() {
                            // A partial frame may be on the stream: nothing
                            // more can be said on it.
                            failed.store(true, Ordering::Release);
                            let _ = s.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                    }
                })
                .ok()
                .map(|_| tx)
        });
        *self.queue.lock().unwrap_or_else(|e| e.into_inner()) = queue;
    }
}

enum Command {
    Stop,
    Kill,
}

/// A supervised worker.
#[derive(Debug)]
pub struct Supervisor {
    commands: Sender<Command>,
    state: Arc<Mutex<WorkerState>>,
    sender: ControlSender,
    pid: Arc<Mutex<Option<i32>>>,
    outlived: Arc<AtomicBool>,
    remains: crate::remains::Remains,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// Starts supervising; events go to `events`. Fails only if the
    /// supervision thread cannot be spawned (the process is out of threads
    /// or memory): the caller gives back what it set aside for the worker.
    pub fn start(spec: Spec, policy: Policy, events: Sender<Event>) -> std::io::Result<Supervisor> {
        let (tx, rx) = mpsc::channel();
        let state = Arc::new(Mutex::new(WorkerState::Starting));
        let sender = ControlSender::default();
        let pid = Arc::new(Mutex::new(None));
        let outlived = Arc::new(AtomicBool::new(false));
        let remains = crate::remains::Remains::default();
        let life = Life {
            state: state.clone(),
            sender: sender.clone(),
            pid: pid.clone(),
            outlived: outlived.clone(),
            remains: remains.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("ccnode-supervise".into())
            .spawn(move || run(spec, policy, rx, events, life))?;
        Ok(Supervisor {
            commands: tx,
            state,
            sender,
            pid,
            outlived,
            remains,
            thread: Some(thread),
        })
    }

    /// The worker's PID namespace, to wait for when a life may have
    /// outlived its jail ([`Supervisor::outlived`]): usable after this
    /// handle is stopped or dropped.
    pub fn remains(&self) -> crate::remains::Remains {
        self.remains.clone()
    }

    /// Writes frames to the current worker (see [`ControlSender`]).
    pub fn sender(&self) -> ControlSender {
        self.sender.clone()
    }

    /// A handle that ends this worker now from any thread, even while
    /// another waits in [`Supervisor::stop`] for its grace to run out.
    pub fn killer(&self) -> Killer {
        Killer(self.commands.clone())
    }

    /// The jail's pid in the current life, if one runs.
    pub fn pid(&self) -> Option<i32> {
        *self.pid.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> WorkerState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a life of this worker may have outlived its jail (see
    /// [`Event::Exited`]'s `outlived`).
    pub fn outlived(&self) -> bool {
        self.outlived.load(Ordering::Acquire)
    }

    /// Drain: ask the worker to finish and exit; SIGTERM, then SIGKILL,
    /// after the grace period. No restart. Blocks until it has ended, and
    /// returns whether every process of it is known to be gone (false:
    /// [`Supervisor::outlived`]).
    #[must_use = "a worker that outlived its jail still holds its device"]
    pub fn stop(mut self) -> bool {
        let _ = self.commands.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        !self.outlived()
    }

    /// Quarantine: end it now. No restart. Blocks until it has ended, and
    /// returns as [`Supervisor::stop`] does.
    #[must_use = "a worker that outlived its jail still holds its device"]
    pub fn kill(mut self) -> bool {
        let _ = self.commands.send(Command::Kill);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        !self.outlived()
    }
}

/// Ends a supervised worker now (SIGKILL, no restart); see
/// [`Supervisor::killer`]. Does nothing once the supervision has ended.
#[derive(Debug, Clone)]
pub struct Killer(Sender<Command>);

impl Killer {
    pub fn kill(&self) {
        let _ = self.0.send(Command::Kill);
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Kill);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn set(state: &Mutex<WorkerState>, events: &Sender<Event>, s: WorkerState) {
    *state.lock().unwrap_or_else(|e| e.into_inner()) = s;
    let _ = events.send(Event::State(s));
}

/// What one life shares with the [`Supervisor`] handle.
struct Life {
    state: Arc<Mutex<WorkerState>>,
    sender: ControlSender,
    pid: Arc<Mutex<Option<i32>>>,
    outlived: Arc<AtomicBool>,
    remains: crate::remains::Remains,
}

fn run(spec: Spec, policy: Policy, commands: Receiver<Command>, events: Sender<Event>, life: Life) {
    let state = &life.state;
    let mut failures = 0u32;
    loop {
        set(state, &events, WorkerState::Starting);
        let began = Instant::now();
        let mut outlived = false;
        let (reason, requested) =
            run_once(&spec, &policy, &commands, &events, &life, &mut outlived);
        if outlived {
            life.outlived.store(true, Ordering::Release);
        }
        // A worker that ran longer than the longest backoff was not
        // crash-looping: its earlier failures no longer count.
        if began.elapsed() > policy.backoff_max {
            failures = 0;
        }
        life.sender.set(None);
        *life.pid.lock().unwrap_or_else(|e| e.into_inner()) = None;
        set(state, &events, WorkerState::Exited);
        let hopeless = match &reason {
            ExitReason::SetupFailed { .. } => true,
            ExitReason::Code(c) => policy.no_restart_codes.contains(c),
            _ => false,
        };
        // A worker that may still run keeps its device: another life would
        // share it.
        let restart = !requested && !hopeless && !outlived && failures < policy.max_restarts;
        let delay = restart.then(|| {
            let exp = policy
                .backoff_initial
                .saturating_mul(1u32 << failures.min(16));
            exp.min(policy.backoff_max)
        });
        let _ = events.send(Event::Exited {
            reason,
            restart_in: delay,
            outlived,
        });
        let Some(delay) = delay else { return };
        failures += 1;
        match commands.recv_timeout(delay) {
            Ok(_) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// One life of the worker. Returns why it ended, and whether that was
/// asked for (stop or kill); sets `outlived` when the jail had to be
/// SIGKILLed.
fn run_once(
    spec: &Spec,
    policy: &Policy,
    commands: &Receiver<Command>,
    events: &Sender<Event>,
    life: &Life,
    outlived: &mut bool,
) -> (ExitReason, bool) {
    let state = &*life.state;
    let (ours, theirs) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => return (setup_failed("control socket", e), false),
    };
    let mut profile = spec.profile.clone();
    profile.passed_fds = 1 + spec.extra_fds.len() as u32;
    let mut passed = vec![theirs.as_fd()];
    passed.extend(spec.extra_fds.iter().map(|f| f.as_fd()));
    let args: Vec<&str> = spec.jail_args.iter().map(String::as_str).collect();
    let mut jailed = match crate::spawn(
        &spec.jail,
        &args,
        &profile,
        &passed,
        Stdio::null(),
        Stdio::piped(),
    ) {
        Ok(j) => j,
        Err(e) => return (setup_failed("spawn", e), false),
    };
    drop(theirs);
    // The worker's (and the jail's) stderr: bounded lines, as events; never
    // ccnoded's own stderr, where it could write log lines of its choosing.
    let stderr = jailed
        .child
        .stderr
        .take()
        .map(|pipe| StderrLines::start(pipe, events.clone()));
    *life.pid.lock().unwrap_or_else(|e| e.into_inner()) = Some(jailed.child.id() as i32);
    // Setup takes a second or so; one that hangs (a mount, a cgroup
    // write) is ended, and a stop or kill asked for meanwhile is applied
    // at once, not after the worker has started.
    let mut asked = None;
    let started =
        jailed.wait_started_within(policy.setup_timeout, &mut || match commands.try_recv() {
            Ok(c) => {
                asked = Some(c);
                true
            }
            Err(mpsc::TryRecvError::Disconnected) => {
                asked = Some(Command::Kill);
                true
            }
            Err(mpsc::TryRecvError::Empty) => false,
        });
    let reports = std::mem::replace(
        &mut jailed.reports,
        std::io::BufReader::new(tempfile_reader()),
    );
    // Drain the rest of the reports in the background (the jail blocks if
    // nobody reads its pipe), noting whether the jail said how the worker
    // ended.
    let (reports_tx, reports_rx) = mpsc::channel();
    let _ = std::thread::Builder::new()
        .name("ccnode-jail-reports".into())
        .spawn(move || {
            let mut exited = false;
            for line in std::io::BufRead::lines(reports).map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    exited |= v["event"] == "exited";
                }
            }
            let _ = reports_tx.send(exited);
        });
    // Whether the reports, to their end, said `exited`: known a moment
    // after the jail exits (a process stuck in setup may hold the pipe
    // open; it is not waited for). None: not known.
    let late_reports = || reports_rx.recv_timeout(Duration::from_secs(1)).ok();
    if let Ok(evs) = &started {
        // The namespace init, while the jail (its parent, which alone may
        // reap it) still runs or has not been waited for.
        let jail = jailed.child.id() as i32;
        let init = evs.last().and_then(|e| {
            let pid = i32::try_from(e["pid"].as_i64()?).ok()?;
            crate::remains::open_verified(pid, e["start_time"].as_u64(), jail)
        });
        life.remains.set(init);
    }
    if let Err((events_so_far, why)) = started {
        // No worker has run: whatever is left of the jail holds no device
        // open, so ending it decides nothing about the device.
        end_jail(&mut jailed, policy.kill_grace);
        let _ = jailed.child.wait();
        let _ = late_reports();
        if let Some(s) = stderr {
            s.finish();
        }
        match (why, asked) {
            (crate::NotStarted::TimedOut, _) => {
                return (
                    setup_failed(
                        "start",
                        format!(
                            "the jail did not start the worker within {:?}",
                            policy.setup_timeout
                        ),
                    ),
                    false,
                )
            }
            (crate::NotStarted::Aborted, Some(Command::Stop)) => {
                return (ExitReason::Stopped, true)
            }
            (crate::NotStarted::Aborted, _) => return (ExitReason::Killed, true),
            (crate::NotStarted::Failed, _) => {}
        }
        let err = events_so_far.iter().rev().find(|e| e["event"] == "error");
        return (
            ExitReason::SetupFailed {
                stage: err
                    .and_then(|e| e["stage"].as_str())
                    .unwrap_or("start")
                    .to_owned(),
                message: err
                    .and_then(|e| e["message"].as_str())
                    .unwrap_or("the jail ended")
                    .to_owned(),
            },
            false,
        );
    }
    set(state, events, WorkerState::Loading);
    if let Ok(w) = ours.try_clone() {
        let _ = w.set_write_timeout(Some(policy.health_timeout));
        life.sender.set(Some(w));
    }
    if let Some(init) = &spec.init {
        if !life.sender.send(init) {
            *outlived |= end_jail(&mut jailed, policy.kill_grace);
            let _ = jailed.child.wait();
            return (
                setup_failed("init frame", "the worker closed its socket"),
                false,
            );
        }
    }
    let jail_pid = nix::unistd::Pid::from_raw(jailed.child.id() as i32);
    let signal = |s| {
        let _ = nix::sys::signal::kill(jail_pid, s);
    };
    let (mut verdict, mut requested) = converse(
        ours,
        policy,
        commands,
        events,
        state,
        &life.sender,
        spec.frames.as_ref(),
        &signal,
    );
    // The conversation is over: nothing more is sent to this life, and no
    // generation is handed to it while it ends.
    life.sender.set(None);
    if !matches!(verdict, Some(ExitReason::Killed)) {
        set(state, events, WorkerState::Stopping);
    }
    // Waits up to a few seconds for the jail to exit by itself; a kill
    // asked for meanwhile (a quarantine) is not held for them. True if it
    // exited.
    let mut exits_soon = |verdict: &mut Option<ExitReason>| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(jailed.child.try_wait(), Ok(None)) {
                return true;
            }
            match commands.try_recv() {
                Ok(Command::Kill) | Err(mpsc::TryRecvError::Disconnected) => {
                    *verdict = Some(ExitReason::Killed);
                    requested = true;
                    return false;
                }
                // The worker is ending already; a stop asked for now
                // means it is not started again.
                Ok(Command::Stop) => requested = true,
                Err(mpsc::TryRecvError::Empty) => {}
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };
    match &verdict {
        // Ending by request or by violation: the jail goes now.
        Some(reason) if !matches!(reason, ExitReason::Stopped) => {
            *outlived |= end_jail(&mut jailed, policy.kill_grace)
        }
        // A stopped worker has had its grace and a SIGTERM: a few more
        // seconds to exit, then it is ended. Not once it has exited.
        Some(_) => {
            if !exits_soon(&mut verdict) {
                *outlived |= end_jail(&mut jailed, policy.kill_grace);
            }
        }
        // The worker closed its socket: it should be exiting. One that
        // stays, deaf to every command, is ended after the same few
        // seconds.
        None => {
            if !exits_soon(&mut verdict) {
                *outlived |= end_jail(&mut jailed, policy.kill_grace);
                if verdict.is_none() {
                    verdict = Some(ExitReason::ProtocolViolation(
                        "closed its control socket but did not exit".into(),
                    ));
                }
            }
        }
    }
    let status = jailed.child.wait();
    // A jail that exits after its worker started says how the worker ended
    // (`exited`) once its namespace is gone, whether the worker ended by
    // itself or the jail was asked to end it. A jail killed by a signal
    // without that word was killed from outside (SIGKILL by someone, the
    // OOM killer): its init follows by its parent-death signal, but when,
    // and whether the worker goes with it, is not known.
    let said_exited = late_reports() == Some(true);
    match &status {
        Ok(s) if s.signal().is_some() && !said_exited => *outlived = true,
        Err(_) => *outlived = true,
        Ok(_) => {}
    }
    if let Some(s) = stderr {
        s.finish();
    }
    let reason = match verdict {
        Some(r) => r,
        None => match status {
            Ok(s) if s.signal() == Some(libc::SIGSYS) => ExitReason::Seccomp,
            Ok(s) if s.signal().is_some() => ExitReason::Signal(s.signal().unwrap_or(0)),
            Ok(s) => ExitReason::Code(s.code().unwrap_or(-1)),
            Err(e) => ExitReason::ProtocolViolation(format!("cannot wait for the jail: {e}")),
        },
    };
    (reason, requested)
}

fn tempfile_reader() -> std::fs::File {
    std::fs::File::open("/dev/null").expect("/dev/null opens")
}

/// Longest stderr line passed on, bytes; the rest of a longer line is
/// dropped.
pub const MAX_STDERR_LINE: usize = 1024;
/// stderr lines passed on per life; the rest are counted, and the count
/// is passed on at the end.
pub const MAX_STDERR_LINES: usize = 200;

/// Reads a life's stderr into [`Event::Stderr`] events, bounded.
struct StderrLines {
    done: Receiver<()>,
}

impl StderrLines {
    fn start(pipe: std::process::ChildStderr, events: Sender<Event>) -> StderrLines {
        let (tx, done) = mpsc::channel();
        // If no thread can be started, the pipe is dropped with the
        // closure: the worker's writes then fail (EPIPE) rather than block.
        let _ = std::thread::Builder::new()
            .name("ccnode-worker-stderr".into())
            .spawn(move || {
                forward_stderr(std::io::BufReader::new(pipe), &events);
                let _ = tx.send(());
            });
        StderrLines { done }
    }

    /// Waits a moment for the last lines: once the namespace is gone the
    /// pipe has no writer left. A worker that outlives its jail (stuck in
    /// the kernel) is not waited for.
    fn finish(self) {
        let _ = self.done.recv_timeout(Duration::from_secs(1));
    }
}

fn forward_stderr(mut r: impl std::io::BufRead, events: &Sender<Event>) {
    use std::io::{BufRead, Read};
    let (mut sent, mut dropped) = (0usize, 0u64);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut r)
            .take(MAX_STDERR_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        } else if line.len() == MAX_STDERR_LINE {
            // Cut: skip to the end of this line.
            while let Ok(buf) = r.fill_buf() {
                if buf.is_empty() {
                    break;
                }
                match buf.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        r.consume(i + 1);
                        break;
                    }
                    None => {
                        let n = buf.len();
                        r.consume(n);
                    }
                }
            }
        }
        if sent < MAX_STDERR_LINES {
            sent += 1;
            let text = String::from_utf8_lossy(&line).into_owned();
            if events.send(Event::Stderr(text)).is_err() {
                return;
            }
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        let _ = events.send(Event::Stderr(format!(
            "({dropped} more stderr lines not shown)"
        )));
    }
}

/// Ends the jail: asks it to kill its namespace and to wait until every
/// process in it is gone (the worker's device files closed) and its
/// cgroups are removed; SIGKILL only if it has not exited after
/// `grace` (a worker stuck in the kernel, a jail that hangs). Never once
/// the jail is reaped: its pid may already be another process's. True
/// when it had to be SIGKILLed: its namespace may live on.
fn end_jail(jailed: &mut crate::Jailed, grace: Duration) -> bool {
    let pid = nix::unistd::Pid::from_raw(jailed.child.id() as i32);
    match jailed.child.try_wait() {
        Ok(Some(_)) => return false,
        Ok(None) => {}
        // Not ours to wait for any more: what became of it is not known.
        Err(_) => return true,
    }
    let _ = nix::sys::signal::kill(pid, crate::jail::KILL_SIGNAL);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !matches!(jailed.child.try_wait(), Ok(None)) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    true
}

fn setup_failed(stage: &str, e: impl std::fmt::Display) -> ExitReason {
    ExitReason::SetupFailed {
        stage: stage.to_owned(),
        message: e.to_string(),
    }
}

/// Talks to the worker until it ends or must be ended. `Some(reason)` when
/// ccnoded ends it (the jail is then killed, or, for a stop, let go).
#[allow(clippy::too_many_arguments)]
fn converse(
    sock: UnixStream,
    policy: &Policy,
    commands: &Receiver<Command>,
    events: &Sender<Event>,
    state: &Mutex<WorkerState>,
    sender: &ControlSender,
    frames: Option<&FrameSink>,
    signal: &dyn Fn(nix::sys::signal::Signal),
) -> (Option<ExitReason>, bool) {
    use nix::sys::signal::Signal;
    let tick = Duration::from_millis(50);
    let _ = sock.set_read_timeout(Some(tick));
    let _ = sock.set_write_timeout(Some(policy.health_timeout));
    let mut reader = control::FrameReader::new(
        match sock.try_clone() {
            Ok(s) => s,
            Err(e) => return (Some(setup_failed("control socket", e)), false),
        },
        policy.max_frame,
    );
    drop(sock);
    let started = Instant::now();
    let mut ready = false;
    let mut next_health = Instant::now() + policy.health_interval;
    let mut health_due: Option<Instant> = None;
    let mut window = (Instant::now(), 0u32);
    let mut stopping: Option<Instant> = None;
    let mut termed = false;
    loop {
        match commands.try_recv() {
            Ok(Command::Kill) | Err(mpsc::TryRecvError::Disconnected) => {
                return (Some(ExitReason::Killed), true)
            }
            Ok(Command::Stop) if stopping.is_none() => {
                set(state, events, WorkerState::Stopping);
                let _ = sender.send(&control::message("shutdown"));
                stopping = Some(Instant::now());
            }
            _ => {}
        }
        let now = Instant::now();
        if let Some(since) = stopping {
            if now > since + policy.stop_grace + Duration::from_secs(1) {
                return (Some(ExitReason::Stopped), true);
            }
            if now > since + policy.stop_grace && !termed {
                signal(Signal::SIGTERM);
                termed = true;
            }
        } else if !ready && now > started + policy.ready_timeout {
            return (Some(ExitReason::ReadyTimeout), false);
        } else if ready {
            if health_due.is_some_and(|due| now > due) {
                return (Some(ExitReason::Unresponsive), false);
            }
            if health_due.is_none() && now > next_health {
                if !sender.send(&control::message("health")) {
                    return (Some(ExitReason::Unresponsive), false);
                }
                health_due = Some(now + policy.health_timeout);
            }
        }
        // One read at most: a worker that sends a frame a byte at a time
        // must not keep commands and deadlines from being looked at.
        match reader.poll_frame() {
            Ok(None) => {}
            Ok(Some(frame)) => {
                // Every frame counts against the rate limit except those
                // the sink takes as asked for (a token of a running
                // generation): a model may stream thousands a second, a
                // worker may not send noise.
                let counted = match frame["type"].as_str() {
                    Some("ready") if !ready && stopping.is_none() => {
                        ready = true;
                        if let Some(sink) = frames {
                            (sink.0)(frame);
                        }
                        set(state, events, WorkerState::Ready);
                        next_health = Instant::now() + policy.health_interval;
                        true
                    }
                    Some("healthy") => {
                        health_due = None;
                        next_health = Instant::now() + policy.health_interval;
                        true
                    }
                    // Other messages belong to the inference protocol.
                    _ => !frames.is_some_and(|sink| (sink.0)(frame)),
                };
                if counted {
                    if now.duration_since(window.0) >= Duration::from_secs(1) {
                        window = (now, 0);
                    }
                    window.1 += 1;
                    if window.1 > policy.max_frames_per_sec {
                        return (Some(ExitReason::ControlFlood), false);
                    }
                }
            }
            // ccnoded's writer gave up on a worker that does not read.
            Err(FrameError::Closed) if sender.write_failed() => {
                return (Some(ExitReason::Unresponsive), false)
            }
            Err(FrameError::Closed) => {
                // The worker closed its end: it is exiting. Let the exit
                // status say why.
                return (stopping.map(|_| ExitReason::Stopped), stopping.is_some());
            }
            Err(e @ (FrameError::TooLarge { .. } | FrameError::Malformed)) => {
                return (Some(ExitReason::ProtocolViolation(e.to_string())), false)
            }
            Err(FrameError::Io(_)) => return (None, false),
        }
    }
}
