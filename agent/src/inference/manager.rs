//! The model manager: verifies a model's signature, starts its sandboxed
//! workers with the sealed bytes, routes generations to ready workers
//! through a bounded queue, and follows the node's state (drain: finish,
//! then stop workers; quarantine: cut generations off, kill workers).
//!
//! ```text
//! load: verify (OMS, sealed memfds) ─▶ grant device ─▶ spawn jail ─▶ `load` ─▶ `ready`
//! submit ─▶ idle ready worker? ─yes─▶ `generate` ─▶ `token`* ─▶ `done` ─▶ next queued
//!              └─no─▶ queue (max_queue) ─full─▶ 429
//! ```
//!
//! A failed verification never spawns a worker. Every generation holds a
//! node work guard, so a draining node becomes drained when the last one
//! ends.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use ccnode_sandbox::supervise::{
    ControlSender, Event as SupEvent, ExitReason, FrameSink, Policy, Spec, Supervisor, WorkerState,
};
use ccnode_worker::protocol::{self as wp, Finish};
use serde_json::Value;
use tokio::sync::mpsc;

use super::config::{InferenceConfig, ModelConfig};
use super::{
    CancelOnDrop, ChatMessage, FinishReason, GenerateParams, Generation, Inference, ModelInfo,
    Piece, Prompt, SubmitError,
};
use crate::audit::AuditRecord;
use crate::config::Config;
use crate::node::{Node, WorkGuard};
use crate::state::{Actor, NodeState};
use crate::timefmt::unix_now;
use crate::workers::{self, HostSupport};

/// Why a model could not be loaded; `code()` is stable.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model {0} is already loaded")]
    Exists(String),
    #[error("model {0} is not loaded")]
    NotLoaded(String),
    #[error("model {name}: {source}")]
    Config {
        name: String,
        #[source]
        source: crate::config::ConfigError,
    },
    #[error("model {name}: the trust policy {path}: {source}")]
    Policy {
        name: String,
        path: PathBuf,
        #[source]
        source: ccnode_attest::oms::OmsError,
    },
    #[error("model {name}: signature verification failed: {source}")]
    Verify {
        name: String,
        #[source]
        source: ccnode_attest::oms::OmsError,
    },
    #[error("model {name}: {source}")]
    Worker {
        name: String,
        #[source]
        source: workers::WorkerError,
    },
    #[error("model {name}: device {device} is already assigned to {holder}")]
    DeviceTaken {
        name: String,
        device: String,
        holder: String,
    },
    #[error("model {name}: {source}")]
    Device {
        name: String,
        #[source]
        source: crate::gpu::scrub::ClaimError,
    },
    #[error("model {name}: new workers are blocked: {why}")]
    Blocked { name: String, why: String },
    #[error("model {name}: cannot hand the model over: {message}")]
    HandOver { name: String, message: String },
    #[error("the node is {0}: models are not loaded now")]
    NodeState(NodeState),
    #[error("model {0}: the node was quarantined while it loaded")]
    Quarantined(String),
    #[error("model {name}: cannot measure it into the TPM")]
    Measure {
        name: String,
        #[source]
        source: ccnode_attest::tpm::TpmError,
    },
}

impl LoadError {
    pub fn code(&self) -> &'static str {
        match self {
            LoadError::Exists(_) => "model_exists",
            LoadError::NotLoaded(_) => "model_not_loaded",
            LoadError::Config { .. } => "invalid_model_config",
            LoadError::Policy { .. } => "trust_policy_invalid",
            LoadError::Verify { .. } => "signature_invalid",
            LoadError::Worker { .. } => "worker_setup_failed",
            LoadError::DeviceTaken { .. } => "device_taken",
            LoadError::Device { source, .. } => source.code(),
            LoadError::Blocked { .. } => "workers_blocked",
            LoadError::HandOver { .. } => "hand_over_failed",
            LoadError::NodeState(_) | LoadError::Quarantined(_) => "node_not_active",
            LoadError::Measure { .. } => "measure_failed",
        }
    }
}

/// What `ccnodectl model list` shows of one model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelStatus {
    pub name: String,
    pub dir: PathBuf,
    pub manifest_digest: String,
    pub signer: String,
    pub files: usize,
    pub bytes: u64,
    pub loaded_at: u64,
    pub queue: usize,
    pub workers: Vec<WorkerStatus>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerStatus {
    pub state: &'static str,
    pub device: Option<String>,
    pub pid: Option<i32>,
    pub busy: bool,
    pub last_exit: Option<String>,
}

fn state_str(s: WorkerState) -> &'static str {
    match s {
        WorkerState::Starting => "starting",
        WorkerState::Loading => "loading",
        WorkerState::Ready => "ready",
        WorkerState::Stopping => "stopping",
        WorkerState::Exited => "exited",
    }
}

/// What [`Model::try_start`] did with a job it took.
#[derive(Debug, PartialEq, Eq)]
enum Started {
    Running,
    /// Its client had gone: dropped.
    Gone,
}

/// A generation on its way: where its pieces go, what keeps the node's
/// drain waiting, and when it was accepted.
struct Job {
    id: u64,
    msg: Value,
    /// Tokens asked for; `token` frames and their text bytes so far.
    max_tokens: u32,
    frames: u64,
    text_bytes: u64,
    /// Its text went over the budget: the client has had its error and
    /// the worker a `cancel`; the job stays on the replica, which is not
    /// idle, until the worker's `done` or `error` for it.
    over_budget: bool,
    tx: mpsc::Sender<Piece>,
    _work: WorkGuard,
}

/// What one generation's `token` frames may carry, and why.
///
/// An honest worker emits text at most once per generated token and twice
/// at the end (the decoder's and the stop filter's held-back text): at
/// most `max_tokens + 2` emissions. It cuts each emission into frames of
/// at most `MAX_TOKEN_TEXT` bytes on character boundaries, so every frame
/// but an emission's last holds at least `MAX_TOKEN_TEXT - 3` bytes (a cut
/// backs off at most three bytes of a four-byte character). After `bytes`
/// bytes it has therefore sent at most `emissions + bytes / (MAX_TOKEN_TEXT
/// - 3)` frames. The text itself is budgeted at `MAX_TOKEN_TEXT` bytes per
/// emission on average: a model whose tokens decode to more is refused.
/// Together the two bound what a hostile worker can make ccnoded hold for
/// one generation: `(max_tokens + 2) × MAX_TOKEN_TEXT` bytes in at most
/// [`max_token_frames`] frames. Frames are not tokens: the usage a client
/// sees is the worker's count in `done`.
struct TextBudget;

impl TextBudget {
    const PIECE_MIN: u64 = wp::MAX_TOKEN_TEXT as u64 - 3;

    fn emissions(max_tokens: u32) -> u64 {
        u64::from(max_tokens) + 2
    }

    fn bytes(max_tokens: u32) -> u64 {
        Self::emissions(max_tokens) * wp::MAX_TOKEN_TEXT as u64
    }
}

/// Most `token` frames [`Job::take_text`] lets through for `max_tokens`.
fn max_token_frames(max_tokens: u32) -> u64 {
    TextBudget::emissions(max_tokens) + TextBudget::bytes(max_tokens) / TextBudget::PIECE_MIN
}

/// A generation's channel of pieces: room for every `token` frame
/// [`Job::take_text`] lets through and the end, so a send never finds it
/// full.
fn pieces_channel(max_tokens: u32) -> (mpsc::Sender<Piece>, mpsc::Receiver<Piece>) {
    let room = usize::try_from(max_token_frames(max_tokens) + 1).unwrap_or(usize::MAX);
    mpsc::channel(room)
}

impl Job {
    /// Counts a `token` frame of `len` bytes against the [`TextBudget`];
    /// false when an honest worker could not have sent it.
    fn take_text(&mut self, len: usize) -> bool {
        self.frames += 1;
        self.text_bytes = self.text_bytes.saturating_add(len as u64);
        len <= wp::MAX_TOKEN_TEXT
            && self.text_bytes <= TextBudget::bytes(self.max_tokens)
            && self.frames
                <= TextBudget::emissions(self.max_tokens) + self.text_bytes / TextBudget::PIECE_MIN
    }
}

struct Replica {
    index: usize,
    device: Option<String>,
    /// The scrub ledger's token for `device` while this replica holds it.
    claim: Mutex<Option<u64>>,
    sup: Mutex<Option<Supervisor>>,
    state: Mutex<WorkerState>,
    busy: Mutex<Option<Job>>,
    last_exit: Mutex<Option<String>>,
    /// Its worker may have outlived its jail: the device is held, and said
    /// so once.
    held: AtomicBool,
    /// The worker's PID namespace, waited for when it may have outlived
    /// its jail.
    remains: Mutex<Option<ccnode_sandbox::remains::Remains>>,
}

struct Model {
    cfg: ModelConfig,
    manifest_digest: String,
    signer: String,
    files: usize,
    bytes: u64,
    loaded_at: u64,
    replicas: Vec<Arc<Replica>>,
    queue: Mutex<VecDeque<Job>>,
    manager: Weak<Manager>,
    /// The workers graceful stops are waiting for, by stop and replica: a
    /// kill ends them too ([`Model::stop_workers`]), and leaves their
    /// devices to the stop that waits for them.
    stopping: Mutex<Vec<(u64, usize, ccnode_sandbox::supervise::Killer)>>,
    stops: AtomicU64,
    /// A reload after an undrain or release is verifying this model's
    /// files again.
    reloading: AtomicBool,
}

/// The model manager ([`Inference`] for the API).
pub struct Manager {
    node: Arc<Node>,
    config: Arc<Config>,
    support: HostSupport,
    jail: PathBuf,
    metrics: InferenceMetrics,
    models: Mutex<BTreeMap<String, Arc<Model>>>,
    /// Configured models an admin unloaded: not loaded again on undrain.
    unloaded: Mutex<std::collections::BTreeSet<String>>,
    next_id: AtomicU64,
    /// The slow halves of node transitions (a drain's graceful stop, the
    /// reloads when the node is active again), run in order on one thread
    /// of their own ([`Manager::in_order`]), so that the follower is free
    /// to apply a quarantine at once.
    transitions: Mutex<std::sync::mpsc::Sender<Transition>>,
    blocked: Option<Arc<crate::gpu::GpuMonitor>>,
    /// For audit records written from worker threads.
    runtime: tokio::runtime::Handle,
    /// Where each verified model is measured (the ccnode PCR and its event
    /// log) before any worker gets its bytes; `None` without attestation.
    tpm: Option<Arc<ccnode_attest::tpm::TpmService>>,
    /// Who holds which device, and the scrub before it changes hands;
    /// `None` without a GPU backend.
    scrubber: Option<Arc<crate::gpu::scrub::Scrubber>>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The prompt a chat becomes: each message as `<|role|>\n` and its content
/// on its own line, then `<|assistant|>\n` for the reply.
pub fn render_chat(messages: &[ChatMessage]) -> String {
    let mut s = String::new();
    for m in messages {
        s.push_str("<|");
        s.push_str(&m.role);
        s.push_str("|>\n");
        s.push_str(&m.content);
        s.push('\n');
    }
    s.push_str("<|assistant|>\n");
    s
}

impl Manager {
    /// A manager for `config`'s models (none loaded yet: see
    /// [`Manager::load_configured`]). `jail` is ccnoded's own executable.
    /// Call inside the tokio runtime.
    pub fn new(
        node: Arc<Node>,
        config: Arc<Config>,
        jail: PathBuf,
        metrics: &crate::metrics::Metrics,
        gpu: Option<Arc<crate::gpu::GpuMonitor>>,
        tpm: Option<Arc<ccnode_attest::tpm::TpmService>>,
        scrubber: Option<Arc<crate::gpu::scrub::Scrubber>>,
    ) -> Arc<Manager> {
        let support = HostSupport::probe(&config.sandbox);
        Arc::new(Manager {
            node,
            support,
            jail,
            metrics: InferenceMetrics::new(metrics.registry()),
            models: Mutex::new(BTreeMap::new()),
            unloaded: Mutex::new(std::collections::BTreeSet::new()),
            next_id: AtomicU64::new(1),
            transitions: Mutex::new(transitions()),
            blocked: gpu,
            config,
            runtime: tokio::runtime::Handle::current(),
            tpm,
            scrubber,
        })
    }

    /// The device ledger and scrubs, when there is a GPU backend.
    pub fn scrubber(&self) -> Option<&Arc<crate::gpu::scrub::Scrubber>> {
        self.scrubber.as_ref()
    }

    fn inference(&self) -> &InferenceConfig {
        &self.config.inference
    }

    /// Loads every model in the config that is not loaded (and was not
    /// unloaded by an admin); failures are logged, audited and returned,
    /// and do not stop the others. A node that is not active loads nothing
    /// now: its models load when it becomes active.
    pub fn load_configured(self: &Arc<Self>) -> Vec<LoadError> {
        let state = self.node.snapshot().state;
        if state != NodeState::Active {
            tracing::info!(state = %state, "models not loaded until the node is active");
            return Vec::new();
        }
        let mut errors = Vec::new();
        for m in self.inference().models.clone() {
            // A quarantine or drain meanwhile: the rest waits for the next
            // time the node is active.
            if self.node.snapshot().state != NodeState::Active {
                break;
            }
            let skip =
                lock(&self.models).contains_key(&m.name) || lock(&self.unloaded).contains(&m.name);
            if skip {
                continue;
            }
            if let Err(e) = self.load(m) {
                errors.push(e);
            }
        }
        errors
    }

    fn audit(&self, command: &str, reason: String, result: &str) {
        let node = self.node.clone();
        let record = AuditRecord {
            ts: SystemTime::now(),
            actor: Actor::system("inference"),
            command: command.to_owned(),
            reason: Some(reason),
            result: result.to_owned(),
            from: None,
            to: None,
        };
        self.runtime.spawn(async move { node.audit(record).await });
    }

    /// Verify → grant → spawn → hand over. Blocking (hashing, spawning):
    /// call from a blocking thread. A failed verification spawns nothing.
    pub fn load(self: &Arc<Self>, cfg: ModelConfig) -> Result<(), LoadError> {
        self.load_as(cfg, None)
    }

    /// [`Manager::load`], or with `replacing` the model listed under the
    /// name, which stays listed (its requests answered "not ready") until
    /// the new one is published in its place. Refused if that entry was
    /// unloaded or replaced meanwhile.
    fn load_as(
        self: &Arc<Self>,
        mut cfg: ModelConfig,
        replacing: Option<&Arc<Model>>,
    ) -> Result<(), LoadError> {
        let result = self.load_inner(&mut cfg, replacing);
        let (res, reason) = match &result {
            Ok(()) => ("ok", format!("model {} loading", cfg.name)),
            Err(e) => (e.code(), e.to_string()),
        };
        self.metrics
            .loads
            .with_label_values(&[if result.is_ok() { "ok" } else { res }])
            .inc();
        match &result {
            Ok(()) => tracing::info!(model = %cfg.name, "model verified; workers starting"),
            Err(e) => {
                tracing::error!(model = %cfg.name, code = e.code(), error = %crate::error_chain(e), "model load refused")
            }
        }
        self.audit("model_load", reason, res);
        result
    }

    fn load_inner(
        self: &Arc<Self>,
        cfg: &mut ModelConfig,
        replacing: Option<&Arc<Model>>,
    ) -> Result<(), LoadError> {
        let name = cfg.name.clone();
        // Read before anything is verified; checked again before workers
        // start and when the model is published: a quarantine while the
        // model is hashed (seconds to minutes) reaches this load too.
        let (state, quarantines) = self.node.state_and_quarantines();
        if state != NodeState::Active {
            return Err(LoadError::NodeState(state));
        }
        cfg.validate().map_err(|source| LoadError::Config {
            name: name.clone(),
            source,
        })?;
        // The name is free, or still holds the model this one replaces.
        let free = |models: &BTreeMap<String, Arc<Model>>| match (models.get(&name), replacing) {
            (None, None) => Ok(()),
            (Some(x), Some(old)) if Arc::ptr_eq(x, old) => Ok(()),
            (None, Some(_)) => Err(LoadError::NotLoaded(name.clone())),
            (Some(_), _) => Err(LoadError::Exists(name.clone())),
        };
        free(&lock(&self.models))?;
        if let Some(gpu) = &self.blocked {
            let why = gpu.blocked_reasons();
            if !why.is_empty() {
                return Err(LoadError::Blocked {
                    name,
                    why: why.join("; "),
                });
            }
        }
        let policy_path = cfg
            .trust_policy
            .clone()
            .or_else(|| self.inference().trust_policy.clone())
            .ok_or_else(|| LoadError::Config {
                name: name.clone(),
                source: crate::config::ConfigError::Invalid {
                    key: "inference.models",
                    message: "no trust_policy for this model".into(),
                },
            })?;
        let policy =
            ccnode_attest::oms::policy::TrustPolicy::load(&policy_path).map_err(|source| {
                LoadError::Policy {
                    name: name.clone(),
                    path: policy_path.clone(),
                    source,
                }
            })?;
        // The only read of the model: hashed and copied into sealed memfds
        // in one pass. What workers get is exactly what was verified.
        let verified = ccnode_attest::oms::verify_model(
            &cfg.dir,
            &cfg.signature_path(),
            &policy,
            &ccnode_attest::oms::VerifyOptions::new(name.clone()),
        )
        .map_err(|source| LoadError::Verify {
            name: name.clone(),
            source,
        })?;
        pause_point(&format!("model-verified-{name}"));
        self.still_active(&name, quarantines)?;
        // Devices: each replica's, resolved and exclusive node-wide.
        let mut grants: Vec<Option<(Vec<PathBuf>, String)>> = Vec::new();
        for r in 0..cfg.replicas as usize {
            match cfg.gpus.get(r) {
                None => grants.push(None),
                Some(target) => {
                    let g = workers::grant_devices(&self.config.gpu, std::slice::from_ref(target))
                        .map_err(|source| LoadError::Worker {
                            name: name.clone(),
                            source,
                        })?;
                    grants.push(Some(g));
                }
            }
        }
        {
            let models = lock(&self.models);
            for (i, g) in grants.iter().enumerate() {
                let Some((_, uuid)) = g else { continue };
                let dup_here = grants[..i]
                    .iter()
                    .flatten()
                    .any(|(_, u)| u.eq_ignore_ascii_case(uuid));
                let holder = models.values().find(|m| {
                    m.replicas.iter().any(|r| {
                        r.device
                            .as_deref()
                            .is_some_and(|d| d.eq_ignore_ascii_case(uuid))
                    })
                });
                if dup_here || holder.is_some() {
                    return Err(LoadError::DeviceTaken {
                        name: name.clone(),
                        device: uuid.clone(),
                        holder: holder.map_or(name.clone(), |m| m.cfg.name.clone()),
                    });
                }
            }
        }
        // Measured before any worker sees a byte: a verifier replaying the
        // event log learns every model this node has served since boot.
        if let Some(tpm) = &self.tpm {
            let signer: String = verified.signer.chars().take(256).collect();
            tpm.measure(
                ccnode_attest::eventlog::ccnode::event_type::MODEL_LOAD,
                serde_json::json!({
                    "name": name,
                    "digest": format!("sha256:{}", verified.manifest_digest),
                    "signer": signer,
                }),
            )
            .map_err(|source| LoadError::Measure {
                name: name.clone(),
                source,
            })?;
        }
        let program = workers::resolve_program(&self.inference().worker_binary.to_string_lossy())
            .map_err(|source| LoadError::Worker {
            name: name.clone(),
            source,
        })?;
        let files: Vec<wp::ModelFile> = verified
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| wp::ModelFile {
                name: f.name.clone(),
                fd: wp::FIRST_MODEL_FD + i as i32,
                size: f.size,
            })
            .collect();
        if files.len() > wp::MAX_MODEL_FILES {
            return Err(LoadError::HandOver {
                name: name.clone(),
                message: format!(
                    "{} files; a worker takes at most {}",
                    files.len(),
                    wp::MAX_MODEL_FILES
                ),
            });
        }
        let bytes = verified.bytes_hashed;
        let file_count = verified.file_count;
        let fds: Vec<OwnedFd> = verified.files.into_iter().map(|f| f.into_fd()).collect();
        let model = Arc::new({
            let replicas = grants
                .iter()
                .enumerate()
                .map(|(index, g)| {
                    Arc::new(Replica {
                        index,
                        device: g.as_ref().map(|(_, u)| u.clone()),
                        claim: Mutex::new(None),
                        sup: Mutex::new(None),
                        state: Mutex::new(WorkerState::Starting),
                        busy: Mutex::new(None),
                        last_exit: Mutex::new(None),
                        held: AtomicBool::new(false),
                        remains: Mutex::new(None),
                    })
                })
                .collect::<Vec<_>>();
            Model {
                cfg: cfg.clone(),
                manifest_digest: verified.manifest_digest.clone(),
                signer: verified.signer.clone(),
                files: file_count,
                bytes,
                loaded_at: unix_now(),
                replicas,
                queue: Mutex::new(VecDeque::new()),
                stopping: Mutex::new(Vec::new()),
                stops: AtomicU64::new(0),
                reloading: AtomicBool::new(false),
                manager: Arc::downgrade(self),
            }
        });
        // Each device from the ledger: free, and scrubbed since its last
        // tenant (this waits for a scrub in progress).
        if let Some(scrubber) = &self.scrubber {
            for r in &model.replicas {
                let Some(device) = &r.device else { continue };
                match scrubber.claim(device, &format!("{name}/{}", r.index)) {
                    Ok(token) => *lock(&r.claim) = Some(token),
                    Err(source) => {
                        model.release_devices();
                        return Err(LoadError::Device {
                            name: name.clone(),
                            source,
                        });
                    }
                }
            }
        }
        // Start every replica; each gets its own copies of the fds. If one
        // cannot start, those started are killed and the devices go back
        // (scrubbed).
        let started = (|| -> Result<(), LoadError> {
            for (r, g) in model.replicas.iter().zip(&grants) {
                let extra = fds
                    .iter()
                    .map(|f| f.as_fd().try_clone_to_owned())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| LoadError::HandOver {
                        name: name.clone(),
                        message: e.to_string(),
                    })?;
                let (devices, visible) = g.clone().unwrap_or_default();
                let mut profile = workers::profile(
                    &self.config.sandbox,
                    &self.support,
                    // Names its device: a group left behind by a crash
                    // says what its worker may still hold.
                    &ccnode_sandbox::cgroup::worker_group_name(
                        &format!("worker-{name}-{}", r.index),
                        r.device.as_slice(),
                    ),
                    program.clone(),
                    Vec::new(),
                    devices,
                )
                .map_err(|source| LoadError::Worker {
                    name: name.clone(),
                    source,
                })?;
                profile.env.retain(|(k, _)| k != "CUDA_VISIBLE_DEVICES");
                if !visible.is_empty() {
                    profile.env.push(("CUDA_VISIBLE_DEVICES".into(), visible));
                }
                let load = wp::Load {
                    model: name.clone(),
                    device: cfg.device.as_str().to_owned(),
                    gpus: r.device.iter().cloned().collect(),
                    files: files.clone(),
                };
                let sink = {
                    let model = Arc::downgrade(&model);
                    let replica = r.clone();
                    FrameSink(Arc::new(move |frame: Value| {
                        model.upgrade().is_some_and(|m| m.on_frame(&replica, frame))
                    }))
                };
                let spec = Spec {
                    jail: self.jail.clone(),
                    jail_args: vec![workers::JAIL_ARG.to_owned()],
                    profile,
                    extra_fds: extra,
                    init: Some(wp::with_body("load", &load)),
                    frames: Some(sink),
                };
                let policy = Policy {
                    ready_timeout: self.inference().load_timeout,
                    no_restart_codes: vec![i32::from(LOAD_FAILED_EXIT)],
                    max_frame: wp::MAX_FRAME_FROM_WORKER,
                    ..Policy::default()
                };
                let (etx, erx) = std::sync::mpsc::channel();
                let sup =
                    Supervisor::start(spec, policy, etx).map_err(|e| LoadError::HandOver {
                        name: name.clone(),
                        message: format!("cannot start a supervisor: {e}"),
                    })?;
                let model_w = Arc::downgrade(&model);
                let replica = r.clone();
                std::thread::Builder::new()
                    .name("ccnode-worker-events".into())
                    .spawn(move || {
                        while let Ok(ev) = erx.recv() {
                            let Some(m) = model_w.upgrade() else { return };
                            m.on_event(&replica, ev);
                        }
                    })
                    .map_err(|e| LoadError::HandOver {
                        name: name.clone(),
                        message: e.to_string(),
                    })?;
                *lock(&r.remains) = Some(sup.remains());
                *lock(&r.sup) = Some(sup);
            }
            Ok(())
        })();
        if let Err(e) = started {
            model.stop_workers(true);
            return Err(e);
        }

        // A worker that became ready before its supervisor was stored.
        model.pump();
        // Published only if the node is still active and was not
        // quarantined since the load began, checked under the lock that
        // the node's follower takes to find the models to stop: a
        // quarantine either comes after this and stops these workers, or
        // comes before and this ends them. Another load of the same name
        // may have finished meanwhile: keep that one. Either way this
        // load's workers are killed and their devices go back (scrubbed).
        let refused = {
            let mut models = lock(&self.models);
            if let Err(e) = self.still_active(&name, quarantines) {
                Some(e)
            } else if let Err(e) = free(&models) {
                Some(e)
            } else {
                self.metrics
                    .queue_depth
                    .with_label_values(&[name.as_str()])
                    .set(0);
                models.insert(name.clone(), model.clone());
                // Loaded again: a configured model comes back on undrain.
                lock(&self.unloaded).remove(&name);
                None
            }
        };
        if let Some(e) = refused {
            model.stop_workers(true);
            return Err(e);
        }
        Ok(())
    }

    /// `Ok` while the node is active and has had no quarantine since it
    /// had `quarantines` (what a load read when it began).
    fn still_active(&self, name: &str, quarantines: u64) -> Result<(), LoadError> {
        match self.node.state_and_quarantines() {
            (NodeState::Active, q) if q == quarantines => Ok(()),
            (NodeState::Active, _) => Err(LoadError::Quarantined(name.to_owned())),
            (state, _) => Err(LoadError::NodeState(state)),
        }
    }

    /// Stops a model's workers (letting generations in flight finish) and
    /// forgets it.
    pub fn unload(&self, name: &str) -> Result<(), LoadError> {
        let model = lock(&self.models)
            .remove(name)
            .ok_or_else(|| LoadError::NotLoaded(name.to_owned()))?;
        lock(&self.unloaded).insert(name.to_owned());
        model.fail_queue("model_unloaded", "the model was unloaded");
        model.stop_workers(false);
        let _ = self.metrics.queue_depth.remove_label_values(&[name]);
        for s in ["starting", "loading", "ready", "stopping", "exited"] {
            let _ = self.metrics.workers.remove_label_values(&[name, s]);
        }
        self.audit("model_unload", format!("model {name}"), "ok");
        Ok(())
    }

    /// The attestation claims' `models`: each loaded model and its
    /// verified manifest digest.
    pub fn claims(&self) -> Vec<ccnode_attest::evidence::ModelClaim> {
        lock(&self.models)
            .values()
            .map(|m| ccnode_attest::evidence::ModelClaim {
                name: m.cfg.name.clone(),
                digest: format!("sha256:{}", m.manifest_digest),
            })
            .collect()
    }

    /// Each device granted to a worker: `{device, model, worker}`.
    pub fn assignments(&self) -> Vec<serde_json::Value> {
        lock(&self.models)
            .values()
            .flat_map(|m| {
                m.replicas.iter().filter_map(|r| {
                    r.device.as_ref().map(|d| {
                        serde_json::json!({"device": d, "model": m.cfg.name, "worker": r.index})
                    })
                })
            })
            .collect()
    }

    pub fn status(&self) -> Vec<ModelStatus> {
        lock(&self.models).values().map(|m| m.status()).collect()
    }

    /// Follows the node: quarantine kills every worker now (generations
    /// in flight end with `node_quarantined`); drained stops them;
    /// active again restarts them.
    pub async fn follow_node(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut rx = self.node.subscribe();
        let (mut last, mut last_quarantines) = self.node.state_and_quarantines();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
            let (now, quarantines) = self.node.state_and_quarantines();
            if now == last && quarantines == last_quarantines {
                continue;
            }
            // The watch keeps only the newest record: a quarantine that
            // came and went while the last state was being applied is
            // applied all the same before the state now.
            let missed = quarantines != last_quarantines && now != NodeState::Quarantined;
            last = now;
            last_quarantines = quarantines;
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if missed {
                    me.apply_state(NodeState::Quarantined);
                }
                me.apply_state(now)
            })
            .await;
        }
    }

    /// Runs `work` after the transitions queued before it, on the
    /// transitions thread.
    fn in_order(self: &Arc<Self>, work: impl FnOnce(&Arc<Manager>) + Send + 'static) {
        let me = self.clone();
        let job: Transition = Box::new(move || work(&me));
        if let Err(e) = lock(&self.transitions).send(job) {
            // The thread is gone (it could not be started): here, then.
            (e.0)();
        }
    }

    fn apply_state(self: &Arc<Self>, state: NodeState) {
        tracing::debug!(state = %state, "inference follows the node");
        match state {
            // Reloading verifies every model again (seconds to minutes
            // each), and a graceful stop waits up to the workers' grace:
            // both in order on the transitions thread, so that a
            // quarantine meanwhile is applied at once (its kill reaches
            // the workers a graceful stop waits for).
            NodeState::Active => return self.in_order(|m| m.reload()),
            NodeState::Drained => {
                return self.in_order(|m| {
                    let models: Vec<Arc<Model>> = lock(&m.models).values().cloned().collect();
                    for model in models {
                        model.stop_workers(false);
                    }
                })
            }
            _ => {}
        }
        let models: Vec<Arc<Model>> = lock(&self.models).values().cloned().collect();
        for m in models {
            match state {
                NodeState::Quarantined => {
                    // Cut off first, so no piece of a generation in flight
                    // arrives after the node is quarantined.
                    m.fail_queue("node_quarantined", "the node was quarantined");
                    m.fail_in_flight("node_quarantined", "the node was quarantined");
                    m.stop_workers(true);
                }
                NodeState::Drained | NodeState::Active => {}
                NodeState::Draining => {
                    m.fail_queue("node_draining", "the node is draining");
                }
            }
        }
        // Quarantine scrubs every device no worker holds any more (the
        // killed workers' devices are being scrubbed already).
        if state == NodeState::Quarantined {
            if let Some(s) = &self.scrubber {
                s.scrub_all("quarantine");
            }
        }
    }

    /// The node is active again: starts, one model after another, the
    /// workers a drain or quarantine stopped, then the configured models
    /// not loaded yet (the node started drained or quarantined, or a load
    /// failed before). Stops at the first model after the node leaves
    /// active; the load in progress then refuses itself (`load_inner`).
    /// On the transitions thread: one pass at a time, after the stops
    /// queued before it.
    fn reload(self: &Arc<Self>) {
        let models: Vec<Arc<Model>> = lock(&self.models).values().cloned().collect();
        for m in models {
            if self.node.snapshot().state != NodeState::Active {
                return;
            }
            m.restart_workers();
        }
        self.load_configured();
    }

    /// Stops every worker (drain semantics) at shutdown.
    pub fn shutdown(&self) {
        let models: Vec<Arc<Model>> = lock(&self.models).values().cloned().collect();
        for m in models {
            m.fail_queue("node_shutting_down", "ccnoded is stopping");
            m.stop_workers(false);
        }
    }
}

/// Longest worker-sent message kept, in characters.
const MAX_WORKER_TEXT: usize = 512;

/// A string field of a worker's frame, cut to `max` characters (empty when
/// absent or not a string) and escaped with [`ccnode_attest::printable`]: a
/// worker runs model code, and its words go into log lines and ccnodectl's
/// output, where a newline or an escape sequence could forge a line.
fn worker_text(frame: &serde_json::Value, key: &str, max: usize) -> String {
    let cut: String = frame[key]
        .as_str()
        .unwrap_or("")
        .chars()
        .take(max)
        .collect();
    ccnode_attest::printable(&cut).into_owned()
}

/// Work queued for the transitions thread.
type Transition = Box<dyn FnOnce() + Send>;

/// Starts the transitions thread; it ends when its sender is dropped (with
/// the manager). If it cannot start, the sender's sends fail and the work
/// runs on the caller ([`Manager::in_order`]).
fn transitions() -> std::sync::mpsc::Sender<Transition> {
    let (tx, rx) = std::sync::mpsc::channel::<Transition>();
    let started = std::thread::Builder::new()
        .name("ccnode-transitions".into())
        .spawn(move || {
            for work in rx {
                work();
            }
        });
    if let Err(e) = started {
        tracing::error!(error = %e, "cannot start the model transitions thread");
    }
    tx
}

/// The worker's exit code for a model it cannot load (no restart).
const LOAD_FAILED_EXIT: u8 = 65;

/// Test hook, debug builds only: with `CCNODE_TEST_PAUSE_DIR=<dir>`, a
/// load reaching `point` while `<dir>/<point>` is a fifo waits there until
/// a test has opened the fifo for writing and closed it again. The test's
/// open returns once the load is there; the load goes on when the test
/// closes its end. Release builds compile it to nothing.
fn pause_point(point: &str) {
    #[cfg(debug_assertions)]
    if let Some(dir) = std::env::var_os("CCNODE_TEST_PAUSE_DIR") {
        let fifo = std::path::Path::new(&dir).join(point);
        let is_fifo = std::fs::metadata(&fifo)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()));
        if is_fifo {
            tracing::warn!(point, "CCNODE_TEST_PAUSE_DIR: paused");
            // Opening blocks until a writer opens; reading ends at EOF,
            // when the writer closes.
            if let Ok(mut f) = std::fs::File::open(&fifo) {
                let _ = std::io::copy(&mut f, &mut std::io::sink());
            }
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

impl Model {
    /// Takes one lock at a time, each in its own statement: a guard made
    /// inside a struct expression would live until the whole expression
    /// ends, and holding `r.sup` while taking `r.busy` is the reverse of
    /// [`Model::try_start`]'s order (a deadlock).
    fn status(&self) -> ModelStatus {
        let queue = lock(&self.queue).len();
        let workers = self
            .replicas
            .iter()
            .map(|r| {
                let state = state_str(*lock(&r.state));
                let pid = lock(&r.sup).as_ref().and_then(|s| s.pid());
                let busy = lock(&r.busy).is_some();
                let last_exit = lock(&r.last_exit).clone();
                WorkerStatus {
                    state,
                    device: r.device.clone(),
                    pid,
                    busy,
                    last_exit,
                }
            })
            .collect();
        ModelStatus {
            name: self.cfg.name.clone(),
            dir: self.cfg.dir.clone(),
            manifest_digest: self.manifest_digest.clone(),
            signer: self.signer.clone(),
            files: self.files,
            bytes: self.bytes,
            loaded_at: self.loaded_at,
            queue,
            workers,
        }
    }

    fn manager(&self) -> Option<Arc<Manager>> {
        self.manager.upgrade()
    }

    fn set_queue_gauge(&self, n: usize) {
        if let Some(m) = self.manager() {
            m.metrics
                .queue_depth
                .with_label_values(&[self.cfg.name.as_str()])
                .set(n as i64);
        }
    }

    fn count_generation(&self, finish: &str) {
        if let Some(m) = self.manager() {
            m.metrics
                .generations
                .with_label_values(&[self.cfg.name.as_str(), finish])
                .inc();
        }
    }

    fn sender_of(&self, r: &Replica) -> Option<ControlSender> {
        lock(&r.sup).as_ref().map(|s| s.sender())
    }

    /// Hands `job` to replica `r` if it is ready and idle; gives it back
    /// otherwise. A job whose client has gone is dropped, not started:
    /// its cancel may have looked for it while it was neither queued nor
    /// running (taken off the queue by [`Model::pump`]). The check is
    /// under `r.busy`, which that cancel takes after the client's end of
    /// the channel is closed, so one of the two sees the other.
    fn try_start(&self, r: &Replica, job: Job) -> Result<Started, Job> {
        if job.tx.is_closed() {
            return Ok(Started::Gone);
        }
        if *lock(&r.state) != WorkerState::Ready {
            return Err(job);
        }
        let mut busy = lock(&r.busy);
        if job.tx.is_closed() {
            return Ok(Started::Gone);
        }
        if busy.is_some() {
            return Err(job);
        }
        let Some(sender) = self.sender_of(r) else {
            return Err(job);
        };
        if !sender.send(&job.msg) {
            return Err(job);
        }
        *busy = Some(job);
        Ok(Started::Running)
    }

    /// Starts queued jobs on idle ready replicas, dropping those whose
    /// client has gone.
    fn pump(&self) {
        for r in &self.replicas {
            loop {
                let job = {
                    let mut q = lock(&self.queue);
                    let Some(job) = q.pop_front() else { return };
                    self.set_queue_gauge(q.len());
                    job
                };
                match self.try_start(r, job) {
                    Ok(Started::Running) => break,
                    // The next job may go to the same replica.
                    Ok(Started::Gone) => continue,
                    Err(job) => {
                        // Checked under the queue lock, which a cancel
                        // takes first: it finds the job queued, or this
                        // finds its client gone.
                        let mut q = lock(&self.queue);
                        if !job.tx.is_closed() {
                            q.push_front(job);
                        }
                        self.set_queue_gauge(q.len());
                        break;
                    }
                }
            }
        }
    }

    fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let any_ready = self
            .replicas
            .iter()
            .any(|r| *lock(&r.state) == WorkerState::Ready);
        if !any_ready {
            return Err(SubmitError::NotReady(self.cfg.name.clone()));
        }
        let mut job = job;
        for r in &self.replicas {
            match self.try_start(r, job) {
                Ok(_) => return Ok(()),
                Err(j) => job = j,
            }
        }
        let mut q = lock(&self.queue);
        // Jobs whose clients have gone hold no place in the queue.
        q.retain(|j| !j.tx.is_closed());
        if q.len() >= self.cfg.max_queue as usize {
            self.set_queue_gauge(q.len());
            return Err(SubmitError::QueueFull {
                model: self.cfg.name.clone(),
                retry_after: Duration::from_secs(1),
            });
        }
        q.push_back(job);
        self.set_queue_gauge(q.len());
        drop(q);
        // A worker may have become idle meanwhile.
        self.pump();
        Ok(())
    }

    fn cancel(&self, id: u64) {
        {
            let mut q = lock(&self.queue);
            if let Some(pos) = q.iter().position(|j| j.id == id) {
                q.remove(pos);
                self.set_queue_gauge(q.len());
                return;
            }
        }
        for r in &self.replicas {
            let running = lock(&r.busy).as_ref().is_some_and(|j| j.id == id);
            if running {
                if let Some(s) = self.sender_of(r) {
                    let mut m = wp::message("cancel");
                    m["id"] = id.into();
                    s.send(&m);
                }
            }
        }
    }

    /// Takes one frame from replica `r`; true when it was asked for (a
    /// token, `done` or `error` of the generation `r` runs, within its
    /// `max_tokens`): everything else counts as noise against the
    /// worker's frame rate. That includes `ready`: the supervisor acts on
    /// the first of a life itself, and any later one was not asked for.
    fn on_frame(&self, r: &Replica, frame: Value) -> bool {
        let id = frame["id"].as_u64();
        match (frame["type"].as_str().unwrap_or(""), id) {
            ("token", Some(id)) => {
                let mut busy = lock(&r.busy);
                let Some(job) = busy.as_mut().filter(|j| j.id == id) else {
                    return false;
                };
                if job.over_budget {
                    return false;
                }
                let text = frame["text"].as_str().unwrap_or("");
                if !job.take_text(text.len()) {
                    // The worker goes on until it reads the cancel: the job
                    // keeps the replica busy until then, so that no other
                    // generation is sent to a worker still in this one.
                    job.over_budget = true;
                    let _ = job.tx.try_send(Piece::Error {
                        code: "worker_error",
                        message: "the worker sent more or larger text than asked for".into(),
                    });
                    drop(busy);
                    self.count_generation("error");
                    if let Some(s) = self.sender_of(r) {
                        let mut m = wp::message("cancel");
                        m["id"] = id.into();
                        s.send(&m);
                    }
                    return false;
                }
                // The channel has room for every frame take_text allows.
                let _ = job.tx.try_send(Piece::Token {
                    text: text.to_owned(),
                });
                true
            }
            ("done", Some(id)) => {
                let job = lock(&r.busy).take_if(|j| j.id == id);
                let Some(job) = job else { return false };
                if job.over_budget {
                    // Failed and counted already.
                    drop(job);
                    self.pump();
                    return true;
                }
                let done = wp::parse::<wp::Done>(&frame)
                    .ok()
                    // Usage is the worker's word, but never more tokens
                    // than were asked for.
                    .filter(|d| d.completion_tokens <= job.max_tokens);
                if let Some(done) = done {
                    if let (Some(secs), Some(m)) =
                        (worker_first_token_secs(done.first_token_us), self.manager())
                    {
                        m.metrics
                            .worker_first_token
                            .with_label_values(&[self.cfg.name.as_str()])
                            .observe(secs);
                    }
                    self.count_generation(match done.finish {
                        Finish::Stop => "stop",
                        Finish::Length => "length",
                        Finish::Cancelled => "cancelled",
                    });
                    let finish_reason = match done.finish {
                        Finish::Length => FinishReason::Length,
                        Finish::Stop | Finish::Cancelled => FinishReason::Stop,
                    };
                    let _ = job.tx.try_send(Piece::Done {
                        finish_reason,
                        prompt_tokens: done.prompt_tokens,
                        completion_tokens: done.completion_tokens,
                    });
                } else {
                    self.count_generation("error");
                    let _ = job.tx.try_send(Piece::Error {
                        code: "worker_error",
                        message: "the worker's done frame is malformed or counts more tokens than asked for".into(),
                    });
                }
                drop(job);
                self.pump();
                true
            }
            ("error", Some(id)) => {
                let job = lock(&r.busy).take_if(|j| j.id == id);
                let Some(job) = job else { return false };
                if job.over_budget {
                    drop(job);
                    self.pump();
                    return true;
                }
                self.count_generation("error");
                let code = worker_code(frame["code"].as_str().unwrap_or(""));
                let message = worker_text(&frame, "message", MAX_WORKER_TEXT);
                let _ = job.tx.try_send(Piece::Error { code, message });
                drop(job);
                self.pump();
                true
            }
            ("error", None) => {
                // The worker's words: bounded before they are kept or shown.
                let message = worker_text(&frame, "message", MAX_WORKER_TEXT);
                let code = worker_text(&frame, "code", 64);
                tracing::error!(model = %self.cfg.name, worker = r.index, code, message, "worker error");
                *lock(&r.last_exit) = Some(format!("{code}: {message}"));
                false
            }
            _ => false,
        }
    }

    fn on_event(&self, r: &Replica, ev: SupEvent) {
        match ev {
            SupEvent::Stderr(line) => {
                // The worker's words: escaped, a field of ccnoded's line.
                tracing::warn!(model = %self.cfg.name, worker = r.index, line = %ccnode_attest::printable(&line), "worker stderr");
            }
            SupEvent::State(s) => {
                *lock(&r.state) = s;
                if let Some(m) = self.manager() {
                    m.metrics.refresh_workers(&m);
                }
                if s == WorkerState::Ready {
                    tracing::info!(model = %self.cfg.name, worker = r.index, "worker ready");
                    self.pump();
                }
            }
            SupEvent::Exited {
                reason,
                restart_in,
                outlived,
            } => {
                let job = lock(&r.busy).take();
                if let Some(job) = job {
                    let _ = job.tx.try_send(Piece::Error {
                        code: "worker_failed",
                        message: format!("the worker ended ({})", reason.label()),
                    });
                }
                let label = reason.label();
                {
                    let mut last = lock(&r.last_exit);
                    if !(matches!(reason, ExitReason::Code(_)) && last.is_some()) {
                        *last = Some(describe(&reason));
                    }
                }
                if let Some(m) = self.manager() {
                    m.metrics.exits.with_label_values(&[label]).inc();
                    let requested = matches!(reason, ExitReason::Stopped | ExitReason::Killed);
                    if !requested {
                        tracing::warn!(model = %self.cfg.name, worker = r.index, reason = label, restart_in = ?restart_in, "worker ended");
                        m.audit(
                            "worker_exit",
                            format!(
                                "model {} worker {}: {}",
                                self.cfg.name,
                                r.index,
                                describe(&reason)
                            ),
                            label,
                        );
                    }
                    if reason == ExitReason::Seccomp {
                        m.metrics.seccomp_violations.inc();
                        if m.inference().quarantine_on_seccomp_violation {
                            let node = m.node.clone();
                            let why = format!(
                                "worker of model {} made a forbidden system call (SIGSYS)",
                                self.cfg.name
                            );
                            m.runtime.spawn(async move {
                                if node.snapshot().state != NodeState::Quarantined {
                                    if let Err(e) = node
                                        .transition(
                                            crate::state::Event::Quarantine,
                                            Actor::system("sandbox"),
                                            why,
                                        )
                                        .await
                                    {
                                        tracing::error!(error = %e, "quarantine after a seccomp violation failed");
                                    }
                                }
                            });
                        }
                    }
                }
                // Nobody left to serve the queue.
                let none_coming = restart_in.is_none()
                    && self.replicas.iter().all(|x| {
                        x.index == r.index || matches!(*lock(&x.state), WorkerState::Exited)
                    });
                if none_coming {
                    self.fail_queue("model_not_ready", "no worker serves this model now");
                }
                // This worker is gone for good: its device is scrubbed
                // before it serves anyone else. Unless it may not be gone.
                if outlived {
                    self.hold_device(r);
                } else if restart_in.is_none() {
                    self.release_device(r);
                }
            }
        }
    }

    fn fail_queue(&self, code: &'static str, message: &str) {
        let jobs: Vec<Job> = lock(&self.queue).drain(..).collect();
        self.set_queue_gauge(0);
        for j in jobs {
            let _ = j.tx.try_send(Piece::Error {
                code,
                message: message.to_owned(),
            });
        }
    }

    fn fail_in_flight(&self, code: &'static str, message: &str) {
        for r in &self.replicas {
            if let Some(j) = lock(&r.busy).take() {
                let _ = j.tx.try_send(Piece::Error {
                    code,
                    message: message.to_owned(),
                });
            }
        }
    }

    /// Ends every worker: `kill` (quarantine) now, or a graceful stop that
    /// lets the current generation finish.
    fn stop_workers(&self, kill: bool) {
        // No new generation goes to a worker being stopped.
        for r in &self.replicas {
            let mut st = lock(&r.state);
            if *st != WorkerState::Exited {
                *st = WorkerState::Stopping;
            }
        }
        let sups: Vec<(usize, Supervisor)> = self
            .replicas
            .iter()
            .filter_map(|r| lock(&r.sup).take().map(|s| (r.index, s)))
            .collect();
        // A graceful stop leaves a way to kill its workers while it waits
        // out their grace; a kill uses every such way first, so that a
        // quarantine during a drain's stop is not held for the grace.
        let stop_id = self.stops.fetch_add(1, Ordering::Relaxed);
        if kill {
            for (_, _, k) in lock(&self.stopping).iter() {
                k.kill();
            }
        } else {
            lock(&self.stopping).extend(sups.iter().map(|(i, s)| (stop_id, *i, s.killer())));
        }
        let taken: Vec<usize> = sups.iter().map(|(i, _)| *i).collect();
        let handles: Vec<_> = sups
            .into_iter()
            .map(|(i, s)| {
                (
                    i,
                    std::thread::spawn(move || if kill { s.kill() } else { s.stop() }),
                )
            })
            .collect();
        let mut outlived = Vec::new();
        for (i, h) in handles {
            // A supervision thread that panicked: nothing is known of its
            // worker either.
            if !h.join().unwrap_or(false) {
                outlived.push(i);
            }
        }
        // Each device is decided by the stop that joined its supervisor: a
        // replica another stop is still ending keeps its device until that
        // stop knows whether its worker is gone. One no stop holds (its
        // load failed part-way, or its worker ended and was decided then)
        // has nothing running.
        let mut stopping = lock(&self.stopping);
        if !kill {
            stopping.retain(|(id, _, _)| *id != stop_id);
        }
        let elsewhere: Vec<usize> = stopping.iter().map(|(_, i, _)| *i).collect();
        drop(stopping);
        for r in &self.replicas {
            if outlived.contains(&r.index) {
                self.hold_device(r);
            } else if taken.contains(&r.index) || !elsewhere.contains(&r.index) {
                self.release_device(r);
            }
        }
    }

    /// A worker that may have outlived its jail keeps its device: it is
    /// neither scrubbed nor given to anyone while the process may still
    /// have it open. It is held until the worker's PID namespace is seen
    /// to be empty (its init's pidfd; `ccnode_sandbox::remains`), then
    /// scrubbed and given back; when that cannot be seen, until ccnoded
    /// restarts.
    fn hold_device(&self, r: &Replica) {
        if r.held.swap(true, Ordering::AcqRel) {
            return;
        }
        // The claim's token leaves the replica: no later release (an
        // unload) can free the device; only the watch below can.
        let token = lock(&r.claim).take();
        let Some(m) = self.manager() else { return };
        let remains = lock(&r.remains).clone().filter(|w| w.watched());
        let device = match (&r.device, token, &m.scrubber, remains) {
            (Some(d), Some(token), Some(scrubber), Some(remains)) => {
                let (dev, scrubber, node, rt) = (
                    d.clone(),
                    scrubber.clone(),
                    m.node.clone(),
                    m.runtime.clone(),
                );
                let what = format!("model {} worker {}", self.cfg.name, r.index);
                let watch = std::thread::Builder::new()
                    .name("ccnode-remains".into())
                    .spawn(move || {
                        if !remains.wait_gone(None) {
                            return;
                        }
                        tracing::warn!(device = %dev, "the namespace of a worker that outlived its jail is gone: scrubbing its device");
                        let record = AuditRecord {
                            ts: SystemTime::now(),
                            actor: Actor::system("inference"),
                            command: "worker_gone".into(),
                            reason: Some(format!(
                                "{what}: its PID namespace is empty; device {dev} is scrubbed and given back"
                            )),
                            result: "released".into(),
                            from: None,
                            to: None,
                        };
                        rt.spawn(async move { node.audit(record).await });
                        scrubber.release(&dev, token);
                    });
                match watch {
                    Ok(_) => format!("device {d} stays held until its PID namespace is empty"),
                    Err(_) => format!("device {d} stays held until ccnoded restarts"),
                }
            }
            (Some(d), Some(_), _, _) => format!("device {d} stays held until ccnoded restarts"),
            _ => "it held no device".to_owned(),
        };
        tracing::error!(model = %self.cfg.name, worker = r.index, "worker may have outlived its jail; {device}");
        m.audit(
            "worker_outlived",
            format!(
                "model {} worker {}: the jail did not end it in time and was killed; {device}",
                self.cfg.name, r.index
            ),
            "held",
        );
    }

    /// Gives every replica's device back to the ledger, which scrubs it
    /// before anyone else may have it. Only for workers that are gone.
    fn release_devices(&self) {
        for r in &self.replicas {
            self.release_device(r);
        }
    }

    fn release_device(&self, r: &Replica) {
        let Some(m) = self.manager() else { return };
        let (Some(scrubber), Some(device)) = (&m.scrubber, &r.device) else {
            return;
        };
        if let Some(token) = lock(&r.claim).take() {
            scrubber.release(device, token);
        }
    }

    fn restart_workers(&self) {
        // Workers stopped by a drain are started again from the config:
        // verification runs again too (the bytes on disk may have changed).
        let Some(m) = self.manager() else { return };
        if self.replicas.iter().all(|r| lock(&r.sup).is_some()) {
            return;
        }
        let cfg = self.cfg.clone();
        let name = cfg.name.clone();
        // Only if it is still this model: not unloaded or loaded anew
        // since the reload pass listed it. It stays listed while it is
        // verified again (its requests get 503 `model_not_ready`, not 404).
        let Some(old) = lock(&m.models)
            .get(&name)
            .filter(|x| std::ptr::eq(Arc::as_ptr(x), self))
            .cloned()
        else {
            return;
        };
        // One reload at a time: another pass meanwhile finds this one.
        if self.reloading.swap(true, Ordering::AcqRel) {
            return;
        }
        let result = m.load_as(cfg, Some(&old));
        self.reloading.store(false, Ordering::Release);
        match result {
            Ok(()) => {}
            // A drain or quarantine overtook the reload: the model stays
            // listed, its workers stopped, for the next time the node is
            // active (an admin-loaded model is in no config to come back
            // from). Unloaded meanwhile: gone, as asked.
            Err(LoadError::NodeState(_) | LoadError::Quarantined(_) | LoadError::NotLoaded(_)) => {}
            Err(e) => {
                // Not served: no longer listed either.
                let mut models = lock(&m.models);
                if models.get(&name).is_some_and(|x| Arc::ptr_eq(x, &old)) {
                    models.remove(&name);
                }
                drop(models);
                tracing::error!(model = %name, error = %e, "model not reloaded after undrain")
            }
        }
    }
}

fn describe(reason: &ExitReason) -> String {
    match reason {
        ExitReason::Code(c) => format!("exited with code {c}"),
        ExitReason::Signal(s) => format!("killed by signal {s}"),
        ExitReason::Seccomp => "killed by SIGSYS: a forbidden system call".into(),
        ExitReason::SetupFailed { stage, message } => {
            format!("sandbox setup failed at {stage}: {message}")
        }
        other => other.label().replace('_', " "),
    }
}

/// A worker's error code as a `&'static str` from the closed set (a
/// worker's own string is never passed on as a label).
fn worker_code(code: &str) -> &'static str {
    use wp::codes::*;
    [
        CONTEXT_LENGTH_EXCEEDED,
        INVALID_REQUEST,
        BUSY,
        ENGINE,
        PROTOCOL,
    ]
    .into_iter()
    .find(|c| *c == code)
    .unwrap_or("worker_error")
}

impl Inference for Manager {
    fn models(&self) -> Vec<ModelInfo> {
        lock(&self.models)
            .values()
            .map(|m| ModelInfo {
                id: m.cfg.name.clone(),
                created: m.loaded_at,
                ready_workers: m
                    .replicas
                    .iter()
                    .filter(|r| *lock(&r.state) == WorkerState::Ready)
                    .count() as u32,
            })
            .collect()
    }

    fn submit(&self, model: &str, params: GenerateParams) -> Result<Generation, SubmitError> {
        let m = lock(&self.models)
            .get(model)
            .cloned()
            .ok_or_else(|| SubmitError::UnknownModel(model.chars().take(64).collect()))?;
        let Some(work) = self.node.begin_work() else {
            return Err(match self.node.snapshot().state {
                NodeState::Quarantined => SubmitError::Quarantined,
                _ => SubmitError::Draining,
            });
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let prompt = match &params.prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(msgs) => render_chat(msgs),
        };
        if prompt.len() > wp::MAX_PROMPT_BYTES {
            return Err(SubmitError::TooLong(format!(
                "the prompt is over {} bytes",
                wp::MAX_PROMPT_BYTES
            )));
        }
        let seed = params.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ id.rotate_left(32)
        });
        let g = wp::Generate {
            id,
            prompt,
            max_tokens: params.max_tokens,
            temperature: params.temperature,
            top_p: params.top_p,
            seed,
            stop: params.stop,
        };
        let msg = wp::with_body("generate", &g);
        if serde_json::to_vec(&msg).map_or(usize::MAX, |v| v.len() + 4) > wp::MAX_FRAME_TO_WORKER {
            return Err(SubmitError::TooLong(
                "the request, encoded for the worker, is too large".into(),
            ));
        }
        let (tx, rx) = pieces_channel(params.max_tokens);
        let job = Job {
            id,
            msg,
            max_tokens: params.max_tokens,
            frames: 0,
            text_bytes: 0,
            over_budget: false,
            tx,
            _work: work,
        };
        m.submit(job)?;
        let weak = Arc::downgrade(&m);
        Ok(Generation {
            pieces: rx,
            cancel: CancelOnDrop::new(move || {
                if let Some(m) = weak.upgrade() {
                    m.cancel(id);
                }
            }),
        })
    }
}

/// The model manager's series (docs/metrics.md).
#[derive(Debug, Clone)]
pub struct InferenceMetrics {
    pub queue_depth: prometheus::IntGaugeVec,
    pub workers: prometheus::IntGaugeVec,
    pub loads: prometheus::IntCounterVec,
    pub exits: prometheus::IntCounterVec,
    pub seccomp_violations: prometheus::IntCounter,
    pub generations: prometheus::IntCounterVec,
    pub worker_first_token: prometheus::HistogramVec,
}

/// The longest worker-reported time to a first token kept in
/// `ccnode_inference_worker_first_token_seconds`: anything longer is a
/// worker's nonsense, not a measurement.
const MAX_WORKER_FIRST_TOKEN_US: u64 = 3_600_000_000;

/// A `done` frame's `first_token_us` as seconds to observe, or `None`
/// when absent or beyond [`MAX_WORKER_FIRST_TOKEN_US`].
fn worker_first_token_secs(us: Option<u64>) -> Option<f64> {
    us.filter(|&us| us <= MAX_WORKER_FIRST_TOKEN_US)
        .map(|us| us as f64 / 1e6)
}

impl InferenceMetrics {
    fn new(registry: &prometheus::Registry) -> Self {
        use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts};
        fn reg<C: prometheus::core::Collector + Clone + 'static>(
            r: &prometheus::Registry,
            c: C,
        ) -> C {
            // A second manager on the same registry (tests) reuses nothing;
            // registration errors mean a duplicate and are ignored.
            let _ = r.register(Box::new(c.clone()));
            c
        }
        InferenceMetrics {
            queue_depth: reg(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "ccnode_inference_queue_depth",
                        "Generations waiting for a worker, by model.",
                    ),
                    &["model"],
                )
                .expect("valid metric"),
            ),
            workers: reg(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "ccnode_inference_workers",
                        "Inference workers by model and state (starting, loading, ready, stopping, exited).",
                    ),
                    &["model", "state"],
                )
                .expect("valid metric"),
            ),
            loads: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "ccnode_model_loads_total",
                        "Model loads by result: ok, or the refusal's code (signature_invalid, ...).",
                    ),
                    &["result"],
                )
                .expect("valid metric"),
            ),
            exits: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "ccnode_worker_exits_total",
                        "Inference worker ends by reason (seccomp_violation, exited_error, killed, ...).",
                    ),
                    &["reason"],
                )
                .expect("valid metric"),
            ),
            generations: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "ccnode_inference_generations_total",
                        "Generations workers finished, by model and how: stop, length, cancelled, error.",
                    ),
                    &["model", "finish"],
                )
                .expect("valid metric"),
            ),
            worker_first_token: reg(
                registry,
                prometheus::HistogramVec::new(
                    prometheus::HistogramOpts::new(
                        "ccnode_inference_worker_first_token_seconds",
                        "Time from the worker reading a generation to its first token, as the worker reports it \
                         (tokenising and prefill); ccnode_api_time_to_first_token_seconds less this is ccnoded's share.",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                        30.0, 60.0,
                    ]),
                    &["model"],
                )
                .expect("valid metric"),
            ),
            seccomp_violations: reg(
                registry,
                IntCounter::new(
                    "ccnode_worker_seccomp_violations_total",
                    "Workers killed by SIGSYS for a forbidden system call.",
                )
                .expect("valid metric"),
            ),
        }
    }

    fn refresh_workers(&self, m: &Manager) {
        for model in lock(&m.models).values() {
            for s in ["starting", "loading", "ready", "stopping", "exited"] {
                let n = model
                    .replicas
                    .iter()
                    .filter(|r| state_str(*lock(&r.state)) == s)
                    .count();
                self.workers
                    .with_label_values(&[model.cfg.name.as_str(), s])
                    .set(n as i64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model with one replica in `state` and no worker behind it (so
    /// nothing can be started on it), and no manager.
    fn model(state: WorkerState, max_queue: u32) -> Model {
        Model {
            cfg: ModelConfig {
                name: "m".into(),
                dir: PathBuf::from("/nonexistent"),
                signature: None,
                trust_policy: None,
                device: crate::inference::config::DeviceKind::Cpu,
                gpus: Vec::new(),
                replicas: 1,
                max_queue,
            },
            manifest_digest: String::new(),
            signer: String::new(),
            files: 0,
            bytes: 0,
            loaded_at: 0,
            replicas: vec![Arc::new(Replica {
                index: 0,
                device: None,
                claim: Mutex::new(None),
                sup: Mutex::new(None),
                state: Mutex::new(state),
                busy: Mutex::new(None),
                last_exit: Mutex::new(None),
                held: AtomicBool::new(false),
                remains: Mutex::new(None),
            })],
            queue: Mutex::new(VecDeque::new()),
            stopping: Mutex::new(Vec::new()),
            stops: AtomicU64::new(0),
            reloading: AtomicBool::new(false),
            manager: Weak::new(),
        }
    }

    /// A job and its client's end of the channel.
    fn job(node: &Arc<Node>, id: u64) -> (Job, mpsc::Receiver<Piece>) {
        let (tx, rx) = pieces_channel(1);
        let job = Job {
            id,
            msg: wp::message("generate"),
            max_tokens: 1,
            frames: 0,
            text_bytes: 0,
            over_budget: false,
            tx,
            _work: node.begin_work().expect("an active node"),
        };
        (job, rx)
    }

    fn node(dir: &std::path::Path) -> Arc<Node> {
        Node::open("t".into(), dir, 10, crate::metrics::Metrics::new("t"))
            .unwrap()
            .0
    }

    #[test]
    fn a_job_whose_client_left_while_pump_held_it_is_dropped_not_put_back() {
        // The cancel of a job `pump` has taken off the queue finds it
        // neither queued nor running: the client's end is closed, and
        // that is all `pump` has to go by.
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path());
        let m = model(WorkerState::Ready, 8);
        let (gone, rx) = job(&node, 1);
        let (live, _rx) = job(&node, 2);
        lock(&m.queue).extend([gone, live]);
        drop(rx);
        m.pump();
        let queued: Vec<u64> = lock(&m.queue).iter().map(|j| j.id).collect();
        assert_eq!(queued, [2], "the live job waits; the gone one is dropped");
        assert!(lock(&m.replicas[0].busy).is_none());
        assert_eq!(node.in_flight(), 1, "the dropped job's work guard ended");
    }

    #[test]
    fn a_job_whose_client_left_is_never_started() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path());
        let m = model(WorkerState::Ready, 8);
        let (gone, rx) = job(&node, 1);
        drop(rx);
        assert!(matches!(
            m.try_start(&m.replicas[0], gone),
            Ok(Started::Gone)
        ));
        assert!(lock(&m.replicas[0].busy).is_none());
    }

    #[test]
    fn jobs_whose_clients_left_hold_no_place_in_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path());
        let m = model(WorkerState::Ready, 1);
        let (gone, rx) = job(&node, 1);
        lock(&m.queue).push_back(gone);
        drop(rx);
        let (live, _rx) = job(&node, 2);
        assert!(m.submit(live).is_ok(), "the queue's one place was free");
        let queued: Vec<u64> = lock(&m.queue).iter().map(|j| j.id).collect();
        assert_eq!(queued, [2]);
        let (more, _rx2) = job(&node, 3);
        assert!(matches!(m.submit(more), Err(SubmitError::QueueFull { .. })));
    }

    #[test]
    fn a_workers_error_cannot_forge_a_log_line() {
        let m = model(WorkerState::Ready, 8);
        let frame = serde_json::json!({
            "type": "error",
            "code": "oom\nlevel=INFO",
            "message": "x\n2026-12-03T00:00:00Z INFO worker ready\u{1b}[2K",
        });
        assert!(!m.on_frame(&m.replicas[0], frame));
        let last = lock(&m.replicas[0].last_exit).clone().unwrap();
        assert_eq!(
            last,
            "oom\\u{a}level=INFO: x\\u{a}2026-12-03T00:00:00Z INFO worker ready\\u{1b}[2K"
        );
    }

    fn token(id: u64, text: &str) -> Value {
        serde_json::json!({"type": "token", "id": id, "text": text})
    }

    /// The pieces waiting on `rx`, as (text, or the error's code).
    fn drain(rx: &mut mpsc::Receiver<Piece>) -> Vec<Result<usize, &'static str>> {
        let mut out = Vec::new();
        while let Ok(p) = rx.try_recv() {
            out.push(match p {
                Piece::Token { text } => Ok(text.len()),
                Piece::Error { code, .. } => Err(code),
                Piece::Done { .. } => Err("done"),
            });
        }
        out
    }

    #[test]
    fn a_done_counting_more_tokens_than_asked_for_fails_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path());
        let m = model(WorkerState::Ready, 8);
        let r = &m.replicas[0];
        for (completion_tokens, want) in [(1, Err("done")), (2, Err("worker_error"))] {
            // `job` asks for one token.
            let (j, mut rx) = job(&node, 1);
            *lock(&r.busy) = Some(j);
            let done = serde_json::json!({"v": 1, "type": "done", "id": 1, "finish": "length",
                "prompt_tokens": 3, "completion_tokens": completion_tokens});
            assert!(m.on_frame(r, done));
            assert_eq!(drain(&mut rx), [want], "{completion_tokens}");
            assert!(lock(&r.busy).is_none());
        }
    }

    #[test]
    fn status_holds_no_lock_while_it_waits_for_another() {
        // try_start holds `busy` and then takes `sup`: status, waiting for
        // `busy`, must not hold `sup` (or the queue) meanwhile.
        let m = Arc::new(model(WorkerState::Ready, 8));
        let busy = lock(&m.replicas[0].busy);
        let t = {
            let m = m.clone();
            std::thread::spawn(move || m.status().workers.len())
        };
        // Time for status to reach `busy`; too short a wait only lets this
        // pass without testing.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(m.replicas[0].sup.try_lock().is_ok(), "status holds sup");
        assert!(m.queue.try_lock().is_ok(), "status holds the queue");
        drop(busy);
        assert_eq!(t.join().unwrap(), 1);
    }

    #[test]
    fn one_token_in_full_size_chunks_is_taken_and_text_over_the_budget_refused() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path());
        let m = model(WorkerState::Ready, 8);
        let r = &m.replicas[0];
        let max = wp::MAX_TOKEN_TEXT;
        // max_tokens 1: one token of 10000 bytes in three frames, then the
        // two held-back pieces at the end; five frames, under the budget
        // of three emissions × MAX_TOKEN_TEXT.
        let (j, mut rx) = job(&node, 1);
        *lock(&r.busy) = Some(j);
        for len in [max, max, 10_000 - 2 * max, 1, 1] {
            assert!(m.on_frame(r, token(1, &"x".repeat(len))), "{len}");
        }
        assert_eq!(drain(&mut rx), [Ok(max), Ok(max), Ok(1808), Ok(1), Ok(1)]);
        // One byte more than the budget's rest: the generation fails.
        let rest = 3 * max - 10_002;
        assert!(!m.on_frame(r, token(1, &"x".repeat(rest + 1))));
        assert_eq!(drain(&mut rx), [Err("worker_error")]);
        // The worker is still in it until it answers the cancel: nothing
        // else is sent to it, and what it sends meanwhile is noise.
        assert!(lock(&r.busy).is_some());
        assert!(!m.on_frame(r, token(1, "x")));
        assert_eq!(drain(&mut rx), []);
        let done = serde_json::json!({"v": 1, "type": "done", "id": 1, "finish": "cancelled",
            "prompt_tokens": 1, "completion_tokens": 1});
        assert!(m.on_frame(r, done));
        assert_eq!(drain(&mut rx), []);
        assert!(lock(&r.busy).is_none());

        // One frame over MAX_TOKEN_TEXT.
        let (j, mut rx) = job(&node, 2);
        *lock(&r.busy) = Some(j);
        assert!(!m.on_frame(r, token(2, &"x".repeat(max + 1))));
        assert_eq!(drain(&mut rx), [Err("worker_error")]);

        // Small frames: no more than one per emission.
        let (j, mut rx) = job(&node, 3);
        *lock(&r.busy) = Some(j);
        for _ in 0..3 {
            assert!(m.on_frame(r, token(3, "x")));
        }
        assert!(!m.on_frame(r, token(3, "x")));
        assert_eq!(drain(&mut rx), [Ok(1), Ok(1), Ok(1), Err("worker_error")]);
    }

    #[test]
    fn the_pieces_channel_has_room_for_every_frame_the_budget_allows() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path());
        let piece_min = TextBudget::PIECE_MIN as usize;
        for max_tokens in [1, 7] {
            let most = max_token_frames(max_tokens);
            for len in [0, 1, 100, piece_min, wp::MAX_TOKEN_TEXT] {
                let (mut j, _rx) = job(&node, 1);
                j.max_tokens = max_tokens;
                let (tx, _rx) = pieces_channel(max_tokens);
                let mut taken = 0;
                while j.take_text(len) {
                    assert!(tx
                        .try_send(Piece::Token {
                            text: String::new()
                        })
                        .is_ok());
                    taken += 1;
                }
                assert!(taken <= most, "{len}: {taken} > {most}");
                // And the end still fits.
                assert!(tx
                    .try_send(Piece::Token {
                        text: String::new()
                    })
                    .is_ok());
            }
        }
    }

    #[test]
    fn a_worker_reported_first_token_time_is_bounded() {
        assert_eq!(worker_first_token_secs(None), None);
        assert_eq!(worker_first_token_secs(Some(1_500)), Some(0.0015));
        assert_eq!(
            worker_first_token_secs(Some(MAX_WORKER_FIRST_TOKEN_US)),
            Some(3600.0)
        );
        assert_eq!(
            worker_first_token_secs(Some(MAX_WORKER_FIRST_TOKEN_US + 1)),
            None
        );
        assert_eq!(worker_first_token_secs(Some(u64::MAX)), None);
    }
}
