//! TEE evidence. This issue implements the `simulated` TEE for dev mode and
//! tests; SEV-SNP and TDX arrive with the next one and plug into the same
//! slot ([`crate::evidence::TeeEvidence`]).
//!
//! The simulated TEE signs a report-shaped structure,
//! `{kind: "simulated", report_data: binding, measurement}`, with an
//! ephemeral P-256 key generated per process. Nothing vouches for that key,
//! so the evidence proves nothing about the platform: it exercises the
//! evidence path end to end. Its kind says `simulated`, and the verifier
//! refuses it unless the policy sets `allow_simulated_tee = true`.

use std::io::Read;
use std::path::Path;

use base64::Engine as _;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::pkcs8::{DecodePublicKey, EncodePublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::evidence::TeeEvidence;
use crate::jcs;

/// TEE kinds.
pub mod kind {
    /// The simulated TEE (dev mode, tests).
    pub const SIMULATED: &str = "simulated";
    /// No TEE evidence (a node without one).
    pub const NONE: &str = "none";
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The signed structure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedReport {
    /// Always `simulated`.
    pub kind: String,
    /// The evidence binding, hex (where SEV-SNP and TDX put it too).
    pub report_data: String,
    /// sha256 of the agent binary (or of a fixed string), hex.
    pub measurement: String,
}

/// The simulated TEE's evidence document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedEvidence {
    pub report: SimulatedReport,
    /// The ephemeral key, SPKI PEM.
    pub public_key_pem: String,
    /// ECDSA P-256 SHA-256 over JCS(report), DER, base64.
    pub signature: String,
}

/// The TEE an attester uses.
#[derive(Debug)]
pub enum Tee {
    /// No TEE evidence: `tee.kind = "none"`, refused by the verifier unless
    /// `allow_no_tee = true`.
    None,
    /// The simulated TEE.
    Simulated(SimulatedTee),
}

impl Tee {
    pub fn kind(&self) -> &'static str {
        match self {
            Tee::None => kind::NONE,
            Tee::Simulated(_) => kind::SIMULATED,
        }
    }

    /// The TEE evidence over `binding`.
    pub fn evidence(&self, binding: &[u8; 32]) -> Result<TeeEvidence, String> {
        match self {
            Tee::None => Ok(TeeEvidence {
                kind: kind::NONE.into(),
                evidence: serde_json::Value::Null,
            }),
            Tee::Simulated(s) => {
                let ev = s.report(binding)?;
                Ok(TeeEvidence {
                    kind: kind::SIMULATED.into(),
                    evidence: serde_json::to_value(ev).map_err(|e| e.to_string())?,
                })
            }
        }
    }
}

/// The simulated TEE: an ephemeral signing key and a measurement.
pub struct SimulatedTee {
    key: p256::ecdsa::SigningKey,
    measurement: [u8; 32],
}

impl std::fmt::Debug for SimulatedTee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedTee")
            .field("measurement", &hex::encode(self.measurement))
            .finish_non_exhaustive()
    }
}

/// Largest binary hashed as the measurement.
const MAX_MEASURED_FILE: u64 = 1 << 30;

impl SimulatedTee {
    /// A simulated TEE with a fresh key and the given measurement.
    pub fn new(measurement: [u8; 32]) -> SimulatedTee {
        SimulatedTee {
            key: p256::ecdsa::SigningKey::random(&mut rand_core::OsRng),
            measurement,
        }
    }

    /// Measures `path` (normally the agent's own binary, `/proc/self/exe`),
    /// falling back to sha256("ccnode-simulated-tee") when it cannot be read.
    pub fn measuring(path: &Path) -> SimulatedTee {
        let m = std::fs::File::open(path)
            .ok()
            .and_then(|f| {
                let mut h = Sha256::new();
                let mut r = f.take(MAX_MEASURED_FILE);
                std::io::copy(&mut r, &mut h).ok()?;
                Some(h.finalize().into())
            })
            .unwrap_or_else(|| Sha256::digest(b"ccnode-simulated-tee").into());
        SimulatedTee::new(m)
    }

    pub fn measurement(&self) -> [u8; 32] {
        self.measurement
    }

    /// The signed report over `binding`.
    pub fn report(&self, binding: &[u8; 32]) -> Result<SimulatedEvidence, String> {
        let report = SimulatedReport {
            kind: kind::SIMULATED.into(),
            report_data: hex::encode(binding),
            measurement: hex::encode(self.measurement),
        };
        let canon = jcs::canonicalize_serialize(&report).map_err(|e| e.to_string())?;
        let sig: p256::ecdsa::Signature = self.key.sign(&canon);
        let pem = p256::PublicKey::from(self.key.verifying_key())
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .map_err(|e| e.to_string())?;
        Ok(SimulatedEvidence {
            report,
            public_key_pem: pem,
            signature: B64.encode(sig.to_der().as_bytes()),
        })
    }
}

/// Checks a simulated TEE document: the signature over its report, and that
/// its report data is `binding`. (Who signed it is not checked: nobody
/// vouches for the key; that is what "simulated" means.)
pub fn verify_simulated(evidence: &serde_json::Value, binding: &[u8; 32]) -> Result<(), String> {
    let ev: SimulatedEvidence = serde_json::from_value(evidence.clone())
        .map_err(|e| format!("malformed simulated evidence: {e}"))?;
    if ev.report.kind != kind::SIMULATED {
        return Err(format!("report kind {:?} is not simulated", ev.report.kind));
    }
    if ev.public_key_pem.len() > 4096 || ev.signature.len() > 256 {
        return Err("simulated evidence key or signature too large".into());
    }
    let key = p256::PublicKey::from_public_key_pem(&ev.public_key_pem)
        .map_err(|_| "simulated evidence key is not a P-256 SPKI PEM".to_string())?;
    let sig_der = B64
        .decode(&ev.signature)
        .map_err(|_| "simulated evidence signature is not base64".to_string())?;
    let sig = p256::ecdsa::Signature::from_der(&sig_der)
        .map_err(|_| "simulated evidence signature is not DER ECDSA".to_string())?;
    let canon = jcs::canonicalize_serialize(&ev.report).map_err(|e| e.to_string())?;
    p256::ecdsa::VerifyingKey::from(key)
        .verify(&canon, &sig)
        .map_err(|_| "simulated report signature does not verify".to_string())?;
    if ev.report.report_data != hex::encode(binding) {
        return Err(format!(
            "report_data {} is not the binding {}",
            ev.report.report_data,
            hex::encode(binding)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_round_trip_and_tamper() {
        let tee = Tee::Simulated(SimulatedTee::new([5; 32]));
        let ev = tee.evidence(&[1; 32]).unwrap();
        assert_eq!(ev.kind, "simulated");
        verify_simulated(&ev.evidence, &[1; 32]).unwrap();
        assert!(verify_simulated(&ev.evidence, &[2; 32])
            .unwrap_err()
            .contains("not the binding"));
        let mut bad = ev.evidence.clone();
        bad["report"]["measurement"] = serde_json::json!("00");
        assert!(verify_simulated(&bad, &[1; 32])
            .unwrap_err()
            .contains("does not verify"));
        assert!(verify_simulated(&serde_json::json!({}), &[1; 32]).is_err());
        let m = SimulatedTee::measuring(Path::new("/nonexistent"));
        assert_eq!(
            m.measurement(),
            <[u8; 32]>::from(Sha256::digest(b"ccnode-simulated-tee"))
        );
    }
}
