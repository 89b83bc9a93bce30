//! ccnode's on-host agent: the `ccnoded` daemon and the `ccnodectl` admin CLI.
//!
//! This crate is deliberately thin. It owns the node's lifecycle (the
//! [`state`] machine and its [`persist`]ence), the local admin socket
//! ([`admin`]), the Prometheus and health endpoint ([`http`]) and the systemd
//! integration ([`notify`]); the hardware-facing work lives in the library
//! crates (`ccnode-attest`, `ccnode-sandbox`, `ccnode-gpu`).

pub mod admin;
pub mod audit;
pub mod config;
pub mod daemon;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod persist;
pub mod state;
pub mod timefmt;
pub mod workers;

/// The agent's version, as built.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
