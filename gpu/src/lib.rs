//! ccnode's GPU access: NVML inventory, telemetry, driver drift and MIG
//! layout, VRAM scrubbing, and a simulated backend for tests and dev mode.
//!
//! Empty so far: the foundation issue only lays out the workspace. ccnoded
//! reports no GPU data until the GPU telemetry issue lands.
