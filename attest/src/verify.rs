//! The verifier: checks an evidence document against the verifier's nonce
//! and policy, without trusting the node, and reports every check by name.
//!
//! Checks, in order (each `pass`, `fail` or `skip`, with a message):
//!
//! | name | what |
//! | --- | --- |
//! | `nonce_length` | the verifier's nonce is 16 to 64 bytes |
//! | `ak_public` | the AK public area parses, is a restricted signing key made in the TPM, its name is nameAlg‖sha256(area), and it is the key in the PEM |
//! | `ak_signature` | the TPMT_SIGNATURE verifies over the TPMS_ATTEST with the AK (ECDSA P-256 or RSASSA/RSA-PSS, SHA-256) |
//! | `quote_structure` | TPMS_ATTEST parses, magic TPM_GENERATED_VALUE, type ATTEST_QUOTE |
//! | `batch_inclusion` | for a batched answer: this nonce is in the batch's Merkle root by the audit path (skip when not batched) |
//! | `qualifying_data` | extraData equals the binding recomputed from the nonce (or the verified batch root), the claims, the AK and the bound evidence |
//! | `pcr_digest` | the reported PCRs are exactly the quoted selection and their sha256 is the quote's pcrDigest |
//! | `firmware_event_log` | the firmware log replays to the reported PCRs it touches (skip when absent) |
//! | `ccnode_event_log` | ccnode's log names the policy's `ccnode_pcr` (default 13), is well-formed and replays to that PCR |
//! | `claims_digest` | the reported claims digest is sha256(JCS(claims)) |
//! | `models_measured` | every model the claims list has a `model_load` event with its name and digest in ccnode's log |
//! | `policy_ak` | the AK's SPKI sha256 is in the policy's `allowed_aks` |
//! | `policy_pcrs` | reported PCRs equal the policy's `expected_pcrs` (skip when none) |
//! | `policy_models` | the digest of every model the claims list and of every `model_load` event in the log is in `allowed_models` (skip when unset) |
//! | `policy_node_state` | the node state is `active` |
//! | `policy_drift` | the claims report no drift |
//! | `tee` | the TEE evidence verifies and is bound: `sev-snp` (VCEK/VLEK chain to a pinned AMD root, report signature, REPORT_DATA is the binding, the `[snp]` policy), `tdx` (quote signature chain to Intel's root, REPORTDATA is the binding, the `[tdx]` policy); `simulated` only with `allow_simulated_tee`, `none` only with `allow_no_tee`; other kinds fail |
//! | `gpu_cc` | every GPU the claims list in CC mode has NVIDIA evidence: its chain to NVIDIA's device root, the SPDM signature, the nonce derived from this nonce, bound through `bound_evidence`, the `[nvidia]` policy; simulated GPUs only with `allow_simulated_gpus`; with `require_gpu_cc`, every GPU must be in CC mode (skip when the node has no GPUs and sends no GPU evidence) |
//!
//! The verdict is `pass` only when no check failed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::SystemTime;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::eventlog::{ccnode, firmware};
use crate::evidence::{self, hex32, Claims, Evidence};
use crate::tee;
use crate::tpm::key::AkPublicKey;
use crate::tpm::wire::{self, attr};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Largest verifier policy file.
pub const MAX_POLICY_FILE: u64 = 1 << 20;
/// Most entries in any policy list.
pub const MAX_POLICY_ITEMS: usize = 4096;

/// A check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

/// One named check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub message: String,
}

/// The overall verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
}

/// What the verifier concluded.
#[derive(Debug, Clone, Serialize)]
pub struct AttestationResult {
    pub verdict: Verdict,
    pub checks: Vec<Check>,
    /// The node's claims, as reported (trustworthy only when the verdict
    /// is `pass`).
    pub claims: Claims,
    /// sha256 of the AK's SPKI, hex (empty when the PEM is unusable).
    pub ak_spki_sha256: String,
    /// When the verification ran (Unix seconds).
    pub verified_at: u64,
}

impl AttestationResult {
    /// The check called `name`.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// True when the verdict is pass.
    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Pass
    }

    /// The names of the checks that failed.
    pub fn failed(&self) -> Vec<&'static str> {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .map(|c| c.name)
            .collect()
    }
}

/// Adds the `tls_binding` check: the evidence came over a TLS connection
/// whose server key (`peer_spki_sha256`, hex) is the one the node claims
/// (`tls_spki_sha256`), so the connection was to the attested node.
pub fn check_tls_binding(result: &mut AttestationResult, peer_spki_sha256: &str) {
    let (status, message) = match result.claims.tls_spki_sha256.as_deref() {
        Some(claimed) if claimed.eq_ignore_ascii_case(peer_spki_sha256) => (
            Status::Pass,
            format!("the server key {peer_spki_sha256} is the attested one"),
        ),
        Some(claimed) => (
            Status::Fail,
            format!("the server key is {peer_spki_sha256}, the node claims {claimed}"),
        ),
        None => (
            Status::Fail,
            "the node claims no TLS key, but answered over TLS".to_string(),
        ),
    };
    if status == Status::Fail {
        result.verdict = Verdict::Fail;
    }
    result.checks.push(Check {
        name: "tls_binding",
        status,
        message,
    });
}

/// The verifier's policy (`verifier.toml`; see attest/examples/verifier.toml).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierPolicy {
    /// sha256 of the SPKI of every attestation key trusted (hex).
    pub allowed_aks: BTreeSet<[u8; 32]>,
    /// The PCR the node's ccnode event log must extend (the node's
    /// `[attestation] ccnode_pcr`); the evidence's own `pcr` is not trusted.
    pub ccnode_pcr: u32,
    /// bank → PCR index → expected value.
    pub expected_pcrs: BTreeMap<String, BTreeMap<u32, Vec<u8>>>,
    /// Allowed model digests; `None`: models are not checked.
    pub allowed_models: Option<BTreeSet<String>>,
    /// Accept the simulated TEE (dev mode and tests only).
    pub allow_simulated_tee: bool,
    /// Accept evidence without TEE evidence.
    pub allow_no_tee: bool,
    /// What SEV-SNP reports must show; `None`: SEV-SNP evidence is refused.
    pub snp: Option<tee::snp::SnpPolicy>,
    /// What TDX quotes must show; `None`: TDX evidence is refused.
    pub tdx: Option<tee::tdx::TdxPolicy>,
    /// What NVIDIA GPU evidence must show.
    pub nvidia: crate::nvidia::NvidiaPolicy,
    /// Accept a simulated GPU inventory (dev mode and tests only).
    pub allow_simulated_gpus: bool,
    /// Every GPU the node claims must be in confidential-computing mode.
    pub require_gpu_cc: bool,
}

impl Default for VerifierPolicy {
    /// Trusts nothing: no AK, no TEE, no simulated GPU.
    fn default() -> Self {
        VerifierPolicy {
            allowed_aks: BTreeSet::new(),
            ccnode_pcr: crate::tpm::DEFAULT_CCNODE_PCR,
            expected_pcrs: BTreeMap::new(),
            allowed_models: None,
            allow_simulated_tee: false,
            allow_no_tee: false,
            snp: None,
            tdx: None,
            nvidia: crate::nvidia::NvidiaPolicy::default(),
            allow_simulated_gpus: false,
            require_gpu_cc: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    allowed_aks: Vec<String>,
    #[serde(default)]
    ccnode_pcr: Option<u32>,
    #[serde(default)]
    expected_pcrs: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    allowed_models: Option<Vec<String>>,
    #[serde(default)]
    allow_simulated_tee: bool,
    #[serde(default)]
    allow_no_tee: bool,
    #[serde(default)]
    snp: Option<tee::snp::SnpPolicy>,
    #[serde(default)]
    tdx: Option<tee::tdx::TdxPolicy>,
    #[serde(default)]
    nvidia: crate::nvidia::NvidiaPolicy,
    #[serde(default)]
    allow_simulated_gpus: bool,
    #[serde(default)]
    require_gpu_cc: bool,
}

/// Why a verifier policy cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read verifier policy {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("verifier policy: {0}")]
    Invalid(String),
}

impl VerifierPolicy {
    /// Loads and validates a policy file.
    pub fn load(path: &Path) -> Result<VerifierPolicy, PolicyError> {
        let bytes = crate::oms::read_bounded(path, "verifier policy", MAX_POLICY_FILE).map_err(
            |e| match e {
                crate::oms::OmsError::Io { source, .. } => PolicyError::Io {
                    path: path.display().to_string(),
                    source,
                },
                other => PolicyError::Invalid(other.to_string()),
            },
        )?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| PolicyError::Invalid(format!("{} is not UTF-8", path.display())))?;
        Self::from_toml(text)
    }

    /// Parses and validates policy TOML.
    pub fn from_toml(text: &str) -> Result<VerifierPolicy, PolicyError> {
        let raw: RawPolicy =
            toml::from_str(text).map_err(|e| PolicyError::Invalid(e.to_string()))?;
        let bad = |m: String| PolicyError::Invalid(m);
        if raw.allowed_aks.len() > MAX_POLICY_ITEMS
            || raw.allowed_models.as_ref().map_or(0, Vec::len) > MAX_POLICY_ITEMS
        {
            return Err(bad(format!(
                "a list has more than {MAX_POLICY_ITEMS} entries"
            )));
        }
        let mut allowed_aks = BTreeSet::new();
        for (i, a) in raw.allowed_aks.iter().enumerate() {
            let d = hex32(a.strip_prefix("sha256:").unwrap_or(a)).ok_or_else(|| {
                bad(format!(
                    "allowed_aks[{i}]: {a:?} is not a sha256 digest (64 hex digits)"
                ))
            })?;
            allowed_aks.insert(d);
        }
        let mut expected_pcrs = BTreeMap::new();
        for (bank, values) in raw.expected_pcrs {
            let alg = wire::hash_alg(&bank)
                .ok_or_else(|| bad(format!("expected_pcrs.{bank}: unknown bank")))?;
            let len = wire::digest_len(alg).unwrap_or(32);
            let mut m = BTreeMap::new();
            for (idx, value) in values {
                let i: u32 =
                    idx.parse().ok().filter(|i| *i < 24).ok_or_else(|| {
                        bad(format!("expected_pcrs.{bank}.{idx}: not a PCR index"))
                    })?;
                let v = hex::decode(&value)
                    .ok()
                    .filter(|v| v.len() == len)
                    .ok_or_else(|| {
                        bad(format!(
                            "expected_pcrs.{bank}.{idx}: not {len} bytes of hex"
                        ))
                    })?;
                m.insert(i, v);
            }
            expected_pcrs.insert(bank, m);
        }
        let ccnode_pcr = raw.ccnode_pcr.unwrap_or(crate::tpm::DEFAULT_CCNODE_PCR);
        if !crate::tpm::CCNODE_PCR_RANGE.contains(&ccnode_pcr) {
            return Err(bad(format!(
                "ccnode_pcr {ccnode_pcr} must be one of 8..=15, as ccnoded's own setting"
            )));
        }
        if let Some(t) = &raw.tdx {
            t.validate().map_err(|e| bad(format!("tdx: {e}")))?;
        }
        if let Some(p) = &raw.snp {
            p.validate().map_err(|e| bad(format!("snp: {e}")))?;
        }
        raw.nvidia
            .validate()
            .map_err(|e| bad(format!("nvidia: {e}")))?;
        Ok(VerifierPolicy {
            allowed_aks,
            ccnode_pcr,
            expected_pcrs,
            allowed_models: raw.allowed_models.map(|v| v.into_iter().collect()),
            allow_simulated_tee: raw.allow_simulated_tee,
            allow_no_tee: raw.allow_no_tee,
            snp: raw.snp,
            tdx: raw.tdx,
            nvidia: raw.nvidia,
            allow_simulated_gpus: raw.allow_simulated_gpus,
            require_gpu_cc: raw.require_gpu_cc,
        })
    }
}

struct Checks(Vec<Check>);

impl Checks {
    fn push(&mut self, name: &'static str, r: Result<String, String>) {
        let (status, message) = match r {
            Ok(m) => (Status::Pass, m),
            Err(m) => (Status::Fail, m),
        };
        self.0.push(Check {
            name,
            status,
            message,
        });
    }

    fn skip(&mut self, name: &'static str, message: impl Into<String>) {
        self.0.push(Check {
            name,
            status: Status::Skip,
            message: message.into(),
        });
    }
}

/// Verifies `evidence` against the verifier's `nonce` and `policy`.
pub fn verify(
    evidence: &Evidence,
    nonce: &[u8],
    policy: &VerifierPolicy,
    now: SystemTime,
) -> AttestationResult {
    let mut checks = Checks(Vec::new());

    // nonce_length
    checks.push(
        "nonce_length",
        evidence::check_nonce(nonce).map(|()| format!("{} bytes", nonce.len())),
    );

    // ak_public
    let pem_key = AkPublicKey::from_pem(&evidence.tpm.ak.public_pem);
    let spki_digest = pem_key.as_ref().ok().and_then(|k| k.spki_sha256().ok());
    checks.push("ak_public", check_ak_public(evidence, &pem_key));

    // ak_signature
    let attest = B64.decode(&evidence.tpm.quote.attest);
    checks.push(
        "ak_signature",
        (|| {
            let key = pem_key.as_ref().map_err(|e| format!("AK: {e}"))?;
            let attest = attest.as_ref().map_err(|_| "quote is not base64")?;
            let sig_bytes = B64
                .decode(&evidence.tpm.quote.signature)
                .map_err(|_| "signature is not base64")?;
            let sig = wire::parse_signature(&sig_bytes).map_err(|e| e.to_string())?;
            key.verify(attest, &sig)?;
            Ok("signature verifies with the AK".to_string())
        })(),
    );

    // quote_structure
    let quote = attest
        .as_ref()
        .map_err(|_| "quote is not base64".to_string())
        .and_then(|a| wire::parse_quote(a).map_err(|e| e.to_string()));
    checks.push(
        "quote_structure",
        quote
            .as_ref()
            .map(|q| {
                format!(
                    "TPMS_ATTEST quote, clock {} reset {} restart {}",
                    q.clock, q.reset_count, q.restart_count
                )
            })
            .map_err(Clone::clone),
    );

    // batch_inclusion
    match &evidence.batch {
        None => checks.skip("batch_inclusion", "a quote of its own"),
        Some(b) => checks.push(
            "batch_inclusion",
            b.verified_root(nonce).map(|r| {
                format!(
                    "this nonce is leaf {} of {} under root {}",
                    b.index,
                    b.size,
                    hex::encode(r)
                )
            }),
        ),
    }

    // qualifying_data (with the recomputed claims digest)
    let claims_digest = evidence.claims.digest();
    checks.push(
        "qualifying_data",
        (|| {
            let q = quote.as_ref().map_err(|_| "no parsable quote")?;
            let cd = claims_digest
                .as_ref()
                .map_err(|e| format!("claims cannot be canonicalised: {e}"))?;
            let ak = spki_digest.ok_or("no usable AK")?;
            let binding = evidence::expected_binding(
                evidence.batch.as_ref(),
                nonce,
                cd,
                &ak,
                &evidence.bound_evidence,
            )?;
            if q.extra_data != binding {
                return Err(format!(
                    "quote qualifying data {} is not the binding {} for this nonce",
                    hex::encode(&q.extra_data),
                    hex::encode(binding)
                ));
            }
            if evidence.binding != hex::encode(binding) {
                return Err(format!(
                    "reported binding {} is not the recomputed {}",
                    evidence.binding,
                    hex::encode(binding)
                ));
            }
            Ok(format!("binding {}", hex::encode(binding)))
        })(),
    );

    // pcr_digest
    let pcrs = decode_pcrs(evidence);
    checks.push(
        "pcr_digest",
        (|| {
            let q = quote.as_ref().map_err(|_| "no parsable quote")?;
            let pcrs = pcrs.as_ref().map_err(Clone::clone)?;
            let mut h = Sha256::new();
            let mut quoted: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
            for sel in &q.pcr_select {
                let bank = wire::hash_name(sel.hash)
                    .ok_or_else(|| format!("quoted bank {:#06x} is not supported", sel.hash))?;
                if quoted.contains_key(bank) {
                    return Err(format!("bank {bank} selected twice in the quote"));
                }
                for p in &sel.pcrs {
                    let v = pcrs
                        .get(bank)
                        .and_then(|m| m.get(p))
                        .ok_or_else(|| format!("quoted PCR {bank}:{p} is not reported"))?;
                    h.update(v);
                }
                quoted.insert(bank.to_string(), sel.pcrs.iter().copied().collect());
            }
            let reported: BTreeMap<String, BTreeSet<u32>> = pcrs
                .iter()
                .map(|(b, m)| (b.clone(), m.keys().copied().collect()))
                .filter(|(_, s): &(String, BTreeSet<u32>)| !s.is_empty())
                .collect();
            if reported != quoted {
                return Err(format!(
                    "reported PCRs {reported:?} are not the quoted selection {quoted:?}"
                ));
            }
            let digest = h.finalize();
            if digest[..] != q.pcr_digest[..] {
                return Err(format!(
                    "quote pcrDigest {} is not sha256 of the reported values {}",
                    hex::encode(&q.pcr_digest),
                    hex::encode(digest)
                ));
            }
            Ok(format!(
                "{} PCRs match the quote",
                quoted.values().map(BTreeSet::len).sum::<usize>()
            ))
        })(),
    );

    // firmware_event_log
    match &evidence.tpm.firmware_event_log {
        None => checks.skip("firmware_event_log", "the node sent no firmware event log"),
        Some(b64) => checks.push(
            "firmware_event_log",
            (|| {
                if b64.len() > firmware::MAX_LOG / 3 * 4 + 4 {
                    return Err("firmware event log too large".to_string());
                }
                let raw = B64
                    .decode(b64)
                    .map_err(|_| "firmware event log is not base64")?;
                let replayed = firmware::replay(&raw).map_err(|e| e.to_string())?;
                let sha = pcrs
                    .as_ref()
                    .ok()
                    .and_then(|p| p.get("sha256"))
                    .ok_or("no sha256 PCRs reported")?;
                let mut compared = 0;
                for (idx, value) in &replayed.pcrs {
                    if *idx == policy.ccnode_pcr {
                        continue;
                    }
                    if let Some(reported) = sha.get(idx) {
                        if reported.as_slice() != value {
                            return Err(format!(
                                "PCR {idx}: the log replays to {}, the TPM reports {}",
                                hex::encode(value),
                                hex::encode(reported)
                            ));
                        }
                        compared += 1;
                    }
                }
                Ok(format!(
                    "{} events replay to the {compared} quoted PCRs they extend",
                    replayed.events
                ))
            })(),
        ),
    }

    // ccnode_event_log
    checks.push(
        "ccnode_event_log",
        (|| {
            let log = &evidence.tpm.ccnode_event_log;
            if log.pcr != policy.ccnode_pcr {
                return Err(format!(
                    "the log names PCR {}, the policy's ccnode_pcr is {}",
                    log.pcr, policy.ccnode_pcr
                ));
            }
            let replayed = ccnode::replay(&log.events, log.pcr).map_err(|e| e.to_string())?;
            let reported = pcrs
                .as_ref()
                .ok()
                .and_then(|p| p.get("sha256"))
                .and_then(|m| m.get(&log.pcr))
                .ok_or_else(|| format!("ccnode PCR {} is not among the quoted PCRs", log.pcr))?;
            if reported.as_slice() != replayed {
                return Err(format!(
                    "{} events replay to {}, PCR {} is {}",
                    log.events.len(),
                    hex::encode(replayed),
                    log.pcr,
                    hex::encode(reported)
                ));
            }
            Ok(format!(
                "{} events replay to PCR {}",
                log.events.len(),
                log.pcr
            ))
        })(),
    );

    // claims_digest
    checks.push(
        "claims_digest",
        match &claims_digest {
            Err(e) => Err(format!("claims cannot be canonicalised: {e}")),
            Ok(d) if hex::encode(d) == evidence.claims_digest => {
                Ok(format!("sha256 {}", hex::encode(d)))
            }
            Ok(d) => Err(format!(
                "reported claims digest {} is not sha256(JCS(claims)) {}",
                evidence.claims_digest,
                hex::encode(d)
            )),
        },
    );

    // models_measured
    // Both lists come from the node: bounded before they are compared.
    let too_many = evidence.tpm.ccnode_event_log.events.len() > ccnode::MAX_EVENTS
        || evidence.claims.models.len() > ccnode::MAX_EVENTS;
    let too_many_msg = || format!("more than {} events or claimed models", ccnode::MAX_EVENTS);
    let loads = if too_many {
        BTreeSet::new()
    } else {
        model_loads(&evidence.tpm.ccnode_event_log.events)
    };
    checks.push(
        "models_measured",
        (|| {
            if too_many {
                return Err(too_many_msg());
            }
            let unmeasured: Vec<String> = evidence
                .claims
                .models
                .iter()
                .filter(|m| !loads.contains(&(m.name.as_str(), m.digest.as_str())))
                .map(|m| format!("{:?} ({:?})", m.name, m.digest))
                .collect();
            if !unmeasured.is_empty() {
                return Err(format!(
                    "claimed models with no model_load event: {}",
                    shortened(&unmeasured)
                ));
            }
            Ok(format!(
                "{} claimed models among {} distinct loads this boot",
                evidence.claims.models.len(),
                loads.len()
            ))
        })(),
    );

    // policy_ak
    checks.push(
        "policy_ak",
        match spki_digest {
            None => Err("no usable AK".into()),
            Some(d) if policy.allowed_aks.contains(&d) => {
                Ok(format!("AK {} allowed", hex::encode(d)))
            }
            Some(d) => Err(format!(
                "AK {} is not in the policy's allowed_aks",
                hex::encode(d)
            )),
        },
    );

    // policy_pcrs
    if policy.expected_pcrs.values().all(BTreeMap::is_empty) {
        checks.skip("policy_pcrs", "the policy expects no PCR values");
    } else {
        checks.push(
            "policy_pcrs",
            (|| {
                let pcrs = pcrs.as_ref().map_err(Clone::clone)?;
                let mut n = 0;
                for (bank, want) in &policy.expected_pcrs {
                    for (idx, v) in want {
                        let got = pcrs
                            .get(bank)
                            .and_then(|m| m.get(idx))
                            .ok_or_else(|| format!("PCR {bank}:{idx} is not reported"))?;
                        if got != v {
                            return Err(format!(
                                "PCR {bank}:{idx} is {}, the policy expects {}",
                                hex::encode(got),
                                hex::encode(v)
                            ));
                        }
                        n += 1;
                    }
                }
                Ok(format!("{n} PCRs as expected"))
            })(),
        );
    }

    // policy_models
    match &policy.allowed_models {
        None => checks.skip("policy_models", "the policy does not restrict models"),
        Some(_) if too_many => checks.push("policy_models", Err(too_many_msg())),
        Some(allowed) => {
            // What is loaded now and everything loaded since boot: a model
            // unloaded before the quote has still had the GPU.
            let mut seen = BTreeSet::new();
            let refused: Vec<String> = evidence
                .claims
                .models
                .iter()
                .map(|m| (m.name.as_str(), m.digest.as_str()))
                .chain(loads.iter().map(|(n, d)| (*n, *d)))
                .filter(|(_, d)| !allowed.contains(*d))
                .filter(|m| seen.insert(*m))
                .map(|(n, d)| format!("{n:?} ({d:?})"))
                .collect();
            checks.push(
                "policy_models",
                if refused.is_empty() {
                    Ok(format!(
                        "{} models and {} distinct loads allowed",
                        evidence.claims.models.len(),
                        loads.len()
                    ))
                } else {
                    Err(format!("models not allowed: {}", shortened(&refused)))
                },
            );
        }
    }

    // policy_node_state
    checks.push(
        "policy_node_state",
        if evidence.claims.node_state == "active" {
            Ok("active".into())
        } else {
            Err(format!(
                "node state is {:?}{}, not active",
                evidence.claims.node_state,
                evidence
                    .claims
                    .node_state_reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ))
        },
    );

    // policy_drift
    checks.push(
        "policy_drift",
        match evidence.claims.drift.as_deref() {
            None | Some([]) => Ok("no drift reported".into()),
            Some(d) => Err(format!(
                "{} drift entries: {}",
                d.len(),
                serde_json::to_string(d).unwrap_or_default()
            )),
        },
    );

    // tee
    checks.push(
        "tee",
        check_tee(evidence, nonce, policy, &claims_digest, spki_digest, now),
    );

    // gpu_cc
    match check_gpu_cc(evidence, nonce, policy, &claims_digest, now) {
        None => checks.skip(
            "gpu_cc",
            "the node claims no GPUs and sends no GPU evidence",
        ),
        Some(r) => checks.push("gpu_cc", r),
    }

    let verdict = if checks.0.iter().any(|c| c.status == Status::Fail) {
        Verdict::Fail
    } else {
        Verdict::Pass
    };
    AttestationResult {
        verdict,
        checks: checks.0,
        claims: evidence.claims.clone(),
        ak_spki_sha256: spki_digest.map(hex::encode).unwrap_or_default(),
        verified_at: now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }
}

fn check_ak_public(
    evidence: &Evidence,
    pem_key: &Result<AkPublicKey, String>,
) -> Result<String, String> {
    let key = pem_key.as_ref().map_err(|e| format!("AK PEM: {e}"))?;
    let bytes = B64
        .decode(&evidence.tpm.ak.public_area)
        .map_err(|_| "public area is not base64")?;
    let area = wire::parse_public(&bytes).map_err(|e| e.to_string())?;
    let missing = attr::AK_REQUIRED & !area.attributes;
    if missing != 0 || area.attributes & attr::DECRYPT != 0 {
        return Err(format!(
            "attributes {:#010x} are not those of a restricted signing key generated in the TPM (fixedTPM, fixedParent, sensitiveDataOrigin, restricted, sign; no decrypt)",
            area.attributes
        ));
    }
    let name = area
        .name(&bytes)
        .ok_or("the public area's name algorithm is not sha256")?;
    let reported = B64
        .decode(&evidence.tpm.ak.name)
        .map_err(|_| "name is not base64")?;
    if reported != name {
        return Err(format!(
            "reported name {} is not nameAlg || sha256(public area) {}",
            hex::encode(&reported),
            hex::encode(&name)
        ));
    }
    let from_area = AkPublicKey::from_public_area(&area)?;
    if from_area.spki_der()? != key.spki_der()? {
        return Err("the PEM key is not the key in the public area".into());
    }
    Ok(format!(
        "restricted signing key, name {}",
        hex::encode(&name)
    ))
}

fn check_tee(
    evidence: &Evidence,
    nonce: &[u8],
    policy: &VerifierPolicy,
    claims_digest: &Result<[u8; 32], crate::jcs::JcsError>,
    spki_digest: Option<[u8; 32]>,
    now: SystemTime,
) -> Result<String, String> {
    let kind = evidence.tee.kind.as_str();
    if evidence.claims.tee_kind != kind {
        return Err(format!(
            "claims say tee {:?}, the evidence is {kind:?}",
            evidence.claims.tee_kind
        ));
    }
    let binding = || -> Result<[u8; 32], String> {
        let cd = claims_digest.as_ref().map_err(|e| e.to_string())?;
        let ak = spki_digest.ok_or("no usable AK")?;
        evidence::expected_binding(
            evidence.batch.as_ref(),
            nonce,
            cd,
            &ak,
            &evidence.bound_evidence,
        )
    };
    match kind {
        tee::kind::SEV_SNP => {
            let p = policy
                .snp
                .as_ref()
                .ok_or("SEV-SNP evidence is refused: the verifier policy has no [snp] table")?;
            tee::snp::verify_evidence(&evidence.tee.evidence, &binding()?, p, now)
        }
        tee::kind::TDX => {
            let p = policy
                .tdx
                .as_ref()
                .ok_or("TDX evidence is refused: the verifier policy has no [tdx] table")?;
            tee::tdx::verify_evidence(&evidence.tee.evidence, &binding()?, p, now)
        }
        tee::kind::SIMULATED => {
            if !policy.allow_simulated_tee {
                return Err(
                    "simulated TEE evidence is refused (the policy does not set allow_simulated_tee)"
                        .into(),
                );
            }
            tee::verify_simulated(&evidence.tee.evidence, &binding()?)?;
            Ok("simulated TEE (allowed by policy): report bound to this evidence".into())
        }
        tee::kind::NONE => {
            if policy.allow_no_tee {
                Ok("no TEE evidence (allowed by policy)".into())
            } else {
                Err("no TEE evidence (the policy does not set allow_no_tee)".into())
            }
        }
        other => Err(format!(
            "TEE kind {other:?} is not supported by this verifier"
        )),
    }
}

/// The `gpu_cc` check; `None` when there is nothing to check (no GPUs
/// claimed, no GPU evidence sent).
fn check_gpu_cc(
    evidence: &Evidence,
    nonce: &[u8],
    policy: &VerifierPolicy,
    claims_digest: &Result<[u8; 32], crate::jcs::JcsError>,
    now: SystemTime,
) -> Option<Result<String, String>> {
    let claimed = claimed_gpus(evidence.claims.gpu.as_ref());
    if claimed.as_ref().is_ok_and(|c| c.gpus.is_empty()) && evidence.gpus.is_empty() {
        return None;
    }
    Some((|| {
        let claimed = claimed?;
        if claimed.simulated {
            if !policy.allow_simulated_gpus {
                return Err(
                    "the node's GPUs are simulated (the policy does not set allow_simulated_gpus)"
                        .to_string(),
                );
            }
            if !evidence.gpus.is_empty() {
                return Err("GPU evidence from a node whose GPUs are simulated".into());
            }
            return Ok(format!(
                "{} simulated GPUs (allowed by policy): no GPU evidence",
                claimed.gpus.len()
            ));
        }
        if evidence.gpus.len() > evidence::MAX_GPUS {
            return Err(format!(
                "{} GPU evidence entries exceed {}",
                evidence.gpus.len(),
                evidence::MAX_GPUS
            ));
        }
        let cd = claims_digest
            .as_ref()
            .map_err(|e| format!("claims cannot be canonicalised: {e}"))?;
        let fresh = evidence::fresh_value(evidence.batch.as_ref(), nonce)?;
        // Each entry is bound: its digest is in bound_evidence, in order,
        // and nothing else is.
        if evidence.bound_evidence.len() != evidence.gpus.len() {
            return Err(format!(
                "{} bound evidence entries for {} GPU evidence entries",
                evidence.bound_evidence.len(),
                evidence.gpus.len()
            ));
        }
        let mut by_uuid = BTreeMap::new();
        for (ev, bound) in evidence.gpus.iter().zip(&evidence.bound_evidence) {
            let want = evidence::gpu_bound(ev).map_err(|e| e.to_string())?;
            if *bound != want {
                return Err(format!(
                    "GPU {}: its evidence digest {} is not the bound {} {}",
                    ev.uuid, want.sha256, bound.kind, bound.sha256
                ));
            }
            if by_uuid.insert(ev.uuid.as_str(), ev).is_some() {
                return Err(format!("GPU {} has two evidence entries", ev.uuid));
            }
        }
        // One physical GPU cannot stand for two: its device key (the leaf
        // certificate's, which signs the report) must differ per entry. The
        // nonce names the UUID, but the node picks the nonces it asks for,
        // and the device certificate does not carry the NVML UUID.
        let mut devices = BTreeMap::new();
        // (An entry whose chain does not parse fails its verification below.)
        for ev in &evidence.gpus {
            let Some(key) = gpu_device_key(ev) else {
                continue;
            };
            if let Some(other) = devices.insert(key, ev.uuid.as_str()) {
                return Err(format!(
                    "GPUs {other} and {} sent evidence signed by the same device key",
                    ev.uuid
                ));
            }
        }
        let mut verified = Vec::new();
        for g in &claimed.gpus {
            match g.cc_mode.as_str() {
                "on" => {}
                "devtools" => {
                    return Err(format!(
                        "GPU {} is in CC devtools mode, which is not confidential",
                        g.uuid
                    ))
                }
                other if policy.require_gpu_cc => {
                    return Err(format!(
                        "GPU {} is not in CC mode ({other}) and the policy sets require_gpu_cc",
                        g.uuid
                    ))
                }
                _ => continue,
            }
            let ev = by_uuid
                .remove(g.uuid.as_str())
                .ok_or_else(|| format!("GPU {} is in CC mode but sent no evidence", g.uuid))?;
            let expected = evidence::gpu_nonce(&fresh, cd, &g.uuid);
            let msg = crate::nvidia::verify_gpu_evidence(ev, &expected, &policy.nvidia, now)
                .map_err(|e| format!("GPU {}: {e}", g.uuid))?;
            verified.push(format!("{}: {msg}", g.uuid));
        }
        if let Some(extra) = by_uuid.keys().next() {
            return Err(format!(
                "evidence for GPU {extra}, which the claims do not list in CC mode"
            ));
        }
        if verified.is_empty() {
            return Ok(format!(
                "{} GPUs, none in CC mode: no GPU evidence expected",
                claimed.gpus.len()
            ));
        }
        Ok(verified.join("; "))
    })())
}

/// sha256 of the DER SubjectPublicKeyInfo of a GPU evidence entry's leaf
/// (device) certificate: which physical GPU signed it.
fn gpu_device_key(ev: &crate::nvidia::GpuCcEvidence) -> Option<[u8; 32]> {
    use der::Encode as _;
    let chain = crate::nvidia::parse_pem_chain(ev.cert_chain.as_bytes()).ok()?;
    let spki = chain
        .first()?
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .ok()?;
    Some(Sha256::digest(spki).into())
}

/// The GPUs the claims list.
struct ClaimedGpus {
    simulated: bool,
    gpus: Vec<ClaimedGpu>,
}

struct ClaimedGpu {
    uuid: String,
    cc_mode: String,
}

/// Reads `claims.gpu` as ccnoded writes it (`{simulated, inventory: {gpus:
/// [{uuid, cc_mode, ...}]}}`); absent means no GPUs.
fn claimed_gpus(gpu: Option<&serde_json::Value>) -> Result<ClaimedGpus, String> {
    let Some(gpu) = gpu else {
        return Ok(ClaimedGpus {
            simulated: false,
            gpus: Vec::new(),
        });
    };
    let simulated = gpu
        .get("simulated")
        .and_then(serde_json::Value::as_bool)
        .ok_or("claims.gpu has no boolean \"simulated\"")?;
    let list = gpu
        .pointer("/inventory/gpus")
        .and_then(serde_json::Value::as_array)
        .ok_or("claims.gpu has no inventory.gpus list")?;
    let mut gpus = Vec::new();
    for g in list {
        let field = |k: &str| {
            g.get(k)
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("a GPU in claims.gpu has no {k}"))
        };
        gpus.push(ClaimedGpu {
            uuid: field("uuid")?,
            cc_mode: field("cc_mode")?,
        });
    }
    Ok(ClaimedGpus { simulated, gpus })
}

/// The `(name, digest)` of every `model_load` event in ccnode's log; a
/// field that is missing or not a string reads `"?"` (which no policy
/// allows and no claim names).
fn model_loads(events: &[ccnode::CcnodeEvent]) -> BTreeSet<(&str, &str)> {
    events
        .iter()
        .filter(|e| e.event_type == ccnode::event_type::MODEL_LOAD)
        .map(|e| {
            let field = |k: &str| e.data.get(k).and_then(|v| v.as_str()).unwrap_or("?");
            (field("name"), field("digest"))
        })
        .collect()
}

/// The first 16 of `items`, joined, and how many more there were.
fn shortened(items: &[String]) -> String {
    let mut s = items
        .iter()
        .take(16)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > 16 {
        s.push_str(&format!(" and {} more", items.len() - 16));
    }
    s
}

/// The reported PCR values, decoded and length-checked.
fn decode_pcrs(evidence: &Evidence) -> Result<BTreeMap<String, BTreeMap<u32, Vec<u8>>>, String> {
    let mut out = BTreeMap::new();
    for (bank, values) in &evidence.tpm.pcrs {
        let alg = wire::hash_alg(bank).ok_or_else(|| format!("unknown PCR bank {bank:?}"))?;
        let len = wire::digest_len(alg).unwrap_or(32);
        let mut m = BTreeMap::new();
        for (idx, v) in values {
            if *idx >= 24 {
                return Err(format!("PCR index {idx} out of range"));
            }
            let d = hex::decode(v)
                .ok()
                .filter(|d| d.len() == len)
                .ok_or_else(|| format!("PCR {bank}:{idx} is not {len} bytes of hex"))?;
            m.insert(*idx, d);
        }
        out.insert(bank.clone(), m);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::{AkEvidence, CcnodeEventLog, QuoteEvidence, TeeEvidence, TpmEvidence};
    use crate::nvidia::GpuCcEvidence;

    /// A document whose TPM part is junk: only `gpu_cc` is looked at.
    fn doc(gpu: serde_json::Value, gpus: Vec<GpuCcEvidence>) -> Evidence {
        let mut claims = crate::evidence::tests::claims();
        claims.gpu = Some(gpu);
        let bound_evidence = gpus
            .iter()
            .map(|g| evidence::gpu_bound(g).unwrap())
            .collect();
        Evidence {
            version: 1,
            claims_digest: String::new(),
            claims,
            bound_evidence,
            binding: String::new(),
            tpm: TpmEvidence {
                ak: AkEvidence {
                    algorithm: String::new(),
                    public_pem: String::new(),
                    public_area: String::new(),
                    name: String::new(),
                },
                quote: QuoteEvidence {
                    attest: String::new(),
                    signature: String::new(),
                },
                pcrs: BTreeMap::new(),
                firmware_event_log: None,
                ccnode_event_log: CcnodeEventLog {
                    pcr: 13,
                    events: Vec::new(),
                },
            },
            tee: TeeEvidence {
                kind: "none".into(),
                evidence: serde_json::Value::Null,
            },
            batch: None,
            gpus,
        }
    }

    fn inventory(simulated: bool, gpus: &[(&str, &str)]) -> serde_json::Value {
        let list: Vec<_> = gpus
            .iter()
            .map(|(u, m)| serde_json::json!({"uuid": u, "cc_mode": m}))
            .collect();
        serde_json::json!({"backend": if simulated {"sim"} else {"nvml"}, "simulated": simulated, "inventory": {"gpus": list}})
    }

    fn gpu_ev(uuid: &str) -> GpuCcEvidence {
        GpuCcEvidence {
            uuid: uuid.into(),
            nonce: "00".repeat(32),
            report: String::new(),
            cert_chain: String::new(),
        }
    }

    fn gpu_cc(e: &Evidence, policy: &str) -> Check {
        let p = VerifierPolicy::from_toml(&format!("allowed_aks = []\n{policy}")).unwrap();
        verify(e, &[7; 32], &p, SystemTime::now())
            .check("gpu_cc")
            .unwrap()
            .clone()
    }

    fn fails(c: &Check, needle: &str) {
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.message.contains(needle), "{needle:?} not in {c:?}");
    }

    #[test]
    fn gpu_cc_is_skipped_without_gpus_and_passes_without_cc() {
        let mut e = doc(serde_json::json!(null), Vec::new());
        e.claims.gpu = None;
        assert_eq!(gpu_cc(&e, "").status, Status::Skip);
        let e = doc(
            inventory(false, &[("GPU-a", "off"), ("GPU-b", "unsupported")]),
            Vec::new(),
        );
        let c = gpu_cc(&e, "");
        assert_eq!(c.status, Status::Pass, "{c:?}");
        assert!(c.message.contains("none in CC mode"));
    }

    #[test]
    fn gpu_cc_refuses_each_kind_of_wrong_evidence() {
        // Simulated GPUs: refused unless allowed, and never with evidence.
        let sim = doc(inventory(true, &[("GPU-a", "on")]), Vec::new());
        fails(&gpu_cc(&sim, ""), "simulated");
        assert_eq!(
            gpu_cc(&sim, "allow_simulated_gpus = true").status,
            Status::Pass
        );
        let sim_ev = doc(inventory(true, &[("GPU-a", "on")]), vec![gpu_ev("GPU-a")]);
        fails(&gpu_cc(&sim_ev, "allow_simulated_gpus = true"), "simulated");
        // Devtools mode is not confidential.
        fails(
            &gpu_cc(
                &doc(inventory(false, &[("GPU-a", "devtools")]), Vec::new()),
                "",
            ),
            "devtools",
        );
        // CC off where the policy requires it.
        fails(
            &gpu_cc(
                &doc(inventory(false, &[("GPU-a", "off")]), Vec::new()),
                "require_gpu_cc = true",
            ),
            "require_gpu_cc",
        );
        // CC on, no evidence.
        fails(
            &gpu_cc(&doc(inventory(false, &[("GPU-a", "on")]), Vec::new()), ""),
            "sent no evidence",
        );
        // Evidence for a GPU the claims do not list in CC mode.
        fails(
            &gpu_cc(
                &doc(inventory(false, &[("GPU-a", "off")]), vec![gpu_ev("GPU-z")]),
                "",
            ),
            "do not list",
        );
        // Two entries for one GPU.
        fails(
            &gpu_cc(
                &doc(
                    inventory(false, &[("GPU-a", "on")]),
                    vec![gpu_ev("GPU-a"), gpu_ev("GPU-a")],
                ),
                "",
            ),
            "two evidence entries",
        );
        // One device's evidence standing for two GPUs: the same leaf key.
        let sample = |uuid: &str| GpuCcEvidence {
            cert_chain: include_str!("../tests/fixtures/nvidia-hopper/hopperCertChain.txt").into(),
            ..gpu_ev(uuid)
        };
        fails(
            &gpu_cc(
                &doc(
                    inventory(false, &[("GPU-a", "on"), ("GPU-b", "on")]),
                    vec![sample("GPU-a"), sample("GPU-b")],
                ),
                "",
            ),
            "signed by the same device key",
        );
        // An entry not covered by bound_evidence.
        let mut unbound = doc(inventory(false, &[("GPU-a", "on")]), vec![gpu_ev("GPU-a")]);
        unbound.bound_evidence.clear();
        fails(&gpu_cc(&unbound, ""), "bound evidence entries");
        // Evidence for the wrong nonce (this junk entry's is all zeros).
        fails(
            &gpu_cc(
                &doc(inventory(false, &[("GPU-a", "on")]), vec![gpu_ev("GPU-a")]),
                "",
            ),
            "GPU-a",
        );
        // Claims whose GPU part has no recognisable shape.
        fails(
            &gpu_cc(&doc(serde_json::json!({"gpus": []}), Vec::new()), ""),
            "simulated",
        );
    }

    #[test]
    fn the_example_policy_parses_with_every_table() {
        let p = VerifierPolicy::from_toml(include_str!("../examples/verifier.toml")).unwrap();
        assert!(p.snp.is_some() && p.tdx.is_some());
        assert!(!p.allow_simulated_gpus && !p.require_gpu_cc);
        // Tables are strict too.
        for bad in [
            "allowed_aks = []\n[snp]\nallowed_measurements = [\"00\"]",
            "allowed_aks = []\n[snp]\nunknown = 1",
            "allowed_aks = []\n[tdx]\nallowed_mrtd = [\"zz\"]",
            "allowed_aks = []\n[nvidia]\nallowed_driver_versions = 5",
            "allowed_aks = []\n[snp]\nmax_vmpl = 4",
        ] {
            assert!(VerifierPolicy::from_toml(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn oversized_model_lists_fail_without_being_compared() {
        let mut e = doc(serde_json::json!({}), Vec::new());
        let claim = e.claims.models[0].clone();
        e.claims.models = vec![claim; ccnode::MAX_EVENTS + 1];
        let p = VerifierPolicy::from_toml("allowed_aks = []\nallowed_models = []").unwrap();
        let r = verify(&e, &[7; 32], &p, SystemTime::now());
        for name in ["models_measured", "policy_models"] {
            fails(r.check(name).unwrap(), "more than 4096");
        }
        // Within bounds: judged, and named (a few of them).
        let mut e = doc(serde_json::json!({}), Vec::new());
        let claim = e.claims.models[0].clone();
        e.claims.models = vec![claim; 40];
        let r = verify(&e, &[7; 32], &p, SystemTime::now());
        fails(r.check("models_measured").unwrap(), "and 24 more");
    }

    #[test]
    fn policy_parsing() {
        let ak = "ab".repeat(32);
        let p = VerifierPolicy::from_toml(&format!(
            r#"
            allowed_aks = ["sha256:{ak}"]
            allowed_models = ["sha256:00"]
            allow_simulated_tee = true
            [expected_pcrs.sha256]
            "0" = "{zero}"
            "#,
            zero = "00".repeat(32)
        ))
        .unwrap();
        assert_eq!(p.allowed_aks.len(), 1);
        assert!(p.allow_simulated_tee && !p.allow_no_tee);
        assert_eq!(p.expected_pcrs["sha256"][&0], vec![0; 32]);
        assert_eq!(p.ccnode_pcr, 13, "the default is ccnoded's default");
        assert_eq!(VerifierPolicy::default().ccnode_pcr, 13);
        let p = VerifierPolicy::from_toml("allowed_aks = []\nccnode_pcr = 8").unwrap();
        assert_eq!(p.ccnode_pcr, 8);
        for pcr in [0, 7, 16, 23, 24] {
            let e = VerifierPolicy::from_toml(&format!("allowed_aks = []\nccnode_pcr = {pcr}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("must be one of 8..=15"), "{pcr}: {e}");
        }
        for bad in [
            "",
            "allowed_aks = []\nccnode_pcr = -1",
            "allowed_aks = [\"zz\"]",
            "allowed_aks = []\nunknown = 1",
            "allowed_aks = []\n[expected_pcrs.md5]\n\"0\" = \"00\"",
            "allowed_aks = []\n[expected_pcrs.sha256]\n\"24\" = \"00\"",
            "allowed_aks = []\n[expected_pcrs.sha256]\n\"1\" = \"00\"",
        ] {
            assert!(VerifierPolicy::from_toml(bad).is_err(), "{bad}");
        }
    }
}
