//! Wiring: load state, bind listeners, tell systemd, serve, shut down.

use std::sync::Arc;

use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::peer::Policy;
use crate::admin::server::{self, AdminContext, AdminListener, BindError};
use ccnode_gpu::BackendKind;
use tracing::Instrument;

use crate::attestation::StartError;
use crate::config::{Config, ConfigError};
use crate::gpu::GpuMonitor;
use crate::http::{self, HttpListener};
use crate::metrics::Metrics;
use crate::node::{Node, OpenError};
use crate::notify::{self, Notifier};
use crate::persist::{Loaded, PersistError};

/// Why the daemon stopped with an error. Each maps to an exit code that
/// systemd units and scripts can act on (see [`DaemonError::exit_code`]).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    #[error("cannot set up logging")]
    Logging(#[from] crate::logging::LogError),
    #[error(transparent)]
    State(#[from] OpenError),
    #[error(transparent)]
    AdminSocket(#[from] BindError),
    #[error("cannot listen on {addr}")]
    Http {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    #[error("NOTIFY_SOCKET is set but unusable")]
    Notify(#[source] std::io::Error),
    #[error("GPU backend unavailable")]
    Gpu(#[source] ccnode_gpu::GpuError),
    #[error("cannot start the GPU monitor threads")]
    GpuThreads(#[source] std::io::Error),
    #[error("attestation unavailable")]
    Attestation(#[source] crate::attestation::StartError),
    #[error("cannot load the API's TLS certificate or key")]
    ApiTls(#[source] crate::openai::TlsError),
    #[error("cannot listen for the API on {addr}")]
    ApiListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("model {model}: a configured device cannot be assigned")]
    ModelDevice {
        model: String,
        #[source]
        source: crate::workers::WorkerError,
    },
    #[error("sandbox.cgroup_delegated: {0}")]
    Delegation(String),
    #[error("cannot listen for attestations on {addr}")]
    AttestationListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Exit codes, after sysexits.h.
pub mod exit {
    /// Clean shutdown.
    pub const OK: u8 = 0;
    /// An error not listed below.
    pub const SOFTWARE: u8 = 70;
    /// The runtime or a listener could not be created, or the state
    /// directory or admin socket is in use by another ccnoded.
    pub const OSERR: u8 = 71;
    /// Configured hardware is unavailable: NVML's library or any GPU is
    /// missing, or the TPM cannot be opened or used. Never answered by
    /// falling back to simulation.
    pub const UNAVAILABLE: u8 = 69;
    /// Persistent state could not be read or written.
    pub const IOERR: u8 = 74;
    /// The configuration is invalid. systemd does not restart on it.
    pub const CONFIG: u8 = 78;
}

impl DaemonError {
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Config(_) => exit::CONFIG,
            DaemonError::ModelDevice {
                source: crate::workers::WorkerError::Backend(_),
                ..
            } => exit::UNAVAILABLE,
            DaemonError::ModelDevice { .. }
            | DaemonError::ApiTls(_)
            | DaemonError::Delegation(_) => exit::CONFIG,
            DaemonError::ApiListen { .. } => exit::OSERR,
            DaemonError::Logging(_) | DaemonError::Notify(_) | DaemonError::GpuThreads(_) => {
                exit::SOFTWARE
            }
            DaemonError::Gpu(ccnode_gpu::GpuError::SimSpec { .. }) => exit::CONFIG,
            DaemonError::Gpu(_) => exit::UNAVAILABLE,
            DaemonError::Attestation(StartError::Config(_) | StartError::Tls(_)) => exit::CONFIG,
            DaemonError::Attestation(StartError::Tpm(e) | StartError::Measure(e))
                if e.code() == "event_log" =>
            {
                exit::IOERR
            }
            DaemonError::Attestation(StartError::Tpm(e)) if e.code() == "tpm_config" => {
                exit::CONFIG
            }
            DaemonError::Attestation(_) => exit::UNAVAILABLE,
            DaemonError::AttestationListen { .. } => exit::OSERR,
            DaemonError::State(OpenError::Persist(PersistError::Locked { .. })) => exit::OSERR,
            DaemonError::State(_) => exit::IOERR,
            DaemonError::AdminSocket(_) | DaemonError::Http { .. } | DaemonError::Runtime(_) => {
                exit::OSERR
            }
        }
    }
}

/// Runs ccnoded until SIGTERM or SIGINT. Logging must be initialised.
pub fn run(mut config: Config) -> Result<(), DaemonError> {
    let admin_gid = config.admin.group.resolve("admin.group")?;
    let read_only_gid = config
        .admin
        .read_only_group
        .as_ref()
        .map(|g| g.resolve("admin.read_only_group"))
        .transpose()?;
    let mode = config.admin.mode_bits()?;
    let notifier = Notifier::from_env().map_err(DaemonError::Notify)?;
    // A model load holds every file and its sealed copy open at once.
    match ccnode_attest::oms::raise_open_file_limit() {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    // First of all, while nothing else has started: ccnoded's own group
    // becomes the workers' parent only once ccnoded has left it.
    if config.sandbox.cgroup_delegated {
        let d = ccnode_sandbox::cgroup::own_v2_group()
            .and_then(|g| ccnode_sandbox::cgroup::take_delegation(&g))
            .map_err(DaemonError::Delegation)?;
        tracing::info!(
            group = %d.group.display(),
            leaf = %d.leaf.display(),
            workers = %d.workers.display(),
            controllers = %d.enabled.join(" "),
            "took the delegated cgroup: ccnoded in its own leaf, workers' groups beneath workers/"
        );
        config.sandbox.cgroup_parent = Some(d.workers.clone());
        config.sandbox.device_cgroup_parent = Some(d.workers);
    }
    // Before any state is touched: a host whose configured GPUs cannot be
    // reached does not start.
    let gpu_backend = crate::gpu::open_backend(&config.gpu).map_err(DaemonError::Gpu)?;
    let simulated = gpu_backend
        .as_ref()
        .is_some_and(|b| b.kind() == BackendKind::Sim);
    // Every start-up line of a daemon on simulated GPUs says so.
    let span = if simulated {
        tracing::warn_span!("start", gpu_backend = "sim (SIMULATED GPUs)")
    } else {
        tracing::Span::none()
    };
    let _entered = span.clone().entered();
    // Every device a model is assigned must exist: a MIG UUID that names
    // nothing is a configuration error, named, before anything starts.
    for m in &config.inference.models {
        for g in &m.gpus {
            crate::workers::grant_devices(&config.gpu, std::slice::from_ref(g)).map_err(
                |source| DaemonError::ModelDevice {
                    model: m.name.clone(),
                    source,
                },
            )?;
        }
    }
    if simulated {
        tracing::warn!(
            sim_file = %config.gpu.sim_file.as_deref().unwrap_or(std::path::Path::new("")).display(),
            "GPU backend is SIMULATED: no real GPU is monitored"
        );
    }
    let node_id = config.node_id();
    let metrics = Metrics::new(&node_id);
    let (node, loaded) = Node::open(
        node_id.clone(),
        &config.node.state_dir,
        config.admin.audit_recent,
        metrics,
    )?;
    match &loaded {
        Loaded::Restored(r) => {
            tracing::info!(state = %r.state, reason = %r.reason, since = %crate::timefmt::format(r.since), "node state restored")
        }
        Loaded::FirstStart(_) => tracing::info!("first start: node is active"),
        Loaded::Recovered { problem, .. } => {
            tracing::error!(problem = %problem, "node state could not be trusted: starting quarantined")
        }
    }
    // The TPM after the state directory is ours: ccnode's event log lives
    // there.
    let attester = if config.attestation.enabled {
        Some(
            crate::attestation::open(&config, gpu_backend.as_ref())
                .map_err(DaemonError::Attestation)?,
        )
    } else {
        None
    };
    let support = crate::workers::HostSupport::probe(&config.sandbox);
    let m = node.metrics();
    m.sandbox
        .with_label_values(&["landlock_abi"])
        .set(i64::from(support.landlock_abi));
    m.sandbox
        .with_label_values(&["landlock_required_abi"])
        .set(i64::from(config.sandbox.landlock_min_abi));
    m.sandbox
        .with_label_values(&["landlock_ok"])
        .set(i64::from(support.landlock_ok(&config.sandbox)));
    m.sandbox
        .with_label_values(&["cgroup_limits"])
        .set(i64::from(support.cgroup_unavailable.is_none()));
    if let Some(why) = &support.cgroup_unavailable {
        tracing::warn!(reason = %why, "workers will run without cgroup memory and pids limits");
    }
    m.sandbox
        .with_label_values(&["device_cgroup"])
        .set(i64::from(support.device_cgroup.is_ok()));
    // The directories workers' groups are made in.
    let worker_parents: Vec<std::path::PathBuf> = [
        (
            &config.sandbox.cgroup_parent,
            support.cgroup_unavailable.is_none(),
        ),
        (
            &config.sandbox.device_cgroup_parent,
            support.device_cgroup.is_ok(),
        ),
    ]
    .into_iter()
    .filter_map(|(p, usable)| p.clone().filter(|_| usable))
    .collect();
    // Groups that jails killed outright (SIGKILL, a crash of the host's
    // ccnoded) could not remove: empty, named after a dead jail's pid.
    // Ones that still hold processes stay, and so do their devices
    // (Scrubber::hold_leftovers).
    for parent in &worker_parents {
        let removed = ccnode_sandbox::cgroup::sweep(parent);
        if removed > 0 {
            tracing::info!(parent = %parent.display(), removed, "removed worker cgroups left by dead jails");
        }
    }
    match (
        &config.sandbox.device_cgroup_parent,
        support.device_cgroup_unavailable(),
    ) {
        (Some(_), Some(why)) => tracing::error!(
            reason = %why,
            "sandbox.device_cgroup_parent is unusable: no worker will start"
        ),
        (None, Some(why)) => tracing::warn!(
            reason = %why,
            "workers will run without a device cgroup (Landlock and their own /dev still confine them to their devices)"
        ),
        _ => {
            if let Ok(kind) = &support.device_cgroup {
                tracing::info!(?kind, "each worker gets its own device allow-list");
            }
        }
    }
    if !support.landlock_ok(&config.sandbox) {
        tracing::error!(
            kernel_abi = support.landlock_abi,
            required_abi = config.sandbox.landlock_min_abi,
            "the kernel's Landlock is below the sandbox policy: workers will not start"
        );
    } else if support.landlock_abi < i32::from(config.sandbox.landlock_min_abi) {
        tracing::warn!(
            kernel_abi = support.landlock_abi,
            required_abi = config.sandbox.landlock_min_abi,
            "workers will start with DEGRADED Landlock confinement (sandbox.landlock_allow_degraded)"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.node.worker_threads)
        .max_blocking_threads(16)
        .thread_name("ccnoded")
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    drop(_entered);
    runtime.block_on(
        serve(
            config,
            node,
            gpu_backend,
            attester,
            admin_gid,
            read_only_gid,
            mode,
            notifier,
            worker_parents,
        )
        .instrument(span),
    )
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    config: Config,
    node: Arc<Node>,
    gpu_backend: Option<Arc<dyn ccnode_gpu::GpuBackend>>,
    attester: Option<Arc<ccnode_attest::Attester>>,
    admin_gid: u32,
    read_only_gid: Option<u32>,
    mode: u32,
    notifier: Notifier,
    worker_parents: Vec<std::path::PathBuf>,
) -> Result<(), DaemonError> {
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();

    let admin = AdminListener::bind(&config.admin.socket, mode, admin_gid)?;
    let http_listener = HttpListener::bind(config.http.listen)
        .await
        .map_err(|source| DaemonError::Http {
            addr: config.http.listen,
            source,
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| DaemonError::Http {
            addr: config.http.listen,
            source,
        })?;
    let attestation_tls = match &attester {
        Some(_) => {
            crate::attestation::load_tls(&config.attestation).map_err(DaemonError::Attestation)?
        }
        None => None,
    };
    let scheme = if attestation_tls.is_some() {
        "https"
    } else {
        "http"
    };
    let attestation_listener = match &attester {
        None => None,
        Some(_) => {
            let addr = config.attestation.listen;
            let l = crate::attestation::AttestationListener::bind(addr)
                .await
                .map_err(|source| DaemonError::AttestationListen { addr, source })?;
            let bound = l
                .local_addr()
                .map_err(|source| DaemonError::AttestationListen { addr, source })?;
            Some((l, bound))
        }
    };
    let api_listener = if config.api.enabled {
        let tls = crate::openai::load_tls(&config.api).map_err(DaemonError::ApiTls)?;
        let addr = config.api.listen;
        let l = crate::openai::ApiListener::bind(addr)
            .await
            .map_err(|source| DaemonError::ApiListen { addr, source })?;
        let bound = l
            .local_addr()
            .map_err(|source| DaemonError::ApiListen { addr, source })?;
        Some((l, bound, tls))
    } else {
        None
    };
    let signals = Signals::install().map_err(DaemonError::Runtime)?;

    // GPUs: one poll and its policy before READY, so that drift or a sick
    // GPU found at start has taken effect when systemd hears we are up.
    // The device ledger and VRAM scrubs, over the same backend.
    let scrubber = gpu_backend.as_ref().map(|b| {
        crate::gpu::scrub::Scrubber::new(
            b.clone(),
            config.gpu.scrub.clone(),
            node.clone(),
            node.metrics().registry(),
        )
    });
    let gpu = match gpu_backend {
        None => None,
        Some(backend) => {
            let monitor = GpuMonitor::new(backend, config.gpu.clone());
            let first = {
                let m = monitor.clone();
                tokio::task::spawn_blocking(move || m.poll())
                    .await
                    .expect("the GPU poll does not panic")
            };
            for finding in first {
                crate::gpu::act(&node, finding).await;
            }
            let (tx, rx) = tokio::sync::mpsc::channel(1024);
            monitor.start(tx).map_err(DaemonError::GpuThreads)?;
            tokio::spawn(crate::gpu::run_actions(node.clone(), rx));
            Some(monitor)
        }
    };

    // Models: verified and their workers started in the background; the
    // API answers model_not_ready until a worker is ready.
    let jail = std::env::current_exe().map_err(DaemonError::Runtime)?;
    let inference = crate::inference::Manager::new(
        node.clone(),
        Arc::new(config.clone()),
        jail,
        node.metrics(),
        gpu.clone(),
        attester.as_ref().map(|a| a.tpm().clone()),
        scrubber.clone(),
    );
    {
        // Every device is scrubbed before its first worker: whatever the
        // last process left in VRAM (before a crash or a reboot of
        // ccnoded) does not reach a tenant.
        let m = inference.clone();
        // Worker groups a previous run left with processes in them: their
        // devices are held, not scrubbed, until they end. Before anything
        // serves, so no load can claim one first.
        if let Some(s) = m.scrubber() {
            tokio::task::block_in_place(|| s.hold_leftovers(&worker_parents));
        }
        tokio::task::spawn_blocking(move || {
            if let Some(s) = m.scrubber() {
                s.scrub_all("start");
            }
            m.load_configured();
        });
    }
    let follow_task = tokio::spawn(inference.clone().follow_node(stop.clone()));

    let policy = Policy {
        admin_gid,
        read_only_gid,
        self_uid: nix::unistd::geteuid().as_raw(),
    };
    let metrics_url = format!("http://{http_addr}/metrics");
    let attestation_url = attestation_listener
        .as_ref()
        .map(|(_, a)| format!("{scheme}://{a}/v1/attestation"));
    let api_url = api_listener.as_ref().map(|(_, a, tls)| {
        let scheme = if tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{a}/v1")
    });
    let socket_path = admin.path().display().to_string();
    let mut admin_ctx = AdminContext::new(
        node.clone(),
        policy,
        &config.admin,
        json!({
            "admin_socket": socket_path,
            "metrics_url": metrics_url,
            "attestation_url": attestation_url,
            "api_url": api_url,
        }),
        gpu.clone(),
    );
    admin_ctx.inference = Some(inference.clone());
    let ctx = Arc::new(admin_ctx);

    let notifier = Arc::new(notifier);
    let grace = config.node.shutdown_grace;
    let admin_task = tokio::spawn(server::serve(admin, ctx, stop.clone(), tracker.clone()));
    let http_task = tokio::spawn(http::serve(
        http_listener,
        node.clone(),
        gpu.clone(),
        config.http.clone(),
        stop.clone(),
        grace,
    ));
    let attestation_task = match (attestation_listener, attester) {
        (Some((listener, _)), Some(attester)) => {
            let models = inference.clone();
            let node = node.clone();
            let gpu = gpu.clone();
            let config = config.clone();
            let stop = stop.clone();
            Some(tokio::spawn(async move {
                crate::attestation::serve(
                    listener,
                    attester,
                    node,
                    gpu,
                    Some(models),
                    attestation_tls,
                    &config,
                    stop,
                    grace,
                )
                .await
            }))
        }
        _ => None,
    };
    let api_task = api_listener.map(|(listener, _, tls)| {
        tokio::spawn(crate::openai::serve(
            listener,
            inference.clone(),
            config.api.clone(),
            tls,
            node.metrics().clone(),
            stop.clone(),
            grace,
        ))
    });
    let drain_task = tokio::spawn(node.clone().run_drain_watcher(stop.clone()));
    if let Some(interval) = notify::watchdog_interval() {
        // Pinged from the runtime itself: a wedged runtime stops pinging and
        // systemd restarts the daemon.
        let stop = stop.clone();
        let notifier = notifier.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => notifier.watchdog(),
                }
            }
        });
    }

    let state = node.snapshot();
    tracing::info!(
        node = %node.id(),
        state = %state.state,
        admin_socket = %socket_path,
        metrics = %metrics_url,
        attestation = attestation_url.as_deref().unwrap_or("off"),
        api = api_url.as_deref().unwrap_or("off"),
        "ccnoded ready"
    );
    notifier.ready(&format!(
        "node {} {}; admin socket {socket_path}; metrics {metrics_url}",
        node.id(),
        state.state
    ));
    let status_task = {
        let mut rx = node.subscribe();
        let node_id = node.id().to_owned();
        let stop = stop.clone();
        let notifier = notifier.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = rx.changed() => if changed.is_err() { return },
                }
                let r = rx.borrow_and_update().clone();
                notifier.status(&format!("node {node_id} {}: {}", r.state, r.reason));
            }
        })
    };

    let signal = signals.wait().await;
    tracing::info!(signal, grace = %humantime::format_duration(grace), "shutting down");
    notifier.stopping(&format!("stopping on {signal}"));
    stop.cancel();
    tracker.close();
    let _ = admin_task.await;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("admin requests still running after the grace period");
    }
    let _ = http_task.await;
    if let Some(t) = attestation_task {
        let _ = t.await;
    }
    if let Some(t) = api_task {
        let _ = t.await;
    }
    if let Some(gpu) = &gpu {
        gpu.stop();
    }
    let _ = drain_task.await;
    let _ = status_task.await;
    let _ = follow_task.await;
    {
        let m = inference.clone();
        let _ = tokio::task::spawn_blocking(move || {
            m.shutdown();
            // The stopped workers' devices are being scrubbed: let those
            // scrubs finish within the grace (the next start scrubs every
            // device anyway, so one cut short loses nothing).
            if let Some(s) = m.scrubber() {
                if !s.wait_idle(grace) {
                    tracing::warn!(
                        "scrubs still running at exit; the next start scrubs every device"
                    );
                }
            }
        })
        .await;
    }
    // Every transition was persisted before it was acknowledged and every
    // audit record synced before that; nothing is left to flush.
    let r = node.snapshot();
    tracing::info!(state = %r.state, "stopped");
    Ok(())
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
