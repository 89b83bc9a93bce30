//! ccnode's on-host agent: the `ccnoded` daemon and the `ccnodectl` admin CLI.
//!
//! This crate is deliberately thin. It owns the node's lifecycle (the
//! [`state`] machine and its [`persist`]ence), the local admin socket
//! ([`admin`]), the Prometheus and health endpoint ([`http`]), the
//! OpenAI-compatible inference API ([`openai`]) and the systemd
//! integration ([`notify`]); the hardware-facing work lives in the library
//! crates (`ccnode-attest`, `ccnode-sandbox`, `ccnode-gpu`).

pub mod admin;
pub mod attestation;
pub mod audit;
pub mod config;
pub mod daemon;
pub mod gpu;
pub mod http;
pub mod inference;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod openai;
pub mod persist;
pub mod state;
pub mod timefmt;
pub mod workers;

pub use ccnode_attest::error_chain;

/// The agent's version, as built.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
