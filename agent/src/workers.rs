//! Workers as ccnoded starts them: a jail profile from the `[sandbox]`
//! config, the jail being ccnoded itself re-executed with `__jail`.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use ccnode_sandbox::Profile;

use crate::config::{ConfigError, SandboxConfig};

/// The argument that turns ccnoded into the jail (see `ccnode_sandbox::jail`).
pub const JAIL_ARG: &str = "__jail";

/// What the host offers the sandbox, found at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSupport {
    /// The kernel's Landlock ABI (0: none).
    pub landlock_abi: i32,
    /// Why workers get no cgroup limits, if they do not.
    pub cgroup_unavailable: Option<String>,
    /// How each worker's device group is enforced, or why workers get
    /// none.
    pub device_cgroup: Result<ccnode_sandbox::profile::DeviceCgroupKind, String>,
}

impl HostSupport {
    pub fn probe(cfg: &SandboxConfig) -> HostSupport {
        use ccnode_sandbox::profile::DeviceCgroupKind;
        let cgroup_unavailable = match &cfg.cgroup_parent {
            None => Some("sandbox.cgroup_parent is not set".to_owned()),
            Some(p) => ccnode_sandbox::cgroup::unavailable_reason(p),
        };
        let device_cgroup = match &cfg.device_cgroup_parent {
            None => Err("sandbox.device_cgroup_parent is not set".to_owned()),
            Some(p) => ccnode_sandbox::cgroup::device_cgroup_kind(p).and_then(|kind| {
                // A process has one v2 group: with v2 limits, that group
                // also carries the device program.
                match (&cfg.cgroup_parent, &cgroup_unavailable) {
                    (Some(limits), None) if kind == DeviceCgroupKind::V2 && limits != p => {
                        Err(format!(
                            "{} is cgroup v2, where a worker has one group, and \
                             sandbox.cgroup_parent is {}: set both to the same directory",
                            p.display(),
                            limits.display()
                        ))
                    }
                    _ => Ok(kind),
                }
            }),
        };
        HostSupport {
            landlock_abi: ccnode_sandbox::jail::kernel_landlock_abi(),
            cgroup_unavailable,
            device_cgroup,
        }
    }

    /// Why workers get no device cgroup, if they do not.
    pub fn device_cgroup_unavailable(&self) -> Option<&str> {
        self.device_cgroup.as_ref().err().map(String::as_str)
    }

    /// Whether workers can start under the configured Landlock policy.
    pub fn landlock_ok(&self, cfg: &SandboxConfig) -> bool {
        self.landlock_abi >= i32::from(cfg.landlock_min_abi) || cfg.landlock_allow_degraded
    }
}

/// Errors preparing a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the GPU backend")]
    Backend(#[source] ccnode_gpu::GpuError),
    #[error("gpu.backend is \"none\": no GPU can be assigned")]
    NoBackend,
    #[error("cannot assign {target}")]
    Device {
        target: String,
        #[source]
        source: ccnode_gpu::devices::DeviceError,
    },
    #[error("command {0:?} not found (give an absolute path, or one on PATH)")]
    NoCommand(String),
    #[error("cannot wait for the jail")]
    Wait(#[source] std::io::Error),
    /// `sandbox-exec --gpu` while a daemon owns the devices.
    #[error(
        "GPUs are granted by the running ccnoded only (its device ledger, scrubs and \
         audit); stop it first, or run without --gpu"
    )]
    DevicesOwned(#[source] crate::persist::PersistError),
    /// `sandbox-exec --gpu` could not take the state directory's lock for
    /// another reason (permissions, a read-only file system).
    #[error("cannot take the state directory lock that keeps ccnoded off the GPUs")]
    StateLock(#[source] crate::persist::PersistError),
}

/// What a worker assigned `targets` (GPU indexes, `GPU-…` or `MIG-…`
/// UUIDs) is given: the device nodes and `CUDA_VISIBLE_DEVICES`, from the
/// configured backend's inventory ([`ccnode_gpu::devices::grant`]).
pub fn grant_devices(
    gpu: &crate::config::GpuConfig,
    targets: &[String],
) -> Result<(Vec<PathBuf>, String), WorkerError> {
    let backend = crate::gpu::open_backend(gpu)
        .map_err(WorkerError::Backend)?
        .ok_or(WorkerError::NoBackend)?;
    let inv = backend.inventory().map_err(WorkerError::Backend)?;
    let roots = backend.device_roots();
    let mut nodes: Vec<PathBuf> = Vec::new();
    let mut visible = Vec::new();
    for t in targets {
        let g =
            ccnode_gpu::devices::grant(&inv, t, &roots).map_err(|source| WorkerError::Device {
                target: t.clone(),
                source,
            })?;
        for n in g.nodes {
            if !nodes.contains(&n) {
                nodes.push(n);
            }
        }
        visible.push(g.cuda_visible_devices);
    }
    Ok((nodes, visible.join(",")))
}

/// An absolute path for `cmd`, looked up on PATH if it has no slash.
pub fn resolve_program(cmd: &str) -> Result<PathBuf, WorkerError> {
    if cmd.contains('/') {
        let p = std::fs::canonicalize(cmd).map_err(|_| WorkerError::NoCommand(cmd.to_owned()))?;
        return Ok(p);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(cmd))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::canonicalize(p).ok())
        .ok_or_else(|| WorkerError::NoCommand(cmd.to_owned()))
}

/// The jail profile for `program` under `cfg`.
pub fn profile(
    cfg: &SandboxConfig,
    support: &HostSupport,
    name: &str,
    program: PathBuf,
    args: Vec<String>,
    devices: Vec<PathBuf>,
) -> Result<Profile, WorkerError> {
    let (uid, primary_gid) = cfg.worker_user.resolve("sandbox.worker_user")?;
    let gid = match &cfg.worker_group {
        Some(g) => g.resolve("sandbox.worker_group")?,
        None => primary_gid.ok_or_else(|| ConfigError::Invalid {
            key: "sandbox.worker_group",
            message: "must be set when sandbox.worker_user is a numeric uid".into(),
        })?,
    };
    if uid == 0 || gid == 0 {
        return Err(ConfigError::Invalid {
            key: "sandbox.worker_user",
            message: "resolves to root; workers never run as root".into(),
        }
        .into());
    }
    let mut p = Profile::new(program.clone(), uid, gid);
    p.args = std::iter::once(program.display().to_string())
        .chain(args)
        .collect();
    p.env = cfg
        .env_allow
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
        .collect();
    p.devices = devices;
    // /proc/driver/nvidia needs no bind: the jail's new procfs shows it.
    p.tmp_size = cfg.tmp_size_bytes;
    p.rlimits = ccnode_sandbox::profile::Rlimits {
        open_files: cfg.max_open_files,
        processes: cfg.max_processes,
        file_size: cfg.max_file_size_bytes,
        locked_memory: cfg.max_locked_memory_bytes,
    };
    p.landlock_min_abi = cfg.landlock_min_abi;
    p.landlock_allow_degraded = cfg.landlock_allow_degraded;
    p.cgroup = match (&cfg.cgroup_parent, &support.cgroup_unavailable) {
        (Some(parent), None) => Some(ccnode_sandbox::profile::CgroupLimits {
            parent: parent.clone(),
            name: name.to_owned(),
            memory_max: cfg.memory_max_bytes,
            pids_max: cfg.pids_max,
        }),
        _ => None,
    };
    // Asked for and unusable: no worker starts without it (fail closed).
    p.device_cgroup = match (&cfg.device_cgroup_parent, &support.device_cgroup) {
        (Some(parent), Ok(kind)) => Some(ccnode_sandbox::profile::DeviceCgroup {
            parent: parent.clone(),
            name: name.to_owned(),
            kind: *kind,
        }),
        (Some(_), Err(why)) => {
            return Err(ConfigError::Invalid {
                key: "sandbox.device_cgroup_parent",
                message: format!("unusable, so no worker starts: {why}"),
            }
            .into())
        }
        (None, _) => None,
    };
    Ok(p)
}

/// `ccnoded sandbox-exec`: runs `command` under exactly the worker profile,
/// with this terminal's stdout and stderr, and returns the exit code to
/// use (the command's, or 128 + the signal that killed it).
pub fn sandbox_exec(
    config: &crate::config::Config,
    jail: &Path,
    gpus: &[String],
    command: &[String],
) -> Result<u8, WorkerError> {
    let cfg = &config.sandbox;
    let (cmd, args) = command
        .split_first()
        .ok_or_else(|| WorkerError::NoCommand(String::new()))?;
    let program = resolve_program(cmd)?;
    // A device given to this command is one the daemon's ledger does not
    // know: while a daemon runs it could be a worker's, and nothing would
    // scrub it after. So with --gpu this command takes the daemon's state
    // directory lock for as long as it runs: refused while a daemon runs,
    // and a daemon cannot start (and then scrubs every device at start)
    // until the command has ended.
    let (_devices_lock, devices, visible) = if gpus.is_empty() {
        (None, Vec::new(), String::new())
    } else {
        let lock = crate::persist::lock_dir(&config.node.state_dir).map_err(|e| match e {
            crate::persist::PersistError::Locked { .. } => WorkerError::DevicesOwned(e),
            other => WorkerError::StateLock(other),
        })?;
        let (devices, visible) = grant_devices(&config.gpu, gpus)?;
        (Some(lock), devices, visible)
    };
    let support = HostSupport::probe(cfg);
    if cfg.cgroup_delegated {
        // Moving this one-shot command out of its own group would leave the
        // caller's shell behind in a group with controllers enabled.
        eprintln!(
            "sandbox: sandbox.cgroup_delegated is taken by the daemon only; this command runs \
             without cgroups"
        );
    }
    if let Some(why) = &support.cgroup_unavailable {
        eprintln!("sandbox: no cgroup limits: {why}");
    }
    if cfg.device_cgroup_parent.is_none() {
        if let Some(why) = support.device_cgroup_unavailable() {
            eprintln!("sandbox: no device cgroup: {why}");
        }
    }
    let mut profile = profile(
        cfg,
        &support,
        &ccnode_sandbox::cgroup::worker_group_name(
            &format!("sandbox-exec-{}", std::process::id()),
            &visible
                .split(',')
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        ),
        program,
        args.to_vec(),
        devices,
    )?;
    if !visible.is_empty() {
        // CUDA sees exactly what was granted, whatever the allow-list.
        profile.env.retain(|(k, _)| k != "CUDA_VISIBLE_DEVICES");
        profile.env.push(("CUDA_VISIBLE_DEVICES".into(), visible));
    }
    let mut jailed = match ccnode_sandbox::spawn(
        jail,
        &[JAIL_ARG],
        &profile,
        &[],
        Stdio::inherit(),
        Stdio::inherit(),
    ) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("sandbox: {e}");
            return Ok(ccnode_sandbox::jail::EXIT_SETUP_FAILED as u8);
        }
    };
    // Say what the jail reports, as it reports it.
    let mut line = String::new();
    loop {
        line.clear();
        match jailed.reports.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        match v["event"].as_str().unwrap_or("") {
            "landlock" => eprintln!(
                "sandbox: landlock {} (kernel ABI {}, policy requires {})",
                v["status"].as_str().unwrap_or("?"),
                v["kernel_abi"],
                v["required_abi"]
            ),
            "landlock_degraded" => eprintln!(
                "sandbox: DEGRADED: kernel Landlock ABI {} is below the required {}",
                v["kernel_abi"], v["required_abi"]
            ),
            "rlimit_lowered" => eprintln!(
                "sandbox: {} limited to {} (ccnoded's own limit), not {}",
                v["limit"].as_str().unwrap_or("?"),
                v["set"],
                v["wanted"]
            ),
            "error" => eprintln!(
                "sandbox: setup failed at {}: {}",
                v["stage"].as_str().unwrap_or("?"),
                v["message"].as_str().unwrap_or("?")
            ),
            "exited" => {
                if let Some(name) = v["signal_name"].as_str() {
                    let why = if name == "SIGSYS" {
                        " (a forbidden system call: seccomp)"
                    } else {
                        ""
                    };
                    eprintln!("sandbox: the command was killed by {name}{why}");
                }
            }
            _ => {}
        }
    }
    let status = jailed.child.wait().map_err(WorkerError::Wait)?;
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => (128 + sig) as u8,
        _ => 1,
    })
}
