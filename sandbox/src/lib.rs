//! ccnode's worker jail: namespaces, Landlock, seccomp, capabilities,
//! rlimits, cgroups, fd hand-over, spawning and supervision.
//!
//! Empty so far: the foundation issue only lays out the workspace. No worker
//! runs sandboxed (no worker runs at all) until the sandbox issue lands.
