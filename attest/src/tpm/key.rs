//! The attestation key outside the TPM: its SubjectPublicKeyInfo from a
//! TPM public area, and verification of TPM signatures with it (p256 and
//! rsa crates; no TPM involved).

use p256::ecdsa::signature::Verifier as _;
use p256::pkcs8::{DecodePublicKey, EncodePublicKey};
use sha2::{Digest, Sha256};

use super::wire::{self, PublicArea, PublicKeyArea, Signature};

/// Smallest RSA modulus accepted for an AK.
pub const MIN_RSA_BITS: usize = 2048;

/// An AK public key.
#[derive(Debug, Clone)]
pub enum AkPublicKey {
    P256(p256::ecdsa::VerifyingKey),
    Rsa(rsa::RsaPublicKey),
}

impl AkPublicKey {
    /// Parses an SPKI PEM (P-256 or RSA).
    pub fn from_pem(pem: &str) -> Result<AkPublicKey, String> {
        if pem.len() > 8192 {
            return Err("public key PEM larger than 8 KiB".into());
        }
        if let Ok(k) = p256::PublicKey::from_public_key_pem(pem) {
            return Ok(AkPublicKey::P256(k.into()));
        }
        match rsa::RsaPublicKey::from_public_key_pem(pem) {
            Ok(k) => {
                let bits = rsa::traits::PublicKeyParts::n(&k).bits();
                if bits < MIN_RSA_BITS {
                    return Err(format!("rsa key of {bits} bits is below {MIN_RSA_BITS}"));
                }
                Ok(AkPublicKey::Rsa(k))
            }
            Err(_) => Err("not a P-256 or RSA SubjectPublicKeyInfo PEM".into()),
        }
    }

    /// Builds the key from a parsed TPM public area.
    pub fn from_public_area(area: &PublicArea) -> Result<AkPublicKey, String> {
        match &area.key {
            PublicKeyArea::Ecc { curve, x, y } => {
                if *curve != wire::TPM_ECC_NIST_P256 {
                    return Err(format!("ecc curve {curve:#06x} is not NIST P-256"));
                }
                let mut sec1 = vec![4u8];
                sec1.extend_from_slice(&pad32(x).ok_or("ecc x coordinate longer than 32 bytes")?);
                sec1.extend_from_slice(&pad32(y).ok_or("ecc y coordinate longer than 32 bytes")?);
                let k = p256::PublicKey::from_sec1_bytes(&sec1)
                    .map_err(|_| "ecc point is not on P-256".to_string())?;
                Ok(AkPublicKey::P256(k.into()))
            }
            PublicKeyArea::Rsa {
                modulus, exponent, ..
            } => {
                let e = if *exponent == 0 { 65537 } else { *exponent };
                let k = rsa::RsaPublicKey::new(
                    rsa::BigUint::from_bytes_be(modulus),
                    rsa::BigUint::from(e),
                )
                .map_err(|e| format!("invalid rsa key: {e}"))?;
                if modulus.len() * 8 < MIN_RSA_BITS {
                    return Err(format!(
                        "rsa modulus of {} bits is below {MIN_RSA_BITS}",
                        modulus.len() * 8
                    ));
                }
                Ok(AkPublicKey::Rsa(k))
            }
        }
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Result<Vec<u8>, String> {
        let doc = match self {
            AkPublicKey::P256(k) => p256::PublicKey::from(k).to_public_key_der(),
            AkPublicKey::Rsa(k) => k.to_public_key_der(),
        };
        doc.map(|d| d.as_bytes().to_vec())
            .map_err(|e| format!("cannot encode the key: {e}"))
    }

    /// The SPKI PEM.
    pub fn spki_pem(&self) -> Result<String, String> {
        let pem = match self {
            AkPublicKey::P256(k) => {
                p256::PublicKey::from(k).to_public_key_pem(p256::pkcs8::LineEnding::LF)
            }
            AkPublicKey::Rsa(k) => k.to_public_key_pem(p256::pkcs8::LineEnding::LF),
        };
        pem.map_err(|e| format!("cannot encode the key: {e}"))
    }

    /// sha256 of the DER SPKI: the AK digest bound into evidence and listed
    /// in verifier policies.
    pub fn spki_sha256(&self) -> Result<[u8; 32], String> {
        Ok(Sha256::digest(self.spki_der()?).into())
    }

    /// Verifies a TPM signature over `message` (the marshalled
    /// `TPMS_ATTEST`). Only SHA-256 signatures are accepted.
    pub fn verify(&self, message: &[u8], sig: &Signature) -> Result<(), String> {
        match (self, sig) {
            (AkPublicKey::P256(k), Signature::Ecdsa { hash, r, s }) => {
                if *hash != wire::TPM_ALG_SHA256 {
                    return Err(format!("ecdsa signature hash {hash:#06x} is not sha256"));
                }
                let r = pad32(r).ok_or("ecdsa r longer than 32 bytes")?;
                let s = pad32(s).ok_or("ecdsa s longer than 32 bytes")?;
                let sig = p256::ecdsa::Signature::from_scalars(r, s)
                    .map_err(|_| "ecdsa r or s out of range".to_string())?;
                k.verify(message, &sig)
                    .map_err(|_| "ecdsa signature does not verify with the AK".to_string())
            }
            (AkPublicKey::Rsa(k), Signature::Rsa { scheme, hash, sig }) => {
                if *hash != wire::TPM_ALG_SHA256 {
                    return Err(format!("rsa signature hash {hash:#06x} is not sha256"));
                }
                let digest = Sha256::digest(message);
                let result = if *scheme == wire::TPM_ALG_RSASSA {
                    k.verify(rsa::Pkcs1v15Sign::new::<Sha256>(), &digest, sig)
                } else {
                    k.verify(rsa::Pss::new::<Sha256>(), &digest, sig)
                };
                result.map_err(|_| "rsa signature does not verify with the AK".to_string())
            }
            (AkPublicKey::P256(_), _) => Err("an rsa signature for an ecc AK".into()),
            (AkPublicKey::Rsa(_), _) => Err("an ecdsa signature for an rsa AK".into()),
        }
    }
}

/// Left-pads a big-endian integer to 32 bytes (None when longer, after
/// dropping leading zeros).
fn pad32(b: &[u8]) -> Option<p256::FieldBytes> {
    let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    let b = &b[start..];
    if b.len() > 32 {
        return None;
    }
    let mut out = p256::FieldBytes::default();
    out[32 - b.len()..].copy_from_slice(b);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer as _;
    use rand_core::OsRng;

    #[test]
    fn ecdsa_from_parts_and_pem() {
        let sk = p256::ecdsa::SigningKey::random(&mut OsRng);
        let vk = *sk.verifying_key();
        let ak = AkPublicKey::P256(vk);
        let pem = ak.spki_pem().unwrap();
        let back = AkPublicKey::from_pem(&pem).unwrap();
        assert_eq!(back.spki_der().unwrap(), ak.spki_der().unwrap());
        let msg = b"attest";
        let sig: p256::ecdsa::Signature = sk.sign(msg);
        let (r, s) = sig.split_bytes();
        let tpm = Signature::Ecdsa {
            hash: wire::TPM_ALG_SHA256,
            r: r.to_vec(),
            s: s.to_vec(),
        };
        ak.verify(msg, &tpm).unwrap();
        assert!(ak.verify(b"other", &tpm).is_err());
        let wrong_hash = Signature::Ecdsa {
            hash: wire::TPM_ALG_SHA1,
            r: r.to_vec(),
            s: s.to_vec(),
        };
        assert!(ak.verify(msg, &wrong_hash).is_err());
        assert!(AkPublicKey::from_pem("garbage").is_err());
    }

    #[test]
    fn rsa_pss_and_pkcs1() {
        let sk = rsa::RsaPrivateKey::new(&mut OsRng, 2048).unwrap();
        let ak = AkPublicKey::Rsa(sk.to_public_key());
        let msg = b"attest";
        let digest = Sha256::digest(msg);
        let pkcs1 = sk
            .sign(rsa::Pkcs1v15Sign::new::<Sha256>(), &digest)
            .unwrap();
        let pss = sk
            .sign_with_rng(&mut OsRng, rsa::Pss::new::<Sha256>(), &digest)
            .unwrap();
        let mk = |scheme, sig: &Vec<u8>| Signature::Rsa {
            scheme,
            hash: wire::TPM_ALG_SHA256,
            sig: sig.clone(),
        };
        ak.verify(msg, &mk(wire::TPM_ALG_RSASSA, &pkcs1)).unwrap();
        ak.verify(msg, &mk(wire::TPM_ALG_RSAPSS, &pss)).unwrap();
        assert!(ak.verify(msg, &mk(wire::TPM_ALG_RSAPSS, &pkcs1)).is_err());
        assert!(ak.verify(b"x", &mk(wire::TPM_ALG_RSASSA, &pkcs1)).is_err());
    }
}
