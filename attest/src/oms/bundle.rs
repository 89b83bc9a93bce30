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
    /// Sigstore keyless: a single DER certificate (plus transparency log
    /// entries this module does not verify).
    Certificate(Vec<u8>),
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
            (None, None, Some(cert)) => Material::Certificate(b64("certificate", &cert.raw_bytes)?),
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
