//! ccnode's on-host agent: the `ccnoded` daemon and the `ccnodectl` admin CLI.
//!
//! This crate is deliberately thin. It owns the node's lifecycle (the
//! [`state`] machine and its [`persist`]ence), the local admin socket
//! ([`admin`]), the Prometheus and health endpoint ([`http`]) and the systemd
//! integration ([`notify`]); the hardware-facing work lives in the library
//! crates (`ccnode-attest`, `ccnode-sandbox`, `ccnode-gpu`).

pub mod admin;
pub mod attestation;
pub mod audit;
pub mod config;
pub mod daemon;
pub mod gpu;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod persist;
pub mod state;
pub mod timefmt;
pub mod workers;

/// An error and its sources, once each, joined with ": " (the house
/// style: messages never repeat their source, so the chain is printed
/// once, at the edge).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

/// The agent's version, as built.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
