//! `[inference]`: the worker binary, queue bounds, and the models loaded at
//! start (`[[inference.models]]`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;

/// `[inference]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// The `ccnode-worker` binary started in each sandbox.
    pub worker_binary: PathBuf,
    /// How long a worker has to load its model and say `ready`.
    #[serde(with = "humantime_serde")]
    pub load_timeout: Duration,
    /// Trust policy for models that name none (OMS trust policy TOML,
    /// docs/model-signing.md).
    pub trust_policy: Option<PathBuf>,
    /// Quarantine the node when a worker is killed for a forbidden system
    /// call (SIGSYS from seccomp). Off: the worker is restarted per policy;
    /// the violation is always counted and audited.
    pub quarantine_on_seccomp_violation: bool,
    /// Models loaded at start.
    pub models: Vec<ModelConfig>,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            worker_binary: PathBuf::from("/usr/libexec/ccnode/ccnode-worker"),
            load_timeout: Duration::from_secs(300),
            trust_policy: None,
            quarantine_on_seccomp_violation: false,
            models: Vec::new(),
        }
    }
}

/// Where a model's workers compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

/// One `[[inference.models]]` entry (also what `ccnodectl model load`
/// sends).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The model's name in the API and the trust policy.
    pub name: String,
    /// The model directory (config.json, tokenizer.json, safetensors).
    pub dir: PathBuf,
    /// The OMS signature; default `<dir>/model.sig`.
    #[serde(default)]
    pub signature: Option<PathBuf>,
    /// The trust policy; default `[inference] trust_policy`.
    #[serde(default)]
    pub trust_policy: Option<PathBuf>,
    /// `cpu` (default) or `cuda`.
    #[serde(default = "default_device")]
    pub device: DeviceKind,
    /// One GPU or MIG device per replica (`0`, `GPU-…`, `MIG-…`); empty:
    /// none granted. With `cuda`, one per replica is required.
    #[serde(default)]
    pub gpus: Vec<String>,
    /// Workers serving this model.
    #[serde(default = "one")]
    pub replicas: u32,
    /// Generations waiting for a worker before 429.
    #[serde(default = "default_queue")]
    pub max_queue: u32,
}

fn default_device() -> DeviceKind {
    DeviceKind::Cpu
}
fn one() -> u32 {
    1
}
fn default_queue() -> u32 {
    8
}

/// Longest model name.
pub const MAX_NAME: usize = 64;
/// Most replicas of one model.
pub const MAX_REPLICAS: u32 = 64;
/// Longest queue of one model.
pub const MAX_QUEUE: u32 = 10_000;

fn invalid(message: String) -> ConfigError {
    ConfigError::Invalid {
        key: "inference.models",
        message,
    }
}

impl ModelConfig {
    pub fn signature_path(&self) -> PathBuf {
        self.signature
            .clone()
            .unwrap_or_else(|| self.dir.join("model.sig"))
    }

    /// Checks what the types do not. Relative paths are taken from
    /// ccnoded's working directory, as everywhere in the config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = &self.name;
        let ok_name = !n.is_empty()
            && n.len() <= MAX_NAME
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
            && !n.starts_with('.');
        if !ok_name {
            return Err(invalid(format!(
                "model name {n:?}: 1 to {MAX_NAME} of A-Z a-z 0-9 - _ . :, not starting with ."
            )));
        }
        if self.replicas == 0 || self.replicas > MAX_REPLICAS {
            return Err(invalid(format!(
                "model {n}: replicas must be 1 to {MAX_REPLICAS}"
            )));
        }
        if self.max_queue > MAX_QUEUE {
            return Err(invalid(format!(
                "model {n}: max_queue must be at most {MAX_QUEUE}"
            )));
        }
        if !self.gpus.is_empty() && self.gpus.len() != self.replicas as usize {
            return Err(invalid(format!(
                "model {n}: gpus lists {} devices for {} replicas (one each)",
                self.gpus.len(),
                self.replicas
            )));
        }
        if self.device == DeviceKind::Cuda && self.gpus.is_empty() {
            return Err(invalid(format!(
                "model {n}: device = \"cuda\" needs gpus, one per replica"
            )));
        }
        Ok(())
    }
}

impl InferenceConfig {
    /// Validates every model.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.load_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                key: "inference.load_timeout",
                message: "must be positive".into(),
            });
        }
        let mut names = std::collections::HashSet::new();
        let mut devices = std::collections::HashSet::new();
        for m in &self.models {
            m.validate()?;
            if !names.insert(m.name.clone()) {
                return Err(invalid(format!("model {} is declared twice", m.name)));
            }
            for g in &m.gpus {
                if !devices.insert(g.to_ascii_lowercase()) {
                    return Err(invalid(format!(
                        "device {g} is assigned twice (no two workers share a device)"
                    )));
                }
            }
            if m.trust_policy.is_none() && self.trust_policy.is_none() {
                return Err(invalid(format!(
                    "model {}: no trust_policy (set it on the model or in [inference])",
                    m.name
                )));
            }
        }
        Ok(())
    }
}
