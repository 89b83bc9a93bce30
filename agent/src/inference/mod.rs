//! Inference: models served by sandboxed `ccnode-worker` processes, and the
//! seam between them and the OpenAI-compatible API ([`crate::openai`]).
//!
//! The API speaks only to [`Inference`]: it lists models and submits
//! generations; the model manager behind it (verification, workers,
//! queues) is the other side. Tests of the API use a fake `Inference`;
//! ccnoded uses the real one.

use std::time::Duration;

pub mod config;
pub mod manager;

pub use config::{InferenceConfig, ModelConfig};
pub use manager::Manager;

/// One message of a chat, as the API received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// `/v1/completions`: the prompt text, as is.
    Text(String),
    /// `/v1/chat/completions`: rendered into one prompt by the model
    /// manager (docs/inference.md gives the template).
    Chat(Vec<ChatMessage>),
}

/// A generation request, validated by the API (bounds are the API's job).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    pub prompt: Prompt,
    /// At least 1, at most the API's cap.
    pub max_tokens: u32,
    /// 0: greedy (argmax). Otherwise sampled at this temperature.
    pub temperature: f64,
    /// Nucleus sampling; 1.0: off.
    pub top_p: f64,
    /// Seed for sampling; `None`: the worker picks one.
    pub seed: Option<u64>,
    /// Generation ends before any of these strings; none is emitted.
    pub stop: Vec<String>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model emitted its end-of-sequence token, or a stop string.
    Stop,
    /// `max_tokens` was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A piece of a generation's output, in order: any number of `Token`, then
/// exactly one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Text produced by one or more tokens (never a partial UTF-8 char).
    Token { text: String },
    Done {
        finish_reason: FinishReason,
        prompt_tokens: u32,
        completion_tokens: u32,
    },
    /// The generation failed after it was accepted (the worker died, the
    /// node was quarantined, ...). `code` is stable (docs/inference.md).
    Error { code: &'static str, message: String },
}

/// A running (or queued) generation. Pieces arrive on `pieces`; dropping
/// the `Generation` cancels it (the worker stops generating), which is what
/// a client disconnect does.
#[derive(Debug)]
pub struct Generation {
    /// Declared first, so dropped first: the job's channel is closed
    /// before `cancel` runs, and a job that `pump` holds between queue and
    /// worker when the client goes is dropped for its closed channel
    /// (`Model::try_start`), since the cancel cannot find it then.
    pub pieces: tokio::sync::mpsc::Receiver<Piece>,
    /// Cancels on drop.
    pub cancel: CancelOnDrop,
}

/// Runs its closure once, when dropped.
pub struct CancelOnDrop(Option<Box<dyn FnOnce() + Send + Sync>>);

impl CancelOnDrop {
    pub fn new(f: impl FnOnce() + Send + Sync + 'static) -> Self {
        CancelOnDrop(Some(Box::new(f)))
    }

    /// Nothing to cancel (the generation has ended).
    pub fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

impl std::fmt::Debug for CancelOnDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelOnDrop")
            .field("armed", &self.0.is_some())
            .finish()
    }
}

/// Why a generation was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// No such model is configured or loaded (404, `model_not_found`).
    #[error("the model {0:?} does not exist")]
    UnknownModel(String),
    /// The model exists but no worker is ready (503, `model_not_ready`).
    #[error("the model {0:?} is not ready")]
    NotReady(String),
    /// Every worker is busy and the queue is full (429, `queue_full`, with
    /// `Retry-After`).
    #[error("the model {model:?} is at capacity; retry later")]
    QueueFull {
        model: String,
        retry_after: Duration,
    },
    /// The node is draining or drained (503, `node_draining`).
    #[error("the node is draining and takes no new requests")]
    Draining,
    /// The node is quarantined (503, `node_quarantined`).
    #[error("the node is quarantined")]
    Quarantined,
    /// The prompt does not fit the model's context (400,
    /// `context_length_exceeded`).
    #[error("{0}")]
    TooLong(String),
}

impl SubmitError {
    /// The HTTP status the API answers with.
    pub fn status(&self) -> u16 {
        match self {
            SubmitError::UnknownModel(_) => 404,
            SubmitError::NotReady(_) | SubmitError::Draining | SubmitError::Quarantined => 503,
            SubmitError::QueueFull { .. } => 429,
            SubmitError::TooLong(_) => 400,
        }
    }

    /// The stable error code in the OpenAI error object.
    pub fn code(&self) -> &'static str {
        match self {
            SubmitError::UnknownModel(_) => "model_not_found",
            SubmitError::NotReady(_) => "model_not_ready",
            SubmitError::QueueFull { .. } => "queue_full",
            SubmitError::Draining => "node_draining",
            SubmitError::Quarantined => "node_quarantined",
            SubmitError::TooLong(_) => "context_length_exceeded",
        }
    }
}

/// A model as `GET /v1/models` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub id: String,
    /// Unix time the model was loaded.
    pub created: u64,
    /// Workers ready to serve it.
    pub ready_workers: u32,
}

/// The model manager, as the API sees it.
pub trait Inference: Send + Sync + 'static {
    fn models(&self) -> Vec<ModelInfo>;
    /// Accepts a generation or says why not. Never blocks: a queued
    /// generation's first piece arrives when a worker takes it.
    fn submit(&self, model: &str, params: GenerateParams) -> Result<Generation, SubmitError>;
}
