//! ccnode attestation: evidence producers (TPM, SEV-SNP, TDX, NVIDIA GPU
//! confidential computing), the evidence format, the verifier library and
//! OpenSSF model-signature verification.
//!
//! Implemented so far:
//!
//! - [`oms`]: model-signature verification;
//! - [`tpm`]: TPM quotes and measured operation through tss-esapi (the
//!   `tpm` feature, on by default), and the bounded TPM structure parsers
//!   the verifier uses (always built);
//! - [`evidence`]: the evidence document (version 1), RFC 8785 claims
//!   digests ([`jcs`]) and the binding;
//! - [`eventlog`]: ccnode's own event log and the firmware's TCG log;
//! - [`tee`]: the TEE slot, with the `simulated` TEE only (SEV-SNP and TDX
//!   arrive with the next issue; GPU evidence with the GPU issue);
//! - [`verify`]: the verifier, and [`client`], the minimal HTTP client
//!   `ccnode-verify attest` uses;
//! - [`Attester`] (with `tpm`): claims and a nonce in, evidence out.

#[cfg(feature = "tpm")]
mod attester;
pub mod client;
pub mod eventlog;
pub mod evidence;
pub mod jcs;
pub mod merkle;
pub mod nvidia;
pub mod oms;
pub mod tee;
pub mod tpm;
pub mod verify;

#[cfg(feature = "tpm")]
pub use attester::{AttestError, Attester, GpuAttestation};
pub use evidence::{Claims, Evidence, ModelClaim};
pub use oms::printable;

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
pub use verify::{verify, AttestationResult, VerifierPolicy};
