//! Bounded parsers of the TPM 2.0 structures a verifier receives from an
//! untrusted node: `TPMS_ATTEST` (a quote), `TPMT_SIGNATURE` and
//! `TPMT_PUBLIC` (the attestation key). Written here rather than taken from
//! tss-esapi so the verifier needs no TPM library, parses only what it
//! accepts, and never panics: every length is checked against the bytes
//! left and against the structure's own maximum, and every parse must
//! consume its input exactly.

use sha2::{Digest, Sha256};

/// `TPM_GENERATED_VALUE`: the magic a TPM puts at the start of everything it
/// signs with a restricted key.
pub const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// `TPM_ST_ATTEST_QUOTE`.
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;

pub const TPM_ALG_RSA: u16 = 0x0001;
pub const TPM_ALG_SHA1: u16 = 0x0004;
pub const TPM_ALG_SHA256: u16 = 0x000b;
pub const TPM_ALG_SHA384: u16 = 0x000c;
pub const TPM_ALG_SHA512: u16 = 0x000d;
pub const TPM_ALG_NULL: u16 = 0x0010;
pub const TPM_ALG_RSASSA: u16 = 0x0014;
pub const TPM_ALG_RSAPSS: u16 = 0x0016;
pub const TPM_ALG_ECDSA: u16 = 0x0018;
pub const TPM_ALG_ECDAA: u16 = 0x001a;
pub const TPM_ALG_ECC: u16 = 0x0023;
pub const TPM_ECC_NIST_P256: u16 = 0x0003;

/// Largest marshalled structure accepted (a quote over every PCR of four
/// banks is well under 1 KiB; an RSA-4096 public area about 600 bytes).
pub const MAX_STRUCTURE: usize = 4096;
/// Largest `TPM2B_NAME` (hash algorithm + SHA-512 digest).
pub const MAX_NAME: usize = 2 + 64;
/// Largest `TPM2B_DATA` / `TPM2B_DIGEST` (SHA-512).
pub const MAX_DIGEST: usize = 64;
/// Largest RSA modulus or signature accepted (RSA-4096).
pub const MAX_RSA_BYTES: usize = 512;
/// Largest ECC coordinate or signature half (P-521).
pub const MAX_ECC_BYTES: usize = 66;
/// Most `TPMS_PCR_SELECTION`s in a `TPML_PCR_SELECTION` (`HASH_COUNT`).
pub const MAX_PCR_BANKS: usize = 16;
/// Largest `sizeofSelect` (`PCR_SELECT_MAX`: 32 PCRs).
pub const MAX_PCR_SELECT: usize = 4;

/// Object attribute bits (TPM 2.0 part 2, `TPMA_OBJECT`).
pub mod attr {
    pub const FIXED_TPM: u32 = 1 << 1;
    pub const FIXED_PARENT: u32 = 1 << 4;
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    pub const RESTRICTED: u32 = 1 << 16;
    pub const DECRYPT: u32 = 1 << 17;
    pub const SIGN_ENCRYPT: u32 = 1 << 18;
    /// What an attestation key must have.
    pub const AK_REQUIRED: u32 =
        FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN_ENCRYPT;
}

/// A parse failure: what was being read and why it failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {reason}")]
pub struct WireError {
    pub what: &'static str,
    pub reason: String,
}

struct Reader<'a> {
    what: &'static str,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(what: &'static str, buf: &'a [u8]) -> Result<Self, WireError> {
        let r = Reader { what, buf };
        if buf.len() > MAX_STRUCTURE {
            return Err(r.err(format!(
                "{} bytes exceeds the limit of {MAX_STRUCTURE}",
                buf.len()
            )));
        }
        Ok(r)
    }

    fn err(&self, reason: impl Into<String>) -> WireError {
        WireError {
            what: self.what,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(self.err(format!("truncated at {field}")));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self, field: &str) -> Result<u8, WireError> {
        Ok(self.take(1, field)?[0])
    }

    fn u16(&mut self, field: &str) -> Result<u16, WireError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &str) -> Result<u32, WireError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, field: &str) -> Result<u64, WireError> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A `TPM2B_*`: a u16 size, then that many bytes (at most `max`).
    fn sized(&mut self, max: usize, field: &str) -> Result<&'a [u8], WireError> {
        let n = usize::from(self.u16(field)?);
        if n > max {
            return Err(self.err(format!("{field} of {n} bytes exceeds {max}")));
        }
        self.take(n, field)
    }

    fn finish(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.err(format!("{} trailing bytes", self.buf.len())))
        }
    }
}

/// One bank's selection: the hash algorithm and the selected PCR indices,
/// ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrBankSelection {
    pub hash: u16,
    pub pcrs: Vec<u32>,
}

/// A parsed `TPMS_ATTEST` of type `TPM_ST_ATTEST_QUOTE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteInfo {
    pub qualified_signer: Vec<u8>,
    pub extra_data: Vec<u8>,
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub safe: bool,
    pub firmware_version: u64,
    pub pcr_select: Vec<PcrBankSelection>,
    pub pcr_digest: Vec<u8>,
}

/// Parses a marshalled `TPMS_ATTEST`; it must carry the TPM's magic and be
/// a quote.
pub fn parse_quote(bytes: &[u8]) -> Result<QuoteInfo, WireError> {
    let mut r = Reader::new("TPMS_ATTEST", bytes)?;
    let magic = r.u32("magic")?;
    if magic != TPM_GENERATED_VALUE {
        return Err(r.err(format!(
            "magic {magic:#010x} is not TPM_GENERATED_VALUE {TPM_GENERATED_VALUE:#010x}"
        )));
    }
    let ty = r.u16("type")?;
    if ty != TPM_ST_ATTEST_QUOTE {
        return Err(r.err(format!(
            "type {ty:#06x} is not TPM_ST_ATTEST_QUOTE {TPM_ST_ATTEST_QUOTE:#06x}"
        )));
    }
    let qualified_signer = r.sized(MAX_NAME, "qualifiedSigner")?.to_vec();
    let extra_data = r.sized(MAX_DIGEST, "extraData")?.to_vec();
    let clock = r.u64("clockInfo.clock")?;
    let reset_count = r.u32("clockInfo.resetCount")?;
    let restart_count = r.u32("clockInfo.restartCount")?;
    let safe = match r.u8("clockInfo.safe")? {
        0 => false,
        1 => true,
        v => return Err(r.err(format!("clockInfo.safe is {v}, not a TPMI_YES_NO"))),
    };
    let firmware_version = r.u64("firmwareVersion")?;
    let pcr_select = read_pcr_selection(&mut r)?;
    let pcr_digest = r.sized(MAX_DIGEST, "pcrDigest")?.to_vec();
    r.finish()?;
    Ok(QuoteInfo {
        qualified_signer,
        extra_data,
        clock,
        reset_count,
        restart_count,
        safe,
        firmware_version,
        pcr_select,
        pcr_digest,
    })
}

fn read_pcr_selection(r: &mut Reader<'_>) -> Result<Vec<PcrBankSelection>, WireError> {
    let count = r.u32("pcrSelect.count")? as usize;
    if count > MAX_PCR_BANKS {
        return Err(r.err(format!("{count} PCR selections exceed {MAX_PCR_BANKS}")));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let hash = r.u16("pcrSelect.hash")?;
        let size = usize::from(r.u8("pcrSelect.sizeofSelect")?);
        if size > MAX_PCR_SELECT {
            return Err(r.err(format!("sizeofSelect {size} exceeds {MAX_PCR_SELECT}")));
        }
        let bits = r.take(size, "pcrSelect.pcrSelect")?;
        let mut pcrs = Vec::new();
        for (byte, b) in bits.iter().enumerate() {
            for bit in 0..8u32 {
                if b & (1 << bit) != 0 {
                    pcrs.push(byte as u32 * 8 + bit);
                }
            }
        }
        out.push(PcrBankSelection { hash, pcrs });
    }
    Ok(out)
}

/// A parsed `TPMT_SIGNATURE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// RSASSA-PKCS1-v1_5 (`TPM_ALG_RSASSA`) or RSA-PSS (`TPM_ALG_RSAPSS`).
    Rsa {
        scheme: u16,
        hash: u16,
        sig: Vec<u8>,
    },
    /// ECDSA: the two halves as the TPM gave them (big-endian, possibly
    /// shorter than the field size).
    Ecdsa { hash: u16, r: Vec<u8>, s: Vec<u8> },
}

/// Parses a marshalled `TPMT_SIGNATURE` (RSASSA, RSAPSS or ECDSA only).
pub fn parse_signature(bytes: &[u8]) -> Result<Signature, WireError> {
    let mut r = Reader::new("TPMT_SIGNATURE", bytes)?;
    let alg = r.u16("sigAlg")?;
    let sig = match alg {
        TPM_ALG_RSASSA | TPM_ALG_RSAPSS => {
            let hash = r.u16("hash")?;
            let sig = r.sized(MAX_RSA_BYTES, "sig")?.to_vec();
            Signature::Rsa {
                scheme: alg,
                hash,
                sig,
            }
        }
        TPM_ALG_ECDSA => {
            let hash = r.u16("hash")?;
            let sr = r.sized(MAX_ECC_BYTES, "signatureR")?.to_vec();
            let ss = r.sized(MAX_ECC_BYTES, "signatureS")?.to_vec();
            Signature::Ecdsa { hash, r: sr, s: ss }
        }
        other => {
            return Err(r.err(format!(
                "signature algorithm {other:#06x} is not RSASSA, RSAPSS or ECDSA"
            )))
        }
    };
    r.finish()?;
    Ok(sig)
}

/// The key in a parsed `TPMT_PUBLIC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKeyArea {
    Rsa {
        /// The modulus, big-endian.
        modulus: Vec<u8>,
        /// The public exponent (0 in the structure means 65537).
        exponent: u32,
        key_bits: u16,
    },
    Ecc {
        curve: u16,
        x: Vec<u8>,
        y: Vec<u8>,
    },
}

/// A parsed `TPMT_PUBLIC` (RSA and ECC only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicArea {
    pub name_alg: u16,
    pub attributes: u32,
    pub auth_policy: Vec<u8>,
    /// The signing scheme (`TPM_ALG_NULL` when the key leaves it open) and
    /// its hash.
    pub scheme: u16,
    pub scheme_hash: Option<u16>,
    pub key: PublicKeyArea,
}

impl PublicArea {
    /// The object's name for `bytes` (its marshalled `TPMT_PUBLIC`): the
    /// name algorithm followed by the hash of the public area. Only SHA-256
    /// names are computed.
    pub fn name(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        if self.name_alg != TPM_ALG_SHA256 {
            return None;
        }
        let mut out = TPM_ALG_SHA256.to_be_bytes().to_vec();
        out.extend_from_slice(&Sha256::digest(bytes));
        Some(out)
    }
}

fn read_symmetric(r: &mut Reader<'_>) -> Result<(), WireError> {
    let alg = r.u16("symmetric.algorithm")?;
    if alg != TPM_ALG_NULL {
        r.u16("symmetric.keyBits")?;
        r.u16("symmetric.mode")?;
    }
    Ok(())
}

/// Parses a marshalled `TPMT_PUBLIC`.
pub fn parse_public(bytes: &[u8]) -> Result<PublicArea, WireError> {
    let mut r = Reader::new("TPMT_PUBLIC", bytes)?;
    let ty = r.u16("type")?;
    let name_alg = r.u16("nameAlg")?;
    let attributes = r.u32("objectAttributes")?;
    let auth_policy = r.sized(MAX_DIGEST, "authPolicy")?.to_vec();
    let (scheme, scheme_hash, key) = match ty {
        TPM_ALG_RSA => {
            read_symmetric(&mut r)?;
            let scheme = r.u16("scheme")?;
            let scheme_hash = if scheme == TPM_ALG_NULL {
                None
            } else {
                Some(r.u16("scheme.hashAlg")?)
            };
            let key_bits = r.u16("keyBits")?;
            let exponent = r.u32("exponent")?;
            let modulus = r.sized(MAX_RSA_BYTES, "unique.rsa")?.to_vec();
            (
                scheme,
                scheme_hash,
                PublicKeyArea::Rsa {
                    modulus,
                    exponent,
                    key_bits,
                },
            )
        }
        TPM_ALG_ECC => {
            read_symmetric(&mut r)?;
            let scheme = r.u16("scheme")?;
            let scheme_hash = if scheme == TPM_ALG_NULL {
                None
            } else {
                let h = r.u16("scheme.hashAlg")?;
                if scheme == TPM_ALG_ECDAA {
                    r.u16("scheme.count")?;
                }
                Some(h)
            };
            let curve = r.u16("curveID")?;
            let kdf = r.u16("kdf.scheme")?;
            if kdf != TPM_ALG_NULL {
                r.u16("kdf.hashAlg")?;
            }
            let x = r.sized(MAX_ECC_BYTES, "unique.ecc.x")?.to_vec();
            let y = r.sized(MAX_ECC_BYTES, "unique.ecc.y")?.to_vec();
            (scheme, scheme_hash, PublicKeyArea::Ecc { curve, x, y })
        }
        other => {
            return Err(r.err(format!("object type {other:#06x} is not RSA or ECC")));
        }
    };
    r.finish()?;
    Ok(PublicArea {
        name_alg,
        attributes,
        auth_policy,
        scheme,
        scheme_hash,
        key,
    })
}

/// Marshals a `TPML_PCR_SELECTION` for one bank (used by tests and the
/// producer's consistency check).
pub fn marshal_pcr_selection(banks: &[PcrBankSelection]) -> Vec<u8> {
    let mut out = (banks.len() as u32).to_be_bytes().to_vec();
    for bank in banks {
        out.extend_from_slice(&bank.hash.to_be_bytes());
        let mut bits = [0u8; MAX_PCR_SELECT];
        let mut size = 3usize;
        for &p in &bank.pcrs {
            let byte = (p / 8) as usize;
            if byte < MAX_PCR_SELECT {
                bits[byte] |= 1 << (p % 8);
                size = size.max(byte + 1);
            }
        }
        out.push(size as u8);
        out.extend_from_slice(&bits[..size]);
    }
    out
}

/// The digest size of a TPM hash algorithm, if supported.
pub fn digest_len(alg: u16) -> Option<usize> {
    match alg {
        TPM_ALG_SHA1 => Some(20),
        TPM_ALG_SHA256 => Some(32),
        TPM_ALG_SHA384 => Some(48),
        TPM_ALG_SHA512 => Some(64),
        _ => None,
    }
}

/// The name tpm2-tools and the evidence use for a hash algorithm.
pub fn hash_name(alg: u16) -> Option<&'static str> {
    match alg {
        TPM_ALG_SHA1 => Some("sha1"),
        TPM_ALG_SHA256 => Some("sha256"),
        TPM_ALG_SHA384 => Some("sha384"),
        TPM_ALG_SHA512 => Some("sha512"),
        _ => None,
    }
}

/// The inverse of [`hash_name`].
pub fn hash_alg(name: &str) -> Option<u16> {
    match name {
        "sha1" => Some(TPM_ALG_SHA1),
        "sha256" => Some(TPM_ALG_SHA256),
        "sha384" => Some(TPM_ALG_SHA384),
        "sha512" => Some(TPM_ALG_SHA512),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A well-formed quote over sha256 PCRs 0..=7 and 13.
    pub(crate) fn sample_quote(extra: &[u8]) -> Vec<u8> {
        let mut q = TPM_GENERATED_VALUE.to_be_bytes().to_vec();
        q.extend_from_slice(&TPM_ST_ATTEST_QUOTE.to_be_bytes());
        let name = [0u8, 0x0b, 1, 2, 3, 4];
        q.extend_from_slice(&(name.len() as u16).to_be_bytes());
        q.extend_from_slice(&name);
        q.extend_from_slice(&(extra.len() as u16).to_be_bytes());
        q.extend_from_slice(extra);
        q.extend_from_slice(&42u64.to_be_bytes());
        q.extend_from_slice(&1u32.to_be_bytes());
        q.extend_from_slice(&2u32.to_be_bytes());
        q.push(1);
        q.extend_from_slice(&7u64.to_be_bytes());
        q.extend_from_slice(&marshal_pcr_selection(&[PcrBankSelection {
            hash: TPM_ALG_SHA256,
            pcrs: vec![0, 1, 2, 3, 4, 5, 6, 7, 13],
        }]));
        q.extend_from_slice(&32u16.to_be_bytes());
        q.extend_from_slice(&[0xab; 32]);
        q
    }

    #[test]
    fn quote_round_trip_and_truncation() {
        let q = sample_quote(&[9; 32]);
        let info = parse_quote(&q).unwrap();
        assert_eq!(info.extra_data, vec![9; 32]);
        assert_eq!(info.pcr_select[0].pcrs, vec![0, 1, 2, 3, 4, 5, 6, 7, 13]);
        assert_eq!(info.pcr_digest, vec![0xab; 32]);
        assert!(info.safe);
        // Every truncation fails cleanly, never panics.
        for n in 0..q.len() {
            assert!(parse_quote(&q[..n]).is_err(), "prefix {n}");
        }
        let mut long = q.clone();
        long.push(0);
        assert!(parse_quote(&long).unwrap_err().reason.contains("trailing"));
        let mut bad = q.clone();
        bad[0] ^= 1;
        assert!(parse_quote(&bad).unwrap_err().reason.contains("magic"));
        let mut bad = q.clone();
        bad[5] = 0x17;
        assert!(parse_quote(&bad).unwrap_err().reason.contains("type"));
        assert!(parse_quote(&vec![0u8; MAX_STRUCTURE + 1]).is_err());
    }

    #[test]
    fn signature_forms() {
        let mut ecdsa = TPM_ALG_ECDSA.to_be_bytes().to_vec();
        ecdsa.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
        for half in [[1u8; 32], [2u8; 32]] {
            ecdsa.extend_from_slice(&32u16.to_be_bytes());
            ecdsa.extend_from_slice(&half);
        }
        assert!(matches!(
            parse_signature(&ecdsa).unwrap(),
            Signature::Ecdsa {
                hash: TPM_ALG_SHA256,
                ..
            }
        ));
        for n in 0..ecdsa.len() {
            assert!(parse_signature(&ecdsa[..n]).is_err());
        }
        let mut huge = TPM_ALG_RSASSA.to_be_bytes().to_vec();
        huge.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
        huge.extend_from_slice(&600u16.to_be_bytes());
        huge.extend_from_slice(&[0; 600]);
        assert!(parse_signature(&huge)
            .unwrap_err()
            .reason
            .contains("exceeds"));
        assert!(parse_signature(&[0x00, 0x05]).is_err());
    }

    #[test]
    fn public_truncation_never_panics() {
        let mut p = TPM_ALG_ECC.to_be_bytes().to_vec();
        p.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
        p.extend_from_slice(&attr::AK_REQUIRED.to_be_bytes());
        p.extend_from_slice(&0u16.to_be_bytes());
        p.extend_from_slice(&TPM_ALG_NULL.to_be_bytes());
        p.extend_from_slice(&TPM_ALG_ECDSA.to_be_bytes());
        p.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
        p.extend_from_slice(&TPM_ECC_NIST_P256.to_be_bytes());
        p.extend_from_slice(&TPM_ALG_NULL.to_be_bytes());
        for c in [[3u8; 32], [4u8; 32]] {
            p.extend_from_slice(&32u16.to_be_bytes());
            p.extend_from_slice(&c);
        }
        let area = parse_public(&p).unwrap();
        assert_eq!(area.scheme, TPM_ALG_ECDSA);
        assert_eq!(area.name(&p).unwrap().len(), 34);
        for n in 0..p.len() {
            assert!(parse_public(&p[..n]).is_err());
        }
    }
}
