//! VRAM scrubbing between tenants: which device is whose, and the scrub
//! that runs before a device changes hands.
//!
//! Every GPU (MIG off) or MIG device is in one state: `unscrubbed` (found,
//! not scrubbed since ccnoded started), `free` (its last scrub passed),
//! `claimed` by one worker replica, `scrubbing`, or `out_of_service` (its
//! last scrub failed or fell below the policy's coverage). A worker gets a
//! device only from `free`: [`Scrubber::claim`] waits for a scrub in
//! progress and scrubs an unscrubbed device first. [`Scrubber::release`]
//! (the worker is gone for good: unloaded, drained, killed, or ended
//! without a restart) scrubs it before anyone else can claim it. A
//! supervisor's restart of the same replica keeps the claim: the same
//! verified model, for the same tenant, on the same device.
//!
//! A scrub is one `ccnode-scrub` child per device (one CUDA process sees
//! one MIG device), with a cleared environment, `CUDA_VISIBLE_DEVICES` set
//! to the device, its own process group (killed whole at the timeout) and
//! a bounded report. A child that crashes, hangs or reports figures that do
//! not add up ([`ScrubReport::check`]) is a failed scrub.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ccnode_gpu::scrub::{ScrubFailure, ScrubReport, MAX_REPORT_BYTES};
use ccnode_gpu::{BackendKind, GpuBackend};
use serde::Serialize;

use super::lock;
use crate::audit::AuditRecord;
use crate::config::{ScrubAction, ScrubPolicy};
use crate::node::Node;
use crate::state::{Actor, Event, NodeState};
use crate::timefmt::unix_now;

/// Longest stderr kept from a scrub child, for the log.
const MAX_STDERR: usize = 4096;

/// The scrub program: `binary` itself if it is a path; a bare name is
/// looked for next to ccnoded's own executable first (an install puts
/// both in one directory, and so does cargo), then on PATH.
fn scrub_program(binary: &std::path::Path) -> Result<std::path::PathBuf, String> {
    let name = binary.to_string_lossy();
    if !name.contains('/') {
        let beside = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join(binary)));
        if let Some(p) = beside.filter(|p| p.is_file()) {
            return Ok(p);
        }
    }
    crate::workers::resolve_program(&name).map_err(|e| e.to_string())
}

/// Reads at most `max + 1` bytes of `r` on a thread of its own and sends
/// them when `r` ends: a descendant holding the pipe open cannot make the
/// caller wait on it (the caller waits on the channel, with a timeout).
fn read_bounded<R: Read + Send + 'static>(
    r: Option<R>,
    max: usize,
) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(r) = r {
            let _ = r.take(max as u64 + 1).read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}

/// The memory of `device` (a GPU or MIG UUID) in `inv`.
fn device_memory(inv: &ccnode_gpu::Inventory, device: &str) -> Option<u64> {
    inv.gpus.iter().find_map(|g| {
        if g.uuid.eq_ignore_ascii_case(device) {
            Some(g.memory_total_bytes)
        } else {
            g.mig_devices
                .iter()
                .find(|m| m.uuid.eq_ignore_ascii_case(device))
                .map(|m| m.memory_total_bytes)
        }
    })
}

/// The layout of the GPU that holds `device`: its MIG mode and MIG
/// devices. A scrub is only good for the layout it ran under: memory that
/// was a MIG device's, or outside every MIG device, is the whole GPU's
/// again when MIG goes off.
fn layout_of(inv: &ccnode_gpu::Inventory, device: &str) -> Option<String> {
    inv.gpus
        .iter()
        .find(|g| {
            g.uuid.eq_ignore_ascii_case(device)
                || g.mig_devices
                    .iter()
                    .any(|m| m.uuid.eq_ignore_ascii_case(device))
        })
        .map(|g| {
            let migs: Vec<&str> = g.mig_devices.iter().map(|m| m.uuid.as_str()).collect();
            format!("{:?}/{}", g.mig_mode, migs.join(","))
        })
}

/// Where a device stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Unscrubbed,
    Free,
    Claimed {
        token: u64,
        holder: String,
    },
    Scrubbing,
    OutOfService(String),
    /// Given to a worker whose group, from before this ccnoded started,
    /// still holds processes: neither scrubbed nor claimed until every one
    /// of `groups` is empty.
    Held {
        why: String,
        groups: std::collections::BTreeSet<std::path::PathBuf>,
    },
}

impl State {
    fn label(&self) -> &'static str {
        match self {
            State::Unscrubbed => "unscrubbed",
            State::Free => "free",
            State::Claimed { .. } => "claimed",
            State::Scrubbing => "scrubbing",
            State::OutOfService(_) => "out_of_service",
            State::Held { .. } => "held",
        }
    }
}

/// The latest scrub of a device.
#[derive(Debug, Clone, Serialize)]
pub struct LastScrub {
    /// `ok`, `low_coverage`, `timeout`, `crashed`, `bad_report`,
    /// `child_error`, `spawn_failed`.
    pub result: &'static str,
    /// Why the scrub ran: `start`, `release`, `quarantine`, `claim`.
    pub trigger: String,
    /// Unix seconds when it ended.
    pub at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<ScrubReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug)]
struct Dev {
    state: State,
    last: Option<LastScrub>,
    /// The parent GPU's layout its last passing scrub ran under, the same
    /// before and after the scrub; `None` when that is not known.
    layout: Option<String>,
}

/// Why a device cannot be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("device {device} is out of service: {why}")]
    OutOfService { device: String, why: String },
    #[error("device {device} is held by {holder}")]
    Taken { device: String, holder: String },
    #[error("device {device} is still being scrubbed")]
    Busy { device: String },
}

impl ClaimError {
    pub fn code(&self) -> &'static str {
        match self {
            ClaimError::OutOfService { .. } => "device_out_of_service",
            ClaimError::Taken { .. } => "device_taken",
            ClaimError::Busy { .. } => "device_busy",
        }
    }
}

/// A scrub's outcome, before the policy.
struct Outcome {
    result: &'static str,
    report: Option<ScrubReport>,
    error: Option<String>,
}

/// The scrub metrics (docs/metrics.md).
#[derive(Debug, Clone)]
struct ScrubMetrics {
    scrubs: prometheus::IntCounterVec,
    bytes: prometheus::IntCounterVec,
    duration: prometheus::Histogram,
    coverage: prometheus::GaugeVec,
    out_of_service: prometheus::IntGaugeVec,
    enabled: prometheus::IntGauge,
}

impl ScrubMetrics {
    fn new(r: &prometheus::Registry) -> ScrubMetrics {
        use prometheus::{
            GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts,
        };
        fn reg<C: prometheus::core::Collector + Clone + 'static>(
            r: &prometheus::Registry,
            c: C,
        ) -> C {
            let _ = r.register(Box::new(c.clone()));
            c
        }
        ScrubMetrics {
            scrubs: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "ccnode_scrubs_total",
                        "VRAM scrubs by device and result (ok, low_coverage, timeout, crashed, bad_report, child_error, spawn_failed).",
                    ),
                    &["device", "result"],
                )
                .expect("valid metric"),
            ),
            bytes: reg(
                r,
                IntCounterVec::new(
                    Opts::new("ccnode_scrub_bytes_total", "VRAM bytes zeroed and verified, by device."),
                    &["device"],
                )
                .expect("valid metric"),
            ),
            duration: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "ccnode_scrub_duration_seconds",
                        "Time one device's scrub took, child start to report (failed ones too).",
                    )
                    .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]),
                )
                .expect("valid metric"),
            ),
            coverage: reg(
                r,
                GaugeVec::new(
                    Opts::new(
                        "ccnode_scrub_coverage_ratio",
                        "Share of the device's memory the last passing report covered (0 after a failed scrub).",
                    ),
                    &["device"],
                )
                .expect("valid metric"),
            ),
            out_of_service: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "ccnode_scrub_device_out_of_service",
                        "1 while a device is kept from workers because its last scrub failed.",
                    ),
                    &["device"],
                )
                .expect("valid metric"),
            ),
            enabled: reg(
                r,
                IntGauge::new("ccnode_scrub_enabled", "1 when VRAM is scrubbed between tenants (gpu.scrub.enabled).")
                    .expect("valid metric"),
            ),
        }
    }
}

/// The device ledger and the scrubs.
pub struct Scrubber {
    backend: Arc<dyn GpuBackend>,
    policy: ScrubPolicy,
    devices: Mutex<BTreeMap<String, Dev>>,
    /// Leftover worker groups that hold every device while the inventory
    /// could not list the devices to hold: group → why. While any is
    /// here, no device is claimed.
    held_everywhere: Mutex<BTreeMap<std::path::PathBuf, String>>,
    changed: Condvar,
    next_token: std::sync::atomic::AtomicU64,
    metrics: ScrubMetrics,
    node: Arc<Node>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrubber").finish_non_exhaustive()
    }
}

impl Scrubber {
    /// A ledger of `backend`'s devices, none scrubbed yet. Call inside the
    /// tokio runtime.
    pub fn new(
        backend: Arc<dyn GpuBackend>,
        policy: ScrubPolicy,
        node: Arc<Node>,
        registry: &prometheus::Registry,
    ) -> Arc<Scrubber> {
        let metrics = ScrubMetrics::new(registry);
        metrics.enabled.set(i64::from(policy.enabled));
        if !policy.enabled {
            tracing::warn!("VRAM scrubbing is DISABLED (gpu.scrub.enabled = false): devices change tenants unscrubbed");
        }
        Arc::new(Scrubber {
            backend,
            policy,
            devices: Mutex::new(BTreeMap::new()),
            held_everywhere: Mutex::new(BTreeMap::new()),
            changed: Condvar::new(),
            next_token: std::sync::atomic::AtomicU64::new(1),
            metrics,
            node,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    fn fresh_state(&self) -> State {
        if self.policy.enabled {
            State::Unscrubbed
        } else {
            State::Free
        }
    }

    /// The host's devices now (blocking: reads the inventory).
    fn host_devices(&self) -> Vec<String> {
        match self.backend.inventory() {
            Ok(inv) => ccnode_gpu::scrub::devices(&inv),
            Err(e) => {
                tracing::error!(error = %e, "no GPU inventory for the scrub");
                Vec::new()
            }
        }
    }

    /// Scrubs every device that no worker holds and none is scrubbing
    /// (free, unscrubbed and out-of-service ones: a passing scrub brings
    /// those back), at most `gpu.scrub.parallel` at once. Blocking; returns
    /// when all are done.
    pub fn scrub_all(self: &Arc<Self>, trigger: &str) {
        let found = self.host_devices();
        let todo: Vec<String> = {
            let mut devs = lock(&self.devices);
            for d in &found {
                devs.entry(d.clone()).or_insert_with(|| Dev {
                    state: self.fresh_state(),
                    last: None,
                    layout: None,
                });
            }
            if !self.policy.enabled {
                return;
            }
            let todo: Vec<String> = devs
                .iter()
                .filter(|(_, d)| {
                    matches!(
                        d.state,
                        State::Free | State::Unscrubbed | State::OutOfService(_)
                    )
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in &todo {
                if let Some(d) = devs.get_mut(k) {
                    d.state = State::Scrubbing;
                }
            }
            todo
        };
        if todo.is_empty() {
            return;
        }
        tracing::info!(devices = todo.len(), trigger, "scrubbing VRAM");
        let queue = Mutex::new(todo.into_iter());
        std::thread::scope(|s| {
            for _ in 0..self.policy.parallel {
                s.spawn(|| loop {
                    let Some(dev) = lock(&queue).next() else {
                        return;
                    };
                    self.scrub_now(&dev, trigger);
                });
            }
        });
    }

    /// Holds the devices of every worker group a previous run left with
    /// processes in it (under `parents`): a worker that outlived its jail,
    /// or survived a crash of ccnoded, may still use them. The group's name
    /// says which devices its worker was given
    /// (`ccnode_sandbox::cgroup::worker_group_name`); one that does not say
    /// holds every device. Each device stays `held` (not scrubbed, not
    /// claimed) until every group holding it is empty, then is scrubbed.
    /// The processes are left alone: a worker whose ccnoded is gone ends
    /// when its control socket closes, and one stuck in the kernel would
    /// not die of a signal either.
    /// Call at start, before anything can claim a device.
    pub fn hold_leftovers(self: &Arc<Self>, parents: &[std::path::PathBuf]) {
        let groups: Vec<std::path::PathBuf> = parents
            .iter()
            .flat_map(|p| ccnode_sandbox::cgroup::populated_groups(p))
            .collect();
        if groups.is_empty() {
            return;
        }
        let all = self.host_devices();
        let mut watched = Vec::new();
        for group in groups {
            let name = group
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let (devices, which) = match ccnode_sandbox::cgroup::group_devices(&name) {
                Some(d) => (d, "the devices its name gives"),
                None => (
                    all.clone(),
                    "every device (its name does not say which it had)",
                ),
            };
            tracing::error!(
                group = %group.display(),
                devices = ?devices,
                "a worker group from before this start still holds processes: holding {which} until it is empty"
            );
            let why = format!(
                "held while {} (a worker group from before ccnoded started) holds processes",
                group.display()
            );
            if devices.is_empty() {
                if ccnode_sandbox::cgroup::group_devices(&name).is_none() {
                    // Every device, and the inventory lists none now (it
                    // could not be read): hold whatever is claimed later.
                    tracing::error!(
                        group = %group.display(),
                        "no device list to hold: no device is given to anyone until the group is empty"
                    );
                    lock(&self.held_everywhere).insert(group.clone(), why);
                    watched.push((group, Vec::new()));
                }
                continue;
            }
            {
                let mut devs = lock(&self.devices);
                for d in &devices {
                    let dev = devs.entry(d.clone()).or_insert_with(|| Dev {
                        state: State::Unscrubbed,
                        last: None,
                        layout: None,
                    });
                    match &mut dev.state {
                        State::Held { groups, .. } => {
                            groups.insert(group.clone());
                        }
                        other => {
                            *other = State::Held {
                                why: why.clone(),
                                groups: [group.clone()].into(),
                            }
                        }
                    }
                    self.metrics
                        .out_of_service
                        .with_label_values(&[d.as_str()])
                        .set(1);
                }
            }
            watched.push((group, devices));
        }
        let me = self.clone();
        let watch = std::thread::Builder::new()
            .name("ccnode-leftover".into())
            .spawn(move || {
                while !watched.is_empty() {
                    std::thread::sleep(Duration::from_secs(1));
                    watched.retain(|(group, devices)| {
                        if ccnode_sandbox::cgroup::populated(group) {
                            return true;
                        }
                        tracing::warn!(group = %group.display(), "a leftover worker group is empty");
                        lock(&me.held_everywhere).remove(group);
                        for d in devices {
                            me.end_hold(d, group);
                        }
                        false
                    });
                }
            });
        if let Err(e) = watch {
            tracing::error!(error = %e, "no thread to watch leftover worker groups: their devices stay held until ccnoded restarts");
        }
    }

    /// `group` no longer holds `device`: once no group does, it is
    /// scrubbed (or free, with scrubbing off) like one just released.
    fn end_hold(self: &Arc<Self>, device: &str, group: &std::path::Path) {
        {
            let mut devs = lock(&self.devices);
            let Some(d) = devs.get_mut(device) else {
                return;
            };
            let State::Held { groups, .. } = &mut d.state else {
                return;
            };
            groups.remove(group);
            if !groups.is_empty() {
                return;
            }
            if !self.policy.enabled {
                d.state = State::Free;
                self.metrics
                    .out_of_service
                    .with_label_values(&[device])
                    .set(0);
                self.changed.notify_all();
                return;
            }
            d.state = State::Scrubbing;
        }
        self.scrub_now(device, "leftover");
    }

    /// Takes `device` for `holder` (`model/replica`), waiting for a scrub in
    /// progress and scrubbing it first if it never was. Blocking. The token
    /// goes back to [`Scrubber::release`].
    pub fn claim(self: &Arc<Self>, device: &str, holder: &str) -> Result<u64, ClaimError> {
        if let Some(why) = lock(&self.held_everywhere).values().next() {
            return Err(ClaimError::OutOfService {
                device: device.to_owned(),
                why: why.clone(),
            });
        }
        // The layout now, to tell whether the device's last scrub still
        // covers it (a MIG change since makes it unscrubbed again).
        let mut layout = self
            .backend
            .inventory()
            .ok()
            .and_then(|inv| layout_of(&inv, device));
        let mut devs = lock(&self.devices);
        // Long enough for every device queued before this one (a start-up
        // scrub runs `parallel` at a time).
        let rounds = devs.len().div_ceil(self.policy.parallel) as u32 + 1;
        let deadline = Instant::now() + self.policy.timeout * rounds + Duration::from_secs(5);
        // Scrubs this claim may run: one, and one more if the layout moved
        // under the first.
        let mut scrubs_left = 2;
        loop {
            let d = devs.entry(device.to_owned()).or_insert_with(|| Dev {
                state: self.fresh_state(),
                last: None,
                layout: None,
            });
            // Fail closed: a layout that is not known now, or was not known
            // when the device was scrubbed, is a changed one.
            if self.policy.enabled
                && d.state == State::Free
                && (layout.is_none() || d.layout != layout)
            {
                tracing::warn!(
                    device,
                    "the GPU's MIG layout changed (or cannot be read) since the device's last scrub: scrubbing again"
                );
                d.state = State::Unscrubbed;
            }
            match d.state.clone() {
                State::Free => {
                    let token = self
                        .next_token
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    d.state = State::Claimed {
                        token,
                        holder: holder.to_owned(),
                    };
                    return Ok(token);
                }
                State::Claimed { holder: h, .. } => {
                    return Err(ClaimError::Taken {
                        device: device.to_owned(),
                        holder: h,
                    })
                }
                State::OutOfService(why) | State::Held { why, .. } => {
                    return Err(ClaimError::OutOfService {
                        device: device.to_owned(),
                        why,
                    })
                }
                State::Unscrubbed if scrubs_left == 0 => {
                    return Err(ClaimError::Busy {
                        device: device.to_owned(),
                    });
                }
                State::Unscrubbed => {
                    scrubs_left -= 1;
                    d.state = State::Scrubbing;
                    drop(devs);
                    self.scrub_now(device, "claim");
                    devs = lock(&self.devices);
                    // Judge the new scrub against the layout it ran under.
                    if let Some(d) = devs.get(device) {
                        if d.state == State::Free {
                            layout = d.layout.clone().or(layout);
                        }
                    }
                }
                State::Scrubbing => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ClaimError::Busy {
                            device: device.to_owned(),
                        });
                    }
                    devs = self
                        .changed
                        .wait_timeout(devs, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// Gives back a device no worker will touch again (`token` from
    /// [`Scrubber::claim`]) and scrubs it in the background before anyone
    /// else may claim it. A stale token does nothing.
    pub fn release(self: &Arc<Self>, device: &str, token: u64) {
        {
            let mut devs = lock(&self.devices);
            let Some(d) = devs.get_mut(device) else {
                return;
            };
            if !matches!(d.state, State::Claimed { token: t, .. } if t == token) {
                return;
            }
            if !self.policy.enabled {
                d.state = State::Free;
                self.changed.notify_all();
                return;
            }
            d.state = State::Scrubbing;
        }
        let me = self.clone();
        let dev = device.to_owned();
        let spawned = std::thread::Builder::new()
            .name("ccnode-scrub".into())
            .spawn(move || me.scrub_now(&dev, "release"));
        if let Err(e) = spawned {
            // Never leave a device `scrubbing` with nothing running.
            tracing::error!(error = %e, "no thread for a scrub: scrubbing on this one");
            self.scrub_now(device, "release");
        }
    }

    /// Runs one scrub of `device` (already marked scrubbing), records it
    /// and applies the policy.
    fn scrub_now(&self, device: &str, trigger: &str) {
        let layout_now = || {
            self.backend
                .inventory()
                .ok()
                .and_then(|inv| layout_of(&inv, device))
        };
        let before = layout_now();
        let started = Instant::now();
        let out = self.run_child(device);
        let after = layout_now();
        // A scrub covers the layout only if it held still throughout.
        let layout = before.filter(|b| after.as_ref() == Some(b));
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .scrubs
            .with_label_values(&[device, out.result])
            .inc();
        let passed = out.result == "ok";
        if let Some(r) = &out.report {
            self.metrics
                .bytes
                .with_label_values(&[device])
                .inc_by(r.bytes_scrubbed);
        }
        self.metrics
            .coverage
            .with_label_values(&[device])
            .set(match (&out.report, passed) {
                (Some(r), true) => r.coverage,
                _ => 0.0,
            });
        self.metrics
            .out_of_service
            .with_label_values(&[device])
            .set(i64::from(!passed));
        let why = out.error.clone().unwrap_or_default();
        if passed {
            let r = out.report.as_ref().expect("a passing scrub has a report");
            tracing::info!(
                device,
                trigger,
                coverage = r.coverage,
                bytes = r.bytes_scrubbed,
                ms = r.duration_ms,
                "VRAM scrubbed"
            );
        } else {
            tracing::error!(device, trigger, result = out.result, error = %why, "VRAM scrub FAILED: device out of service");
        }
        {
            let mut devs = lock(&self.devices);
            let d = devs.entry(device.to_owned()).or_insert_with(|| Dev {
                state: State::Scrubbing,
                last: None,
                layout: None,
            });
            d.layout = layout;
            d.state = if passed {
                State::Free
            } else {
                State::OutOfService(format!("scrub {}: {why}", out.result))
            };
            d.last = Some(LastScrub {
                result: out.result,
                trigger: trigger.to_owned(),
                at: unix_now(),
                report: out.report,
                error: out.error,
            });
        }
        self.changed.notify_all();
        if !passed {
            self.fail(device, out.result, why);
        }
    }

    /// Audits a failed scrub and, under `on_failure = "quarantine"`,
    /// quarantines the node.
    fn fail(&self, device: &str, result: &'static str, why: String) {
        let node = self.node.clone();
        let action = self.policy.on_failure;
        let reason = format!("VRAM scrub of {device} failed ({result}): {why}");
        self.runtime.spawn(async move {
            node.audit(AuditRecord {
                ts: SystemTime::now(),
                actor: Actor::system("scrub"),
                command: "scrub".into(),
                reason: Some(reason.clone()),
                result: result.into(),
                from: None,
                to: None,
            })
            .await;
            if action == ScrubAction::Quarantine && node.snapshot().state != NodeState::Quarantined
            {
                if let Err(e) = node
                    .transition(Event::Quarantine, Actor::system("scrub"), reason)
                    .await
                {
                    tracing::error!(error = %e, "quarantine after a failed scrub failed");
                }
            }
        });
    }

    /// One child: spawn, bounded read, timeout, judge.
    fn run_child(&self, device: &str) -> Outcome {
        let fail = |result: &'static str, e: String| Outcome {
            result,
            report: None,
            error: Some(e),
        };
        let program = match scrub_program(&self.policy.binary) {
            Ok(p) => p,
            Err(e) => return fail("spawn_failed", e),
        };
        let mut cmd = Command::new(&program);
        cmd.arg("--device")
            .arg(device)
            .arg("--chunk-mib")
            .arg(self.policy.chunk_mib.to_string())
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("CUDA_VISIBLE_DEVICES", device)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if self.backend.kind() == BackendKind::Sim {
            let Some(path) = self
                .backend
                .device_roots()
                .sim_vram
                .and_then(|d| ccnode_gpu::scrub::sim_vram_path(&d, device))
            else {
                return fail(
                    "spawn_failed",
                    "the sim backend has no device tree (device_root), so no sim VRAM".into(),
                );
            };
            cmd.arg("--sim-vram").arg(path);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return fail("spawn_failed", format!("{}: {e}", program.display())),
        };
        let pid = child.id() as i32;
        // Readers on threads of their own, answering over channels: a
        // descendant holding a pipe open cannot make ccnoded wait on it.
        let out = read_bounded(child.stdout.take(), MAX_REPORT_BYTES);
        let err = read_bounded(child.stderr.take(), MAX_STDERR);
        let deadline = Instant::now() + self.policy.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() >= deadline => break None,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return fail("crashed", format!("wait: {e}")),
            }
        };
        let status = match status {
            Some(s) => s,
            None => {
                // The whole group (not yet reaped, so its id is still
                // ours): a child's own children hold the pipes open.
                // SAFETY: kill(2) on our unreaped child's process group.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                // A process stuck in the driver may not die at once: reap
                // it on a thread of its own, and fail the scrub now.
                std::thread::spawn(move || {
                    let _ = child.wait();
                });
                return fail(
                    "timeout",
                    format!(
                        "no report within {}",
                        humantime::format_duration(self.policy.timeout)
                    ),
                );
            }
        };
        // The child is gone; its output follows at once unless something
        // it started still holds the pipes.
        let grace = Duration::from_secs(5);
        let Ok(stdout) = out.recv_timeout(grace) else {
            return fail(
                "bad_report",
                "the report pipe was held open after the scrub exited".into(),
            );
        };
        let stderr = err.recv_timeout(grace).unwrap_or_default();
        let stderr = String::from_utf8_lossy(&stderr[..stderr.len().min(MAX_STDERR)])
            .trim()
            .to_owned();
        if stdout.len() > MAX_REPORT_BYTES {
            return fail(
                "bad_report",
                format!("report larger than {MAX_REPORT_BYTES} bytes"),
            );
        }
        let line = String::from_utf8_lossy(&stdout);
        let line = line.trim();
        if !status.success() {
            if let Ok(f) = serde_json::from_str::<ScrubFailure>(line) {
                return fail("child_error", format!("{}: {}", f.error, f.message));
            }
            let how = match std::os::unix::process::ExitStatusExt::signal(&status) {
                Some(sig) => format!("killed by signal {sig}"),
                None => format!("exited with {status}"),
            };
            let tail: String = stderr.chars().take(512).collect();
            return fail("crashed", format!("{how}; stderr: {tail:?}"));
        }
        let report: ScrubReport = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => {
                let shown: String = line.chars().take(200).collect();
                return fail("bad_report", format!("{e}: {shown:?}"));
            }
        };
        if let Err(e) = report.check(device) {
            return fail("bad_report", e);
        }
        if let Err(e) = self.check_against_inventory(device, &report) {
            return fail("bad_report", e);
        }
        if report.coverage < self.policy.min_coverage {
            let e = format!(
                "covered {:.4} of the memory, the policy asks for {}",
                report.coverage, self.policy.min_coverage
            );
            return Outcome {
                result: "low_coverage",
                report: Some(report),
                error: Some(e),
            };
        }
        Outcome {
            result: "ok",
            report: Some(report),
            error: None,
        }
    }

    /// What the child cannot be taken at its word on: the device's size
    /// (from the driver's inventory: exactly the sim VRAM's size on the sim
    /// backend; within 10% below to 1% above NVML's figure with CUDA, whose
    /// `cuMemGetInfo` total may differ slightly) and the backend.
    fn check_against_inventory(&self, device: &str, r: &ScrubReport) -> Result<(), String> {
        let sim = self.backend.kind() == BackendKind::Sim;
        let want_backend = if sim { "sim" } else { "cuda" };
        if r.backend != want_backend {
            return Err(format!(
                "a {} report for a {want_backend} device",
                r.backend
            ));
        }
        let inv = self
            .backend
            .inventory()
            .map_err(|e| format!("no inventory to check the report against: {e}"))?;
        let memory = device_memory(&inv, device)
            .ok_or_else(|| format!("{device} is no longer in the inventory"))?;
        let ok = if sim {
            r.bytes_total == ccnode_gpu::scrub::sim_vram_size(memory)
        } else {
            let (t, m) = (r.bytes_total as f64, memory as f64);
            t >= 0.9 * m && t <= 1.01 * m
        };
        if !ok {
            return Err(format!(
                "bytes_total {} does not fit the device's {memory} bytes",
                r.bytes_total
            ));
        }
        Ok(())
    }

    /// Every known device: `{device, state, holder?, reason?, last?}`.
    pub fn status_json(&self) -> Vec<serde_json::Value> {
        lock(&self.devices)
            .iter()
            .map(|(k, d)| {
                let mut v = serde_json::json!({"device": k, "state": d.state.label()});
                match &d.state {
                    State::Claimed { holder, .. } => v["holder"] = holder.clone().into(),
                    State::OutOfService(why) | State::Held { why, .. } => {
                        v["reason"] = why.clone().into()
                    }
                    _ => {}
                }
                if let Some(l) = &d.last {
                    v["last_scrub"] = serde_json::to_value(l).unwrap_or_default();
                }
                v
            })
            .collect()
    }

    /// The attestation claims' `vram_scrub`: whether scrubbing is on, and
    /// each device's latest scrub (result, coverage, bytes, time).
    pub fn claims(&self) -> serde_json::Value {
        let devices: Vec<serde_json::Value> = lock(&self.devices)
            .iter()
            .map(|(k, d)| {
                let last = d.last.as_ref().map(|l| {
                    serde_json::json!({
                        "result": l.result,
                        "trigger": l.trigger,
                        "at": l.at,
                        "coverage": l.report.as_ref().map(|r| r.coverage),
                        "bytes_scrubbed": l.report.as_ref().map(|r| r.bytes_scrubbed),
                        "bytes_total": l.report.as_ref().map(|r| r.bytes_total),
                        "backend": l.report.as_ref().map(|r| r.backend.clone()),
                    })
                });
                serde_json::json!({"device": k, "state": d.state.label(), "last_scrub": last})
            })
            .collect();
        serde_json::json!({
            "enabled": self.policy.enabled,
            "min_coverage": self.policy.min_coverage,
            "devices": devices,
        })
    }

    /// Blocks until no device is being scrubbed (at most `timeout`); for
    /// orderly shutdown and tests.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut devs = lock(&self.devices);
        loop {
            if !devs.values().any(|d| d.state == State::Scrubbing) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            devs = self
                .changed
                .wait_timeout(devs, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend whose inventory cannot be read.
    #[derive(Debug)]
    struct Unreadable;

    impl GpuBackend for Unreadable {
        fn kind(&self) -> BackendKind {
            BackendKind::Sim
        }
        fn inventory(&self) -> Result<ccnode_gpu::Inventory, ccnode_gpu::GpuError> {
            Err(ccnode_gpu::GpuError::Call {
                call: "inventory",
                message: "unreadable".into(),
            })
        }
        fn sample(&self) -> Result<Vec<ccnode_gpu::GpuSample>, ccnode_gpu::GpuError> {
            self.inventory().map(|_| Vec::new())
        }
        fn wait_events(
            &self,
            _: Duration,
        ) -> Result<Vec<ccnode_gpu::GpuEvent>, ccnode_gpu::GpuError> {
            Ok(Vec::new())
        }
        fn cc_attestation(
            &self,
            _: u32,
            _: &[u8; 32],
        ) -> Result<ccnode_gpu::CcAttestation, ccnode_gpu::GpuError> {
            Err(ccnode_gpu::GpuError::Unsupported("test".into()))
        }
    }

    #[test]
    fn a_leftover_group_holds_every_device_even_when_none_can_be_listed() {
        // A previous run's worker group whose name says no device, found
        // while the inventory cannot be read: there is no device list to
        // mark held, so every claim is refused until the group is empty.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _enter = runtime.enter();
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let node = Node::open("t".into(), &state, 10, crate::metrics::Metrics::new("t"))
            .unwrap()
            .0;
        // Scrubbing off: a claim after the hold needs no scrub child.
        let policy = ScrubPolicy {
            enabled: false,
            ..ScrubPolicy::default()
        };
        let scrubber = Scrubber::new(
            Arc::new(Unreadable),
            policy,
            node,
            &prometheus::Registry::new(),
        );
        // A group as a jail names it (`<name>-<jail pid>`), populated as
        // cgroup.events says.
        let parent = dir.path().join("workers");
        let group = parent.join("worker-old-0-4242");
        std::fs::create_dir_all(&group).unwrap();
        std::fs::write(group.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        scrubber.hold_leftovers(std::slice::from_ref(&parent));
        match scrubber.claim("MIG-anything", "m/0") {
            Err(ClaimError::OutOfService { why, .. }) => {
                assert!(why.contains("worker-old-0-4242"), "{why}")
            }
            other => panic!("claimed beside a leftover worker: {other:?}"),
        }
        // The group empties: claims go through again.
        std::fs::write(group.join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match scrubber.claim("MIG-anything", "m/0") {
                Ok(_) => break,
                Err(ClaimError::OutOfService { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
