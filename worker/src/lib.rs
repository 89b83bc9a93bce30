//! ccnode-worker: the sandboxed inference process (candle), the control
//! protocol ccnoded speaks with it, and a generator of small test models.

pub mod testmodel;
