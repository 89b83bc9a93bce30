//! Event logs: ccnode's own log of what it extended into the ccnode PCR
//! ([`ccnode`]), and the firmware's TCG log ([`firmware`]). Both are
//! replayed by the verifier.

pub mod ccnode;
pub mod firmware;
