//! ccnode-worker: the sandboxed inference process (candle), the control
//! protocol ccnoded speaks with it, and a generator of small test models.
//!
//! Without the `engine` feature only [`protocol`] and [`shape`] (and the
//! test-model generator) are built: what ccnoded needs.

pub mod protocol;
pub mod shape;
pub mod testmodel;

#[cfg(feature = "engine")]
pub mod engine;
#[cfg(feature = "engine")]
pub mod reference;
#[cfg(feature = "engine")]
pub mod serve;
