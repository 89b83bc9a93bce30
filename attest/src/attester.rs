//! The evidence producer: claims + nonce → binding → TPM quote and TEE
//! evidence over it → an [`Evidence`] document.
//!
//! [`Attester::attest`] blocks on the TPM; call it from
//! `tokio::task::spawn_blocking`. Calls from many threads are fine: the TPM
//! service serialises them.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;

use crate::eventlog::firmware;
use crate::evidence::{
    self, AkEvidence, BoundEvidence, CcnodeEventLog, Claims, Evidence, QuoteEvidence, TpmEvidence,
    EVIDENCE_VERSION,
};
use crate::jcs::JcsError;
use crate::tee::Tee;
use crate::tpm::{TpmError, TpmService};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Why evidence could not be produced. Variants are stable; [`code`]
/// gives the label for JSON errors and metrics.
///
/// [`code`]: AttestError::code
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The verifier's nonce is out of bounds (the caller's fault: HTTP 400).
    #[error("{0}")]
    Nonce(String),
    /// The claims cannot be canonicalised (an integer beyond ±2^53, too
    /// deep): a bug in the caller.
    #[error("claims cannot be canonicalised")]
    Claims(#[source] JcsError),
    /// The TPM failed.
    #[error("tpm")]
    Tpm(#[source] TpmError),
    /// The firmware event log exists but cannot be read.
    #[error("cannot read the firmware event log {path}: {detail}")]
    FirmwareLog { path: String, detail: String },
    /// The TEE failed.
    #[error("tee evidence: {0}")]
    Tee(String),
    /// A GPU in confidential-computing mode gave no attestation report.
    #[error("gpu {uuid} attestation: {detail}")]
    Gpu { uuid: String, detail: String },
}

/// The GPUs whose confidential-computing evidence goes into every
/// attestation (ccnoded implements it over its GPU backend). Blocking, like
/// the TPM.
pub trait GpuAttestation: Send + Sync + std::fmt::Debug {
    /// The GPUs in CC mode now: (UUID, backend index).
    fn cc_gpus(&self) -> Vec<(String, u32)>;
    /// The GPU's attestation report for `nonce` (SPDM GET_MEASUREMENTS
    /// request and response) and its certificate chain (PEM).
    fn report(&self, index: u32, nonce: &[u8; 32]) -> Result<(Vec<u8>, Vec<u8>), String>;
}

impl AttestError {
    pub fn code(&self) -> &'static str {
        match self {
            AttestError::Nonce(_) => "bad_nonce",
            AttestError::Claims(_) => "claims",
            AttestError::Tpm(e) => e.code(),
            AttestError::FirmwareLog { .. } => "firmware_log",
            AttestError::Tee(_) => "tee",
            AttestError::Gpu { .. } => "gpu",
        }
    }
}

/// Produces evidence. Cheap to share (`Arc<Attester>`).
#[derive(Debug)]
pub struct Attester {
    tpm: Arc<TpmService>,
    tee: Tee,
    gpus: Option<Arc<dyn GpuAttestation>>,
}

impl Attester {
    pub fn new(tpm: Arc<TpmService>, tee: Tee) -> Attester {
        Attester {
            tpm,
            tee,
            gpus: None,
        }
    }

    /// Also attests the GPUs `gpus` reports in CC mode.
    pub fn with_gpus(mut self, gpus: Arc<dyn GpuAttestation>) -> Attester {
        self.gpus = Some(gpus);
        self
    }

    pub fn tpm(&self) -> &Arc<TpmService> {
        &self.tpm
    }

    /// The TEE kind this attester puts in claims and evidence.
    pub fn tee_kind(&self) -> &'static str {
        self.tee.kind()
    }

    /// Produces evidence for `nonce` (16 to 64 bytes) with `claims`
    /// (`claims.tee_kind` is set here). Blocks on the TPM.
    pub fn attest(&self, nonce: &[u8], claims: Claims) -> Result<Evidence, AttestError> {
        evidence::check_nonce(nonce).map_err(AttestError::Nonce)?;
        self.produce(claims, nonce, |cd, ak, bound| {
            evidence::compute_binding(nonce, cd, ak, bound)
        })
    }

    /// Answers several verifiers with one quote (and one TEE report): the
    /// binding covers the Merkle root of their `nonces` ([`crate::merkle`]),
    /// and each answer carries its own nonce's leaf index and audit path,
    /// in the order of `nonces`. One nonce gets a plain [`Attester::attest`]
    /// answer. Blocks on the TPM once.
    pub fn attest_batch(
        &self,
        nonces: &[Vec<u8>],
        claims: Claims,
    ) -> Result<Vec<Evidence>, AttestError> {
        match nonces {
            [] => return Ok(Vec::new()),
            [one] => return Ok(vec![self.attest(one, claims)?]),
            _ => {}
        }
        if nonces.len() > crate::merkle::MAX_BATCH {
            return Err(AttestError::Nonce(format!(
                "a batch of {} nonces exceeds {}",
                nonces.len(),
                crate::merkle::MAX_BATCH
            )));
        }
        for n in nonces {
            evidence::check_nonce(n).map_err(AttestError::Nonce)?;
        }
        let leaves: Vec<[u8; 32]> = nonces.iter().map(|n| crate::merkle::leaf_hash(n)).collect();
        let root = crate::merkle::root(&leaves).expect("at least two leaves");
        let shared = self.produce(claims, &root, |cd, ak, bound| {
            evidence::compute_batch_binding(&root, cd, ak, bound)
        })?;
        Ok((0..leaves.len())
            .map(|i| {
                let mut e = shared.clone();
                e.batch = Some(evidence::BatchProof {
                    index: i as u32,
                    size: leaves.len() as u32,
                    root: hex::encode(root),
                    path: crate::merkle::path(&leaves, i)
                        .iter()
                        .map(hex::encode)
                        .collect(),
                });
                e
            })
            .collect())
    }

    /// One document: GPU evidence for `fresh` (the nonce or the batch
    /// root), then the binding over everything, then the quote and the TEE
    /// report over the binding.
    fn produce(
        &self,
        mut claims: Claims,
        fresh: &[u8],
        binding_of: impl FnOnce(&[u8; 32], &[u8; 32], &[BoundEvidence]) -> Result<[u8; 32], String>,
    ) -> Result<Evidence, AttestError> {
        claims.tee_kind = self.tee.kind().to_string();
        let claims_digest = claims.digest().map_err(AttestError::Claims)?;
        let ak = self.tpm.ak();
        let gpus = self.gpu_evidence(fresh, &claims_digest)?;
        let bound = gpus
            .iter()
            .map(evidence::gpu_bound)
            .collect::<Result<Vec<BoundEvidence>, _>>()
            .map_err(AttestError::Claims)?;
        let binding = binding_of(&claims_digest, &ak.spki_sha256, &bound)
            .map_err(|e| AttestError::Tpm(TpmError::Unexpected(e)))?;

        let firmware_event_log = match &self.tpm.config().firmware_log {
            Some(path) => read_firmware_log(path)?,
            None => None,
        };
        let quote = self.tpm.quote(&binding).map_err(AttestError::Tpm)?;
        let tee = self.tee.evidence(&binding).map_err(AttestError::Tee)?;

        let mut sha256 = std::collections::BTreeMap::new();
        for (idx, v) in &quote.pcrs {
            sha256.insert(*idx, hex::encode(v));
        }
        Ok(Evidence {
            version: EVIDENCE_VERSION,
            claims,
            claims_digest: hex::encode(claims_digest),
            bound_evidence: bound,
            binding: hex::encode(binding),
            tpm: TpmEvidence {
                ak: AkEvidence {
                    algorithm: ak.algorithm.as_str().to_string(),
                    public_pem: ak.public_pem.clone(),
                    public_area: B64.encode(&ak.public_area),
                    name: B64.encode(&ak.name),
                },
                quote: QuoteEvidence {
                    attest: B64.encode(&quote.attest),
                    signature: B64.encode(&quote.signature),
                },
                pcrs: [("sha256".to_string(), sha256)].into_iter().collect(),
                firmware_event_log: firmware_event_log.map(|b| B64.encode(b)),
                ccnode_event_log: CcnodeEventLog {
                    pcr: self.tpm.config().ccnode_pcr,
                    events: quote.ccnode_events,
                },
            },
            tee,
            batch: None,
            gpus,
        })
    }

    fn gpu_evidence(
        &self,
        fresh: &[u8],
        claims_digest: &[u8; 32],
    ) -> Result<Vec<crate::nvidia::GpuCcEvidence>, AttestError> {
        let Some(source) = &self.gpus else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (uuid, index) in source.cc_gpus().into_iter().take(evidence::MAX_GPUS) {
            let nonce = evidence::gpu_nonce(fresh, claims_digest, &uuid);
            let (report, chain) =
                source
                    .report(index, &nonce)
                    .map_err(|detail| AttestError::Gpu {
                        uuid: uuid.clone(),
                        detail,
                    })?;
            let cert_chain = String::from_utf8(chain).map_err(|_| AttestError::Gpu {
                uuid: uuid.clone(),
                detail: "the certificate chain is not PEM text".into(),
            })?;
            out.push(crate::nvidia::GpuCcEvidence {
                uuid,
                nonce: hex::encode(nonce),
                report: B64.encode(report),
                cert_chain,
            });
        }
        Ok(out)
    }
}

/// Reads the firmware log: `None` when absent, an error when present but
/// unreadable or larger than [`firmware::MAX_LOG`].
fn read_firmware_log(path: &Path) -> Result<Option<Vec<u8>>, AttestError> {
    let err = |detail: String| AttestError::FirmwareLog {
        path: path.display().to_string(),
        detail,
    };
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e.to_string())),
    };
    // securityfs reports size 0: read with a bound instead of trusting it.
    let mut buf = Vec::new();
    f.take(firmware::MAX_LOG as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| err(e.to_string()))?;
    if buf.len() > firmware::MAX_LOG {
        return Err(err(format!("larger than {} bytes", firmware::MAX_LOG)));
    }
    Ok(Some(buf))
}
