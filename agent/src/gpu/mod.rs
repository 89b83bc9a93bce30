//! GPU monitoring in ccnoded: a poller thread and an event thread over the
//! configured [`GpuBackend`], the cached view that /metrics and the admin
//! socket read, and the health and drift policy that acts on the node.
//!
//! Backend calls block (NVML does), so they run on two threads of their own,
//! never on the async runtime: the poller (inventory and telemetry every
//! `gpu.poll_interval`) and the event thread (XID, ECC and bus events as
//! they come). Both only update the cached view and send [`Finding`]s to
//! [`run_actions`], an async task that audits them and, where the policy
//! says so, quarantines the node. A scrape never calls the backend.

pub mod render;
pub mod scrub;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use ccnode_gpu::drift::{self, Drift};
use ccnode_gpu::{
    BackendKind, GpuBackend, GpuError, GpuEvent, GpuEventKind, GpuSample, Inventory, SampleStatus,
};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::audit::AuditRecord;
use crate::config::{DriftAction, GpuBackendChoice, GpuConfig, HealthAction};
use crate::node::{Node, TransitionError};
use crate::state::{Actor, Event, NodeState};

/// Opens the configured backend (blocking). `Ok(None)` for backend
/// `none`. Never falls back: a configured NVML that is missing is an error.
pub fn open_backend(cfg: &GpuConfig) -> Result<Option<Arc<dyn GpuBackend>>, GpuError> {
    Ok(match cfg.backend {
        GpuBackendChoice::None => None,
        GpuBackendChoice::Nvml => Some(Arc::new(ccnode_gpu::nvml::NvmlBackend::open()?)),
        GpuBackendChoice::Sim => {
            let path = cfg
                .sim_file
                .as_deref()
                .expect("config validation requires gpu.sim_file for the sim backend");
            Some(Arc::new(ccnode_gpu::sim::SimBackend::open(path)?))
        }
    })
}

/// A drifted field and what the policy does about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DriftEntry {
    #[serde(flatten)]
    pub drift: Drift,
    pub action: DriftAction,
}

/// Something the policy acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A field that differs from the baseline (at start, or newly).
    DriftAppeared(DriftEntry),
    /// A drifted field back to its baseline value.
    DriftCleared(DriftEntry),
    /// A health event on one GPU.
    Health {
        gpu: u32,
        uuid: String,
        what: String,
        action: HealthAction,
    },
    /// A GPU's MIG devices changed.
    MigChanged { gpu: u32, from: String, to: String },
    /// GPUs appeared or disappeared from the inventory.
    GpusChanged { from: usize, to: usize },
}

/// The latest poll, as /metrics and `ccnodectl gpus` see it.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub inventory: Option<Inventory>,
    pub samples: Vec<GpuSample>,
    pub drift: Vec<DriftEntry>,
    pub last_poll: Option<SystemTime>,
    pub last_poll_duration: Duration,
    pub last_error: Option<String>,
}

/// Health state that polls and events both feed.
#[derive(Debug, Default)]
struct Health {
    /// The last critical XID per GPU, since ccnoded started.
    critical_xid: BTreeMap<u32, u64>,
    /// Largest uncorrected ECC count seen per GPU.
    ecc_uncorrected: BTreeMap<u32, u64>,
    ecc_tripped: BTreeSet<u32>,
    lost: BTreeSet<u32>,
    row_remap_failure: BTreeSet<u32>,
}

/// XID statistics, from events.
#[derive(Debug, Default, Clone)]
pub struct XidStats {
    /// Count per (GPU, XID).
    pub counts: BTreeMap<(u32, u64), u64>,
    /// Last XID and when, per GPU.
    pub last: BTreeMap<u32, (u64, SystemTime)>,
}

/// Counters of the monitor itself.
#[derive(Debug, Default)]
pub struct MonitorCounters {
    pub polls_ok: AtomicU64,
    pub polls_failed: AtomicU64,
    /// Total poll time, microseconds.
    pub poll_micros: AtomicU64,
    pub events_xid: AtomicU64,
    pub events_ecc_corrected: AtomicU64,
    pub events_ecc_uncorrected: AtomicU64,
    pub events_lost: AtomicU64,
    pub events_mig_config_change: AtomicU64,
    pub event_errors: AtomicU64,
}

/// The GPU monitor: the backend, the cached view and the health state.
#[derive(Debug)]
pub struct GpuMonitor {
    backend: Arc<dyn GpuBackend>,
    config: GpuConfig,
    view: RwLock<Arc<View>>,
    health: Mutex<Health>,
    xids: Mutex<XidStats>,
    pub counters: MonitorCounters,
    stop: (Mutex<bool>, Condvar),
    stopped: AtomicBool,
    /// Set by a MIG configuration change event: the poller polls (and so
    /// compares the layout) now instead of at the end of its interval.
    poll_now: AtomicBool,
}

/// One GPU's health as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuHealth {
    pub healthy: bool,
    pub problems: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data under these locks stays consistent at every await-free
    // step; a panicking holder cannot tear it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl GpuMonitor {
    pub fn new(backend: Arc<dyn GpuBackend>, config: GpuConfig) -> Arc<GpuMonitor> {
        Arc::new(GpuMonitor {
            backend,
            config,
            view: RwLock::new(Arc::new(View::default())),
            health: Mutex::new(Health::default()),
            xids: Mutex::new(XidStats::default()),
            counters: MonitorCounters::default(),
            stop: (Mutex::new(false), Condvar::new()),
            poll_now: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        })
    }

    pub fn kind(&self) -> BackendKind {
        self.backend.kind()
    }

    pub fn is_simulated(&self) -> bool {
        self.kind() == BackendKind::Sim
    }

    /// The latest poll.
    pub fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn xid_stats(&self) -> XidStats {
        lock(&self.xids).clone()
    }

    /// Health per GPU index, from polls and events so far.
    pub fn health(&self) -> BTreeMap<u32, GpuHealth> {
        let view = self.view();
        let h = lock(&self.health);
        let mut out = BTreeMap::new();
        for g in view.inventory.iter().flat_map(|i| &i.gpus) {
            let mut problems = Vec::new();
            if h.lost.contains(&g.index) {
                problems.push("fallen off the bus".to_owned());
            }
            if let Some(code) = h.critical_xid.get(&g.index) {
                problems.push(format!("critical xid {code}"));
            }
            if h.ecc_tripped.contains(&g.index) {
                problems.push(format!(
                    "{} uncorrected ECC errors",
                    h.ecc_uncorrected.get(&g.index).copied().unwrap_or(0)
                ));
            }
            if h.row_remap_failure.contains(&g.index) {
                problems.push("row remapping failed".to_owned());
            }
            out.insert(
                g.index,
                GpuHealth {
                    healthy: problems.is_empty(),
                    problems,
                },
            );
        }
        out
    }

    /// Why new workers may not start now (empty: they may): a failed last
    /// poll (the GPUs' health and layout are not known now), drift whose
    /// action is `block` or `quarantine`, and unhealthy GPUs.
    pub fn blocked_reasons(&self) -> Vec<String> {
        let view = self.view();
        let mut out: Vec<String> = view
            .last_error
            .iter()
            .map(|e| format!("the last GPU poll failed: {e}"))
            .collect();
        out.extend(
            view.drift
                .iter()
                .filter(|d| d.action >= DriftAction::Block)
                .map(|d| format!("drift: {}", d.drift)),
        );
        for (gpu, h) in self.health() {
            if !h.healthy {
                out.push(format!("gpu {gpu} unhealthy: {}", h.problems.join(", ")));
            }
        }
        out
    }

    /// Polls once (blocking) and returns what the policy must act on.
    pub fn poll(&self) -> Vec<Finding> {
        let started = Instant::now();
        let res = self
            .backend
            .inventory()
            .and_then(|inv| Ok((inv, self.backend.sample()?)));
        let took = started.elapsed();
        self.counters
            .poll_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        let prev = self.view();
        let (inv, samples) = match res {
            Ok(r) => r,
            Err(err) => {
                self.counters.polls_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %err, code = err.code(), "GPU poll failed; serving the last values");
                let mut v = (*prev).clone();
                v.last_error = Some(err.to_string());
                v.last_poll_duration = took;
                *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(v);
                return Vec::new();
            }
        };
        self.counters.polls_ok.fetch_add(1, Ordering::Relaxed);
        let mut findings = Vec::new();

        let drift: Vec<DriftEntry> = drift::compare(&self.config.baseline, &inv)
            .into_iter()
            .map(|d| DriftEntry {
                action: self.config.drift_action_for(d.field),
                drift: d,
            })
            .collect();
        for d in &drift {
            if !prev.drift.contains(d) {
                findings.push(Finding::DriftAppeared(d.clone()));
            }
        }
        for d in &prev.drift {
            if !drift.contains(d) {
                findings.push(Finding::DriftCleared(d.clone()));
            }
        }

        if let Some(old) = &prev.inventory {
            if old.gpus.len() != inv.gpus.len() {
                findings.push(Finding::GpusChanged {
                    from: old.gpus.len(),
                    to: inv.gpus.len(),
                });
            }
            for g in &inv.gpus {
                if let Some(o) = old.gpus.iter().find(|o| o.uuid == g.uuid) {
                    let (a, b) = (mig_layout(o), mig_layout(g));
                    if a != b {
                        findings.push(Finding::MigChanged {
                            gpu: g.index,
                            from: a,
                            to: b,
                        });
                    }
                }
            }
        }

        {
            let policy = &self.config.health;
            let mut h = lock(&self.health);
            for g in &inv.gpus {
                let sample = samples.iter().find(|s| s.index == g.index);
                let lost = g.lost || matches!(sample, Some(s) if s.status == SampleStatus::Lost);
                if lost && h.lost.insert(g.index) {
                    findings.push(Finding::Health {
                        gpu: g.index,
                        uuid: g.uuid.clone(),
                        what: "fallen off the bus".into(),
                        action: policy.gpu_lost_action,
                    });
                }
                if !lost {
                    h.lost.remove(&g.index);
                }
                let Some(SampleStatus::Ok(t)) = sample.map(|s| &s.status) else {
                    continue;
                };
                if let Some(n) = t.ecc_uncorrected_total {
                    let seen = h.ecc_uncorrected.entry(g.index).or_default();
                    *seen = (*seen).max(n);
                }
                if let Some(f) = ecc_trip(&mut h, g.index, policy.ecc_uncorrected_threshold) {
                    findings.push(Finding::Health {
                        gpu: g.index,
                        uuid: g.uuid.clone(),
                        what: f,
                        action: policy.ecc_action,
                    });
                }
                if t.remapped_rows.is_some_and(|r| r.failure) && h.row_remap_failure.insert(g.index)
                {
                    findings.push(Finding::Health {
                        gpu: g.index,
                        uuid: g.uuid.clone(),
                        what: "row remapping failed".into(),
                        action: policy.ecc_action,
                    });
                }
            }
        }

        let view = View {
            inventory: Some(inv),
            samples,
            drift,
            last_poll: Some(SystemTime::now()),
            last_poll_duration: took,
            last_error: None,
        };
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
        findings
    }

    /// Records events from the backend and returns what the policy must act
    /// on.
    pub fn handle_events(&self, events: Vec<GpuEvent>) -> Vec<Finding> {
        let policy = &self.config.health;
        let mut findings = Vec::new();
        for e in events {
            match e.kind {
                GpuEventKind::Xid { code } => {
                    self.counters.events_xid.fetch_add(1, Ordering::Relaxed);
                    {
                        let mut x = lock(&self.xids);
                        *x.counts.entry((e.gpu_index, code)).or_default() += 1;
                        x.last.insert(e.gpu_index, (code, SystemTime::now()));
                    }
                    let critical = policy.critical_xids.contains(&code);
                    tracing::warn!(
                        gpu = e.gpu_index,
                        uuid = %e.uuid,
                        xid = code,
                        gpu_instance = ?e.gpu_instance_id,
                        compute_instance = ?e.compute_instance_id,
                        critical,
                        "GPU XID event"
                    );
                    if critical {
                        lock(&self.health).critical_xid.insert(e.gpu_index, code);
                        findings.push(Finding::Health {
                            gpu: e.gpu_index,
                            uuid: e.uuid.clone(),
                            what: format!("critical xid {code}"),
                            action: policy.critical_xid_action,
                        });
                    }
                }
                GpuEventKind::EccCorrected { .. } => {
                    self.counters
                        .events_ecc_corrected
                        .fetch_add(1, Ordering::Relaxed);
                }
                GpuEventKind::EccUncorrected { count } => {
                    self.counters
                        .events_ecc_uncorrected
                        .fetch_add(1, Ordering::Relaxed);
                    let mut h = lock(&self.health);
                    let seen = h.ecc_uncorrected.entry(e.gpu_index).or_default();
                    *seen = seen.saturating_add(count);
                    if let Some(f) = ecc_trip(&mut h, e.gpu_index, policy.ecc_uncorrected_threshold)
                    {
                        findings.push(Finding::Health {
                            gpu: e.gpu_index,
                            uuid: e.uuid.clone(),
                            what: f,
                            action: policy.ecc_action,
                        });
                    }
                }
                GpuEventKind::MigConfigChange => {
                    self.counters
                        .events_mig_config_change
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        gpu = e.gpu_index,
                        uuid = %e.uuid,
                        "GPU MIG configuration changed: comparing the layout now"
                    );
                    self.poll_now.store(true, Ordering::Release);
                    let _guard = lock(&self.stop.0);
                    self.stop.1.notify_all();
                }
                GpuEventKind::Lost => {
                    self.counters.events_lost.fetch_add(1, Ordering::Relaxed);
                    if lock(&self.health).lost.insert(e.gpu_index) {
                        findings.push(Finding::Health {
                            gpu: e.gpu_index,
                            uuid: e.uuid.clone(),
                            what: "fallen off the bus".into(),
                            action: policy.gpu_lost_action,
                        });
                    }
                }
            }
        }
        findings
    }

    /// Starts the poller and event threads; findings go to `tx`. The first
    /// poll is the caller's (see [`GpuMonitor::poll`]), done before the
    /// daemon reports ready.
    pub fn start(self: &Arc<Self>, tx: mpsc::Sender<Finding>) -> std::io::Result<()> {
        let me = self.clone();
        let poll_tx = tx.clone();
        std::thread::Builder::new()
            .name("gpu-poller".into())
            .spawn(move || me.run_poller(poll_tx))?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("gpu-events".into())
            .spawn(move || me.run_events(tx))?;
        Ok(())
    }

    /// Asks both threads to stop; they end within a second.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        *lock(&self.stop.0) = true;
        self.stop.1.notify_all();
    }

    fn run_poller(&self, tx: mpsc::Sender<Finding>) {
        loop {
            {
                let stopped = lock(&self.stop.0);
                let (stopped, _) = self
                    .stop
                    .1
                    .wait_timeout_while(stopped, self.config.poll_interval, |s| {
                        !*s && !self.poll_now.load(Ordering::Acquire)
                    })
                    .unwrap_or_else(|e| e.into_inner());
                if *stopped {
                    return;
                }
                self.poll_now.store(false, Ordering::Release);
            }
            for f in self.poll() {
                if tx.blocking_send(f).is_err() {
                    return;
                }
            }
        }
    }

    fn run_events(&self, tx: mpsc::Sender<Finding>) {
        let mut failures = 0u32;
        while !self.stopped.load(Ordering::Acquire) {
            match self.backend.wait_events(Duration::from_secs(1)) {
                Ok(events) => {
                    failures = 0;
                    for f in self.handle_events(events) {
                        if tx.blocking_send(f).is_err() {
                            return;
                        }
                    }
                }
                Err(err) => {
                    self.counters.event_errors.fetch_add(1, Ordering::Relaxed);
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures % 60 == 0 {
                        tracing::warn!(error = %err, failures, "waiting for GPU events failed");
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// `ccnodectl gpus`: inventory, health, telemetry summary.
    pub fn gpus_json(&self) -> serde_json::Value {
        let view = self.view();
        let health = self.health();
        let blocked = self.blocked_reasons();
        serde_json::json!({
            "backend": self.kind().as_str(),
            "simulated": self.is_simulated(),
            "inventory": view.inventory,
            "health": health,
            "workers_blocked": !blocked.is_empty(),
            "blocked_reasons": blocked,
            "last_poll": view.last_poll.map(crate::timefmt::format),
            "last_error": view.last_error,
        })
    }

    /// `ccnodectl drift`: the baseline comparison.
    pub fn drift_json(&self) -> serde_json::Value {
        let view = self.view();
        serde_json::json!({
            "backend": self.kind().as_str(),
            "simulated": self.is_simulated(),
            "baseline": self.config.baseline,
            "drift": view.drift,
            "last_poll": view.last_poll.map(crate::timefmt::format),
        })
    }
}

/// Records an ECC threshold crossing once per GPU.
fn ecc_trip(h: &mut Health, gpu: u32, threshold: u64) -> Option<String> {
    let n = h.ecc_uncorrected.get(&gpu).copied().unwrap_or(0);
    (n >= threshold && h.ecc_tripped.insert(gpu))
        .then(|| format!("{n} uncorrected ECC errors (threshold {threshold})"))
}

/// A GPU's MIG layout in mig-parted's words: `7x1g.10gb`, `disabled`.
pub fn mig_layout(g: &ccnode_gpu::GpuInfo) -> String {
    if g.mig_devices.is_empty() {
        return format!("mig {}", g.mig_mode.as_str());
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for m in &g.mig_devices {
        *counts.entry(&m.profile).or_default() += 1;
    }
    counts
        .iter()
        .map(|(p, n)| format!("{n}x{p}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Acts on findings until the channel closes: logs, audits, and applies
/// the policy to the node.
pub async fn run_actions(node: Arc<Node>, mut rx: mpsc::Receiver<Finding>) {
    while let Some(f) = rx.recv().await {
        act(&node, f).await;
    }
}

/// Applies one finding.
pub async fn act(node: &Node, finding: Finding) {
    let (command, reason, result, quarantine) = match finding {
        Finding::DriftAppeared(d) => {
            tracing::warn!(field = %d.drift.field, gpu = ?d.drift.gpu, expected = %d.drift.expected, found = %d.drift.found, action = d.action.as_str(), "GPU drift");
            (
                "gpu_drift",
                d.drift.to_string(),
                d.action.as_str(),
                d.action == DriftAction::Quarantine,
            )
        }
        Finding::DriftCleared(d) => {
            tracing::info!(field = %d.drift.field, gpu = ?d.drift.gpu, "GPU drift cleared");
            ("gpu_drift_cleared", d.drift.to_string(), "ok", false)
        }
        Finding::Health {
            gpu,
            uuid,
            what,
            action,
        } => {
            tracing::error!(gpu, uuid = %uuid, problem = %what, action = action.as_str(), "GPU health");
            if action == HealthAction::Ignore {
                return;
            }
            (
                "gpu_health",
                format!("gpu {gpu} ({uuid}): {what}"),
                action.as_str(),
                action == HealthAction::Quarantine,
            )
        }
        Finding::MigChanged { gpu, from, to } => {
            tracing::warn!(gpu, from = %from, to = %to, "GPU MIG layout changed");
            (
                "gpu_mig_changed",
                format!("gpu {gpu}: {from} -> {to}"),
                "alert",
                false,
            )
        }
        Finding::GpusChanged { from, to } => {
            tracing::warn!(from, to, "GPU count changed");
            (
                "gpu_count_changed",
                format!("{from} GPUs -> {to}"),
                "alert",
                false,
            )
        }
    };
    node.audit(AuditRecord {
        ts: SystemTime::now(),
        actor: Actor::system("gpu"),
        command: command.to_owned(),
        reason: Some(reason.clone()),
        result: result.to_owned(),
        from: None,
        to: None,
    })
    .await;
    if quarantine && node.snapshot().state != NodeState::Quarantined {
        let reason = format!("{command}: {reason}");
        match node
            .transition(Event::Quarantine, Actor::system("gpu"), reason)
            .await
        {
            Ok(_) => {}
            // Quarantined by someone else in between: fenced all the same.
            Err(TransitionError::Invalid(_)) => {}
            Err(err) => {
                tracing::error!(error = %crate::error_chain(&err), "GPU policy could not quarantine the node")
            }
        }
    }
}
