//! ccnoded's configuration: TOML, validated at load.
//!
//! Every key has a default, so an empty file is a valid configuration for a
//! production host. Unknown keys are errors: a typo must not silently turn a
//! setting off. Errors name the key (`admin.mode`) and say what was wrong.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where ccnoded looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ccnode/ccnoded.toml";

/// Largest configuration file ccnoded reads.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Largest admin request line, in bytes (the newline excluded).
pub const ADMIN_MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Errors from loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is {size} bytes, more than the {max} allowed")]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("config file {path} is not valid UTF-8")]
    NotUtf8 { path: PathBuf },
    #[error("{path}: key `{key}`: {message}")]
    Parse {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

impl ConfigError {
    fn invalid(key: &'static str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key,
            message: message.into(),
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub node: NodeConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub sandbox: SandboxConfig,
    #[serde(default)]
    pub gpu: GpuConfig,
    #[serde(default)]
    pub attestation: AttestationConfig,
    #[serde(default)]
    pub inference: crate::inference::InferenceConfig,
    #[serde(default)]
    pub api: ApiConfig,
    /// sha256 of the file this was loaded from, `sha256:<hex>` (not a key:
    /// set by [`Config::load`]; the attestation claims carry it).
    #[serde(skip)]
    pub source_digest: Option<String>,
}

/// `[node]`: identity, state and lifecycle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// The node's name in evidence, metrics and logs; the host name if unset.
    pub id: Option<String>,
    /// Where state that must survive a restart lives.
    pub state_dir: PathBuf,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Threads of the async runtime.
    pub worker_threads: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: None,
            state_dir: PathBuf::from("/var/lib/ccnode"),
            shutdown_grace: Duration::from_secs(10),
            worker_threads: 2,
        }
    }
}

/// How log records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald when stderr is connected to the journal, text on a
    /// terminal, JSON otherwise.
    Auto,
    Text,
    Json,
    Journald,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter directive (`info`, `ccnode_agent=debug`); the
    /// `RUST_LOG` environment variable overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Auto,
            level: "info".to_owned(),
        }
    }
}

/// A group, by name or by numeric id.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum GroupSpec {
    Gid(u32),
    Name(String),
}

impl fmt::Display for GroupSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupSpec::Gid(gid) => write!(f, "gid {gid}"),
            GroupSpec::Name(name) => write!(f, "group {name:?}"),
        }
    }
}

impl GroupSpec {
    /// Looks the group up in the system's group database.
    pub fn resolve(&self, key: &'static str) -> Result<u32, ConfigError> {
        match self {
            GroupSpec::Gid(gid) => Ok(*gid),
            GroupSpec::Name(name) => match nix::unistd::Group::from_name(name) {
                Ok(Some(group)) => Ok(group.gid.as_raw()),
                Ok(None) => Err(ConfigError::invalid(
                    key,
                    format!("group {name:?} does not exist on this host"),
                )),
                Err(errno) => Err(ConfigError::invalid(
                    key,
                    format!("cannot look up group {name:?}: {errno}"),
                )),
            },
        }
    }
}

/// `[admin]`: the local admin socket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub socket: PathBuf,
    /// Octal permission bits of the socket file, as a string ("0660").
    pub mode: String,
    /// Members of this group (and root, and the daemon's own uid) may run
    /// every admin command.
    pub group: GroupSpec,
    /// Members of this group may run read-only commands (`status`).
    pub read_only_group: Option<GroupSpec>,
    /// Connections served at once; more are refused with an error.
    pub max_connections: usize,
    /// Time a client has to send one complete request line.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Time a client has to take one response.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Recent audit records kept in memory for the `audit` command.
    pub audit_recent: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            socket: PathBuf::from("/run/ccnode/admin.sock"),
            mode: "0660".to_owned(),
            group: GroupSpec::Name("ccnode-admin".to_owned()),
            read_only_group: None,
            max_connections: 32,
            read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(5),
            audit_recent: 1000,
        }
    }
}

impl AdminConfig {
    /// The socket's permission bits, parsed from [`AdminConfig::mode`].
    pub fn mode_bits(&self) -> Result<u32, ConfigError> {
        let s = self.mode.trim();
        let digits = s.strip_prefix("0o").unwrap_or(s);
        if digits.is_empty() || digits.len() > 4 {
            return Err(ConfigError::invalid(
                "admin.mode",
                format!("expected octal permission bits such as \"0660\", found {s:?}"),
            ));
        }
        let bits = u32::from_str_radix(digits, 8).map_err(|_| {
            ConfigError::invalid(
                "admin.mode",
                format!("expected octal permission bits such as \"0660\", found {s:?}"),
            )
        })?;
        if bits & !0o777 != 0 {
            return Err(ConfigError::invalid(
                "admin.mode",
                format!("setuid, setgid and sticky bits are not allowed, found {s:?}"),
            ));
        }
        if bits & 0o600 != 0o600 {
            return Err(ConfigError::invalid(
                "admin.mode",
                format!("the owner needs read and write access, found {s:?}"),
            ));
        }
        Ok(bits)
    }
}

/// A user, by name or by numeric id.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum UserSpec {
    Uid(u32),
    Name(String),
}

impl UserSpec {
    /// Looks the user up: (uid, primary gid).
    pub fn resolve(&self, key: &'static str) -> Result<(u32, Option<u32>), ConfigError> {
        match self {
            UserSpec::Uid(uid) => Ok((*uid, None)),
            UserSpec::Name(name) => match nix::unistd::User::from_name(name) {
                Ok(Some(u)) => Ok((u.uid.as_raw(), Some(u.gid.as_raw()))),
                Ok(None) => Err(ConfigError::invalid(
                    key,
                    format!("user {name:?} does not exist on this host"),
                )),
                Err(errno) => Err(ConfigError::invalid(
                    key,
                    format!("cannot look up user {name:?}: {errno}"),
                )),
            },
        }
    }
}

/// `[sandbox]`: how workers are confined. docs/sandbox.md explains each
/// layer.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// The unprivileged user workers run as (never root).
    pub worker_user: UserSpec,
    /// Their group; the user's primary group if unset.
    pub worker_group: Option<GroupSpec>,
    /// The Landlock ABI the policy requires (6: file system, TCP, ioctl on
    /// devices, abstract-socket and signal scoping).
    pub landlock_min_abi: u8,
    /// Start workers best-effort on a kernel below `landlock_min_abi`;
    /// shown in metrics and logs.
    pub landlock_allow_degraded: bool,
    /// Size of each worker's private /tmp, bytes.
    pub tmp_size_bytes: u64,
    pub max_open_files: u64,
    pub max_processes: u64,
    pub max_file_size_bytes: u64,
    pub max_locked_memory_bytes: u64,
    /// ccnoded's own cgroup v2 group was delegated to it (systemd's
    /// `Delegate=yes`): at start it moves itself into `<group>/ccnoded`
    /// and uses `<group>/workers` as both `cgroup_parent` and
    /// `device_cgroup_parent` ([`ccnode_sandbox::cgroup::take_delegation`]).
    pub cgroup_delegated: bool,
    /// A delegated cgroup v2 directory for worker cgroups; none: no cgroup
    /// limits (said in metrics and logs).
    pub cgroup_parent: Option<PathBuf>,
    /// A directory of the cgroup v1 `devices` hierarchy under which each
    /// worker gets a group allowing only its own device nodes; none or
    /// unusable: no device cgroup (said in metrics and logs).
    pub device_cgroup_parent: Option<PathBuf>,
    pub memory_max_bytes: u64,
    pub pids_max: u64,
    /// Environment variables passed from ccnoded's environment to workers;
    /// everything else is cleared.
    pub env_allow: Vec<String>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            worker_user: UserSpec::Name("ccnode-worker".to_owned()),
            worker_group: None,
            landlock_min_abi: 6,
            landlock_allow_degraded: false,
            tmp_size_bytes: 64 * 1024 * 1024,
            max_open_files: 1024,
            max_processes: 512,
            max_file_size_bytes: 1024 * 1024 * 1024,
            max_locked_memory_bytes: 64 * 1024 * 1024,
            cgroup_delegated: false,
            cgroup_parent: None,
            device_cgroup_parent: None,
            memory_max_bytes: 64 * 1024 * 1024 * 1024,
            pids_max: 512,
            env_allow: vec!["LANG".to_owned(), "RUST_LOG".to_owned()],
        }
    }
}

/// Which GPU backend ccnoded uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuBackendChoice {
    /// NVIDIA's management library. A missing library or GPU stops ccnoded
    /// (exit 69); it never falls back to simulation.
    Nvml,
    /// Simulated GPUs from `gpu.sim_file`: tests and dev mode only, said
    /// in metrics and logs.
    Sim,
    /// No GPU monitoring (hosts without GPUs, tests of other parts).
    None,
}

/// What ccnoded does about a GPU health event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthAction {
    /// Count it only.
    Ignore,
    /// Count it, log it and audit it.
    Alert,
    /// Also quarantine the node, with the event as the reason.
    Quarantine,
}

impl HealthAction {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthAction::Ignore => "ignore",
            HealthAction::Alert => "alert",
            HealthAction::Quarantine => "quarantine",
        }
    }
}

/// What ccnoded does about a drifted field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftAction {
    /// Drift series, log and audit event.
    Alert,
    /// Also start no new workers while it lasts.
    Block,
    /// Also quarantine the node.
    Quarantine,
}

impl DriftAction {
    pub fn as_str(self) -> &'static str {
        match self {
            DriftAction::Alert => "alert",
            DriftAction::Block => "block",
            DriftAction::Quarantine => "quarantine",
        }
    }
}

/// `[gpu]`: inventory, telemetry, health and drift. docs/metrics.md lists
/// the series.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    pub backend: GpuBackendChoice,
    /// The simulation file (backend `sim` only; relative paths are taken
    /// from the working directory).
    pub sim_file: Option<PathBuf>,
    /// How often GPUs are polled; /metrics serves the last poll.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// `[gpu.health]`.
    pub health: GpuHealthPolicy,
    /// `[gpu.baseline]`: the pinned driver, firmware and modes.
    pub baseline: ccnode_gpu::drift::Baseline,
    /// `[gpu.drift_action]`: per drifted field (`driver_version =
    /// "quarantine"`); fields not listed get `alert`, except `mig_layout`,
    /// which gets `block`.
    pub drift_action: std::collections::BTreeMap<ccnode_gpu::drift::DriftField, DriftAction>,
    /// `[gpu.scrub]`: VRAM scrubbing between tenants.
    pub scrub: ScrubPolicy,
}

/// What ccnoded does with a device whose scrub failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScrubAction {
    /// Keep the device out of service (no worker gets it).
    Block,
    /// Also quarantine the node.
    Quarantine,
}

impl ScrubAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ScrubAction::Block => "block",
            ScrubAction::Quarantine => "quarantine",
        }
    }
}

/// `[gpu.scrub]`: when and how each GPU or MIG device's memory is scrubbed
/// (docs/gpu-isolation.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrubPolicy {
    /// Scrub at start, when a worker's device is released, and on
    /// quarantine. Off: devices change hands unscrubbed (a warning at
    /// start, `ccnode_scrub_enabled 0`, and the attestation claims say so).
    pub enabled: bool,
    /// The scrub program (`ccnode-scrub`), an absolute path or looked up on
    /// PATH.
    pub binary: PathBuf,
    /// Longest one device's scrub may take; then it is killed and failed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Least share of the device's memory a scrub must cover (0 to 1).
    pub min_coverage: f64,
    /// What a failed scrub, or one below `min_coverage`, does.
    pub on_failure: ScrubAction,
    /// Largest allocation of the scrub, MiB.
    pub chunk_mib: u64,
    /// Scrubs run at once (one process per device).
    pub parallel: usize,
}

impl Default for ScrubPolicy {
    fn default() -> Self {
        ScrubPolicy {
            enabled: true,
            binary: PathBuf::from("ccnode-scrub"),
            timeout: Duration::from_secs(600),
            min_coverage: 0.95,
            on_failure: ScrubAction::Block,
            chunk_mib: 1024,
            parallel: 8,
        }
    }
}

impl ScrubPolicy {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(self.min_coverage > 0.0 && self.min_coverage <= 1.0) {
            return Err(ConfigError::invalid(
                "gpu.scrub.min_coverage",
                format!("must be above 0 and at most 1, found {}", self.min_coverage),
            ));
        }
        if self.timeout < Duration::from_millis(100) || self.timeout > Duration::from_secs(3600) {
            return Err(ConfigError::invalid(
                "gpu.scrub.timeout",
                "must be between 100ms and 1h",
            ));
        }
        if !(2..=65536).contains(&self.chunk_mib) {
            return Err(ConfigError::invalid(
                "gpu.scrub.chunk_mib",
                format!("must be between 2 and 65536, found {}", self.chunk_mib),
            ));
        }
        if !(1..=64).contains(&self.parallel) {
            return Err(ConfigError::invalid(
                "gpu.scrub.parallel",
                format!("must be between 1 and 64, found {}", self.parallel),
            ));
        }
        if self.binary.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "gpu.scrub.binary",
                "must not be empty",
            ));
        }
        Ok(())
    }
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            backend: GpuBackendChoice::Nvml,
            sim_file: None,
            poll_interval: Duration::from_secs(10),
            health: GpuHealthPolicy::default(),
            baseline: ccnode_gpu::drift::Baseline::default(),
            drift_action: std::collections::BTreeMap::new(),
            scrub: ScrubPolicy::default(),
        }
    }
}

impl GpuConfig {
    /// The action for a drifted field.
    pub fn drift_action_for(&self, field: ccnode_gpu::drift::DriftField) -> DriftAction {
        use ccnode_gpu::drift::DriftField;
        self.drift_action
            .get(&field)
            .copied()
            .unwrap_or(match field {
                // A layout that drifted changes who shares a GPU: no new
                // workers until it is back, unless the policy says otherwise.
                DriftField::MigLayout => DriftAction::Block,
                _ => DriftAction::Alert,
            })
    }
}

/// `[gpu.health]`: which events are critical and what they do.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuHealthPolicy {
    /// XID codes that are critical (NVIDIA's XID catalog: 48 double-bit
    /// ECC, 63/64 row remapping, 74 NVLink, 79 fallen off the bus, 92 high
    /// single-bit rate, 94/95 contained/uncontained ECC, 119/120 GSP).
    pub critical_xids: Vec<u64>,
    pub critical_xid_action: HealthAction,
    /// A GPU that has fallen off the bus.
    pub gpu_lost_action: HealthAction,
    /// Uncorrected ECC errors on one GPU (since the driver loaded) at which
    /// `ecc_action` applies.
    pub ecc_uncorrected_threshold: u64,
    pub ecc_action: HealthAction,
}

impl Default for GpuHealthPolicy {
    fn default() -> Self {
        GpuHealthPolicy {
            critical_xids: vec![48, 63, 64, 74, 79, 92, 94, 95, 119, 120],
            critical_xid_action: HealthAction::Quarantine,
            gpu_lost_action: HealthAction::Quarantine,
            ecc_uncorrected_threshold: 1,
            ecc_action: HealthAction::Quarantine,
        }
    }
}

/// The TEE evidence ccnoded attaches to attestations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TeeChoice {
    /// None: the evidence says `none`; verifiers refuse it unless told
    /// otherwise.
    None,
    /// An ephemeral key signs a report-shaped structure: dev mode and tests
    /// only; verifiers refuse it unless told otherwise.
    Simulated,
    /// An AMD SEV-SNP guest: a report per attestation (`snp_interface`).
    SevSnp,
    /// An Intel TDX guest: a quote per attestation through configfs-tsm.
    Tdx,
}

/// How an SEV-SNP guest asks for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnpInterface {
    /// configfs-tsm when `tsm_root` exists, else `sev_guest_device`.
    Auto,
    /// configfs-tsm (Linux 6.7 and later).
    ConfigfsTsm,
    /// The `sev-guest` driver's ioctls.
    SevGuest,
}

/// `[attestation]`: the TPM, the evidence and the endpoint
/// (docs/attestation.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttestationConfig {
    /// Serve attestations. When on, a TPM that cannot be opened stops
    /// ccnoded (exit 69).
    pub enabled: bool,
    /// Where `POST /v1/attestation` is served (its own listener, so
    /// /metrics can stay on loopback).
    pub listen: SocketAddr,
    /// `device:/dev/tpmrm0` or `swtpm:host=127.0.0.1,port=2321`.
    pub tcti: String,
    /// Persistent handle of the attestation key (created on first start,
    /// reused after).
    pub ak_handle: u32,
    /// `ecc-p256` or `rsa-2048`.
    pub ak_algorithm: String,
    /// sha256 PCRs each quote covers (`0-7,13`); must include `ccnode_pcr`.
    pub pcrs: String,
    /// The PCR ccnoded extends with each policy and model load.
    pub ccnode_pcr: u32,
    /// The firmware event log; empty: not included.
    pub firmware_log: PathBuf,
    /// The TEE evidence in every attestation. `sev-snp` and `tdx` are
    /// checked at start (one report): ccnoded exits 69 when the TEE
    /// cannot give one, never falling back to another kind.
    pub tee: TeeChoice,
    /// SEV-SNP: configfs-tsm, the sev-guest device, or whichever exists.
    pub snp_interface: SnpInterface,
    /// SEV-SNP: the VMPL the report is asked for at; unset: the kernel's
    /// default (configfs-tsm) or 0 (sev-guest).
    pub snp_vmpl: Option<u32>,
    /// configfs-tsm's report directory.
    pub tsm_root: PathBuf,
    /// The sev-guest device.
    pub sev_guest_device: PathBuf,
    /// Verifiers being answered at once (waiting for the TPM included);
    /// more get 503.
    pub max_concurrent: usize,
    /// Most verifiers answered by one quote (their nonces under one Merkle
    /// root, each answer with its own inclusion proof); 1: a quote per
    /// request.
    pub batch_max: usize,
    /// Per client address: sustained attestations per second, and burst.
    pub per_client_rate: f64,
    pub per_client_burst: u32,
    /// All clients together.
    pub global_rate: f64,
    pub global_burst: u32,
    /// Time a client has to send its request, and the TPM to answer.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Serve TLS with this certificate chain (PEM, leaf first) and key
    /// (PEM, PKCS#8, SEC1 or PKCS#1); both or neither. The sha256 of the
    /// leaf's SubjectPublicKeyInfo is then in the claims.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl Default for AttestationConfig {
    fn default() -> Self {
        AttestationConfig {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 9861)),
            tcti: ccnode_attest::tpm::DEFAULT_TCTI.to_owned(),
            ak_handle: ccnode_attest::tpm::DEFAULT_AK_HANDLE,
            ak_algorithm: "ecc-p256".to_owned(),
            pcrs: "0-7,13".to_owned(),
            ccnode_pcr: ccnode_attest::tpm::DEFAULT_CCNODE_PCR,
            firmware_log: PathBuf::from(ccnode_attest::tpm::DEFAULT_FIRMWARE_LOG),
            tee: TeeChoice::None,
            snp_interface: SnpInterface::Auto,
            snp_vmpl: None,
            tsm_root: PathBuf::from(ccnode_attest::tee::tsm::DEFAULT_ROOT),
            sev_guest_device: PathBuf::from("/dev/sev-guest"),
            max_concurrent: 256,
            batch_max: 256,
            per_client_rate: 2.0,
            per_client_burst: 10,
            global_rate: 50.0,
            global_burst: 100,
            request_timeout: Duration::from_secs(10),
            tls_cert: None,
            tls_key: None,
        }
    }
}

impl AttestationConfig {
    /// The TPM settings, checked; the event log lives in `state_dir`.
    pub fn tpm_config(
        &self,
        state_dir: &Path,
    ) -> Result<ccnode_attest::tpm::TpmConfig, ConfigError> {
        use ccnode_attest::tpm::{AkAlgorithm, PcrSelection, Tcti, TpmConfig};
        let bad = |key: &'static str| {
            move |e: ccnode_attest::tpm::TpmError| ConfigError::invalid(key, e.to_string())
        };
        let mut c = TpmConfig::new(state_dir.join("tpm-events.json"));
        c.tcti = self.tcti.parse::<Tcti>().map_err(bad("attestation.tcti"))?;
        c.ak_handle = self.ak_handle;
        c.ak_algorithm = self
            .ak_algorithm
            .parse::<AkAlgorithm>()
            .map_err(bad("attestation.ak_algorithm"))?;
        c.pcrs = self
            .pcrs
            .parse::<PcrSelection>()
            .map_err(bad("attestation.pcrs"))?;
        c.ccnode_pcr = self.ccnode_pcr;
        c.firmware_log =
            (!self.firmware_log.as_os_str().is_empty()).then(|| self.firmware_log.clone());
        c.validate().map_err(bad("attestation"))?;
        Ok(c)
    }
}

/// `[http]`: the metrics and health endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// Time a client has to send a request's headers.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Largest declared request body (Content-Length) accepted; larger ones
    /// and chunked bodies get 413. The endpoints here take no body.
    pub max_body_bytes: u64,
    /// Time a client has to take some of a response being written; a
    /// client that reads nothing for this long is closed.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9860)),
            max_connections: 64,
            header_read_timeout: Duration::from_secs(5),
            max_body_bytes: 4096,
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// `[api]`: the OpenAI-compatible inference API (docs/inference.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Serve the API.
    pub enabled: bool,
    /// Where `/v1/...` is served (its own listener).
    pub listen: SocketAddr,
    /// Serve TLS with this certificate chain (PEM, leaf first) and key
    /// (PEM: PKCS#8, SEC1 or PKCS#1); both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Largest request body; a larger declared `Content-Length` is refused
    /// before reading, a larger chunked body when it passes the limit (413).
    pub max_body_bytes: u64,
    /// Largest `max_tokens` a request may ask for (400 past it). Requests
    /// that give none get the OpenAI defaults (16 for completions, 256 for
    /// chat), or this if lower.
    pub max_tokens_cap: u32,
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (and the TLS
    /// handshake); also how long a kept-alive connection may sit idle.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time a client has to send a request's body (408 past it).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Time a client has to take some of a response (or stream) being
    /// written; a client that reads nothing for this long is closed, which
    /// cancels its generation.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 9862)),
            tls_cert: None,
            tls_key: None,
            max_body_bytes: 1024 * 1024,
            max_tokens_cap: 4096,
            max_connections: 256,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
        }
    }
}

impl ApiConfig {
    /// Checks the values that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::invalid(
                if self.tls_cert.is_some() {
                    "api.tls_key"
                } else {
                    "api.tls_cert"
                },
                "tls_cert and tls_key go together",
            ));
        }
        if !(1024..=API_MAX_BODY_BYTES).contains(&self.max_body_bytes) {
            return Err(ConfigError::invalid(
                "api.max_body_bytes",
                format!(
                    "must be between 1024 and {API_MAX_BODY_BYTES} (64 MiB), found {}",
                    self.max_body_bytes
                ),
            ));
        }
        check_range(
            "api.max_tokens_cap",
            self.max_tokens_cap as usize,
            1,
            API_MAX_TOKENS_CAP as usize,
        )?;
        check_range("api.max_connections", self.max_connections, 1, 65_536)?;
        check_timeout("api.header_read_timeout", self.header_read_timeout)?;
        check_timeout("api.request_timeout", self.request_timeout)?;
        check_timeout("api.write_timeout", self.write_timeout)?;
        Ok(())
    }
}

/// Most `api.max_body_bytes` may be.
pub const API_MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Most `api.max_tokens_cap` may be.
pub const API_MAX_TOKENS_CAP: u32 = 1 << 20;

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read;
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let size = file.metadata().map_err(read_err)?.len();
        if size > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
                size,
                max: MAX_CONFIG_BYTES,
            });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
                size: bytes.len() as u64,
                max: MAX_CONFIG_BYTES,
            });
        }
        let text = String::from_utf8(bytes).map_err(|_| ConfigError::NotUtf8 {
            path: path.to_owned(),
        })?;
        let digest = {
            use sha2::Digest;
            format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(text.as_bytes()))
            )
        };
        Config::parse(&text)
            .map(|mut c| {
                c.source_digest = Some(digest);
                c
            })
            .map_err(|err| match err {
                ConfigError::Parse { key, message, .. } => ConfigError::Parse {
                    path: path.to_owned(),
                    key,
                    message,
                },
                other => other,
            })
    }

    /// Parses and validates a configuration from TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|err| {
            let key = err.path().to_string();
            let inner = err.into_inner();
            ConfigError::Parse {
                path: PathBuf::new(),
                key: if key == "." {
                    "(top level)".to_owned()
                } else {
                    key
                },
                message: inner.message().trim().to_owned(),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.inference.validate()?;
        self.gpu.scrub.validate()?;
        if let Some(id) = &self.node.id {
            validate_node_id(id)?;
        }
        if !self.node.state_dir.is_absolute() && self.node.state_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid("node.state_dir", "must not be empty"));
        }
        if self.node.shutdown_grace > Duration::from_secs(600) {
            return Err(ConfigError::invalid(
                "node.shutdown_grace",
                "must be at most 10m (systemd's stop timeout must cover it)",
            ));
        }
        if !(1..=64).contains(&self.node.worker_threads) {
            return Err(ConfigError::invalid(
                "node.worker_threads",
                format!(
                    "must be between 1 and 64, found {}",
                    self.node.worker_threads
                ),
            ));
        }
        if crate::logging::parse_filter(&self.log.level).is_none() {
            return Err(ConfigError::invalid(
                "log.level",
                format!("not a valid filter directive: {:?}", self.log.level),
            ));
        }
        if self.admin.socket.as_os_str().is_empty() || self.admin.socket.file_name().is_none() {
            return Err(ConfigError::invalid("admin.socket", "must name a file"));
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if self.admin.socket.as_os_str().len() > 107 {
            return Err(ConfigError::invalid(
                "admin.socket",
                "path is longer than a Unix socket address allows (107 bytes)",
            ));
        }
        self.admin.mode_bits()?;
        if let GroupSpec::Name(name) = &self.admin.group {
            if name.is_empty() {
                return Err(ConfigError::invalid("admin.group", "must not be empty"));
            }
        }
        if let Some(GroupSpec::Name(name)) = &self.admin.read_only_group {
            if name.is_empty() {
                return Err(ConfigError::invalid(
                    "admin.read_only_group",
                    "must not be empty (leave it out to allow nobody)",
                ));
            }
        }
        check_range("admin.max_connections", self.admin.max_connections, 1, 4096)?;
        check_timeout("admin.read_timeout", self.admin.read_timeout)?;
        check_timeout("admin.write_timeout", self.admin.write_timeout)?;
        check_range("admin.audit_recent", self.admin.audit_recent, 1, 100_000)?;
        check_range("http.max_connections", self.http.max_connections, 1, 65_536)?;
        check_timeout("http.header_read_timeout", self.http.header_read_timeout)?;
        check_timeout("http.write_timeout", self.http.write_timeout)?;
        if self.http.max_body_bytes > 16 * 1024 * 1024 {
            return Err(ConfigError::invalid(
                "http.max_body_bytes",
                "must be at most 16 MiB",
            ));
        }
        let sb = &self.sandbox;
        if let UserSpec::Uid(0) = sb.worker_user {
            return Err(ConfigError::invalid(
                "sandbox.worker_user",
                "workers never run as root",
            ));
        }
        if let Some(GroupSpec::Gid(0)) = sb.worker_group {
            return Err(ConfigError::invalid(
                "sandbox.worker_group",
                "workers never run as group root",
            ));
        }
        if !(1..=64).contains(&sb.landlock_min_abi) {
            return Err(ConfigError::invalid(
                "sandbox.landlock_min_abi",
                format!("must be between 1 and 64, found {}", sb.landlock_min_abi),
            ));
        }
        check_range(
            "sandbox.max_open_files",
            sb.max_open_files as usize,
            16,
            1 << 20,
        )?;
        check_range(
            "sandbox.max_processes",
            sb.max_processes as usize,
            1,
            1 << 22,
        )?;
        check_range("sandbox.pids_max", sb.pids_max as usize, 1, 1 << 22)?;
        if sb.tmp_size_bytes < 1024 * 1024 {
            return Err(ConfigError::invalid(
                "sandbox.tmp_size_bytes",
                "must be at least 1 MiB",
            ));
        }
        if sb.cgroup_delegated {
            for (key, set) in [
                ("cgroup_parent", sb.cgroup_parent.is_some()),
                ("device_cgroup_parent", sb.device_cgroup_parent.is_some()),
            ] {
                if set {
                    return Err(ConfigError::invalid(
                        "sandbox.cgroup_delegated",
                        format!(
                            "sets sandbox.{key} itself (<ccnoded's group>/workers): leave {key} out"
                        ),
                    ));
                }
            }
        }
        if let Some(p) = &sb.cgroup_parent {
            if !p.is_absolute() {
                return Err(ConfigError::invalid(
                    "sandbox.cgroup_parent",
                    "must be an absolute path",
                ));
            }
        }
        if let Some(p) = &sb.device_cgroup_parent {
            if !p.is_absolute() {
                return Err(ConfigError::invalid(
                    "sandbox.device_cgroup_parent",
                    "must be an absolute path",
                ));
            }
        }
        for name in &sb.env_allow {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(ConfigError::invalid(
                    "sandbox.env_allow",
                    format!("{name:?} is not a variable name"),
                ));
            }
        }
        let gpu = &self.gpu;
        if gpu.backend == GpuBackendChoice::Sim && gpu.sim_file.is_none() {
            return Err(ConfigError::invalid(
                "gpu.sim_file",
                "is required when gpu.backend is \"sim\"",
            ));
        }
        if gpu.backend != GpuBackendChoice::Sim && gpu.sim_file.is_some() {
            return Err(ConfigError::invalid(
                "gpu.sim_file",
                "is only used with gpu.backend = \"sim\"; remove it",
            ));
        }
        if gpu.poll_interval < Duration::from_millis(100)
            || gpu.poll_interval > Duration::from_secs(3600)
        {
            return Err(ConfigError::invalid(
                "gpu.poll_interval",
                format!(
                    "must be between 100ms and 1h, found {}",
                    humantime::format_duration(gpu.poll_interval)
                ),
            ));
        }
        if gpu.health.ecc_uncorrected_threshold == 0 {
            return Err(ConfigError::invalid(
                "gpu.health.ecc_uncorrected_threshold",
                "must be at least 1",
            ));
        }
        let at = &self.attestation;
        at.tpm_config(&self.node.state_dir)?;
        check_range("attestation.max_concurrent", at.max_concurrent, 1, 4096)?;
        check_range(
            "attestation.batch_max",
            at.batch_max,
            1,
            ccnode_attest::merkle::MAX_BATCH,
        )?;
        for (key, rate) in [
            ("attestation.per_client_rate", at.per_client_rate),
            ("attestation.global_rate", at.global_rate),
        ] {
            if !(rate.is_finite() && rate > 0.0 && rate <= 100_000.0) {
                return Err(ConfigError::invalid(
                    key,
                    format!("must be above 0 and at most 100000 per second, found {rate}"),
                ));
            }
        }
        check_range(
            "attestation.per_client_burst",
            at.per_client_burst as usize,
            1,
            100_000,
        )?;
        check_range(
            "attestation.global_burst",
            at.global_burst as usize,
            1,
            1_000_000,
        )?;
        check_timeout("attestation.request_timeout", at.request_timeout)?;
        if let Some(v) = at.snp_vmpl {
            check_range("attestation.snp_vmpl", v as usize, 0, 3)?;
        }
        if !at.tsm_root.is_absolute() {
            return Err(ConfigError::invalid(
                "attestation.tsm_root",
                "must be an absolute path",
            ));
        }
        if !at.sev_guest_device.is_absolute() {
            return Err(ConfigError::invalid(
                "attestation.sev_guest_device",
                "must be an absolute path",
            ));
        }
        if at.tls_cert.is_some() != at.tls_key.is_some() {
            return Err(ConfigError::invalid(
                if at.tls_cert.is_some() {
                    "attestation.tls_key"
                } else {
                    "attestation.tls_cert"
                },
                "tls_cert and tls_key go together",
            ));
        }
        if gpu.health.critical_xids.len() > 256 {
            return Err(ConfigError::invalid(
                "gpu.health.critical_xids",
                "lists more than 256 codes",
            ));
        }
        gpu.baseline
            .validate()
            .map_err(|e| ConfigError::invalid("gpu.baseline.mig_layout", e))?;
        self.api.validate()?;
        Ok(())
    }

    /// The node id: configured, or the host name.
    pub fn node_id(&self) -> String {
        if let Some(id) = &self.node.id {
            return id.clone();
        }
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| validate_node_id(h).is_ok())
            .unwrap_or_else(|| "unnamed".to_owned())
    }
}

fn validate_node_id(id: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= 253
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            "node.id",
            format!("must be 1 to 253 characters of A-Z a-z 0-9 . - _, found {id:?}"),
        ))
    }
}

fn check_range(key: &'static str, value: usize, min: usize, max: usize) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            format!("must be between {min} and {max}, found {value}"),
        ))
    }
}

fn check_timeout(key: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value < Duration::from_millis(10) || value > Duration::from_secs(3600) {
        return Err(ConfigError::invalid(
            key,
            format!(
                "must be between 10ms and 1h, found {}",
                humantime::format_duration(value)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(err: ConfigError) -> String {
        match err {
            ConfigError::Parse { key, .. } => key,
            ConfigError::Invalid { key, .. } => key.to_owned(),
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn empty_file_gives_production_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.node.state_dir, PathBuf::from("/var/lib/ccnode"));
        assert_eq!(c.admin.socket, PathBuf::from("/run/ccnode/admin.sock"));
        assert_eq!(c.admin.mode_bits().unwrap(), 0o660);
        assert_eq!(c.admin.group, GroupSpec::Name("ccnode-admin".into()));
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:9860");
        assert!(!c.api.enabled, "the API is off unless asked for");
        assert_eq!(c.api.listen.to_string(), "127.0.0.1:9862");
        assert_eq!(c.api.max_body_bytes, 1024 * 1024);
        assert_eq!(c.api.max_tokens_cap, 4096);
        assert_eq!(c.api.max_connections, 256);
        assert_eq!(c.api.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.api.request_timeout, Duration::from_secs(30));
        assert_eq!(c.api.write_timeout, Duration::from_secs(30));
        assert_eq!(c.http.write_timeout, Duration::from_secs(10));
    }

    #[test]
    fn api_section_parses() {
        let c = Config::parse(
            "[api]\nenabled = true\nlisten = \"0.0.0.0:8000\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\nmax_body_bytes = 2048\nmax_tokens_cap = 1\nrequest_timeout = \"5s\"\n",
        )
        .unwrap();
        assert!(c.api.enabled);
        assert_eq!(c.api.listen.to_string(), "0.0.0.0:8000");
        assert_eq!(c.api.tls_key.as_deref(), Some(Path::new("/k.pem")));
        assert_eq!(c.api.max_body_bytes, 2048);
        assert_eq!(c.api.max_tokens_cap, 1);
        assert_eq!(c.api.request_timeout, Duration::from_secs(5));
    }

    #[test]
    fn parses_durations_and_groups() {
        let c = Config::parse(
            "[node]\nshutdown_grace = \"250ms\"\n[admin]\ngroup = 0\nread_only_group = \"adm\"\n",
        )
        .unwrap();
        assert_eq!(c.node.shutdown_grace, Duration::from_millis(250));
        assert_eq!(c.admin.group, GroupSpec::Gid(0));
        assert_eq!(c.admin.read_only_group, Some(GroupSpec::Name("adm".into())));
    }

    #[test]
    fn a_delegated_cgroup_leaves_the_parents_to_ccnoded() {
        let c = Config::parse("[sandbox]\ncgroup_delegated = true\n").unwrap();
        assert!(c.sandbox.cgroup_delegated);
        assert!(!Config::parse("").unwrap().sandbox.cgroup_delegated);
        for key in ["cgroup_parent", "device_cgroup_parent"] {
            let err = Config::parse(&format!(
                "[sandbox]\ncgroup_delegated = true\n{key} = \"/sys/fs/cgroup/x\"\n"
            ))
            .unwrap_err();
            let msg = err.to_string();
            assert_eq!(key_of(err), "sandbox.cgroup_delegated");
            assert!(msg.contains(key), "{msg}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[admin]\nsokcet = \"/tmp/x\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sokcet"), "{msg}");
        assert_eq!(key_of(err), "admin.sokcet");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = Config::parse("[http]\nmax_connections = \"many\"\n").unwrap_err();
        assert_eq!(key_of(err), "http.max_connections");
        let err = Config::parse("[http]\nlisten = \"not an address\"\n").unwrap_err();
        assert_eq!(key_of(err), "http.listen");
        let err = Config::parse("[node]\nshutdown_grace = \"soon\"\n").unwrap_err();
        assert_eq!(key_of(err), "node.shutdown_grace");
    }

    #[test]
    fn bad_values_are_refused_with_their_key() {
        for (text, key) in [
            ("[admin]\nmode = \"0999\"\n", "admin.mode"),
            ("[admin]\nmode = \"4660\"\n", "admin.mode"),
            ("[admin]\nmode = \"0060\"\n", "admin.mode"),
            ("[admin]\nmode = \"\"\n", "admin.mode"),
            ("[admin]\nmax_connections = 0\n", "admin.max_connections"),
            ("[admin]\nread_timeout = \"0s\"\n", "admin.read_timeout"),
            ("[admin]\ngroup = \"\"\n", "admin.group"),
            ("[node]\nid = \"has space\"\n", "node.id"),
            ("[node]\nworker_threads = 0\n", "node.worker_threads"),
            ("[node]\nshutdown_grace = \"2h\"\n", "node.shutdown_grace"),
            ("[log]\nlevel = \"[[[\"\n", "log.level"),
            ("[log]\nlevel = \" a[\u{e4}{\"\n", "log.level"),
            ("[log]\nformat = \"xml\"\n", "log.format"),
            (
                "[http]\nmax_body_bytes = 1000000000\n",
                "http.max_body_bytes",
            ),
            ("[http]\nwrite_timeout = \"2h\"\n", "http.write_timeout"),
            ("[api]\ntls_cert = \"/c.pem\"\n", "api.tls_key"),
            ("[api]\ntls_key = \"/k.pem\"\n", "api.tls_cert"),
            ("[api]\nmax_body_bytes = 100\n", "api.max_body_bytes"),
            (
                "[api]\nmax_body_bytes = 100000000000\n",
                "api.max_body_bytes",
            ),
            ("[api]\nmax_tokens_cap = 0\n", "api.max_tokens_cap"),
            ("[api]\nmax_tokens_cap = 2000000\n", "api.max_tokens_cap"),
            ("[api]\nmax_tokens_cap = -1\n", "api.max_tokens_cap"),
            ("[api]\nmax_connections = 0\n", "api.max_connections"),
            (
                "[api]\nheader_read_timeout = \"0s\"\n",
                "api.header_read_timeout",
            ),
            ("[api]\nrequest_timeout = \"2h\"\n", "api.request_timeout"),
            ("[api]\nwrite_timeout = \"1ms\"\n", "api.write_timeout"),
            ("[api]\nlisten = \"localhost\"\n", "api.listen"),
            ("[api]\nenable = true\n", "api.enable"),
        ] {
            let err = Config::parse(text).unwrap_err();
            assert_eq!(key_of(err), key, "for {text:?}");
        }
        let long = format!("[admin]\nsocket = \"/{}\"\n", "a".repeat(120));
        assert_eq!(key_of(Config::parse(&long).unwrap_err()), "admin.socket");
    }

    #[test]
    fn missing_group_is_named() {
        let err = GroupSpec::Name("no-such-group-ccnode".into())
            .resolve("admin.group")
            .unwrap_err();
        assert_eq!(key_of(err), "admin.group");
        assert_eq!(
            GroupSpec::Name("root".into())
                .resolve("admin.group")
                .unwrap(),
            0
        );
    }

    #[test]
    fn oversize_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.toml");
        std::fs::write(&path, vec![b'#'; (MAX_CONFIG_BYTES + 1) as usize]).unwrap();
        assert!(matches!(
            Config::load(&path).unwrap_err(),
            ConfigError::TooLarge { .. }
        ));
    }
}
