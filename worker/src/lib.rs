//! ccnode-worker: the sandboxed inference process (candle).
//!
//! Empty so far: the foundation issue only lays out the workspace. The worker
//! is built in the inference issue.
