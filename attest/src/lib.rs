//! ccnode attestation: evidence producers (TPM, SEV-SNP, TDX, NVIDIA GPU
//! confidential computing), the evidence format, the verifier library and
//! OpenSSF model-signature verification.
//!
//! Empty so far: the foundation issue only lays out the workspace. Nothing in
//! ccnode attests or verifies anything until the attestation issues land, and
//! nothing may claim otherwise.
