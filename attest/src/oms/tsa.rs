//! RFC 3161 timestamps, as Sigstore bundles carry them
//! (`timestampVerificationData.rfc3161Timestamps`), verified offline
//! against the trust root's timestamp authorities.
//!
//! A timestamp is a `TimeStampResp` whose token is a CMS `SignedData` over
//! a `TSTInfo`. It counts as a verified time when, for one timestamp
//! authority of the trust root (its chain, signing certificate first):
//! the status is `granted`; the `TSTInfo`'s message imprint is the hash
//! (SHA-256/384/512) of the bundle's signature; there is exactly one
//! signer, identified by issuer and serial number (or key id) as the
//! authority's signing certificate, and any certificate embedded for it is
//! that certificate byte for byte; the signed attributes hold the content
//! type `id-ct-TSTInfo` and the digest of the exact `TSTInfo` bytes, and
//! an ESS `signingCertificateV2` or `signingCertificate` (v1, SHA-1),
//! each when present, names that certificate by hash; the signature over
//! the signed attributes verifies with its key (ECDSA, or RSA PKCS#1 v1.5
//! of 2048 to 4096 bits, the hash the algorithm names); the certificate carries a critical extended key usage with
//! `timeStamping`; every link of the authority's chain is signed by the
//! next and valid at the timestamp's time; and the authority's validity
//! window in the trust root covers that time. These are the checks of
//! sigstore-python (through rfc3161-client), plus the ESS certificate hash.
//!
//! The DER is read by hand: the signature covers the signed attributes'
//! exact bytes (re-tagged as a SET) and the digest covers the exact
//! `TSTInfo` bytes, so nothing is decoded and re-encoded before it is
//! checked.

use std::time::SystemTime;

use der::asn1::ObjectIdentifier;
use der::{Decode, Encode};
use sha2::{Digest, Sha256, Sha384, Sha512};
use x509_cert::Certificate;

use super::cert;
use super::sigstore::Authority;

const OID_SIGNED_DATA: &str = "1.2.840.113549.1.7.2";
const OID_TST_INFO: &str = "1.2.840.113549.1.9.16.1.4";
const OID_CONTENT_TYPE: &str = "1.2.840.113549.1.9.3";
const OID_MESSAGE_DIGEST: &str = "1.2.840.113549.1.9.4";
const OID_SIGNING_CERT_V2: &str = "1.2.840.113549.1.9.16.2.47";
const OID_SIGNING_CERT: &str = "1.2.840.113549.1.9.16.2.12";
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
const OID_KP_TIME_STAMPING: &str = "1.3.6.1.5.5.7.3.8";
const OID_EXT_KEY_USAGE: &str = "2.5.29.37";

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
const NULL: u8 = 0x05;
const BOOLEAN: u8 = 0x01;
const GENERALIZED_TIME: u8 = 0x18;
const CTX0: u8 = 0xA0;
const CTX0_PRIM: u8 = 0x80;

/// One DER element: its tag, its contents, and its whole encoding.
#[derive(Clone, Copy)]
struct Tlv<'a> {
    tag: u8,
    body: &'a [u8],
    whole: &'a [u8],
}

/// Reads DER elements one after another from a slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn peek_tag(&self) -> Option<u8> {
        self.0.first().copied()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The next element (definite, minimal lengths only: DER).
    fn next(&mut self) -> Result<Tlv<'a>, String> {
        let buf = self.0;
        let (&tag, rest) = buf.split_first().ok_or("truncated DER")?;
        if tag & 0x1f == 0x1f {
            return Err("high-tag-number form not expected".into());
        }
        let (&first, rest) = rest.split_first().ok_or("truncated DER length")?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return Err("unsupported DER length".into());
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            if rest[0] == 0 || len < 0x80 {
                return Err("non-minimal DER length".into());
            }
            (len, &rest[n..])
        };
        if rest.len() < len {
            return Err("truncated DER contents".into());
        }
        let header = buf.len() - rest.len();
        let whole = &buf[..header + len];
        self.0 = &buf[header + len..];
        Ok(Tlv {
            tag,
            body: &rest[..len],
            whole,
        })
    }

    fn expect(&mut self, tag: u8, what: &str) -> Result<Tlv<'a>, String> {
        let t = self.next().map_err(|e| format!("{what}: {e}"))?;
        if t.tag != tag {
            return Err(format!("{what}: tag {:#04x}, expected {tag:#04x}", t.tag));
        }
        Ok(t)
    }

    /// The next element if it has `tag`.
    fn optional(&mut self, tag: u8) -> Result<Option<Tlv<'a>>, String> {
        if self.peek_tag() == Some(tag) {
            self.next().map(Some)
        } else {
            Ok(None)
        }
    }

    fn end(&self, what: &str) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{what}: trailing data"))
        }
    }
}

fn inner(t: Tlv<'_>) -> Reader<'_> {
    Reader(t.body)
}

fn oid(t: Tlv<'_>) -> Result<String, String> {
    if t.tag != OID {
        return Err("object identifier expected".into());
    }
    ObjectIdentifier::from_der(t.whole)
        .map(|o| o.to_string())
        .map_err(|e| format!("object identifier: {e}"))
}

/// The algorithm OID of an AlgorithmIdentifier. Every algorithm read here
/// (SHA-2, ECDSA) has no parameters: they must be absent or NULL (RFC 5754,
/// 5758), so that not even an unsigned identifier has bytes that change
/// nothing.
fn algorithm(t: Tlv<'_>, what: &str) -> Result<String, String> {
    if t.tag != SEQUENCE {
        return Err(format!("{what}: algorithm identifier expected"));
    }
    let mut r = inner(t);
    let alg = oid(r.next()?)?;
    if let Some(null) = r.optional(NULL)? {
        if !null.body.is_empty() {
            return Err(format!("{what}: malformed NULL parameters"));
        }
    }
    r.end(&format!("{what}: parameters other than NULL"))?;
    Ok(alg)
}

/// The digest of `data` under a SHA-2 algorithm OID.
fn digest(alg: &str, data: &[u8]) -> Result<Vec<u8>, String> {
    Ok(match alg {
        "2.16.840.1.101.3.4.2.1" => Sha256::digest(data).to_vec(),
        "2.16.840.1.101.3.4.2.2" => Sha384::digest(data).to_vec(),
        "2.16.840.1.101.3.4.2.3" => Sha512::digest(data).to_vec(),
        other => return Err(format!("unsupported hash algorithm {other}")),
    })
}

/// The sha*WithRSAEncryption OID for a digest OID (signers that give
/// rsaEncryption as the signature algorithm, OpenSSL's TSA among them).
fn rsa_with(digest_alg: &str) -> Option<&'static str> {
    match digest_alg {
        "2.16.840.1.101.3.4.2.1" => Some("1.2.840.113549.1.1.11"),
        "2.16.840.1.101.3.4.2.2" => Some("1.2.840.113549.1.1.12"),
        "2.16.840.1.101.3.4.2.3" => Some("1.2.840.113549.1.1.13"),
        _ => None,
    }
}

/// The ecdsa-with-SHA* OID for a digest OID (signers that give the key's
/// algorithm, id-ecPublicKey, as the signature algorithm).
fn ecdsa_with(digest_alg: &str) -> Option<&'static str> {
    match digest_alg {
        "2.16.840.1.101.3.4.2.1" => Some("1.2.840.10045.4.3.2"),
        "2.16.840.1.101.3.4.2.2" => Some("1.2.840.10045.4.3.3"),
        "2.16.840.1.101.3.4.2.3" => Some("1.2.840.10045.4.3.4"),
        _ => None,
    }
}

/// A GeneralizedTime `YYYYMMDDHHMMSS[.f…]Z`.
fn generalized_time(t: Tlv<'_>) -> Result<SystemTime, String> {
    if t.tag != GENERALIZED_TIME {
        return Err("genTime is not a GeneralizedTime".into());
    }
    let s = std::str::from_utf8(t.body).map_err(|_| "genTime is not ASCII")?;
    let bad = || {
        format!(
            "genTime {:?} is malformed",
            s.chars().take(40).collect::<String>()
        )
    };
    let digits = s.get(..14).ok_or_else(bad)?;
    let rest = &s[14..];
    if !digits.bytes().all(|b| b.is_ascii_digit()) || !rest.ends_with('Z') {
        return Err(bad());
    }
    let frac = &rest[..rest.len() - 1];
    if !(frac.is_empty()
        || (frac.len() >= 2
            && frac.len() <= 10
            && frac.starts_with('.')
            && frac[1..].bytes().all(|b| b.is_ascii_digit())
            && !frac.ends_with('0')))
    {
        return Err(bad());
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}{frac}Z",
        &digits[0..4],
        &digits[4..6],
        &digits[6..8],
        &digits[8..10],
        &digits[10..12],
        &digits[12..14]
    );
    humantime::parse_rfc3339(&rfc3339).map_err(|_| bad())
}

/// What a timestamp response holds, parsed, before any trust decision.
struct Token<'a> {
    tst_info: &'a [u8],
    imprint_alg: String,
    imprint: &'a [u8],
    gen_time: SystemTime,
    certificates: Vec<&'a [u8]>,
    /// The signer's issuer Name and serial INTEGER (whole DER), or its
    /// subject key identifier.
    sid: Sid<'a>,
    digest_alg: String,
    signed_attrs: &'a [u8],
    content_type: String,
    message_digest: &'a [u8],
    ess_cert_hash: Option<(String, &'a [u8])>,
    /// ESS signingCertificate (v1): the signer's certificate's SHA-1.
    ess_v1_hash: Option<&'a [u8]>,
    signature_alg: String,
    signature: &'a [u8],
}

enum Sid<'a> {
    IssuerSerial { issuer: &'a [u8], serial: &'a [u8] },
    KeyId(&'a [u8]),
}

fn parse(der: &[u8]) -> Result<Token<'_>, String> {
    // TimeStampResp ::= SEQUENCE { status PKIStatusInfo, timeStampToken }
    let mut top = Reader(der);
    let resp = top.expect(SEQUENCE, "TimeStampResp")?;
    top.end("TimeStampResp")?;
    let mut resp = inner(resp);
    let mut status = inner(resp.expect(SEQUENCE, "PKIStatusInfo")?);
    let code = status.expect(INTEGER, "PKIStatus")?;
    if code.body != [0] {
        return Err("the timestamp's status is not granted".into());
    }
    // ContentInfo ::= SEQUENCE { contentType, content [0] EXPLICIT }
    let mut ci = inner(resp.expect(SEQUENCE, "timeStampToken")?);
    resp.end("TimeStampResp")?;
    if oid(ci.next()?)? != OID_SIGNED_DATA {
        return Err("the timestamp token is not SignedData".into());
    }
    let mut content = inner(ci.expect(CTX0, "SignedData content")?);
    ci.end("ContentInfo")?;
    let mut sd = inner(content.expect(SEQUENCE, "SignedData")?);
    content.end("SignedData content")?;
    // RFC 5652 5.1: version 3 whenever the content is not id-data.
    if sd.expect(INTEGER, "SignedData version")?.body != [3] {
        return Err("SignedData version is not 3".into());
    }
    let mut digest_algs = Vec::new();
    let mut algs = inner(sd.expect(SET, "digestAlgorithms")?);
    while !algs.is_empty() {
        if digest_algs.len() >= 8 {
            return Err("too many digest algorithms".into());
        }
        digest_algs.push(algorithm(algs.next()?, "digestAlgorithms")?);
    }
    let mut encap = inner(sd.expect(SEQUENCE, "encapContentInfo")?);
    if oid(encap.next()?)? != OID_TST_INFO {
        return Err("the timestamp token does not hold a TSTInfo".into());
    }
    let mut econtent = inner(encap.expect(CTX0, "eContent")?);
    encap.end("encapContentInfo")?;
    let tst = econtent.expect(OCTET_STRING, "eContent")?;
    econtent.end("eContent")?;
    let mut certificates = Vec::new();
    if let Some(certs) = sd.optional(CTX0)? {
        let mut r = inner(certs);
        while !r.is_empty() {
            let c = r.next()?;
            if certificates.len() >= super::bundle::MAX_CHAIN {
                return Err("too many certificates in the timestamp".into());
            }
            // As the reference: every embedded certificate must parse.
            cert::parse(c.whole).map_err(|e| format!("embedded certificate: {e}"))?;
            certificates.push(c.whole);
        }
    }
    if sd.optional(0xA1)?.is_some() {
        return Err("revocation data in a timestamp is not expected".into());
    }
    let mut infos = inner(sd.expect(SET, "signerInfos")?);
    sd.end("SignedData")?;
    let info = infos.expect(SEQUENCE, "SignerInfo")?;
    if !infos.is_empty() {
        return Err("the timestamp has more than one signer".into());
    }

    // TSTInfo
    let mut t = Reader(tst.body);
    let mut ti = inner(t.expect(SEQUENCE, "TSTInfo")?);
    t.end("TSTInfo")?;
    if ti.expect(INTEGER, "TSTInfo version")?.body != [1] {
        return Err("TSTInfo version is not 1".into());
    }
    ti.expect(OID, "TSTInfo policy")?;
    let mut mi = inner(ti.expect(SEQUENCE, "messageImprint")?);
    let imprint_alg = algorithm(mi.next()?, "messageImprint")?;
    let imprint = mi.expect(OCTET_STRING, "hashedMessage")?.body;
    mi.end("messageImprint")?;
    ti.expect(INTEGER, "TSTInfo serialNumber")?;
    let gen_time = generalized_time(ti.next()?)?;
    ti.optional(SEQUENCE)?; // accuracy
    ti.optional(BOOLEAN)?; // ordering
    ti.optional(INTEGER)?; // nonce
    ti.optional(CTX0)?; // tsa
    ti.optional(0xA1)?; // extensions
    ti.end("TSTInfo")?;

    // SignerInfo
    let mut si = inner(info);
    let version = si.expect(INTEGER, "SignerInfo version")?.body;
    let sid = match si.next()? {
        t if t.tag == SEQUENCE => {
            let mut r = inner(t);
            let issuer = r.expect(SEQUENCE, "sid issuer")?.whole;
            let serial = r.expect(INTEGER, "sid serialNumber")?.whole;
            r.end("IssuerAndSerialNumber")?;
            Sid::IssuerSerial { issuer, serial }
        }
        t if t.tag == CTX0_PRIM => Sid::KeyId(t.body),
        _ => return Err("SignerInfo sid is neither issuer and serial nor key id".into()),
    };
    // RFC 5652 5.3: version 1 with issuer and serial, 3 with a key id.
    let want = if matches!(sid, Sid::KeyId(_)) { 3 } else { 1 };
    if version != [want] {
        return Err("SignerInfo version does not match its sid".into());
    }
    let digest_alg = algorithm(si.next()?, "SignerInfo digestAlgorithm")?;
    if !digest_algs.contains(&digest_alg) {
        return Err("the signer's digest algorithm is not among digestAlgorithms".into());
    }
    let attrs = si
        .optional(CTX0)?
        .ok_or("the timestamp's signer has no signed attributes")?;
    let signature_alg = algorithm(si.next()?, "SignerInfo signatureAlgorithm")?;
    let signature = si.expect(OCTET_STRING, "SignerInfo signature")?.body;
    si.optional(0xA1)?; // unsignedAttrs
    si.end("SignerInfo")?;

    let mut content_type = None;
    let mut message_digest = None;
    let mut ess_cert_hash = None;
    let mut ess_v1_hash = None;
    let mut seen = Vec::new();
    let mut r = inner(attrs);
    while !r.is_empty() {
        let mut a = inner(r.expect(SEQUENCE, "attribute")?);
        let kind = oid(a.next()?)?;
        let mut values = inner(a.expect(SET, "attribute values")?);
        a.end("attribute")?;
        let value = values.next()?;
        values.end("attribute values")?;
        if seen.contains(&kind) {
            return Err(format!("signed attribute {kind} appears twice"));
        }
        match kind.as_str() {
            OID_CONTENT_TYPE => content_type = Some(oid(value)?),
            OID_MESSAGE_DIGEST => {
                if value.tag != OCTET_STRING {
                    return Err("messageDigest is not an OCTET STRING".into());
                }
                message_digest = Some(value.body);
            }
            OID_SIGNING_CERT_V2 => {
                // SigningCertificateV2 ::= SEQUENCE { certs SEQUENCE OF
                //   ESSCertIDv2 { hashAlgorithm DEFAULT sha256, certHash, … } }
                let mut id = first_ess_cert_id(value, "signingCertificateV2", "ESSCertIDv2")?;
                let alg = match id.optional(SEQUENCE)? {
                    Some(a) => algorithm(a, "ESSCertIDv2 hashAlgorithm")?,
                    None => "2.16.840.1.101.3.4.2.1".to_owned(),
                };
                let hash = id.expect(OCTET_STRING, "ESSCertIDv2 certHash")?.body;
                ess_cert_hash = Some((alg, hash));
            }
            OID_SIGNING_CERT => {
                // SigningCertificate ::= SEQUENCE { certs SEQUENCE OF
                //   ESSCertID { certHash OCTET STRING (SHA-1), … }, … }
                let mut id = first_ess_cert_id(value, "signingCertificate", "ESSCertID")?;
                let hash = id.expect(OCTET_STRING, "ESSCertID certHash")?.body;
                if hash.len() != 20 {
                    return Err("ESSCertID certHash is not a SHA-1 hash".into());
                }
                ess_v1_hash = Some(hash);
            }
            _ => {}
        }
        seen.push(kind);
    }
    Ok(Token {
        tst_info: tst.body,
        imprint_alg,
        imprint,
        gen_time,
        certificates,
        sid,
        digest_alg,
        signed_attrs: attrs.whole,
        content_type: content_type.ok_or("no contentType signed attribute")?,
        message_digest: message_digest.ok_or("no messageDigest signed attribute")?,
        ess_cert_hash,
        ess_v1_hash,
        signature_alg,
        signature,
    })
}

/// The first ESS certificate id of a `signingCertificate` or
/// `signingCertificateV2` attribute value (`SEQUENCE { certs SEQUENCE OF
/// id, … }`: the first names the signer), its fields unread.
fn first_ess_cert_id<'a>(value: Tlv<'a>, attr: &str, id: &str) -> Result<Reader<'a>, String> {
    if value.tag != SEQUENCE {
        return Err(format!("{attr} is not a SEQUENCE"));
    }
    let mut v = inner(value);
    let mut certs = inner(v.expect(SEQUENCE, &format!("{id} list"))?);
    Ok(inner(certs.expect(SEQUENCE, id)?))
}

/// Whether `sid` names `c`.
fn names(sid: &Sid<'_>, c: &Certificate) -> bool {
    match sid {
        Sid::IssuerSerial { issuer, serial } => {
            c.tbs_certificate
                .issuer
                .to_der()
                .is_ok_and(|i| i == *issuer)
                && c.tbs_certificate
                    .serial_number
                    .to_der()
                    .is_ok_and(|s| s == *serial)
        }
        Sid::KeyId(id) => cert::extension::<x509_cert::ext::pkix::SubjectKeyIdentifier>(
            c,
            const_oid::db::rfc5280::ID_CE_SUBJECT_KEY_IDENTIFIER,
        )
        .ok()
        .flatten()
        .is_some_and(|ski| ski.0.as_bytes() == *id),
    }
}

/// Why a timestamp is not a verified time.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Not from a trusted authority, or from one and wrong: no time, set
    /// aside (as sigstore-python does).
    SetAside(String),
    /// Its signer is a trusted authority's certificate, but with a key or
    /// an algorithm ccnode does not verify (RSA under 2048 bits, PSS,
    /// SHA-1): the reference would count its time, so the bundle is refused
    /// rather than judged without it.
    Unverifiable(String),
}

impl Failure {
    pub(crate) fn reason(self) -> String {
        match self {
            Failure::SetAside(r) => r,
            Failure::Unverifiable(r) => {
                format!("a timestamp from a trusted authority that ccnode cannot verify: {r}")
            }
        }
    }
}

/// Checks `t`, over `stamped` (the bundle's signature), against one
/// authority; its time if it verifies there.
fn verify_with(t: &Token<'_>, stamped: &[u8], ca: &Authority) -> Result<SystemTime, Failure> {
    // As sigstore-python: an authority's chain holds its signing
    // certificate and at least a root.
    if ca.chain.len() < 2 {
        return Err(Failure::SetAside(
            "timestamp authority chain is incomplete".into(),
        ));
    }
    let leaf = &ca.chain[0];
    if !names(&t.sid, leaf) {
        return Err(Failure::SetAside(
            "not signed by this timestamp authority".into(),
        ));
    }
    // The token names this authority's certificate: what ccnode cannot
    // check is not set aside.
    let unverifiable = Failure::Unverifiable;
    let ess_alg = t.ess_cert_hash.as_ref().map(|(alg, _)| alg);
    for alg in [Some(&t.imprint_alg), Some(&t.digest_alg), ess_alg]
        .into_iter()
        .flatten()
    {
        digest(alg, b"").map_err(unverifiable)?;
    }
    let key = cert::issuer_key_of(leaf).map_err(|e| unverifiable(e.to_string()))?;
    // CMS signers may give the key's algorithm (id-ecPublicKey,
    // rsaEncryption) as the signature algorithm; the digest algorithm then
    // says which.
    let sig_alg = match t.signature_alg.as_str() {
        OID_EC_PUBLIC_KEY => ecdsa_with(&t.digest_alg),
        OID_RSA_ENCRYPTION => rsa_with(&t.digest_alg),
        other => Some(other),
    };
    let sig_oid = sig_alg
        .and_then(|a| ObjectIdentifier::new(a).ok())
        .filter(|oid| key.supports(*oid))
        .ok_or_else(|| {
            unverifiable(format!(
                "signature algorithm {} is not one ccnode verifies with this key",
                t.signature_alg
            ))
        })?;
    checked(t, stamped, ca, &key, sig_oid).map_err(Failure::SetAside)
}

/// The checks of a timestamp whose authority, key and algorithms ccnode
/// supports.
fn checked(
    t: &Token<'_>,
    stamped: &[u8],
    ca: &Authority,
    key: &cert::IssuerKey,
    sig_oid: ObjectIdentifier,
) -> Result<SystemTime, String> {
    if digest(&t.imprint_alg, stamped)? != t.imprint {
        return Err("the timestamp is over other data than this signature".into());
    }
    if t.content_type != OID_TST_INFO {
        return Err("the signed content type is not TSTInfo".into());
    }
    if digest(&t.digest_alg, t.tst_info)? != t.message_digest {
        return Err("the signed message digest is not the TSTInfo's".into());
    }
    let leaf = &ca.chain[0];
    // As the reference: where certificates are embedded, one of them is
    // the signer's, and it is the authority's certificate byte for byte.
    if !t.certificates.is_empty() {
        let mut found = false;
        for c in &t.certificates {
            if names(&t.sid, &cert::parse(c)?) {
                if *c != ca.chain_der[0].as_slice() {
                    return Err("the embedded signing certificate is not the authority's".into());
                }
                found = true;
            }
        }
        if !found {
            return Err("no embedded certificate is the signer's".into());
        }
    }
    if let Some((alg, hash)) = &t.ess_cert_hash {
        if digest(alg, &ca.chain_der[0])? != *hash {
            return Err("signingCertificateV2 names another certificate".into());
        }
    }
    if let Some(hash) = t.ess_v1_hash {
        if sha1::Sha1::digest(&ca.chain_der[0])[..] != *hash {
            return Err("signingCertificate names another certificate".into());
        }
    }
    let eku = leaf
        .tbs_certificate
        .extensions
        .iter()
        .flatten()
        .find(|e| e.extn_id.to_string() == OID_EXT_KEY_USAGE)
        .ok_or("the timestamp authority's certificate has no extended key usage")?;
    if !eku.critical {
        return Err("the timestamp authority's extended key usage is not critical".into());
    }
    let usages = x509_cert::ext::pkix::ExtendedKeyUsage::from_der(eku.extn_value.as_bytes())
        .map_err(|e| format!("extended key usage: {e}"))?;
    if !usages
        .0
        .iter()
        .any(|u| u.to_string() == OID_KP_TIME_STAMPING)
    {
        return Err("the timestamp authority's certificate does not allow timeStamping".into());
    }
    // The signature covers the attributes' DER as a SET, not as [0].
    let mut signed = t.signed_attrs.to_vec();
    signed[0] = SET;
    if !key.verify_x509(sig_oid, &signed, t.signature) {
        return Err("the timestamp's signature does not verify".into());
    }
    for (i, c) in ca.chain.iter().enumerate() {
        cert::check_validity(c, t.gen_time).map_err(|e| e.to_string())?;
        if let Some(issuer) = ca.chain.get(i + 1) {
            if !cert::signed_by(c, issuer) {
                return Err("the timestamp authority's chain does not verify".into());
            }
        }
    }
    if !ca.window.covers_half_open(t.gen_time) {
        return Err("the timestamp is outside its authority's validity in the trust root".into());
    }
    Ok(t.gen_time)
}

/// Verifies one timestamp response over `signature` (the bundle's
/// signature bytes) against the trust root's authorities; its time.
pub(crate) fn verify(
    der: &[u8],
    signature: &[u8],
    authorities: &[Authority],
) -> Result<SystemTime, Failure> {
    let t = parse(der).map_err(Failure::SetAside)?;
    let mut last = Failure::SetAside("no timestamp authority in the trust root".to_owned());
    for ca in authorities {
        match verify_with(&t, signature, ca) {
            Ok(time) => return Ok(time),
            Err(e @ Failure::Unverifiable(_)) => last = e,
            Err(e) if matches!(last, Failure::SetAside(_)) => last = e,
            Err(_) => {}
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        if body.len() < 0x80 {
            v.push(body.len() as u8);
        } else {
            v.extend([0x82, (body.len() >> 8) as u8, body.len() as u8]);
        }
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn der_reader_refuses_what_is_not_der() {
        assert!(Reader(&[0x30, 0x80, 0, 0]).next().is_err(), "indefinite");
        assert!(
            Reader(&[0x30, 0x81, 0x05, 1, 2, 3, 4, 5]).next().is_err(),
            "non-minimal"
        );
        assert!(Reader(&[0x30, 0x05, 1, 2]).next().is_err(), "truncated");
        assert!(Reader(&[0x1f, 0x01, 0]).next().is_err(), "high tag");
        assert!(Reader(&[0x30, 0x85, 1, 1, 1, 1, 1]).next().is_err(), "huge");
        let long = tlv(0x04, &[7u8; 300]);
        let t = Reader(&long).next().unwrap();
        assert_eq!((t.tag, t.body.len(), t.whole.len()), (0x04, 300, 304));
    }

    #[test]
    fn generalized_times() {
        let t = |s: &str| generalized_time(Reader(&tlv(0x18, s.as_bytes())).next().unwrap());
        let secs = |s: &str| {
            t(s).unwrap()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
        };
        assert_eq!(secs("20251010021220Z"), 1_760_062_340.0);
        assert_eq!(secs("20251010021220.5Z"), 1_760_062_340.5);
        for bad in [
            "20251010021220",
            "2025101002122Z",
            "20251010021220.Z",
            "20251010021220.50Z",
            "20251310021220Z",
            "20251010021220+0100",
        ] {
            assert!(t(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        for der in [&b""[..], &[0x30, 0x00], &[0x30, 0x03, 0x30, 0x01, 0x02]] {
            assert!(verify(der, b"sig", &[]).is_err());
        }
    }
}
