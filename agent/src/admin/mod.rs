//! The local admin socket: how admins drain and quarantine a host.

pub mod client;
pub mod peer;
pub mod protocol;
pub mod server;
