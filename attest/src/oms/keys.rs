//! ECDSA public keys (P-256, P-384, P-521) and signature checks, the hash
//! matched to the curve as the reference tool does (SHA-256, SHA-384,
//! SHA-512). Signatures are accepted DER-encoded (what the tool writes) or
//! as fixed-size r||s.

use der::{Decode, Encode};
use sha2::{Digest, Sha256};
use spki::{ObjectIdentifier, SubjectPublicKeyInfoRef};

use super::OmsError;

const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const SECP521R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.35");

#[derive(Clone)]
enum Inner {
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    P521(p521::ecdsa::VerifyingKey),
}

/// A public key a model may be signed with.
#[derive(Clone)]
pub struct PublicKey {
    inner: Inner,
    spki_der: Vec<u8>,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({} {})", self.curve(), self.hint())
    }
}

impl PublicKey {
    /// Parses a DER SubjectPublicKeyInfo.
    pub fn from_spki_der(der: &[u8]) -> Result<PublicKey, String> {
        let spki =
            SubjectPublicKeyInfoRef::from_der(der).map_err(|e| format!("not a public key: {e}"))?;
        Self::from_spki(&spki)
    }

    pub(crate) fn from_spki(spki: &SubjectPublicKeyInfoRef<'_>) -> Result<PublicKey, String> {
        if spki.algorithm.oid != ID_EC_PUBLIC_KEY {
            return Err(format!(
                "not an elliptic-curve key (algorithm {})",
                spki.algorithm.oid
            ));
        }
        let curve = spki
            .algorithm
            .parameters_oid()
            .map_err(|_| "elliptic-curve key without a named curve".to_string())?;
        let point = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| "public key bit string is not whole bytes".to_string())?;
        let bad = |_| "invalid curve point".to_string();
        let inner = match curve {
            c if c == SECP256R1 => {
                Inner::P256(p256::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(bad)?)
            }
            c if c == SECP384R1 => {
                Inner::P384(p384::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(bad)?)
            }
            c if c == SECP521R1 => {
                Inner::P521(p521::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(bad)?)
            }
            other => return Err(format!("unsupported curve {other}")),
        };
        let spki_der = spki
            .to_der()
            .map_err(|e| format!("cannot re-encode key: {e}"))?;
        Ok(PublicKey { inner, spki_der })
    }

    /// Parses a PEM "PUBLIC KEY" block.
    pub fn from_pem(pem: &str) -> Result<PublicKey, String> {
        let (label, der) =
            der::pem::decode_vec(pem.trim().as_bytes()).map_err(|e| format!("not PEM: {e}"))?;
        if label != "PUBLIC KEY" {
            return Err(format!("PEM label {label:?}, expected PUBLIC KEY"));
        }
        Self::from_spki_der(&der)
    }

    /// The curve's name.
    pub fn curve(&self) -> &'static str {
        match self.inner {
            Inner::P256(_) => "P-256",
            Inner::P384(_) => "P-384",
            Inner::P521(_) => "P-521",
        }
    }

    /// The hint the reference tool records: SHA-256 (hex) of the key's PEM
    /// SubjectPublicKeyInfo, 64-column lines, LF endings.
    pub fn hint(&self) -> String {
        let pem = der::pem::encode_string("PUBLIC KEY", der::pem::LineEnding::LF, &self.spki_der)
            .unwrap_or_default();
        hex::encode(Sha256::digest(pem.as_bytes()))
    }

    /// Checks `sig` (DER or raw r||s) over `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        use ecdsa::signature::Verifier as _;
        match &self.inner {
            Inner::P256(k) => p256::ecdsa::Signature::from_der(sig)
                .or_else(|_| p256::ecdsa::Signature::from_slice(sig))
                .is_ok_and(|s| k.verify(msg, &s).is_ok()),
            Inner::P384(k) => p384::ecdsa::Signature::from_der(sig)
                .or_else(|_| p384::ecdsa::Signature::from_slice(sig))
                .is_ok_and(|s| k.verify(msg, &s).is_ok()),
            Inner::P521(k) => p521::ecdsa::Signature::from_der(sig)
                .or_else(|_| p521::ecdsa::Signature::from_slice(sig))
                .is_ok_and(|s| k.verify(msg, &s).is_ok()),
        }
    }

    /// Checks an X.509 signature made by this key with `alg` (an
    /// ecdsa-with-SHA* OID), whatever the curve.
    pub(crate) fn verify_x509(&self, alg: ObjectIdentifier, msg: &[u8], sig: &[u8]) -> bool {
        use ecdsa::signature::hazmat::PrehashVerifier as _;
        let prehash: Vec<u8> = match alg.to_string().as_str() {
            "1.2.840.10045.4.3.2" => Sha256::digest(msg).to_vec(),
            "1.2.840.10045.4.3.3" => sha2::Sha384::digest(msg).to_vec(),
            "1.2.840.10045.4.3.4" => sha2::Sha512::digest(msg).to_vec(),
            _ => return false,
        };
        match &self.inner {
            Inner::P256(k) => p256::ecdsa::Signature::from_der(sig)
                .is_ok_and(|s| k.verify_prehash(&prehash, &s).is_ok()),
            Inner::P384(k) => p384::ecdsa::Signature::from_der(sig)
                .is_ok_and(|s| k.verify_prehash(&prehash, &s).is_ok()),
            Inner::P521(k) => p521::ecdsa::Signature::from_der(sig)
                .is_ok_and(|s| k.verify_prehash(&prehash, &s).is_ok()),
        }
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }
}

/// Checks the bundle's hint (when present) against `key`.
pub(crate) fn check_hint(key: &PublicKey, hint: Option<&str>) -> Result<(), OmsError> {
    match hint {
        Some(found) if !found.eq_ignore_ascii_case(&key.hint()) => Err(OmsError::KeyHint {
            expected: key.hint(),
            found: found.chars().take(128).collect(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A P-256 key and the hint the reference tool computed for it.
    const PEM: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEL4KjPZtBPJyQs/+SCWKMrPY1yYW8\nkFC6+17RsonbV1DQCmPme1zufD2eSNUu+AXMpPjEry7Q8zyJ3Wg1zdkUfQ==\n-----END PUBLIC KEY-----\n";
    // What model_signing 1.1.1 wrote as the hint for this key.
    const HINT: &str = "daae7172777c3a7f3a0a0d015202c19e031e3e9297431b32defa72542c8e67f3";

    #[test]
    fn hint_is_sha256_of_pem() {
        let key = PublicKey::from_pem(PEM).unwrap();
        assert_eq!(key.curve(), "P-256");
        assert_eq!(key.hint(), hex::encode(Sha256::digest(PEM.as_bytes())));
        assert_eq!(key.hint(), HINT);
    }

    #[test]
    fn garbage_keys_are_errors() {
        assert!(PublicKey::from_pem("").is_err());
        assert!(PublicKey::from_pem(
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
        )
        .is_err());
        assert!(PublicKey::from_spki_der(&[0x30, 0x03, 0x02, 0x01, 0x00]).is_err());
    }

    #[test]
    fn garbage_signature_does_not_verify() {
        let key = PublicKey::from_pem(PEM).unwrap();
        assert!(!key.verify(b"msg", b""));
        assert!(!key.verify(b"msg", &[0u8; 64]));
        assert!(!key.verify(b"msg", &[0x30; 72]));
    }
}
