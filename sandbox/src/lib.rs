//! ccnode's worker jail: namespaces, Landlock, seccomp, capabilities,
//! rlimits, cgroups and fd hand-over for inference workers, which are
//! treated as hostile.
//!
//! [`spawn`] starts the [`jail`] process with a [`profile::Profile`]; the
//! jail builds the worker's confinement layer by layer and `execve`s it.
//! docs/sandbox.md describes every layer and what it stops.

pub mod bpf;
pub mod cgroup;
pub mod control;
pub mod jail;
pub mod profile;
pub mod remains;
pub mod seccomp;
pub mod spawn;
pub mod supervise;

pub use profile::Profile;
pub use spawn::{spawn, Jailed, NotStarted, SpawnError};
