//! The signature file: a Sigstore bundle (media type v0.3) holding a DSSE
//! envelope. Parsing checks shape and bounds only; no signature is checked
//! here.

use base64::Engine as _;
use serde::de::IgnoredAny;
use serde::Deserialize;

use super::OmsError;

/// Largest signature file accepted.
pub const MAX_SIGNATURE_FILE: u64 = 1 << 20;
/// Most certificates accepted in a bundle's chain.
pub const MAX_CHAIN: usize = 8;

/// The media type the reference tool writes.
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// The DSSE payload type of an in-toto statement.
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// What the bundle carries to identify the signer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Material {
    /// Key signing: a SHA-256 hint of the PEM public key (hex), absent in
    /// older bundles (which carry `rawBytes` instead, ignored as the
    /// reference tool ignores it).
    PublicKey { hint: Option<String> },
    /// Certificate signing: DER certificates, signing certificate first.
    CertificateChain(Vec<Vec<u8>>),
    /// Sigstore keyless: a short-lived DER certificate and the
    /// transparency-log entries that prove when it signed (checked in
    /// [`super::sigstore`]).
    Keyless {
        certificate: Vec<u8>,
        entries: Vec<TlogEntry>,
        /// RFC 3161 timestamp responses (DER) over the signature, from
        /// `timestampVerificationData` (checked in [`super::tsa`]).
        timestamps: Vec<Vec<u8>>,
    },
}

/// Most RFC 3161 timestamps accepted in a bundle (the reference verifier's
/// and sigstore-go's limit).
pub const MAX_TIMESTAMPS: usize = 32;
/// Largest RFC 3161 timestamp response accepted (decoded).
pub const MAX_TIMESTAMP: usize = 16 << 10;

/// Most transparency-log entries accepted in a bundle.
pub const MAX_TLOG_ENTRIES: usize = 8;
/// Largest canonicalized log entry body accepted (decoded).
pub const MAX_TLOG_BODY: usize = 64 << 10;
/// Most hashes in an inclusion proof (a tree of 2^64 leaves needs 64).
pub const MAX_PROOF_HASHES: usize = 64;
/// Largest checkpoint (signed note) accepted.
pub const MAX_CHECKPOINT: usize = 4096;

/// One transparency-log entry (Rekor v1 or v2), as the bundle carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlogEntry {
    /// The entry's index in the whole log (what the signed entry timestamp
    /// covers).
    pub log_index: u64,
    /// The log's id: SHA-256 of its DER public key (Rekor v1, and v2 logs
    /// with ECDSA keys), or the signed-note key id of its checkpoint key
    /// (Rekor v2 logs with Ed25519 keys).
    pub key_id: Vec<u8>,
    pub kind: String,
    pub version: String,
    /// Seconds since the epoch at which the log integrated the entry; only
    /// Rekor v1 records one (absent or zero: `None`), and it means something
    /// only with the signed entry timestamp that covers it.
    pub integrated_time: Option<u64>,
    /// The log's signature over the entry (the inclusion promise).
    pub signed_entry_timestamp: Option<Vec<u8>>,
    pub inclusion_proof: Option<InclusionProof>,
    /// The canonicalized entry body, decoded.
    pub body: Vec<u8>,
}

/// An RFC 6962 inclusion proof with the log's signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InclusionProof {
    /// The entry's index in the tree the proof is for (a log shard).
    pub log_index: u64,
    pub root_hash: [u8; 32],
    pub tree_size: u64,
    pub hashes: Vec<[u8; 32]>,
    /// The signed note (checkpoint) committing to `tree_size` and `root_hash`.
    pub checkpoint: String,
}

/// A parsed bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The DSSE payload, exactly the bytes that were signed.
    pub payload: Vec<u8>,
    /// The DSSE payload type.
    pub payload_type: String,
    /// The single DSSE signature (DER or raw r||s).
    pub signature: Vec<u8>,
    pub material: Material,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBundle {
    media_type: String,
    verification_material: RawMaterial,
    dsse_envelope: Option<RawEnvelope>,
    message_signature: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMaterial {
    public_key: Option<RawPublicKey>,
    x509_certificate_chain: Option<RawChain>,
    certificate: Option<RawCertificate>,
    #[serde(default)]
    tlog_entries: Vec<RawTlogEntry>,
    timestamp_verification_data: Option<RawTimestamps>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawTimestamps {
    #[serde(default)]
    rfc3161_timestamps: Vec<RawTimestamp>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawTimestamp {
    signed_timestamp: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawTlogEntry {
    #[serde(deserialize_with = "int64")]
    log_index: u64,
    log_id: RawLogId,
    kind_version: RawKindVersion,
    #[serde(default, deserialize_with = "int64")]
    integrated_time: u64,
    inclusion_promise: Option<RawPromise>,
    inclusion_proof: Option<RawProof>,
    canonicalized_body: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawLogId {
    pub(crate) key_id: String,
}

#[derive(Deserialize)]
struct RawKindVersion {
    kind: String,
    version: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPromise {
    signed_entry_timestamp: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawProof {
    #[serde(deserialize_with = "int64")]
    log_index: u64,
    root_hash: String,
    #[serde(deserialize_with = "int64")]
    tree_size: u64,
    hashes: Vec<String>,
    checkpoint: RawCheckpoint,
}

#[derive(Deserialize)]
struct RawCheckpoint {
    envelope: String,
}

/// A protobuf JSON int64: a decimal string (what Sigstore writes) or a
/// number.
fn int64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Text(String),
        Number(u64),
    }
    match Int::deserialize(d)? {
        Int::Number(n) => Ok(n),
        Int::Text(t) => t.parse().map_err(serde::de::Error::custom),
    }
}

fn hash32(field: &str, text: &str) -> Result<[u8; 32], OmsError> {
    b64(field, text)?
        .try_into()
        .map_err(|_| bad(format!("{field} is not 32 bytes")))
}

impl RawTlogEntry {
    fn decode(self) -> Result<TlogEntry, OmsError> {
        let short = |s: &str, what: &str| {
            if s.len() > 64 {
                Err(bad(format!("tlog entry {what} too long")))
            } else {
                Ok(())
            }
        };
        short(&self.kind_version.kind, "kind")?;
        short(&self.kind_version.version, "version")?;
        // Numbers a log can hold: JSON-safe integers (the signed entry
        // timestamp is over their RFC 8785 form, which stops at 2^53), and
        // times a SystemTime can represent.
        const MAX_SAFE: u64 = 1 << 53;
        for (what, n) in [
            ("logIndex", self.log_index),
            ("integratedTime", self.integrated_time),
        ]
        .into_iter()
        .chain(
            self.inclusion_proof
                .iter()
                .flat_map(|p| [("proof logIndex", p.log_index), ("treeSize", p.tree_size)]),
        ) {
            if n > MAX_SAFE {
                return Err(bad(format!("tlog entry {what} {n} out of range")));
            }
        }
        let key_id = b64("tlog entry logId", &self.log_id.key_id)?;
        if key_id.is_empty() || key_id.len() > 64 {
            return Err(bad("tlog entry logId length out of range"));
        }
        if self.canonicalized_body.len() > MAX_TLOG_BODY * 4 / 3 + 4 {
            return Err(bad("tlog entry body too large"));
        }
        let body = b64("tlog entry body", &self.canonicalized_body)?;
        let signed_entry_timestamp = match self.inclusion_promise {
            Some(p) => {
                let set = b64("signed entry timestamp", &p.signed_entry_timestamp)?;
                if set.is_empty() || set.len() > 256 {
                    return Err(bad("signed entry timestamp length out of range"));
                }
                Some(set)
            }
            None => None,
        };
        let inclusion_proof = match self.inclusion_proof {
            Some(p) => {
                if p.hashes.len() > MAX_PROOF_HASHES {
                    return Err(bad("inclusion proof too long"));
                }
                if p.checkpoint.envelope.len() > MAX_CHECKPOINT {
                    return Err(bad("checkpoint too large"));
                }
                Some(InclusionProof {
                    log_index: p.log_index,
                    root_hash: hash32("inclusion proof root hash", &p.root_hash)?,
                    tree_size: p.tree_size,
                    hashes: p
                        .hashes
                        .iter()
                        .map(|h| hash32("inclusion proof hash", h))
                        .collect::<Result<_, _>>()?,
                    checkpoint: p.checkpoint.envelope,
                })
            }
            None => None,
        };
        Ok(TlogEntry {
            log_index: self.log_index,
            key_id,
            kind: self.kind_version.kind,
            version: self.kind_version.version,
            integrated_time: Some(self.integrated_time).filter(|&t| t != 0),
            signed_entry_timestamp,
            inclusion_proof,
            body,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPublicKey {
    hint: Option<String>,
    raw_bytes: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct RawChain {
    certificates: Vec<RawCertificate>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawCertificate {
    raw_bytes: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEnvelope {
    payload: String,
    payload_type: String,
    signatures: Vec<RawSignature>,
}

#[derive(Deserialize)]
struct RawSignature {
    sig: String,
}

fn bad(reason: impl Into<String>) -> OmsError {
    OmsError::Bundle(reason.into())
}

/// Decodes standard base64, with or without padding (protobuf JSON allows
/// both, and URL-safe too).
pub(crate) fn b64(field: &str, text: &str) -> Result<Vec<u8>, OmsError> {
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    use base64::engine::DecodePaddingMode;
    let config =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let standard = GeneralPurpose::new(&base64::alphabet::STANDARD, config);
    let url = GeneralPurpose::new(&base64::alphabet::URL_SAFE, config);
    standard
        .decode(text)
        .or_else(|_| url.decode(text))
        .map_err(|_| bad(format!("{field} is not base64")))
}

impl Bundle {
    /// Parses a signature file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Bundle, OmsError> {
        if bytes.len() as u64 > MAX_SIGNATURE_FILE {
            return Err(OmsError::TooLarge {
                what: "signature file",
                found: bytes.len() as u64,
                limit: MAX_SIGNATURE_FILE,
            });
        }
        let raw: RawBundle =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a bundle: {e}")))?;
        if raw.media_type != BUNDLE_MEDIA_TYPE {
            return Err(bad(format!(
                "media type {:?}, expected {BUNDLE_MEDIA_TYPE}",
                truncate(&raw.media_type)
            )));
        }
        if raw.message_signature.is_some() {
            return Err(bad("message signature bundles are not model signatures"));
        }
        let envelope = raw.dsse_envelope.ok_or_else(|| bad("no DSSE envelope"))?;
        if envelope.signatures.len() != 1 {
            return Err(bad(format!(
                "{} DSSE signatures, expected exactly one",
                envelope.signatures.len()
            )));
        }
        let payload = b64("payload", &envelope.payload)?;
        let signature = b64("signature", &envelope.signatures[0].sig)?;
        if signature.is_empty() || signature.len() > 256 {
            return Err(bad("signature length out of range"));
        }
        let vm = raw.verification_material;
        if vm.tlog_entries.len() > MAX_TLOG_ENTRIES {
            return Err(bad("too many transparency log entries"));
        }
        let material = match (vm.public_key, vm.x509_certificate_chain, vm.certificate) {
            (Some(key), None, None) => {
                let _ = key.raw_bytes;
                if let Some(hint) = &key.hint {
                    if hint.len() > 128 {
                        return Err(bad("public key hint too long"));
                    }
                }
                Material::PublicKey { hint: key.hint.filter(|h| !h.is_empty()) }
            }
            (None, Some(chain), None) => {
                if chain.certificates.is_empty() || chain.certificates.len() > MAX_CHAIN {
                    return Err(bad("certificate chain length out of range"));
                }
                let certs = chain
                    .certificates
                    .iter()
                    .map(|c| b64("certificate", &c.raw_bytes))
                    .collect::<Result<Vec<_>, _>>()?;
                Material::CertificateChain(certs)
            }
            (None, None, Some(cert)) => {
                let raw_ts = vm
                    .timestamp_verification_data
                    .map(|t| t.rfc3161_timestamps)
                    .unwrap_or_default();
                if raw_ts.len() > MAX_TIMESTAMPS {
                    return Err(bad("too many RFC 3161 timestamps"));
                }
                let mut timestamps: Vec<Vec<u8>> = Vec::with_capacity(raw_ts.len());
                for t in &raw_ts {
                    if t.signed_timestamp.len() > MAX_TIMESTAMP * 4 / 3 + 4 {
                        return Err(bad("RFC 3161 timestamp too large"));
                    }
                    let der = b64("signed timestamp", &t.signed_timestamp)?;
                    if timestamps.contains(&der) {
                        return Err(bad("duplicate RFC 3161 timestamp"));
                    }
                    timestamps.push(der);
                }
                Material::Keyless {
                    certificate: b64("certificate", &cert.raw_bytes)?,
                    entries: vm
                        .tlog_entries
                        .into_iter()
                        .map(RawTlogEntry::decode)
                        .collect::<Result<_, _>>()?,
                    timestamps,
                }
            }
            _ => return Err(bad("verification material must hold exactly one of publicKey, x509CertificateChain, certificate")),
        };
        Ok(Bundle {
            payload,
            payload_type: envelope.payload_type,
            signature,
            material,
        })
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// The DSSE v1 pre-authentication encoding of `payload`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_dsse_spec_example() {
        // From the DSSE protocol text.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        for input in [
            &b""[..],
            b"{}",
            b"[]",
            b"null",
            b"{\"mediaType\":1}",
            &[0xff; 10],
        ] {
            assert!(matches!(Bundle::parse(input), Err(OmsError::Bundle(_))));
        }
    }

    #[test]
    fn rejects_oversized_signature_file() {
        let big = vec![b' '; (MAX_SIGNATURE_FILE + 1) as usize];
        assert!(matches!(
            Bundle::parse(&big),
            Err(OmsError::TooLarge { .. })
        ));
    }

    #[test]
    fn rejects_wrong_media_type_and_two_materials() {
        let b = r#"{"mediaType":"application/vnd.dev.sigstore.bundle+json;version=0.1","verificationMaterial":{"publicKey":{"hint":"aa"}},"dsseEnvelope":{"payload":"e30=","payloadType":"x","signatures":[{"sig":"AA=="}]}}"#;
        assert!(matches!(
            Bundle::parse(b.as_bytes()),
            Err(OmsError::Bundle(_))
        ));
        let b = r#"{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","verificationMaterial":{"publicKey":{"hint":"aa"},"certificate":{"rawBytes":"AA=="}},"dsseEnvelope":{"payload":"e30=","payloadType":"x","signatures":[{"sig":"AA=="}]}}"#;
        assert!(matches!(
            Bundle::parse(b.as_bytes()),
            Err(OmsError::Bundle(_))
        ));
    }

    #[test]
    fn accepts_legacy_raw_bytes_key() {
        let b = r#"{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","verificationMaterial":{"publicKey":{"rawBytes":"AAAA"},"tlogEntries":[]},"dsseEnvelope":{"payload":"e30=","payloadType":"x","signatures":[{"sig":"AA==","keyid":""}]}}"#;
        let parsed = Bundle::parse(b.as_bytes()).unwrap();
        assert_eq!(parsed.material, Material::PublicKey { hint: None });
        assert_eq!(parsed.payload, b"{}");
    }
}
