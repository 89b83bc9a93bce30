//! ccnode attestation: evidence producers (TPM, SEV-SNP, TDX, NVIDIA GPU
//! confidential computing), the evidence format, the verifier library and
//! OpenSSF model-signature verification.
//!
//! So far only model-signature verification ([`oms`]) is implemented; the
//! evidence producers and verifier arrive with the attestation issues, and
//! nothing may claim otherwise.

pub mod oms;
