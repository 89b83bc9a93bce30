//! Certificate signing: the bundle carries the signing certificate followed
//! by intermediates; it must chain to a configured CA root, every
//! certificate must be valid now, issuers must be CAs that allow
//! keyCertSign within their path length constraints, no certificate may
//! carry a critical extension ccnode does not process (name constraints
//! included), and the signing certificate must allow digitalSignature (key
//! usage) or codeSigning (extended key usage), with neither extension
//! excluding signing. Issuer signatures: ECDSA with SHA-256/384/512 on
//! P-256, P-384 or P-521, or RSA PKCS#1 v1.5 with SHA-256/384/512 and a
//! modulus of 2048 to 4096 bits (RSASSA-PSS is not supported). Signing
//! certificates' own keys are ECDSA: that is what signs the envelope.

use std::time::SystemTime;

use const_oid::db::rfc5280::{
    ID_CE_BASIC_CONSTRAINTS, ID_CE_EXT_KEY_USAGE, ID_CE_KEY_USAGE, ID_CE_SUBJECT_ALT_NAME,
    ID_KP_CODE_SIGNING,
};
use der::asn1::ObjectIdentifier;
use der::{Decode, Encode};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAltName};
use x509_cert::Certificate;

use super::bundle::MAX_CHAIN;

/// anyExtendedKeyUsage (RFC 5280 4.2.1.12).
const ANY_EXTENDED_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37.0");
use super::keys::PublicKey;
use super::OmsError;

/// A signing certificate that chained to a root.
#[derive(Debug, Clone)]
pub struct SigningCert {
    pub key: PublicKey,
    /// Subject distinguished name.
    pub subject: String,
    /// Subject alternative names (email, URI, DNS); the subject's CN where
    /// the certificate has no subject alternative name extension. Each with
    /// its kind: `email`, `uri`, `dns` or `cn`.
    pub identities: Vec<(&'static str, String)>,
}

impl SigningCert {
    /// Whether `wanted`, a trust policy identity, names this certificate:
    /// `kind:value` (`email:`, `uri:`, `dns:`, `cn:`) matches that kind
    /// only; a bare value matches any kind spelled so.
    pub fn has_identity(&self, wanted: &str) -> bool {
        let typed = IDENTITY_KINDS.iter().find_map(|k| {
            wanted
                .strip_prefix(k)
                .and_then(|r| r.strip_prefix(':'))
                .map(|v| (*k, v))
        });
        self.identities.iter().any(|(kind, value)| match typed {
            Some((k, v)) => *kind == k && value == v,
            None => value == wanted,
        })
    }
}

/// The kinds of identity a signing certificate carries, as a trust policy
/// may prefix them.
pub const IDENTITY_KINDS: [&str; 4] = ["email", "uri", "dns", "cn"];

fn refuse(reason: impl Into<String>) -> OmsError {
    OmsError::Certificate(reason.into())
}

/// Parses one DER certificate.
pub fn parse(der: &[u8]) -> Result<Certificate, String> {
    Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))
}

/// Parses every certificate in a PEM file.
pub fn parse_pem_bundle(text: &str) -> Result<Vec<Certificate>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let end_marker = "-----END CERTIFICATE-----";
        let end = rest[start..]
            .find(end_marker)
            .ok_or("unterminated PEM certificate")?
            + start
            + end_marker.len();
        let (label, der) = der::pem::decode_vec(&rest.as_bytes()[start..end])
            .map_err(|e| format!("bad PEM: {e}"))?;
        if label != "CERTIFICATE" {
            return Err(format!("PEM label {label:?}"));
        }
        out.push(parse(&der)?);
        if out.len() > 64 {
            return Err("too many certificates".into());
        }
        rest = &rest[end..];
    }
    if out.is_empty() {
        return Err("no PEM certificate found".into());
    }
    Ok(out)
}

pub(crate) fn extension<'a, T: Decode<'a>>(
    cert: &'a Certificate,
    oid: der::asn1::ObjectIdentifier,
) -> Result<Option<T>, OmsError> {
    let Some(exts) = &cert.tbs_certificate.extensions else {
        return Ok(None);
    };
    let mut found = exts.iter().filter(|e| e.extn_id == oid);
    let Some(ext) = found.next() else {
        return Ok(None);
    };
    if found.next().is_some() {
        return Err(refuse(format!("duplicate extension {oid}")));
    }
    T::from_der(ext.extn_value.as_bytes())
        .map(Some)
        .map_err(|e| refuse(format!("malformed extension {oid}: {e}")))
}

pub(crate) fn check_validity(cert: &Certificate, now: SystemTime) -> Result<(), OmsError> {
    let v = &cert.tbs_certificate.validity;
    if now < v.not_before.to_system_time() {
        return Err(refuse(format!(
            "{} is not valid yet",
            cert.tbs_certificate.subject
        )));
    }
    if now > v.not_after.to_system_time() {
        return Err(refuse(format!(
            "{} has expired",
            cert.tbs_certificate.subject
        )));
    }
    Ok(())
}

pub(crate) fn key_of(cert: &Certificate) -> Result<PublicKey, OmsError> {
    let der = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| refuse(e.to_string()))?;
    PublicKey::from_spki_der(&der)
        .map_err(|e| refuse(format!("{}: {e}", cert.tbs_certificate.subject)))
}

/// RSA keys verified: 2048 to 4096 bits (smaller are too weak; the rsa
/// crate refuses larger ones).
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=4096;

const RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
/// ecdsa-with-SHA256, -SHA384, -SHA512.
const ECDSA_SHA2: [&str; 3] = [
    "1.2.840.10045.4.3.2",
    "1.2.840.10045.4.3.3",
    "1.2.840.10045.4.3.4",
];
/// sha256WithRSAEncryption, sha384…, sha512… (PKCS#1 v1.5).
const RSA_PKCS1_SHA2: [&str; 3] = [
    "1.2.840.113549.1.1.11",
    "1.2.840.113549.1.1.12",
    "1.2.840.113549.1.1.13",
];

/// A key that signs certificates or timestamps: ECDSA or RSA.
pub(crate) enum IssuerKey {
    Ecdsa(PublicKey),
    Rsa(rsa::RsaPublicKey),
}

impl IssuerKey {
    /// Whether `alg` is a signature algorithm this key is verified with.
    pub(crate) fn supports(&self, alg: ObjectIdentifier) -> bool {
        let alg = alg.to_string();
        match self {
            IssuerKey::Ecdsa(_) => ECDSA_SHA2.contains(&alg.as_str()),
            IssuerKey::Rsa(_) => RSA_PKCS1_SHA2.contains(&alg.as_str()),
        }
    }

    /// Checks an X.509 or CMS signature with `alg`: ecdsa-with-SHA256/384/
    /// 512 for an ECDSA key, sha256/384/512WithRSAEncryption (PKCS#1 v1.5)
    /// for an RSA key.
    pub(crate) fn verify_x509(&self, alg: ObjectIdentifier, msg: &[u8], sig: &[u8]) -> bool {
        use sha2::Digest as _;
        match self {
            IssuerKey::Ecdsa(key) => key.verify_x509(alg, msg, sig),
            IssuerKey::Rsa(key) => {
                let (scheme, digest) = match alg.to_string().as_str() {
                    "1.2.840.113549.1.1.11" => (
                        rsa::Pkcs1v15Sign::new::<sha2::Sha256>(),
                        sha2::Sha256::digest(msg).to_vec(),
                    ),
                    "1.2.840.113549.1.1.12" => (
                        rsa::Pkcs1v15Sign::new::<sha2::Sha384>(),
                        sha2::Sha384::digest(msg).to_vec(),
                    ),
                    "1.2.840.113549.1.1.13" => (
                        rsa::Pkcs1v15Sign::new::<sha2::Sha512>(),
                        sha2::Sha512::digest(msg).to_vec(),
                    ),
                    _ => return false,
                };
                key.verify(scheme, &digest, sig).is_ok()
            }
        }
    }
}

/// The key of a certificate that signs others (or timestamps).
pub(crate) fn issuer_key_of(cert: &Certificate) -> Result<IssuerKey, OmsError> {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    if spki.algorithm.oid.to_string() != RSA_ENCRYPTION {
        return key_of(cert).map(IssuerKey::Ecdsa);
    }
    use rsa::pkcs8::DecodePublicKey as _;
    use rsa::traits::PublicKeyParts as _;
    let der = spki.to_der().map_err(|e| refuse(e.to_string()))?;
    let key = rsa::RsaPublicKey::from_public_key_der(&der)
        .map_err(|e| refuse(format!("{}: RSA key: {e}", cert.tbs_certificate.subject)))?;
    if !RSA_BITS.contains(&key.n().bits()) {
        return Err(refuse(format!(
            "{}: RSA key of {} bits (2048 to 4096 are verified)",
            cert.tbs_certificate.subject,
            key.n().bits()
        )));
    }
    Ok(IssuerKey::Rsa(key))
}

pub(crate) fn signed_by(child: &Certificate, issuer: &Certificate) -> bool {
    if child.tbs_certificate.issuer != issuer.tbs_certificate.subject {
        return false;
    }
    let (Ok(key), Ok(tbs)) = (issuer_key_of(issuer), child.tbs_certificate.to_der()) else {
        return false;
    };
    let Some(sig) = child.signature.as_bytes() else {
        return false;
    };
    // The unsigned outer algorithm must be the signed one (RFC 5280
    // 4.1.1.2), with no parameters but an optional NULL: no byte of the
    // certificate may change without effect.
    let alg = &child.signature_algorithm;
    if *alg != child.tbs_certificate.signature
        || alg
            .parameters
            .as_ref()
            .is_some_and(|p| der::Tagged::tag(p) != der::Tag::Null || !p.value().is_empty())
    {
        return false;
    }
    key.verify_x509(alg.oid, &tbs, sig)
}

/// The extensions ccnode acts on; a certificate marking any other one
/// critical is refused (RFC 5280 4.2: a verifier must reject a critical
/// extension it does not process). Name constraints among them: refused
/// rather than ignored.
const KNOWN_CRITICAL: [ObjectIdentifier; 4] = [
    ID_CE_BASIC_CONSTRAINTS,
    ID_CE_KEY_USAGE,
    ID_CE_EXT_KEY_USAGE,
    ID_CE_SUBJECT_ALT_NAME,
];

/// Constraints ccnode does not process, refused whether marked critical
/// or not: ignoring a name constraint that an issuer marked non-critical
/// (as "technically constrained" sub-CAs often do) would accept names the
/// issuer may not vouch for, where OpenSSL enforces it either way.
const REFUSED: [ObjectIdentifier; 2] = [
    const_oid::db::rfc5280::ID_CE_NAME_CONSTRAINTS,
    const_oid::db::rfc5280::ID_CE_POLICY_CONSTRAINTS,
];

fn check_critical(cert: &Certificate) -> Result<(), OmsError> {
    for e in cert.tbs_certificate.extensions.iter().flatten() {
        if REFUSED.contains(&e.extn_id) {
            return Err(refuse(format!(
                "{} has a constraint ccnode does not process ({})",
                cert.tbs_certificate.subject, e.extn_id
            )));
        }
        if e.critical && !KNOWN_CRITICAL.contains(&e.extn_id) {
            return Err(refuse(format!(
                "{} has a critical extension ccnode does not process ({})",
                cert.tbs_certificate.subject, e.extn_id
            )));
        }
    }
    Ok(())
}

/// Checks `cert` as the issuer of a path with `below` intermediate CA
/// certificates under it (the signing certificate not counted): a CA
/// (`require_ca`: the chain's intermediates; a configured root is trusted
/// as configured), keyCertSign where key usage is given, and a path
/// length constraint that allows `below`.
fn check_issuer(cert: &Certificate, below: usize, require_ca: bool) -> Result<(), OmsError> {
    let subject = &cert.tbs_certificate.subject;
    check_critical(cert)?;
    let bc = extension::<BasicConstraints>(cert, ID_CE_BASIC_CONSTRAINTS)?;
    if require_ca && !bc.as_ref().is_some_and(|b| b.ca) {
        return Err(refuse(format!("issuer {subject} is not a CA")));
    }
    if let Some(limit) = bc.and_then(|b| b.path_len_constraint) {
        if below > usize::from(limit) {
            return Err(refuse(format!(
                "issuer {subject} allows {limit} intermediate certificates below it, the chain has {below}"
            )));
        }
    }
    if extension::<KeyUsage>(cert, ID_CE_KEY_USAGE)?.is_some_and(|k| !k.key_cert_sign()) {
        return Err(refuse(format!(
            "issuer {subject} does not allow keyCertSign"
        )));
    }
    Ok(())
}

/// Verifies the bundle's chain (signing certificate first) against `roots`.
pub fn verify_chain(
    chain: &[Vec<u8>],
    roots: &[Certificate],
    now: SystemTime,
) -> Result<SigningCert, OmsError> {
    if chain.is_empty() || chain.len() > MAX_CHAIN {
        return Err(refuse("certificate chain length out of range"));
    }
    let chain = chain
        .iter()
        .map(|d| parse(d).map_err(refuse))
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = &chain[0];
    check_validity(leaf, now)?;
    let ku = extension::<KeyUsage>(leaf, ID_CE_KEY_USAGE)?;
    let eku = extension::<ExtendedKeyUsage>(leaf, ID_CE_EXT_KEY_USAGE)?;
    // Key usage digitalSignature or extended key usage codeSigning, as the
    // reference tool asks; and, as RFC 5280 4.2.1.3 and 4.2.1.12 mean,
    // neither extension may exclude signing code: a key usage without
    // digitalSignature, or an extended key usage without codeSigning (a
    // TLS server's certificate from the same CA, say), is refused where
    // the reference tool accepts the other half alone.
    if ku.is_none() && eku.is_none() {
        return Err(refuse(
            "signing certificate allows neither digitalSignature nor codeSigning",
        ));
    }
    if ku.is_some_and(|k| !k.digital_signature()) {
        return Err(refuse(
            "signing certificate's key usage does not allow digitalSignature",
        ));
    }
    if eku.is_some_and(|e| {
        !e.0.iter()
            .any(|u| *u == ID_KP_CODE_SIGNING || *u == ANY_EXTENDED_KEY_USAGE)
    }) {
        return Err(refuse(
            "signing certificate's extended key usage does not allow codeSigning",
        ));
    }
    check_critical(leaf)?;
    let mut current = leaf;
    let mut anchored = false;
    for below in 0..=MAX_CHAIN {
        if let Some(root) = roots.iter().find(|r| signed_by(current, r)) {
            check_validity(root, now)?;
            // A self-signed signing certificate configured as its own root
            // is trusted directly (as OpenSSL's store trusts it): it is no
            // issuer of anything else.
            if !(below == 0 && root == leaf) {
                check_issuer(root, below, false)?;
            }
            anchored = true;
            break;
        }
        let Some(next) = chain[1..]
            .iter()
            .find(|c| !std::ptr::eq(*c, current) && signed_by(current, c))
        else {
            break;
        };
        check_validity(next, now)?;
        check_issuer(next, below, true)?;
        current = next;
    }
    if !anchored {
        return Err(refuse("chain does not lead to a configured root"));
    }
    let mut identities = Vec::new();
    let san = extension::<SubjectAltName>(leaf, ID_CE_SUBJECT_ALT_NAME)?;
    let has_san = san.is_some();
    for name in san.into_iter().flat_map(|s| s.0) {
        match name {
            GeneralName::Rfc822Name(s) => identities.push(("email", s.to_string())),
            GeneralName::UniformResourceIdentifier(s) => identities.push(("uri", s.to_string())),
            GeneralName::DnsName(s) => identities.push(("dns", s.to_string())),
            _ => {}
        }
    }
    // The subject's CN names the signer only in a certificate without
    // alternative names (as RFC 6125 has it for TLS): a CA that copies a
    // requested CN must not thereby vouch for an email address.
    for rdn in leaf.tbs_certificate.subject.0.iter().filter(|_| !has_san) {
        for atv in rdn.0.iter() {
            if atv.oid == const_oid::db::rfc4519::CN {
                if let Ok(s) = atv.value.decode_as::<der::asn1::Utf8StringRef<'_>>() {
                    identities.push(("cn", s.to_string()));
                } else if let Ok(s) = atv.value.decode_as::<der::asn1::PrintableStringRef<'_>>() {
                    identities.push(("cn", s.to_string()));
                }
            }
        }
    }
    Ok(SigningCert {
        key: key_of(leaf)?,
        subject: leaf.tbs_certificate.subject.to_string(),
        identities,
    })
}
