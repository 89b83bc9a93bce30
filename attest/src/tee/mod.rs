//! TEE evidence: the slot [`crate::evidence::TeeEvidence`] holds one of
//!
//! - `sev-snp`: an AMD SEV-SNP attestation report whose REPORT_DATA is the
//!   evidence binding, with the host's certificate table when it has one,
//!   from configfs-tsm ([`tsm`]) or `/dev/sev-guest`; parsed and verified in
//!   [`snp`];
//! - `tdx`: an Intel TDX quote whose REPORTDATA is the binding, from
//!   configfs-tsm; parsed and verified in [`tdx`];
//! - `simulated`, below, for dev mode and tests;
//! - `none`.
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

pub mod snp;
pub mod tdx;
pub mod tsm;

/// TEE kinds.
pub mod kind {
    /// The simulated TEE (dev mode, tests).
    pub const SIMULATED: &str = "simulated";
    /// No TEE evidence (a node without one).
    pub const NONE: &str = "none";
    /// AMD SEV-SNP.
    pub const SEV_SNP: &str = "sev-snp";
    /// Intel TDX.
    pub const TDX: &str = "tdx";
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
    /// An SEV-SNP guest.
    SevSnp(SnpSource),
    /// A TDX guest, through configfs-tsm.
    Tdx(tsm::Tsm),
}

/// Where an SEV-SNP guest gets its reports.
#[derive(Debug)]
pub enum SnpSource {
    /// configfs-tsm (Linux 6.7 and later), provider `sev_guest`; `vmpl`
    /// written to `privlevel` when set.
    Tsm { tsm: tsm::Tsm, vmpl: Option<u32> },
    /// The `sev-guest` driver's ioctls (`SNP_GET_EXT_REPORT`).
    SevGuest {
        device: std::path::PathBuf,
        vmpl: u32,
    },
}

impl Tee {
    pub fn kind(&self) -> &'static str {
        match self {
            Tee::None => kind::NONE,
            Tee::Simulated(_) => kind::SIMULATED,
            Tee::SevSnp(_) => kind::SEV_SNP,
            Tee::Tdx(_) => kind::TDX,
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
            Tee::SevSnp(source) => {
                let ev = snp_evidence(source, binding)?;
                Ok(TeeEvidence {
                    kind: kind::SEV_SNP.into(),
                    evidence: serde_json::to_value(ev).map_err(|e| e.to_string())?,
                })
            }
            Tee::Tdx(tsm) => {
                let ev = tdx_evidence(tsm, binding)?;
                Ok(TeeEvidence {
                    kind: kind::TDX.into(),
                    evidence: serde_json::to_value(ev).map_err(|e| e.to_string())?,
                })
            }
        }
    }
}

/// An SEV-SNP report over `binding`, checked to carry it.
fn snp_evidence(source: &SnpSource, binding: &[u8; 32]) -> Result<snp::SnpEvidence, String> {
    let report_data = snp::report_data_for(binding);
    let (report, table) = match source {
        SnpSource::Tsm { tsm, vmpl } => {
            let r = tsm
                .report("sev_guest", &report_data, *vmpl)
                .map_err(|e| crate::error_chain(&e))?;
            (r.outblob, r.auxblob)
        }
        SnpSource::SevGuest { device, vmpl } => snp::sev_guest_report(device, &report_data, *vmpl)
            .map_err(|e| crate::error_chain(&e))?,
    };
    let parsed = snp::parse_report(&report).map_err(|e| crate::error_chain(&e))?;
    if parsed.report_data != report_data {
        return Err("the SEV-SNP report does not carry the report data asked for".into());
    }
    Ok(snp::SnpEvidence::new(&report, table.as_deref()))
}

/// A TDX quote over `binding`, checked to carry it.
fn tdx_evidence(tsm: &tsm::Tsm, binding: &[u8; 32]) -> Result<tdx::TdxEvidence, String> {
    let report_data = tdx::report_data_for(binding);
    let r = tsm
        .report("tdx_guest", &report_data, None)
        .map_err(|e| crate::error_chain(&e))?;
    let quote = tdx::parse_quote(&r.outblob).map_err(|e| crate::error_chain(&e))?;
    if quote.report.report_data != report_data {
        return Err("the TDX quote does not carry the report data asked for".into());
    }
    Ok(tdx::TdxEvidence::new(&r.outblob))
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
    use super::tsm::fake::FakeTsm;
    use super::*;

    const TDX_QUOTE_HEX: &str = include_str!("../../tests/fixtures/tdx/tdx-quote.hex");
    /// Where REPORTDATA sits in a v4 quote: after the header, at the end
    /// of the TD report.
    const TDX_REPORT_DATA: std::ops::Range<usize> =
        tdx::HEADER_LEN + tdx::TD_REPORT_LEN - 64..tdx::HEADER_LEN + tdx::TD_REPORT_LEN;

    fn tdx_quote() -> Vec<u8> {
        let h = TDX_QUOTE_HEX.trim();
        hex::decode(h.strip_prefix("0x").unwrap_or(h)).unwrap()
    }

    #[test]
    fn tdx_evidence_through_configfs_tsm_carries_the_binding_and_is_not_forgeable() {
        // The fake kernel answers with the genuine quote, REPORTDATA
        // replaced by what was asked for: the producer accepts it (it
        // checks the binding, not the signature), the verifier does not.
        let root = tempfile::tempdir().unwrap();
        let fake = FakeTsm::new("tdx_guest", |inblob| {
            let mut q = tdx_quote();
            q[TDX_REPORT_DATA].copy_from_slice(inblob);
            (q, None)
        });
        let tee = Tee::Tdx(tsm::Tsm::with_fs(root.path(), fake));
        let binding = [0x42; 32];
        let ev = tee.evidence(&binding).unwrap();
        assert_eq!(ev.kind, "tdx");
        let quote = B64.decode(ev.evidence["quote"].as_str().unwrap()).unwrap();
        assert_eq!(quote[TDX_REPORT_DATA], tdx::report_data_for(&binding));
        let policy = tdx::TdxPolicy::default();
        let err = tdx::verify_evidence(
            &ev.evidence,
            &binding,
            &policy,
            std::time::SystemTime::now(),
        )
        .unwrap_err();
        assert!(err.contains("signature"), "{err}");
    }

    const SNP_REPORT_HEX: &str = include_str!("../../tests/fixtures/snp-milan/report_milan.hex");
    const SNP_VCEK: &[u8] = include_bytes!("../../tests/fixtures/snp-milan/vcek_milan.der");
    /// REPORT_DATA in an SNP report.
    const SNP_REPORT_DATA: std::ops::Range<usize> = 0x50..0x90;

    fn snp_report() -> Vec<u8> {
        hex::decode(SNP_REPORT_HEX.trim()).unwrap()
    }

    #[test]
    fn snp_evidence_through_configfs_tsm_carries_the_binding_the_vmpl_and_the_certs() {
        let root = tempfile::tempdir().unwrap();
        let table = snp::build_cert_table(&[(snp::guids::VCEK, SNP_VCEK)]);
        let aux = table.clone();
        let fake = FakeTsm::new("sev_guest", move |inblob| {
            let mut r = snp_report();
            r[SNP_REPORT_DATA].copy_from_slice(inblob);
            (r, Some(aux.clone()))
        });
        let tee = Tee::SevSnp(SnpSource::Tsm {
            tsm: tsm::Tsm::with_fs(root.path(), fake.clone()),
            vmpl: Some(2),
        });
        let binding = [0x5a; 32];
        let ev = tee.evidence(&binding).unwrap();
        assert_eq!(ev.kind, "sev-snp");
        assert_eq!(*fake.privlevels.lock().unwrap(), vec!["2".to_string()]);
        let doc: snp::SnpEvidence = serde_json::from_value(ev.evidence.clone()).unwrap();
        assert_eq!(B64.decode(doc.cert_table.unwrap()).unwrap(), table);
        let report = B64.decode(&doc.report).unwrap();
        assert_eq!(report[SNP_REPORT_DATA], snp::report_data_for(&binding));
        // The producer does not check the signature; the verifier does, with
        // the VCEK from the table: changed report data breaks it.
        let policy = snp::SnpPolicy::default();
        let err = snp::verify_evidence(
            &ev.evidence,
            &binding,
            &policy,
            std::time::SystemTime::now(),
        )
        .unwrap_err();
        assert!(err.contains("signature"), "{err}");
    }

    #[test]
    fn snp_producers_refuse_reports_for_other_data_and_missing_devices() {
        let root = tempfile::tempdir().unwrap();
        let fake = FakeTsm::new("sev_guest", |_| (snp_report(), None));
        let tee = Tee::SevSnp(SnpSource::Tsm {
            tsm: tsm::Tsm::with_fs(root.path(), fake),
            vmpl: None,
        });
        let err = tee.evidence(&[1; 32]).unwrap_err();
        assert!(err.contains("does not carry the report data"), "{err}");
        // A truncated report is refused before anything is returned.
        let fake = FakeTsm::new("sev_guest", |_| (snp_report()[..100].to_vec(), None));
        let tee = Tee::SevSnp(SnpSource::Tsm {
            tsm: tsm::Tsm::with_fs(root.path(), fake),
            vmpl: None,
        });
        assert!(tee.evidence(&[1; 32]).is_err());
        let tee = Tee::SevSnp(SnpSource::SevGuest {
            device: "/nonexistent/sev-guest".into(),
            vmpl: 0,
        });
        let err = tee.evidence(&[1; 32]).unwrap_err();
        assert!(err.contains("/nonexistent/sev-guest"), "{err}");
    }

    #[test]
    fn a_tdx_quote_for_other_report_data_is_refused_by_the_producer() {
        let root = tempfile::tempdir().unwrap();
        let fake = FakeTsm::new("tdx_guest", |_| (tdx_quote(), None));
        let tee = Tee::Tdx(tsm::Tsm::with_fs(root.path(), fake));
        let err = tee.evidence(&[1; 32]).unwrap_err();
        assert!(err.contains("does not carry the report data"), "{err}");
        // A provider that is not TDX is refused too.
        let fake = FakeTsm::new("sev_guest", |_| (tdx_quote(), None));
        let tee = Tee::Tdx(tsm::Tsm::with_fs(root.path(), fake));
        assert!(tee.evidence(&[1; 32]).unwrap_err().contains("provider"));
    }

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
