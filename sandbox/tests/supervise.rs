//! Supervision of real jailed workers: the lifecycle, why each ended,
//! restarts with backoff, and workers that misbehave on their control
//! socket or never answer.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use ccnode_sandbox::supervise::{Event, ExitReason, Policy, Spec, Supervisor, WorkerState};
use ccnode_sandbox::Profile;

const JAIL: &str = env!("CARGO_BIN_EXE_ccnode-jail");
const WORKER: &str = env!("CARGO_BIN_EXE_ccnode-test-worker");
const PATIENCE: Duration = Duration::from_secs(60);

/// For a fake jail (a bash script): the report pipe, which spawn() leaves
/// at the second number of `CCNODE_JAIL_FDS`, at fd 4.
const REPORT_AT_4: &str = r#"r=${CCNODE_JAIL_FDS#*,}; exec 4>&"${r%%,*}"; "#;

fn spec(mode: &[&str], uid: u32) -> Spec {
    let mut p = Profile::new(PathBuf::from(WORKER), uid, uid);
    p.args = std::iter::once(WORKER)
        .chain(mode.iter().copied())
        .map(str::to_owned)
        .collect();
    Spec {
        jail: PathBuf::from(JAIL),
        jail_args: Vec::new(),
        profile: p,
        extra_fds: Vec::new(),
        init: None,
        frames: None,
    }
}

fn quick() -> Policy {
    Policy {
        ready_timeout: Duration::from_secs(2),
        health_interval: Duration::from_millis(200),
        health_timeout: Duration::from_secs(2),
        max_frames_per_sec: 200,
        max_restarts: 0,
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        stop_grace: Duration::from_secs(2),
        ..Policy::default()
    }
}

/// The next end of a life: why, the restart delay, and whether the worker
/// may have outlived its jail.
fn next_exit_outlived(rx: &Receiver<Event>) -> (ExitReason, Option<Duration>, bool) {
    loop {
        if let Event::Exited {
            reason,
            restart_in,
            outlived,
        } = rx.recv_timeout(PATIENCE).expect("an event")
        {
            return (reason, restart_in, outlived);
        }
    }
}

/// The next end of a life whose namespace is known to be gone.
fn next_exit(rx: &Receiver<Event>) -> (ExitReason, Option<Duration>) {
    let (reason, restart_in, outlived) = next_exit_outlived(rx);
    assert!(!outlived, "{reason:?}: the jail had to be SIGKILLed");
    (reason, restart_in)
}

fn wait_state(rx: &Receiver<Event>, want: WorkerState) {
    loop {
        match rx.recv_timeout(PATIENCE).expect("an event") {
            Event::State(s) if s == want => return,
            Event::Exited { reason, .. } => panic!("ended before {want:?}: {reason:?}"),
            _ => {}
        }
    }
}

#[test]
fn a_worker_goes_through_its_lifecycle_and_stops_on_request() {
    let (tx, rx) = mpsc::channel();
    let sup = Supervisor::start(spec(&["well"], 65534), quick(), tx).unwrap();
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(PATIENCE).unwrap() {
            Event::State(s) => {
                seen.push(s);
                if s == WorkerState::Ready {
                    break;
                }
            }
            Event::Exited { reason, .. } => panic!("{reason:?}"),
            Event::Stderr(l) => panic!("unexpected stderr: {l}"),
        }
    }
    assert_eq!(
        seen,
        [
            WorkerState::Starting,
            WorkerState::Loading,
            WorkerState::Ready
        ]
    );
    // It answers health checks: still ready several intervals later.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(sup.state(), WorkerState::Ready);
    assert!(sup.stop(), "every process of it is gone");
    let (reason, restart) = next_exit(&rx);
    assert_eq!(reason, ExitReason::Stopped);
    assert_eq!(restart, None, "a requested stop does not restart");
}

#[test]
fn kill_ends_a_worker_now() {
    let (tx, rx) = mpsc::channel();
    let sup = Supervisor::start(spec(&["ignore-shutdown"], 65534), quick(), tx).unwrap();
    wait_state(&rx, WorkerState::Ready);
    assert!(sup.kill(), "every process of it is gone");
    assert_eq!(next_exit(&rx), (ExitReason::Killed, None));
}

#[test]
fn kill_ends_a_worker_that_sends_a_frame_a_byte_at_a_time() {
    // Reading such a frame to its end would hold the supervisor for
    // twenty minutes, the kill unread.
    let (tx, rx) = mpsc::channel();
    let policy = Policy {
        health_interval: Duration::from_secs(3600),
        ..quick()
    };
    let sup = Supervisor::start(spec(&["trickle"], 65534), policy, tx).unwrap();
    wait_state(&rx, WorkerState::Ready);
    // Time for the supervisor to be well into the frame (it follows
    // `ready` at once): the kill must be looked at between its bytes.
    // Too short a wait only lets the kill be seen before the frame.
    std::thread::sleep(Duration::from_millis(500));
    assert!(sup.kill(), "every process of it is gone");
    assert_eq!(next_exit(&rx), (ExitReason::Killed, None));
}

#[test]
fn a_worker_that_ignores_shutdown_is_ended_after_its_grace() {
    let (tx, rx) = mpsc::channel();
    let sup = Supervisor::start(spec(&["ignore-shutdown"], 65534), quick(), tx).unwrap();
    wait_state(&rx, WorkerState::Ready);
    assert!(sup.stop(), "every process of it is gone");
    assert_eq!(next_exit(&rx).0, ExitReason::Stopped);
}

#[test]
fn crashes_restart_with_growing_backoff_then_give_up() {
    let (tx, rx) = mpsc::channel();
    let policy = Policy {
        max_restarts: 2,
        ..quick()
    };
    let _sup = Supervisor::start(spec(&["exit", "3"], 65534), policy, tx).unwrap();
    let delays: Vec<Option<Duration>> = (0..3)
        .map(|_| {
            let (reason, delay) = next_exit(&rx);
            assert_eq!(reason, ExitReason::Code(3));
            delay
        })
        .collect();
    assert_eq!(
        delays,
        [
            Some(Duration::from_millis(50)),
            Some(Duration::from_millis(100)),
            None
        ]
    );
}

#[test]
fn each_kind_of_misbehaviour_is_named() {
    for (mode, expected) in [
        (&["sigsys"][..], "seccomp_violation"),
        (&["silent"][..], "ready_timeout"),
        (&["flood"][..], "control_flood"),
        // A `ready` after the first of a life is noise like any other.
        (&["flood-ready"][..], "control_flood"),
        // Its socket closed, the worker is deaf to every command: it is
        // not waited for.
        (&["close-linger"][..], "protocol_violation"),
        (&["oversize"][..], "protocol_violation"),
        // Its `healthy` would come after a frame that takes twenty
        // minutes: it does not answer in time.
        (&["trickle"][..], "unresponsive"),
        (&["malformed"][..], "protocol_violation"),
        (&["exit", "0"][..], "exited_ok"),
    ] {
        let (tx, rx) = mpsc::channel();
        let _sup = Supervisor::start(spec(mode, 65534), quick(), tx).unwrap();
        let (reason, _) = next_exit(&rx);
        assert_eq!(reason.label(), expected, "{mode:?}: {reason:?}");
    }
}

/// A worker that stops reading its control socket never blocks whoever
/// sends to it (ccnoded sends from its async runtime's threads): frames
/// queue up to [`SEND_QUEUE`], then are refused, however long the write
/// timeout. With writes made by the caller, the first frame larger than
/// the socket's buffer would have held it for the whole timeout (an hour
/// here).
#[test]
fn a_worker_that_stops_reading_never_blocks_its_sender() {
    use ccnode_sandbox::supervise::SEND_QUEUE;
    let (tx, rx) = mpsc::channel();
    let policy = Policy {
        health_interval: Duration::from_secs(3600),
        health_timeout: Duration::from_secs(3600),
        ..quick()
    };
    let sup = Supervisor::start(spec(&["deaf"], 65534), policy, tx).unwrap();
    wait_state(&rx, WorkerState::Ready);
    let sender = sup.sender();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let big = serde_json::json!({"v": 1, "type": "noise", "pad": "x".repeat(1 << 20)});
        let sent: Vec<bool> = (0..SEND_QUEUE * 4).map(|_| sender.send(&big)).collect();
        let _ = done_tx.send(sent);
    });
    let sent = done_rx
        .recv_timeout(PATIENCE)
        .expect("a send waited on a worker that does not read");
    assert!(sent[0], "the first frame is queued");
    let accepted = sent.iter().filter(|s| **s).count();
    assert!(
        accepted <= SEND_QUEUE + 2,
        "{accepted} frames of 1 MiB taken for a worker that reads none"
    );
    assert!(!sent[sent.len() - 1], "a full queue refuses");
    assert!(sup.kill(), "every process of it is gone");
    assert_eq!(next_exit(&rx).0, ExitReason::Killed);
}

/// When ccnoded's own write to a worker that does not read times out, the
/// worker is ended as unresponsive (not blamed for closing the socket,
/// which the writer shut down).
#[test]
fn a_write_that_times_out_ends_the_worker_as_unresponsive() {
    let (tx, rx) = mpsc::channel();
    let policy = Policy {
        health_interval: Duration::from_secs(3600),
        health_timeout: Duration::from_millis(300),
        ..quick()
    };
    let sup = Supervisor::start(spec(&["deaf"], 65534), policy, tx).unwrap();
    wait_state(&rx, WorkerState::Ready);
    let big = serde_json::json!({"v": 1, "type": "noise", "pad": "x".repeat(1 << 20)});
    assert!(sup.sender().send(&big));
    assert_eq!(next_exit(&rx).0, ExitReason::Unresponsive);
}

/// A `close-linger` worker whose conversation has ended (its socket shut
/// down): the supervisor is giving it a few seconds to exit.
fn lingering(policy: Policy) -> (Supervisor, Receiver<Event>) {
    let (tx, rx) = mpsc::channel();
    let sup = Supervisor::start(spec(&["close-linger"], 65534), policy, tx).unwrap();
    wait_state(&rx, WorkerState::Ready);
    // The conversation is over once the state says stopping.
    wait_state(&rx, WorkerState::Stopping);
    (sup, rx)
}

/// While the supervisor gives a worker that closed its socket a few
/// seconds to exit, a kill (a quarantine) is not held for them.
#[test]
fn a_kill_while_a_worker_is_given_time_to_exit_is_applied() {
    let (sup, rx) = lingering(quick());
    assert!(sup.kill(), "every process of it is gone");
    assert_eq!(next_exit(&rx), (ExitReason::Killed, None));
}

/// A stop that comes while the supervisor gives a worker time to exit is
/// not lost: the worker is not started again, and the stop returns.
#[test]
fn a_stop_while_a_worker_is_given_time_to_exit_is_kept() {
    let (sup, rx) = lingering(Policy {
        max_restarts: 3,
        ..quick()
    });
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        assert!(sup.stop(), "every process of it is gone");
        let _ = done_tx.send(());
    });
    done_rx
        .recv_timeout(PATIENCE)
        .expect("the stop was lost: the worker was started again");
    let (_, restart) = next_exit(&rx);
    assert_eq!(restart, None, "started again after a stop");
}

/// A "jail" that never reports: its setup hangs.
fn hanging_setup() -> Spec {
    let mut s = spec(&["well"], 65534);
    s.jail = PathBuf::from("/usr/bin/sleep");
    s.jail_args = vec!["600".into()];
    s
}

#[test]
fn a_kill_during_a_hanging_setup_is_applied_at_once() {
    for stop in [false, true] {
        let (tx, rx) = mpsc::channel();
        let policy = Policy {
            setup_timeout: Duration::from_secs(3600),
            max_restarts: 3,
            ..quick()
        };
        let sup = Supervisor::start(hanging_setup(), policy, tx).unwrap();
        let jail = loop {
            if let Some(pid) = sup.pid() {
                break pid;
            }
            assert_eq!(sup.state(), WorkerState::Starting);
            std::thread::sleep(Duration::from_millis(10));
        };
        let killer = sup.killer();
        let done = std::thread::spawn(move || if stop { sup.stop() } else { sup.kill() });
        let want = if stop {
            ExitReason::Stopped
        } else {
            ExitReason::Killed
        };
        assert_eq!(next_exit(&rx), (want, None), "stop: {stop}");
        done.join().unwrap();
        drop(killer);
        // Ended and reaped, not left behind.
        assert!(!std::path::Path::new(&format!("/proc/{jail}")).exists());
    }
}

#[test]
fn a_jail_that_will_not_end_is_killed_and_its_worker_presumed_alive() {
    // A "jail" that says the worker started, then ignores the kill
    // signal: as one whose worker is stuck in the kernel would stay.
    let mut s = spec(&["well"], 65534);
    s.jail = PathBuf::from("/bin/bash");
    s.jail_args = vec![
        "-c".into(),
        format!(
            "{REPORT_AT_4}trap '' USR1 TERM; echo '{{\"event\":\"started\",\"pid\":1}}' >&4; exec sleep 600"
        ),
    ];
    let policy = Policy {
        kill_grace: Duration::from_millis(300),
        ready_timeout: Duration::from_millis(300),
        max_restarts: 3,
        ..quick()
    };
    let (tx, rx) = mpsc::channel();
    let sup = Supervisor::start(s, policy, tx).unwrap();
    let (reason, restart_in, outlived) = next_exit_outlived(&rx);
    assert_eq!(reason, ExitReason::ReadyTimeout);
    assert!(outlived, "SIGKILLed after its grace");
    assert_eq!(restart_in, None, "not restarted onto the same device");
    assert!(sup.outlived());
    // Pid 1 with no start time: never taken to be the init, so never gone.
    assert!(!sup.remains().watched());
    assert!(!sup.remains().wait_gone(Some(Duration::from_millis(10))));
    assert!(!sup.kill(), "kill says the worker may live on");
}

#[test]
fn a_jail_killed_from_outside_is_presumed_to_leave_its_worker() {
    // SIGKILL to the jail from someone else: init follows by its
    // parent-death signal, but the jail never said how the worker ended.
    let (tx, rx) = mpsc::channel();
    let sup = Supervisor::start(
        spec(&["well"], 65534),
        Policy {
            max_restarts: 3,
            ..quick()
        },
        tx,
    )
    .unwrap();
    wait_state(&rx, WorkerState::Ready);
    let remains = sup.remains();
    assert!(remains.watched(), "the jail's init was seen");
    let jail = sup.pid().expect("a jail runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(jail),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (reason, restart_in, outlived) = next_exit_outlived(&rx);
    assert_eq!(reason, ExitReason::Signal(libc::SIGKILL));
    assert!(outlived);
    assert_eq!(restart_in, None);
    assert!(!sup.kill());
    // Init followed its jail, and the namespace with it: the device may be
    // given back now.
    assert!(remains.wait_gone(Some(PATIENCE)), "the namespace is gone");
}

#[test]
fn remains_are_gone_only_when_the_reported_init_is() {
    // A "jail" that reports a real process (its child, not in a namespace
    // of its own, so nothing ends it with the jail) as its init, then
    // ignores the kill signal. With the start time, and without (as where
    // ccnoded may not read the worker's /proc entry): then the jail's
    // children vouch for it.
    for start_time in ["$t", "null"] {
        let mut s = spec(&["well"], 65534);
        s.jail = PathBuf::from("/bin/bash");
        s.jail_args = vec![
            "-c".into(),
            format!(
                r#"{REPORT_AT_4}trap '' USR1 TERM; sleep 600 & t=$(cut -d' ' -f22 /proc/$!/stat)
printf '{{"event":"started","pid":%s,"start_time":%s}}\n' $! {start_time} >&4
echo $! >&2; exec sleep 600"#
            ),
        ];
        let policy = Policy {
            kill_grace: Duration::from_millis(300),
            ready_timeout: Duration::from_millis(300),
            ..quick()
        };
        let (tx, rx) = mpsc::channel();
        let sup = Supervisor::start(s, policy, tx).unwrap();
        let mut init = None;
        let (reason, outlived) = loop {
            match rx.recv_timeout(PATIENCE).expect("an event") {
                Event::Stderr(line) => init = line.trim().parse::<i32>().ok(),
                Event::Exited {
                    reason, outlived, ..
                } => break (reason, outlived),
                _ => {}
            }
        };
        assert_eq!(reason, ExitReason::ReadyTimeout, "{start_time}");
        assert!(outlived);
        let init = init.expect("the init's pid on stderr");
        let remains = sup.remains();
        assert!(remains.watched(), "{start_time}");
        // The jail is gone; what it reported as init lives on.
        assert!(!remains.wait_gone(Some(Duration::from_millis(100))));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(init),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        assert!(remains.wait_gone(Some(PATIENCE)), "{start_time}");
    }
}

#[test]
fn a_setup_that_hangs_past_its_timeout_fails_without_restart() {
    let (tx, rx) = mpsc::channel();
    let policy = Policy {
        setup_timeout: Duration::from_millis(300),
        max_restarts: 3,
        ..quick()
    };
    let _sup = Supervisor::start(hanging_setup(), policy, tx).unwrap();
    let (reason, restart) = next_exit(&rx);
    match reason {
        ExitReason::SetupFailed { stage, message } => {
            assert_eq!(stage, "start");
            assert!(message.contains("did not start the worker"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(restart, None);
}

#[test]
fn a_workers_stderr_arrives_as_bounded_lines() {
    use ccnode_sandbox::supervise::{MAX_STDERR_LINE, MAX_STDERR_LINES};
    let (tx, rx) = mpsc::channel();
    let _sup = Supervisor::start(spec(&["stderr"], 65534), quick(), tx).unwrap();
    let mut lines = Vec::new();
    let reason = loop {
        match rx.recv_timeout(PATIENCE).expect("an event") {
            Event::Stderr(l) => lines.push(l),
            Event::Exited { reason, .. } => break reason,
            Event::State(_) => {}
        }
    };
    assert_eq!(reason, ExitReason::Code(3));
    assert_eq!(lines.len(), MAX_STDERR_LINES + 1, "{:?}", lines.last());
    assert_eq!(lines[0], "x".repeat(MAX_STDERR_LINE));
    // As written: escaping is for whoever logs it. The rest of the long
    // line did not become lines of its own.
    assert_eq!(lines[1], "forged\rline\u{1b}[2J");
    assert_eq!(lines[2], "line 0");
    assert_eq!(
        lines[MAX_STDERR_LINES - 1],
        format!("line {}", MAX_STDERR_LINES - 3)
    );
    assert_eq!(
        lines[MAX_STDERR_LINES],
        format!("({} more stderr lines not shown)", 1002 - MAX_STDERR_LINES)
    );
}

#[test]
fn setup_failures_do_not_restart() {
    let (tx, rx) = mpsc::channel();
    let mut s = spec(&["well"], 65534);
    s.profile.landlock_min_abi = 60;
    let _sup = Supervisor::start(
        s,
        Policy {
            max_restarts: 5,
            ..quick()
        },
        tx,
    )
    .unwrap();
    let (reason, restart) = next_exit(&rx);
    assert!(
        matches!(&reason, ExitReason::SetupFailed { stage, .. } if stage == "landlock"),
        "{reason:?}"
    );
    assert_eq!(restart, None);
}

#[test]
fn a_fork_bomb_is_contained_by_its_process_limit() {
    // A uid of its own: RLIMIT_NPROC counts every process of the uid.
    let uid = 61_000 + (std::process::id() % 1000);
    let mut s = spec(&["fork-bomb"], uid);
    s.profile.rlimits.processes = 32;
    let (tx, rx) = mpsc::channel();
    let sup = Supervisor::start(s, quick(), tx).unwrap();
    wait_state(&rx, WorkerState::Ready);
    // Still answering health checks after the bomb went off...
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(sup.state(), WorkerState::Ready);
    // ...with no more processes than its limit.
    let count = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("status"))
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(&uid.to_string())
                })
        })
        .count();
    assert!((1..=32).contains(&count), "{count} processes");
    assert!(sup.kill(), "every process of it is gone");
    assert_eq!(next_exit(&rx).0, ExitReason::Killed);
}
