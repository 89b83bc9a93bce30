//! The sandbox spawn benchmark (issue 7): spawn-to-ready latency of a
//! trivial worker under the full sandbox versus the same binary spawned
//! plainly, side by side in one run. Goal: overhead under 5 ms at the
//! median.
//!
//! What "ready" means, for each variant:
//!
//! - **plain**: from calling `std::process::Command::spawn` until it
//!   returns. std's `spawn` returns once `execve` has succeeded in the child
//!   (it waits on a CLOEXEC pipe, or uses `posix_spawn`, which does the
//!   same), so this is "the program has been exec'd".
//! - **jailed**: from calling `ccnode_sandbox::spawn` until
//!   `Jailed::wait_started()` returns: the jail has read the profile,
//!   unshared its namespaces, built the read-only root, dropped identity
//!   and capabilities, applied Landlock and seccomp, and the namespace's
//!   init has seen the worker's `execve` succeed (the `started` event).
//!
//! Neither variant counts the dynamic loader or `main` of the worker, and
//! neither counts process exit: the worker is `/usr/bin/sleep 60`, killed
//! (and reaped) after each measurement, outside the timed region.
//!
//! The variants are interleaved (plain, jailed, phases, failing, in turn)
//! so that drift in the machine's load hits all of them alike.
//!
//! - **phases** runs the jail again and stamps the arrival of each report
//!   line: `cgroup` (the jail is past profile, `unshare`, path opening,
//!   seccomp compilation and its fork), `landlock` (the child has built the
//!   root, set hostname, loopback, rlimits, identity and Landlock) and
//!   `started` (seccomp installed, the worker forked and exec'd).
//! - **failing** runs the jail with a program that does not exist: setup
//!   stops at the `paths` stage, after the jail's exec, the profile read
//!   and `unshare`; the figure is spawn until the `error` event.
//!
//! Run: `cargo bench -p ccnode-sandbox --bench spawn` (as root: the jail
//! needs CAP_SYS_ADMIN). Results are printed as a table and as one
//! `BENCH_JSON {...}` line; docs/benchmarks.md records the figures.
//!
//! | variable                | default | meaning                                   |
//! |-------------------------|---------|-------------------------------------------|
//! | `CCNODE_BENCH_SCALE`    | 1.0     | multiplies the counts (0.1 = quick run)   |
//! | `CCNODE_BENCH_SPAWNS`   | 200     | measured spawns per variant               |
//! | `CCNODE_BENCH_WARMUP`   | 10      | unmeasured spawns per variant first       |
//! | `CCNODE_BENCH_WORKER`   | /usr/bin/sleep | the trivial worker (given `60`)    |
//! | `CCNODE_BENCH_SETTLE_MS`| 5       | pause after each teardown, untimed        |
//!
//! The pause lets the kernel finish tearing down the last jail's
//! namespaces (network namespace cleanup runs in a workqueue) before the
//! next measurement starts, so one spawn's teardown is not billed to the
//! next spawn; every variant gets the same pause.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ccnode_sandbox::{spawn, Jailed, Profile};
use ccnode_testkit::bench::{count, env_f64};
use serde_json::{json, Value};

const JAIL: &str = env!("CARGO_BIN_EXE_ccnode-jail");
const NOBODY: u32 = 65534;

/// Latency figures in microseconds.
#[derive(Debug, Clone, Copy)]
struct Summary {
    n: usize,
    min: f64,
    mean: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Summary {
    fn of(samples: &[Duration]) -> Summary {
        assert!(!samples.is_empty(), "no samples");
        let mut s = samples.to_vec();
        s.sort_unstable();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        // Nearest rank: the smallest sample with at least q of all samples
        // at or below it.
        let pct = |q: f64| {
            let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
            us(s[rank - 1])
        };
        Summary {
            n: s.len(),
            min: us(s[0]),
            mean: s.iter().map(|&d| us(d)).sum::<f64>() / s.len() as f64,
            p50: pct(0.50),
            p90: pct(0.90),
            p99: pct(0.99),
            max: us(*s.last().expect("not empty")),
        }
    }

    fn json(&self) -> Value {
        json!({
            "n": self.n,
            "min_us": round1(self.min),
            "mean_us": round1(self.mean),
            "p50_us": round1(self.p50),
            "p90_us": round1(self.p90),
            "p99_us": round1(self.p99),
            "max_us": round1(self.max),
        })
    }

    fn row(&self, name: &str) {
        let ms = |x: f64| x / 1000.0;
        println!(
            "{name:<34} {:>5} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
            self.n,
            ms(self.min),
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.mean),
            ms(self.max)
        );
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn plain_command(worker: &Path) -> Command {
    let mut cmd = Command::new(worker);
    cmd.arg("60")
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn jail_profile(worker: &Path) -> Profile {
    let mut p = Profile::new(worker.to_path_buf(), NOBODY, NOBODY);
    p.args.push("60".into());
    p
}

fn start_jail(p: &Profile) -> Jailed {
    spawn(Path::new(JAIL), &[], p, &[], Stdio::null(), Stdio::null()).expect("spawn the jail")
}

fn reap(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Ends a jail: SIGKILL to the jail takes the namespace's init (parent
/// death signal) and with it the worker.
fn stop(jailed: Jailed) {
    reap(jailed.child);
}

/// The untimed pause after each teardown.
fn settle() {
    let ms = env_f64("CCNODE_BENCH_SETTLE_MS", 5.0);
    if ms > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(ms / 1000.0));
    }
}

fn one_plain(worker: &Path) -> Duration {
    let mut cmd = plain_command(worker);
    let t0 = Instant::now();
    let child = cmd.spawn().expect("spawn the worker plainly");
    let d = t0.elapsed();
    reap(child);
    settle();
    d
}

fn one_jailed(p: &Profile) -> Duration {
    let t0 = Instant::now();
    let mut jailed = start_jail(p);
    let started = jailed.wait_started();
    let d = t0.elapsed();
    if let Err(events) = started {
        panic!("the jailed worker did not start: {events:?}");
    }
    stop(jailed);
    settle();
    d
}

/// Arrival times of the jail's report lines, from the call to `spawn`.
#[derive(Default)]
struct Phases {
    spawn_returned: Vec<Duration>,
    cgroup: Vec<Duration>,
    landlock: Vec<Duration>,
    started: Vec<Duration>,
}

fn one_phased(p: &Profile, phases: &mut Phases) {
    let t0 = Instant::now();
    let mut jailed = start_jail(p);
    phases.spawn_returned.push(t0.elapsed());
    let mut line = String::new();
    loop {
        line.clear();
        let n = jailed.reports.read_line(&mut line).expect("read reports");
        assert!(n > 0, "the jail ended before the worker started");
        let at = t0.elapsed();
        let v: Value = serde_json::from_str(&line).expect("a JSON report line");
        match v["event"].as_str() {
            Some("cgroup") => phases.cgroup.push(at),
            Some("landlock") => phases.landlock.push(at),
            Some("started") => {
                phases.started.push(at);
                break;
            }
            Some("error") => panic!("setup failed: {v}"),
            _ => {}
        }
    }
    stop(jailed);
    settle();
}

fn one_failing(p: &Profile) -> Duration {
    let t0 = Instant::now();
    let mut jailed = start_jail(p);
    let r = jailed.wait_started();
    let d = t0.elapsed();
    match r {
        Err(events) => {
            let last = events.last().expect("an error event");
            assert_eq!(last["stage"], "paths", "{last}");
        }
        Ok(_) => panic!("a missing program started"),
    }
    let _ = jailed.child.wait();
    settle();
    d
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the spawn benchmark runs the jail, which needs root; skipped");
        return;
    }
    let scale = env_f64("CCNODE_BENCH_SCALE", 1.0);
    let n = count("CCNODE_BENCH_SPAWNS", 200, scale, 5);
    let warmup = count("CCNODE_BENCH_WARMUP", 10, scale.min(1.0), 5);
    let worker = PathBuf::from(
        std::env::var("CCNODE_BENCH_WORKER").unwrap_or_else(|_| "/usr/bin/sleep".into()),
    );
    let profile = jail_profile(&worker);
    let failing = jail_profile(Path::new("/nonexistent/ccnode-bench-worker"));

    for _ in 0..warmup {
        one_plain(&worker);
        one_jailed(&profile);
        one_failing(&failing);
    }

    let mut plain = Vec::with_capacity(n);
    let mut jailed = Vec::with_capacity(n);
    let mut fails = Vec::with_capacity(n);
    let mut phases = Phases::default();
    for i in 0..n {
        // Rotate the order so no variant always follows the same one.
        for k in 0..4 {
            match (i + k) % 4 {
                0 => plain.push(one_plain(&worker)),
                1 => jailed.push(one_jailed(&profile)),
                2 => one_phased(&profile, &mut phases),
                _ => fails.push(one_failing(&failing)),
            }
        }
    }

    let s_plain = Summary::of(&plain);
    let s_jailed = Summary::of(&jailed);
    let s_fail = Summary::of(&fails);
    let s_ret = Summary::of(&phases.spawn_returned);
    let s_cg = Summary::of(&phases.cgroup);
    let s_ll = Summary::of(&phases.landlock);
    let s_st = Summary::of(&phases.started);
    // Per-run phase lengths, so their medians are medians of durations.
    let diff = |a: &[Duration], b: &[Duration]| -> Vec<Duration> {
        a.iter().zip(b).map(|(a, b)| b.saturating_sub(*a)).collect()
    };
    let d_setup = Summary::of(&diff(&phases.spawn_returned, &phases.cgroup));
    let d_child = Summary::of(&diff(&phases.cgroup, &phases.landlock));
    let d_exec = Summary::of(&diff(&phases.landlock, &phases.started));

    let overhead_ms = (s_jailed.p50 - s_plain.p50) / 1000.0;
    let ratio = s_jailed.p50 / s_plain.p50;
    let goal_met = overhead_ms < 5.0;

    println!(
        "sandbox spawn-to-ready, worker {} 60, {n} spawns per variant (ms)",
        worker.display()
    );
    println!(
        "{:<34} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "variant", "n", "min", "p50", "p90", "p99", "mean", "max"
    );
    s_plain.row("plain Command::spawn");
    s_jailed.row("jailed spawn..wait_started");
    s_fail.row("jail, missing program (to error)");
    println!("phases of the jailed start, from the call to spawn:");
    s_ret.row("  spawn() returned (jail exec'd)");
    s_cg.row("  `cgroup` event");
    s_ll.row("  `landlock` event");
    s_st.row("  `started` event");
    println!("phase lengths:");
    d_setup.row("  jail: profile..fork");
    d_child.row("  child: root..landlock");
    d_exec.row("  seccomp, fork, exec worker");
    println!(
        "overhead at the median: {overhead_ms:.3} ms ({ratio:.1}x plain); goal < 5 ms: {}",
        if goal_met { "met" } else { "MISSED" }
    );

    let report = json!({
        "bench": "sandbox_spawn",
        "worker": worker.display().to_string(),
        "spawns": n,
        "plain": s_plain.json(),
        "jailed": s_jailed.json(),
        "jail_missing_program": s_fail.json(),
        "phases_from_spawn": {
            "spawn_returned": s_ret.json(),
            "cgroup": s_cg.json(),
            "landlock": s_ll.json(),
            "started": s_st.json(),
        },
        "phase_lengths": {
            "jail_profile_to_fork": d_setup.json(),
            "child_root_to_landlock": d_child.json(),
            "seccomp_fork_exec": d_exec.json(),
        },
        "overhead_p50_ms": (overhead_ms * 1000.0).round() / 1000.0,
        "ratio_p50": (ratio * 10.0).round() / 10.0,
        "goal_met": goal_met,
    });
    println!("BENCH_JSON {report}");
}
