//! Sigstore keyless signatures, verified offline against a trust root
//! supplied as a file.
//!
//! A keyless bundle carries a short-lived certificate (Fulcio) binding an
//! OIDC identity to a key, and a transparency-log entry (Rekor v1 or v2)
//! proving that the signature was logged. Offline, with a Sigstore trusted
//! root (`trusted_root.json`, or a client trust config holding one), ccnode
//! checks:
//!
//! 1. RFC 3161 timestamps (`timestampVerificationData`, [`super::tsa`]):
//!    a bundle with any needs timestamp authorities in the trust root; each
//!    that verifies against one of them is a time the certificate must
//!    have been valid at (as sigstore-python: one that does not verify is
//!    set aside, not refused);
//! 2. the log entry: its log is in the trust root and its key valid at the
//!    signing time; the RFC 6962 inclusion proof up to the root hash; the
//!    checkpoint (signed note) committing to that root and tree size,
//!    signed by the same log key; and by kind:
//!    - Rekor v1, `dsse` 0.0.1: the log's signed entry timestamp over
//!      (body, integrated time, log id, log index), which makes the
//!      integrated time a verified time; the body records this envelope's
//!      payload hash, its signature and this certificate;
//!    - Rekor v2, `hashedrekord` 0.0.2 (how Rekor v2 logs a DSSE envelope,
//!      rekor-v2-spec 6.1.4): no integrated time, so the time comes from
//!      the timestamps alone; the body records the hash of the envelope's
//!      PAE (the hash the certificate's key details name), its signature
//!      and this certificate. Rekor v2 logs may sign checkpoints with
//!      Ed25519: the log id is then the signed-note key id, SHA-256 of the
//!      key's name, a newline, 0x01 and the key, and the checkpoint's origin
//!      and signer name must be the name that id was made from;
//! 3. the certificate, at every verified time (at least one: Fulcio
//!    certificates live ten minutes): it chains to a certificate authority
//!    of the trust root whose validity covers that time, every link valid
//!    then; it allows code signing; it carries an embedded SCT signed by a
//!    CT log of the trust root over the precertificate;
//! 4. the identity: the certificate's SAN (email or URI) and its OIDC
//!    issuer extension, which the trust policy matches as pairs;
//! 5. the DSSE signature over the payload with the certificate's key.
//!
//! Not done: RSA log keys are refused (RSA issuers and timestamp
//! authorities are verified, [`super::cert`]); witness cosignatures on
//! checkpoints are not checked (the trust root names no witnesses);
//! certificate revocation does not exist in Sigstore and is not checked.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use const_oid::db::rfc5280::{
    ID_CE_EXT_KEY_USAGE, ID_CE_KEY_USAGE, ID_CE_SUBJECT_ALT_NAME, ID_KP_CODE_SIGNING,
};
use der::asn1::ObjectIdentifier;
use der::{Decode, Encode};
use serde::de::IgnoredAny;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{ExtendedKeyUsage, KeyUsage, SubjectAltName};
use x509_cert::Certificate;

use super::bundle::{b64, Bundle, TlogEntry};
use super::keys::PublicKey;
use super::{cert, read_bounded, OmsError};

/// Largest trust root file accepted.
pub const MAX_TRUST_ROOT: u64 = 1 << 20;
/// Most logs or authorities read from a trust root.
const MAX_ROOT_ITEMS: usize = 64;
/// Most SCTs read from a certificate.
const MAX_SCTS: usize = 16;

/// The embedded SCT list (RFC 6962, 3.3).
const OID_SCT_LIST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.11129.2.4.2");
/// Fulcio's OIDC issuer extension (DER UTF8String).
const OID_ISSUER_V2: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.57264.1.8");
/// Fulcio's older OIDC issuer extension (raw bytes).
const OID_ISSUER_V1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.57264.1.1");

/// A validity window from the trust root (`validFor`); an absent end is open.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Window {
    start: Option<SystemTime>,
    end: Option<SystemTime>,
}

impl Window {
    fn covers(&self, t: SystemTime) -> bool {
        self.start.is_none_or(|s| t >= s) && self.end.is_none_or(|e| t <= e)
    }

    /// As `covers`, the end excluded (how sigstore-python reads a timestamp
    /// authority's window).
    pub(crate) fn covers_half_open(&self, t: SystemTime) -> bool {
        self.start.is_none_or(|s| t >= s) && self.end.is_none_or(|e| t < e)
    }
}

/// The algorithm identifier of an Ed25519 key (RFC 8410).
const ID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

/// A log's public key: ECDSA (Rekor v1, CT logs, Rekor v2 logs so keyed)
/// or Ed25519 (Rekor v2 logs).
#[derive(Debug, Clone)]
enum LogVerifier {
    Ecdsa(PublicKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl LogVerifier {
    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        match self {
            LogVerifier::Ecdsa(key) => key.verify(msg, sig),
            // Strict: canonical encodings only and no small-order points,
            // which every signature an honest log makes satisfies.
            LogVerifier::Ed25519(key) => ed25519_dalek::Signature::from_slice(sig)
                .is_ok_and(|sig| key.verify_strict(msg, &sig).is_ok()),
        }
    }
}

/// An Ed25519 key from its DER SubjectPublicKeyInfo.
fn ed25519_from_spki(der: &[u8]) -> Result<ed25519_dalek::VerifyingKey, String> {
    let spki = spki::SubjectPublicKeyInfoRef::from_der(der)
        .map_err(|e| format!("not a public key: {e}"))?;
    if spki.algorithm.oid != ID_ED25519 || spki.algorithm.parameters.is_some() {
        return Err("PKIX_ED25519 key that is not an Ed25519 key".into());
    }
    let raw: [u8; 32] = spki
        .subject_public_key
        .as_bytes()
        .and_then(|b| b.try_into().ok())
        .ok_or("Ed25519 key is not 32 bytes")?;
    ed25519_dalek::VerifyingKey::from_bytes(&raw).map_err(|_| "invalid Ed25519 key".into())
}

/// The signed-note key id of an Ed25519 key named `name` (c2sp.org
/// signed-note): SHA-256(name || 0x0A || 0x01 || key). Its first four
/// bytes are the key hash a note's signature line starts with.
fn note_key_id(name: &str, key: &ed25519_dalek::VerifyingKey) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', 0x01]);
    h.update(key.as_bytes());
    h.finalize().into()
}

/// A transparency or CT log's key.
#[derive(Debug, Clone)]
struct LogKey {
    key_id: Vec<u8>,
    /// The id its checkpoints name it by (`checkpointKeyId`, trust roots
    /// from v0.2): the signed-note key id; absent, the log id is.
    checkpoint_key_id: Option<Vec<u8>>,
    /// `None` for a key type ccnode does not verify (RSA): entries from
    /// that log are refused with a clear reason.
    key: Option<LogVerifier>,
    window: Window,
    url: String,
}

/// A certificate or timestamp authority: its chain, issuing (or signing)
/// certificate first, root last.
#[derive(Debug, Clone)]
pub(crate) struct Authority {
    pub(crate) chain: Vec<Certificate>,
    pub(crate) chain_der: Vec<Vec<u8>>,
    pub(crate) window: Window,
}

/// A Sigstore trust root: the CAs, transparency logs and CT logs trusted.
#[derive(Debug, Clone)]
pub struct TrustedRoot {
    tlogs: Vec<LogKey>,
    ctlogs: Vec<LogKey>,
    authorities: Vec<Authority>,
    /// RFC 3161 timestamp authorities (may be none).
    tsas: Vec<Authority>,
}

/// Who signed, as a verified keyless bundle says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeylessSigner {
    /// The certificate's SAN email addresses and URIs.
    pub identities: Vec<String>,
    /// The OIDC issuer that vouched for the identity.
    pub issuer: String,
    /// When the log integrated the signature (seconds since the epoch), as
    /// its signed entry timestamp vouches; Rekor v2 records none.
    pub integrated_time: Option<u64>,
    /// The entry's index in the log, and the log's URL.
    pub log_index: u64,
    pub log_url: String,
    /// The times (seconds since the epoch) of the RFC 3161 timestamps that
    /// verified.
    pub timestamps: Vec<u64>,
}

/// An identity a policy allows to sign keyless: the certificate's SAN and
/// the OIDC issuer, both exact.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub identity: String,
    pub issuer: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawTrustFile {
    media_type: String,
    // A trusted root:
    #[serde(default)]
    tlogs: Vec<RawLog>,
    #[serde(default)]
    ctlogs: Vec<RawLog>,
    #[serde(default)]
    certificate_authorities: Vec<RawAuthority>,
    #[serde(default)]
    timestamp_authorities: Vec<RawAuthority>,
    // A client trust config:
    trusted_root: Option<Box<RawTrustFile>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLog {
    #[serde(default)]
    base_url: String,
    public_key: RawKey,
    log_id: super::bundle::RawLogId,
    checkpoint_key_id: Option<super::bundle::RawLogId>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawKey {
    raw_bytes: Option<String>,
    #[serde(default)]
    key_details: String,
    valid_for: Option<RawWindow>,
}

#[derive(Deserialize)]
struct RawWindow {
    start: Option<String>,
    end: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAuthority {
    cert_chain: RawCertChain,
    valid_for: Option<RawWindow>,
}

#[derive(Deserialize)]
struct RawCertChain {
    certificates: Vec<RawCert>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawCert {
    raw_bytes: String,
}

const TRUSTED_ROOT_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.trustedroot";
const CLIENT_TRUST_CONFIG_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.clienttrustconfig";

fn window(raw: Option<&RawWindow>, what: &str) -> Result<Window, String> {
    let time = |s: &Option<String>| -> Result<Option<SystemTime>, String> {
        s.as_deref()
            .map(|t| humantime::parse_rfc3339(t).map_err(|e| format!("{what}: time {t:?}: {e}")))
            .transpose()
    };
    match raw {
        None => Ok(Window::default()),
        Some(w) => Ok(Window {
            start: time(&w.start)?,
            end: time(&w.end)?,
        }),
    }
}

fn log_key(raw: &RawLog, what: &str) -> Result<LogKey, String> {
    let key_id = b64(what, &raw.log_id.key_id).map_err(|e| e.to_string())?;
    if key_id.len() != 32 {
        return Err(format!("{what}: log id is not 32 bytes"));
    }
    let checkpoint_key_id = raw
        .checkpoint_key_id
        .as_ref()
        .map(|id| b64(what, &id.key_id).map_err(|e| e.to_string()))
        .transpose()?;
    if checkpoint_key_id.as_ref().is_some_and(|id| id.len() != 32) {
        return Err(format!("{what}: checkpoint key id is not 32 bytes"));
    }
    let key = match &raw.public_key.raw_bytes {
        // Rekor v2 with an Ed25519 key: the log id is the signed-note key
        // id, which commits to the log's name as well; it is checked
        // against the checkpoint's name when an entry is verified.
        Some(bytes) if raw.public_key.key_details == "PKIX_ED25519" => {
            let der = b64(what, bytes).map_err(|e| e.to_string())?;
            let key =
                ed25519_from_spki(&der).map_err(|e| format!("{what} ({}): {e}", raw.base_url))?;
            Some(LogVerifier::Ed25519(key))
        }
        Some(bytes) => {
            let der = b64(what, bytes).map_err(|e| e.to_string())?;
            match PublicKey::from_spki_der(&der) {
                Ok(_) if Sha256::digest(&der)[..] != key_id[..] => {
                    return Err(format!(
                        "{what} ({}): log id is not the SHA-256 of its key",
                        raw.base_url
                    ))
                }
                Ok(k) => Some(LogVerifier::Ecdsa(k)),
                // ECDSA and Ed25519 keys are verified; a log with another
                // key type (RSA) stays known but unusable.
                Err(_) if !raw.public_key.key_details.starts_with("PKIX_ECDSA") => None,
                Err(e) => return Err(format!("{what} ({}): {e}", raw.base_url)),
            }
        }
        None => None,
    };
    Ok(LogKey {
        key_id,
        checkpoint_key_id,
        key,
        window: window(raw.public_key.valid_for.as_ref(), what)?,
        url: raw.base_url.chars().take(200).collect(),
    })
}

impl TrustedRoot {
    /// Parses a Sigstore trusted root (`trusted_root.json`), or a client
    /// trust config (what `model_signing --trust_config` takes) holding one.
    pub fn parse(bytes: &[u8]) -> Result<TrustedRoot, String> {
        if bytes.len() as u64 > MAX_TRUST_ROOT {
            return Err("trust root too large".into());
        }
        let mut raw: RawTrustFile =
            serde_json::from_slice(bytes).map_err(|e| format!("not a Sigstore trust root: {e}"))?;
        if raw.media_type.starts_with(CLIENT_TRUST_CONFIG_MEDIA_TYPE) {
            raw = *raw
                .trusted_root
                .ok_or("client trust config without trustedRoot")?;
        }
        if !raw.media_type.starts_with(TRUSTED_ROOT_MEDIA_TYPE) {
            return Err(format!(
                "media type {:?} is not a Sigstore trusted root",
                raw.media_type.chars().take(80).collect::<String>()
            ));
        }
        if raw.tlogs.len()
            + raw.ctlogs.len()
            + raw.certificate_authorities.len()
            + raw.timestamp_authorities.len()
            > MAX_ROOT_ITEMS
        {
            return Err("too many logs or authorities".into());
        }
        let tlogs = raw
            .tlogs
            .iter()
            .map(|l| log_key(l, "tlog"))
            .collect::<Result<Vec<_>, _>>()?;
        let ctlogs = raw
            .ctlogs
            .iter()
            .map(|l| log_key(l, "ctlog"))
            .collect::<Result<Vec<_>, _>>()?;
        let authorities = raw
            .certificate_authorities
            .iter()
            .map(|ca| authority(ca, "certificate authority"))
            .collect::<Result<Vec<_>, _>>()?;
        let tsas = raw
            .timestamp_authorities
            .iter()
            .map(|ca| authority(ca, "timestamp authority"))
            .collect::<Result<Vec<_>, _>>()?;
        if tlogs.is_empty() || ctlogs.is_empty() || authorities.is_empty() {
            return Err(
                "a trust root for keyless signatures needs tlogs, ctlogs and certificateAuthorities"
                    .into(),
            );
        }
        Ok(TrustedRoot {
            tlogs,
            ctlogs,
            authorities,
            tsas,
        })
    }

    /// Verifies one RFC 3161 timestamp response (DER) over `signature`
    /// against this root's timestamp authorities; the time it vouches for.
    pub fn verify_timestamp(&self, der: &[u8], signature: &[u8]) -> Result<SystemTime, OmsError> {
        super::tsa::verify(der, signature, &self.tsas).map_err(|f| OmsError::Timestamp(f.reason()))
    }

    /// Loads a trust root file.
    pub fn load(path: &Path) -> Result<TrustedRoot, OmsError> {
        let bytes = read_bounded(path, "sigstore trust root", MAX_TRUST_ROOT)?;
        Self::parse(&bytes).map_err(|reason| OmsError::TrustMaterial {
            what: path.display().to_string(),
            reason,
        })
    }
}

fn authority(ca: &RawAuthority, what: &str) -> Result<Authority, String> {
    let certs = &ca.cert_chain.certificates;
    if certs.is_empty() || certs.len() > super::bundle::MAX_CHAIN {
        return Err(format!("{what} chain length out of range"));
    }
    let chain_der = certs
        .iter()
        .map(|c| b64(what, &c.raw_bytes).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let chain = chain_der
        .iter()
        .map(|d| cert::parse(d))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Authority {
        chain,
        chain_der,
        window: window(ca.valid_for.as_ref(), what)?,
    })
}

fn log_err(reason: impl Into<String>) -> OmsError {
    OmsError::TransparencyLog(reason.into())
}

fn cert_err(reason: impl Into<String>) -> OmsError {
    OmsError::Certificate(reason.into())
}

/// `secs` after the epoch; the far future for what a SystemTime cannot
/// hold (bundles bound their times to 2^53 seconds before this is reached).
fn epoch(secs: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or(UNIX_EPOCH + Duration::from_secs(1 << 53))
}

/// Verifies a keyless bundle under `root`: timestamps, log entry,
/// certificate, SCT and the DSSE signature over `message` (the envelope's
/// PAE). Identity policy is the caller's: the result says who signed.
pub fn verify(
    bundle: &Bundle,
    certificate: &[u8],
    entries: &[TlogEntry],
    timestamps: &[Vec<u8>],
    root: &TrustedRoot,
    message: &[u8],
) -> Result<KeylessSigner, OmsError> {
    let leaf = cert::parse(certificate).map_err(cert_err)?;
    if entries.is_empty() {
        return Err(log_err(
            "no transparency log entry: a keyless signature needs one to prove it was logged",
        ));
    }

    // RFC 3161 timestamps, as sigstore-python reads them: a bundle with
    // timestamps needs a trust root with timestamp authorities; each
    // timestamp that verifies is one more time the certificate must have
    // been valid at; one that does not is no time source and is set aside.
    if !timestamps.is_empty() && root.tsas.is_empty() {
        return Err(OmsError::Timestamp(
            "the bundle has RFC 3161 timestamps and the trust root no timestamp authority".into(),
        ));
    }
    // One from a trusted authority that ccnode cannot verify (a weak RSA
    // key, PSS, SHA-1) refuses the bundle: the reference would hold the
    // certificate to its time.
    let mut tsa_times: Vec<SystemTime> = Vec::new();
    for t in timestamps {
        match super::tsa::verify(t, &bundle.signature, &root.tsas) {
            Ok(time) => tsa_times.push(time),
            Err(f @ super::tsa::Failure::Unverifiable(_)) => {
                return Err(OmsError::Timestamp(f.reason()))
            }
            Err(super::tsa::Failure::SetAside(_)) => {}
        }
    }

    let mut logged = Err(log_err("no entry verified"));
    for entry in entries {
        logged = verify_entry(entry, root, bundle, certificate, message, &tsa_times);
        if logged.is_ok() {
            break;
        }
    }
    let (entry, log, log_time) = logged?;
    // Every verified time: the log's (Rekor v1) and the timestamps'; the
    // entry check made sure there is at least one.
    let times: Vec<SystemTime> = log_time
        .into_iter()
        .chain(tsa_times.iter().copied())
        .collect();

    // The certificate, at every verified time.
    let chain_at = |at: SystemTime| {
        let mut last =
            cert_err("no certificate authority of the trust root covers the signing time");
        for ca in root.authorities.iter().filter(|ca| ca.window.covers(at)) {
            let mut chain = vec![certificate.to_vec()];
            chain.extend(ca.chain_der[..ca.chain_der.len() - 1].iter().cloned());
            let anchor = &ca.chain[ca.chain.len() - 1..];
            match cert::verify_chain(&chain, anchor, at) {
                Ok(signing) => return Ok((signing, ca)),
                Err(e) => last = e,
            }
        }
        Err(last)
    };
    let Some((&first, rest)) = times.split_first() else {
        return Err(OmsError::Timestamp("no verified time".into()));
    };
    let (signing, ca) = chain_at(first)?;
    for &t in rest {
        // Without a log time (Rekor v2) every time is a timestamp's, and
        // the certificate not being valid at one is the certificate's
        // fault, as at the first.
        if log_time.is_none() {
            chain_at(t)?;
            continue;
        }
        chain_at(t).map_err(|e| {
            OmsError::Timestamp(format!(
                "the signing certificate was not valid at the time of a verified timestamp \
                 ({}): {e}",
                humantime::format_rfc3339_seconds(t)
            ))
        })?;
    }
    // Fulcio issues both; Sigstore's clients require both.
    let eku = cert::extension::<ExtendedKeyUsage>(&leaf, ID_CE_EXT_KEY_USAGE)?;
    if !eku.is_some_and(|e| e.0.contains(&ID_KP_CODE_SIGNING)) {
        return Err(cert_err("keyless signing certificate lacks codeSigning"));
    }
    let ku = cert::extension::<KeyUsage>(&leaf, ID_CE_KEY_USAGE)?;
    if !ku.is_some_and(|k| k.digital_signature()) {
        return Err(cert_err(
            "keyless signing certificate lacks digitalSignature",
        ));
    }
    let issuer_cert = ca
        .chain
        .iter()
        .find(|c| cert::signed_by(&leaf, c))
        .ok_or_else(|| cert_err("issuing certificate not found in the authority's chain"))?;
    verify_sct(&leaf, issuer_cert, &root.ctlogs)?;

    let identities = san_identities(&leaf)?;
    let issuer = oidc_issuer(&leaf)?;
    if !signing.key.verify(message, &bundle.signature) {
        return Err(OmsError::BadSignature);
    }
    Ok(KeylessSigner {
        identities,
        issuer,
        integrated_time: entry.integrated_time.filter(|_| log_time.is_some()),
        log_index: entry.log_index,
        log_url: log.url.clone(),
        timestamps: tsa_times
            .iter()
            .map(|t| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
            .collect(),
    })
}

/// The entry kinds ccnode reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryKind {
    /// Rekor v1: `dsse` 0.0.1, with a signed entry timestamp.
    DsseV1,
    /// Rekor v2: `hashedrekord` 0.0.2 over the envelope's PAE.
    HashedRekordV2,
}

/// Checks one log entry, given the times the verified timestamps vouch
/// for; returns it, its log, and the log's own verified time (Rekor v1).
fn verify_entry<'a>(
    entry: &'a TlogEntry,
    root: &'a TrustedRoot,
    bundle: &Bundle,
    certificate: &[u8],
    message: &[u8],
    tsa_times: &[SystemTime],
) -> Result<(&'a TlogEntry, &'a LogKey, Option<SystemTime>), OmsError> {
    let kind = match (entry.kind.as_str(), entry.version.as_str()) {
        ("dsse", "0.0.1") => EntryKind::DsseV1,
        ("hashedrekord", "0.0.2") => EntryKind::HashedRekordV2,
        (kind, version) => {
            return Err(log_err(format!(
                "entry kind {kind} {version} is not supported (dsse 0.0.1 from Rekor v1 and \
                 hashedrekord 0.0.2 from Rekor v2 are)"
            )))
        }
    };
    // The time the log's key must be valid at: the integrated time the
    // signed entry timestamp covers (Rekor v1, required there), or every
    // verified timestamp (Rekor v2, which has no time of its own).
    let log_time = match kind {
        EntryKind::DsseV1 => {
            if entry.signed_entry_timestamp.is_none() {
                return Err(log_err("no signed entry timestamp (inclusion promise)"));
            }
            let t = entry
                .integrated_time
                .ok_or_else(|| log_err("no integrated time"))?;
            Some(epoch(t))
        }
        EntryKind::HashedRekordV2 => {
            if entry.signed_entry_timestamp.is_some() {
                return Err(log_err(
                    "a Rekor v2 entry with a signed entry timestamp: v2 logs issue none",
                ));
            }
            if tsa_times.is_empty() {
                return Err(OmsError::Timestamp(
                    "a Rekor v2 entry records no time, and no RFC 3161 timestamp in the \
                     bundle verified: there is no verified signing time"
                        .into(),
                ));
            }
            None
        }
    };
    let key_times: Vec<SystemTime> = match log_time {
        Some(t) => vec![t],
        None => tsa_times.to_vec(),
    };

    // A key listed more than once (with different validity windows, say):
    // the first whose window covers the signing time.
    let mut logs = root
        .tlogs
        .iter()
        .filter(|l| l.key_id == entry.key_id || l.checkpoint_key_id.as_ref() == Some(&entry.key_id))
        .peekable();
    if logs.peek().is_none() {
        return Err(log_err("entry from a log that is not in the trust root"));
    }
    let log = logs
        .find(|l| key_times.iter().all(|&t| l.window.covers(t)))
        .ok_or_else(|| log_err("log key not valid at the signing time"))?;
    let key = log.key.as_ref().ok_or_else(|| {
        log_err(format!(
            "log {} has a key type ccnode does not verify",
            log.url
        ))
    })?;

    // The inclusion promise: the log's signature over the entry as logged.
    if let (Some(set), Some(integrated_time)) =
        (&entry.signed_entry_timestamp, entry.integrated_time)
    {
        let promised = serde_json::json!({
            "body": base64::engine::general_purpose::STANDARD.encode(&entry.body),
            "integratedTime": integrated_time,
            "logID": hex::encode(&entry.key_id),
            "logIndex": entry.log_index,
        });
        let promised = crate::jcs::canonicalize(&promised).map_err(|e| log_err(e.to_string()))?;
        if !key.verify(&promised, set) {
            return Err(log_err("signed entry timestamp does not verify"));
        }
    }

    // The inclusion proof and its checkpoint.
    let proof = entry
        .inclusion_proof
        .as_ref()
        .ok_or_else(|| log_err("no inclusion proof"))?;
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(&entry.body);
    let leaf_hash: [u8; 32] = h.finalize().into();
    let computed = crate::merkle::root_from_audit_path(
        &leaf_hash,
        proof.log_index,
        proof.tree_size,
        &proof.hashes,
    );
    if computed != Some(proof.root_hash) {
        return Err(log_err("inclusion proof does not lead to the root hash"));
    }
    // A Rekor v2 shard numbers its entries as its tree does; nothing else
    // vouches for the entry's index (Rekor v1's is under the signed entry
    // timestamp).
    if kind == EntryKind::HashedRekordV2 && entry.log_index != proof.log_index {
        return Err(log_err(
            "a Rekor v2 entry's log index is not its inclusion proof's",
        ));
    }
    // The checkpoint names the log by its checkpoint key id where the
    // trust root gives one, else by its log id.
    let checkpoint_id = log.checkpoint_key_id.as_ref().unwrap_or(&log.key_id);
    verify_checkpoint(&proof.checkpoint, checkpoint_id, key, proof)?;

    match kind {
        EntryKind::DsseV1 => check_body(entry, bundle, certificate)?,
        EntryKind::HashedRekordV2 => check_hashedrekord_body(entry, bundle, certificate, message)?,
    }
    Ok((entry, log, log_time))
}

/// A checkpoint is a signed note: `origin\nsize\nbase64(root)\n[extra]\n\n`
/// then lines `— name base64(key hint[4] || signature)`, the signature over
/// everything before the blank line. For an Ed25519 log key the log id
/// (the signed-note key id) commits to the key's name: the origin line and
/// the signing line's name must both be that name.
fn verify_checkpoint(
    note: &str,
    key_id: &[u8],
    key: &LogVerifier,
    proof: &super::bundle::InclusionProof,
) -> Result<(), OmsError> {
    let (text, signatures) = note
        .split_once("\n\n")
        .ok_or_else(|| log_err("checkpoint is not a signed note"))?;
    let mut lines = text.split('\n');
    let origin = lines.next().unwrap_or_default();
    // Plain decimal, as the checkpoint format writes it (no sign, no
    // leading zero).
    let size = lines
        .next()
        .filter(|s| {
            !s.is_empty()
                && s.bytes().all(|b| b.is_ascii_digit())
                && (s == &"0" || !s.starts_with('0'))
        })
        .and_then(|s| s.parse::<u64>().ok());
    let root = lines.next().and_then(|r| b64("checkpoint root", r).ok());
    if origin.is_empty()
        || size != Some(proof.tree_size)
        || root.as_deref() != Some(&proof.root_hash[..])
    {
        return Err(log_err(
            "checkpoint does not commit to the proof's tree size and root hash",
        ));
    }
    if let LogVerifier::Ed25519(k) = key {
        if note_key_id(origin, k)[..] != *key_id {
            return Err(log_err(
                "checkpoint origin is not the name the log's id was made from",
            ));
        }
    }
    let signed = format!("{text}\n");
    for line in signatures.lines() {
        let Some(rest) = line.strip_prefix("\u{2014} ") else {
            continue;
        };
        let Some((name, sig)) = rest.rsplit_once(' ') else {
            continue;
        };
        let Ok(sig) = b64("checkpoint signature", sig) else {
            continue;
        };
        // The first line with the log's key hint decides (as Sigstore's
        // clients do): a note padded with lines costs one verification.
        if sig.len() > 4 && key_id.len() >= 4 && sig[..4] == key_id[..4] {
            let named = !matches!(key, LogVerifier::Ed25519(_)) || name == origin;
            if named && key.verify(signed.as_bytes(), &sig[4..]) {
                return Ok(());
            }
            break;
        }
    }
    Err(log_err("checkpoint is not signed by the log's key"))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DsseBody {
    api_version: String,
    kind: String,
    spec: DsseSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DsseSpec {
    payload_hash: HashValue,
    signatures: Vec<DsseBodySignature>,
}

#[derive(Deserialize)]
struct HashValue {
    algorithm: String,
    value: String,
}

#[derive(Deserialize)]
struct DsseBodySignature {
    signature: String,
    verifier: String,
}

/// The logged body must be about this envelope and this certificate.
fn check_body(entry: &TlogEntry, bundle: &Bundle, certificate: &[u8]) -> Result<(), OmsError> {
    let body: DsseBody = serde_json::from_slice(&entry.body)
        .map_err(|e| log_err(format!("entry body is not a dsse entry: {e}")))?;
    if body.kind != entry.kind || body.api_version != entry.version {
        return Err(log_err("entry body kind differs from the entry's kind"));
    }
    if body.spec.payload_hash.algorithm != "sha256"
        || !body
            .spec
            .payload_hash
            .value
            .eq_ignore_ascii_case(&hex::encode(Sha256::digest(&bundle.payload)))
    {
        return Err(log_err("logged payload hash is not this payload's"));
    }
    let [logged] = body.spec.signatures.as_slice() else {
        return Err(log_err("logged entry does not hold exactly one signature"));
    };
    if b64("logged signature", &logged.signature)? != bundle.signature {
        return Err(log_err("logged signature is not this envelope's"));
    }
    let pem = b64("logged verifier", &logged.verifier)?;
    let pem = std::str::from_utf8(&pem).map_err(|_| log_err("logged verifier is not PEM"))?;
    let (label, der) = der::pem::decode_vec(pem.trim().as_bytes())
        .map_err(|_| log_err("logged verifier is not PEM"))?;
    if label != "CERTIFICATE" || der != certificate {
        return Err(log_err("logged certificate is not this bundle's"));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct V2Body {
    kind: String,
    api_version: String,
    spec: V2Spec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct V2Spec {
    hashed_rekord_v002: Option<HashedRekordV002>,
}

#[derive(Deserialize)]
struct HashedRekordV002 {
    data: V2HashOutput,
    signature: V2Signature,
}

#[derive(Deserialize)]
struct V2HashOutput {
    algorithm: String,
    digest: String,
}

#[derive(Deserialize)]
struct V2Signature {
    content: String,
    verifier: V2Verifier,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct V2Verifier {
    x509_certificate: Option<RawCert>,
    public_key: Option<IgnoredAny>,
    key_details: String,
}

/// A Rekor v2 body for a DSSE envelope (rekor-v2-spec 6.1.4) must record
/// the hash of this envelope's PAE (`message`), with the hash the signing
/// key's details name, this envelope's one signature and this certificate.
fn check_hashedrekord_body(
    entry: &TlogEntry,
    bundle: &Bundle,
    certificate: &[u8],
    message: &[u8],
) -> Result<(), OmsError> {
    let body: V2Body = serde_json::from_slice(&entry.body)
        .map_err(|e| log_err(format!("entry body is not a hashedrekord entry: {e}")))?;
    if body.kind != entry.kind || body.api_version != entry.version {
        return Err(log_err("entry body kind differs from the entry's kind"));
    }
    let rekord = body
        .spec
        .hashed_rekord_v002
        .ok_or_else(|| log_err("entry body holds no hashedRekordV002"))?;
    let key = cert::key_of(&cert::parse(certificate).map_err(cert_err)?)?;
    // The algorithm registry's names for the certificate's key.
    let (details, algorithm, digest) = match key.curve() {
        "P-256" => (
            "PKIX_ECDSA_P256_SHA_256",
            "SHA2_256",
            Sha256::digest(message).to_vec(),
        ),
        "P-384" => (
            "PKIX_ECDSA_P384_SHA_384",
            "SHA2_384",
            sha2::Sha384::digest(message).to_vec(),
        ),
        "P-521" => (
            "PKIX_ECDSA_P521_SHA_512",
            "SHA2_512",
            sha2::Sha512::digest(message).to_vec(),
        ),
        other => return Err(cert_err(format!("no hashedrekord hash for a {other} key"))),
    };
    if rekord.data.algorithm != algorithm || b64("logged digest", &rekord.data.digest)? != digest {
        return Err(log_err("logged digest is not this envelope's"));
    }
    if b64("logged signature", &rekord.signature.content)? != bundle.signature {
        return Err(log_err("logged signature is not this envelope's"));
    }
    let verifier = &rekord.signature.verifier;
    let logged_cert = match (&verifier.x509_certificate, &verifier.public_key) {
        (Some(c), None) => b64("logged certificate", &c.raw_bytes)?,
        _ => return Err(log_err("logged verifier is not one certificate")),
    };
    if logged_cert != certificate {
        return Err(log_err("logged certificate is not this bundle's"));
    }
    if verifier.key_details != details {
        return Err(log_err(format!(
            "logged key details {:?} are not the certificate's ({details})",
            verifier.key_details.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}

/// Checks that a CT log of the trust root signed an SCT for the leaf's
/// precertificate (RFC 6962, 3.2: the TBS without the SCT list, and the
/// issuer's key hash).
fn verify_sct(leaf: &Certificate, issuer: &Certificate, ctlogs: &[LogKey]) -> Result<(), OmsError> {
    let exts = leaf
        .tbs_certificate
        .extensions
        .as_deref()
        .unwrap_or_default();
    let mut found = exts.iter().filter(|e| e.extn_id == OID_SCT_LIST);
    let ext = found
        .next()
        .ok_or_else(|| cert_err("certificate has no embedded SCT"))?;
    if found.next().is_some() {
        return Err(cert_err("duplicate SCT extension"));
    }
    let list = der::asn1::OctetString::from_der(ext.extn_value.as_bytes())
        .map_err(|_| cert_err("malformed SCT extension"))?;
    let scts = parse_sct_list(list.as_bytes()).ok_or_else(|| cert_err("malformed SCT list"))?;

    let mut tbs = leaf.tbs_certificate.clone();
    tbs.extensions = tbs.extensions.map(|e| {
        e.into_iter()
            .filter(|x| x.extn_id != OID_SCT_LIST)
            .collect()
    });
    let tbs = tbs.to_der().map_err(|e| cert_err(e.to_string()))?;
    if tbs.len() >= 1 << 24 {
        return Err(cert_err("certificate too large"));
    }
    let issuer_spki = issuer
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| cert_err(e.to_string()))?;
    let issuer_key_hash = Sha256::digest(&issuer_spki);

    for sct in &scts {
        let at = UNIX_EPOCH
            .checked_add(Duration::from_millis(sct.timestamp))
            .unwrap_or(UNIX_EPOCH);
        let Some(log) = ctlogs
            .iter()
            .find(|l| l.key_id == sct.log_id && l.window.covers(at))
        else {
            continue;
        };
        let Some(LogVerifier::Ecdsa(key)) = &log.key else {
            continue;
        };
        // SHA-256 with ECDSA on P-256, SHA-384 on P-384: the hash the key's
        // curve implies, which PublicKey::verify uses.
        let hash_ok = matches!((sct.hash_alg, key.curve()), (4, "P-256") | (5, "P-384"));
        if !hash_ok || sct.sig_alg != 3 {
            continue;
        }
        let mut msg = Vec::with_capacity(tbs.len() + 64);
        msg.extend_from_slice(&[0, 0]); // v1, certificate_timestamp
        msg.extend_from_slice(&sct.timestamp.to_be_bytes());
        msg.extend_from_slice(&[0, 1]); // precert_entry
        msg.extend_from_slice(&issuer_key_hash);
        msg.extend_from_slice(&(tbs.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&tbs);
        msg.extend_from_slice(&(sct.extensions.len() as u16).to_be_bytes());
        msg.extend_from_slice(sct.extensions);
        if key.verify(&msg, sct.signature) {
            return Ok(());
        }
    }
    Err(cert_err(
        "no SCT from a CT log of the trust root verifies for this certificate",
    ))
}

struct Sct<'a> {
    log_id: &'a [u8],
    timestamp: u64,
    extensions: &'a [u8],
    hash_alg: u8,
    sig_alg: u8,
    signature: &'a [u8],
}

/// Splits `n` bytes off the front of `buf`.
fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if buf.len() < n {
        return None;
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Some(head)
}

fn take_u16(buf: &mut &[u8]) -> Option<usize> {
    take(buf, 2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
}

/// The TLS-encoded SignedCertificateTimestampList; `None` when malformed.
fn parse_sct_list(bytes: &[u8]) -> Option<Vec<Sct<'_>>> {
    let mut buf = bytes;
    let total = take_u16(&mut buf)?;
    if total != buf.len() {
        return None;
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        if out.len() == MAX_SCTS {
            return None;
        }
        let len = take_u16(&mut buf)?;
        let mut sct = take(&mut buf, len)?;
        let version = take(&mut sct, 1)?[0];
        let log_id = take(&mut sct, 32)?;
        let ts = take(&mut sct, 8)?;
        let ext_len = take_u16(&mut sct)?;
        let extensions = take(&mut sct, ext_len)?;
        let algs = take(&mut sct, 2)?;
        let sig_len = take_u16(&mut sct)?;
        let signature = take(&mut sct, sig_len)?;
        if version != 0 || !sct.is_empty() {
            return None;
        }
        out.push(Sct {
            log_id,
            timestamp: u64::from_be_bytes(ts.try_into().ok()?),
            extensions,
            hash_alg: algs[0],
            sig_alg: algs[1],
            signature,
        });
    }
    Some(out)
}

/// The SAN email addresses and URIs (Fulcio puts the OIDC subject there).
fn san_identities(leaf: &Certificate) -> Result<Vec<String>, OmsError> {
    let mut out = Vec::new();
    if let Some(san) = cert::extension::<SubjectAltName>(leaf, ID_CE_SUBJECT_ALT_NAME)? {
        for name in san.0 {
            match name {
                GeneralName::Rfc822Name(s) => out.push(s.to_string()),
                GeneralName::UniformResourceIdentifier(s) => out.push(s.to_string()),
                _ => {}
            }
        }
    }
    if out.is_empty() {
        return Err(cert_err("keyless certificate has no email or URI identity"));
    }
    Ok(out)
}

/// The OIDC issuer: Fulcio's DER extension and its older raw one, which
/// must agree when both are present (sigstore-python reads only the older
/// one, sigstore-go prefers the newer: a certificate on which they differ is
/// refused rather than read one way).
fn oidc_issuer(leaf: &Certificate) -> Result<String, OmsError> {
    let v2 = cert::extension::<der::asn1::Utf8StringRef<'_>>(leaf, OID_ISSUER_V2)?
        .map(|s| s.to_string());
    let exts = leaf
        .tbs_certificate
        .extensions
        .as_deref()
        .unwrap_or_default();
    let mut v1s = exts.iter().filter(|e| e.extn_id == OID_ISSUER_V1);
    let v1 = v1s
        .next()
        .map(|ext| {
            std::str::from_utf8(ext.extn_value.as_bytes())
                .map(str::to_owned)
                .map_err(|_| cert_err("OIDC issuer extension is not UTF-8"))
        })
        .transpose()?;
    if v1s.next().is_some() {
        return Err(cert_err("duplicate OIDC issuer extension"));
    }
    match (v2, v1) {
        (Some(a), Some(b)) if a != b => Err(cert_err("the two OIDC issuer extensions differ")),
        (Some(a), _) | (None, Some(a)) => Ok(a),
        (None, None) => Err(cert_err("keyless certificate names no OIDC issuer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sct_list_parser_refuses_truncation_and_trailing_bytes() {
        // One SCT: version, log id, timestamp, no extensions, algs, 2-byte sig.
        let mut sct = vec![0u8];
        sct.extend([7u8; 32]);
        sct.extend(1234u64.to_be_bytes());
        sct.extend([0, 0, 4, 3, 0, 2, 0xaa, 0xbb]);
        let mut list = ((sct.len() + 2) as u16).to_be_bytes().to_vec();
        list.extend((sct.len() as u16).to_be_bytes());
        list.extend(&sct);
        let parsed = parse_sct_list(&list).expect("well-formed list");
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].timestamp, 1234);
        assert_eq!(parsed[0].signature, &[0xaa, 0xbb]);
        for cut in 0..list.len() {
            assert!(parse_sct_list(&list[..cut]).is_none(), "cut at {cut}");
        }
        let mut trailing = list.clone();
        trailing.push(0);
        assert!(parse_sct_list(&trailing).is_none());
        let mut v2 = list.clone();
        v2[4] = 1;
        assert!(parse_sct_list(&v2).is_none());
    }

    #[test]
    fn trust_root_parser_refuses_wrong_shapes() {
        for bad in [
            &b"{}"[..],
            b"[]",
            br#"{"mediaType":"application/json"}"#,
            br#"{"mediaType":"application/vnd.dev.sigstore.clienttrustconfig.v0.1+json"}"#,
            br#"{"mediaType":"application/vnd.dev.sigstore.trustedroot+json;version=0.1"}"#,
        ] {
            assert!(TrustedRoot::parse(bad).is_err());
        }
    }

    const PRODUCTION_ROOT: &[u8] =
        include_bytes!("../../tests/fixtures/sigstore/production-trusted_root.json");
    /// A genuine checkpoint of the public-good Rekor v2 shard (provenance in
    /// tests/fixtures/sigstore/README.md).
    const V2_CHECKPOINT: &str =
        include_str!("../../tests/fixtures/sigstore/log2025-1-checkpoint-34356369");
    const V2_ORIGIN: &str = "log2025-1.rekor.sigstore.dev";

    fn v2_proof(note: &str) -> crate::oms::bundle::InclusionProof {
        let mut lines = note.lines().skip(1);
        let tree_size = lines.next().unwrap().parse().unwrap();
        let root = b64("root", lines.next().unwrap()).unwrap();
        crate::oms::bundle::InclusionProof {
            log_index: 0,
            root_hash: root.try_into().unwrap(),
            tree_size,
            hashes: vec![],
            checkpoint: note.to_string(),
        }
    }

    #[test]
    fn genuine_rekor_v2_checkpoint_verifies_under_the_production_root() {
        let root = TrustedRoot::parse(PRODUCTION_ROOT).unwrap();
        let log = root
            .tlogs
            .iter()
            .find(|l| l.url == format!("https://{V2_ORIGIN}"))
            .unwrap();
        let Some(LogVerifier::Ed25519(key)) = &log.key else {
            panic!("the v2 shard's key is not read as Ed25519: {:?}", log.key);
        };
        // The trust root's log id is the signed-note key id of the name.
        assert_eq!(note_key_id(V2_ORIGIN, key)[..], log.key_id[..]);
        assert_ne!(note_key_id("rekor.sigstore.dev", key)[..], log.key_id[..]);
        let key = log.key.as_ref().unwrap();
        let proof = v2_proof(V2_CHECKPOINT);
        verify_checkpoint(V2_CHECKPOINT, &log.key_id, key, &proof).unwrap();

        // Every byte of the note matters (those that keep it UTF-8).
        let mut refused = 0;
        for at in 0..V2_CHECKPOINT.len() {
            let mut bytes = V2_CHECKPOINT.as_bytes().to_vec();
            bytes[at] ^= 0x01;
            let Ok(note) = String::from_utf8(bytes) else {
                continue;
            };
            assert!(
                verify_checkpoint(&note, &log.key_id, key, &proof).is_err(),
                "byte {at} flipped: accepted"
            );
            refused += 1;
        }
        assert!(refused > 200, "{refused}");
        // The same signature under another signer name, or checked against
        // the v1 log's id (another key hash), is refused.
        let renamed = V2_CHECKPOINT.replace(
            &format!("\u{2014} {V2_ORIGIN} "),
            "\u{2014} rekor.sigstore.dev ",
        );
        assert!(verify_checkpoint(&renamed, &log.key_id, key, &proof).is_err());
        let v1 = &root.tlogs[0];
        assert!(verify_checkpoint(V2_CHECKPOINT, &v1.key_id, key, &proof).is_err());
        // A first line with the key hint decides: one under another name
        // before the good one refuses.
        let (text, line) = V2_CHECKPOINT.split_once("\n\n").unwrap();
        let other_name = line.replace(V2_ORIGIN, "witness.example");
        let padded = format!("{text}\n\n{other_name}{line}");
        assert!(verify_checkpoint(&padded, &log.key_id, key, &proof).is_err());
        let after = format!("{text}\n\n{line}{other_name}");
        verify_checkpoint(&after, &log.key_id, key, &proof).unwrap();
        // The tree size in plain decimal only.
        for size in ["+34356369", "034356369"] {
            let odd = V2_CHECKPOINT.replace("\n34356369\n", &format!("\n{size}\n"));
            assert!(
                verify_checkpoint(&odd, &log.key_id, key, &proof).is_err(),
                "{size}"
            );
        }
        // A different tree size or root than the proof's.
        let mut other = v2_proof(V2_CHECKPOINT);
        other.tree_size += 1;
        assert!(verify_checkpoint(V2_CHECKPOINT, &log.key_id, key, &other).is_err());
    }

    const GENUINE: &[u8] = include_bytes!("../../tests/fixtures/sigstore/v1.1.0-sigstore.sig");

    /// The genuine bundle, its leaf certificate, and the Fulcio
    /// intermediate that issued it.
    fn genuine() -> (Bundle, Vec<u8>, Certificate) {
        let bundle = Bundle::parse(GENUINE).unwrap();
        let super::super::bundle::Material::Keyless { certificate, .. } = &bundle.material else {
            panic!("keyless");
        };
        let certificate = certificate.clone();
        let root: serde_json::Value = serde_json::from_slice(PRODUCTION_ROOT).unwrap();
        let leaf = cert::parse(&certificate).unwrap();
        let issuer = root["certificateAuthorities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ca| {
                let der = b64(
                    "ca",
                    ca["certChain"]["certificates"][0]["rawBytes"]
                        .as_str()
                        .unwrap(),
                );
                cert::parse(&der.unwrap()).unwrap()
            })
            .find(|c| cert::signed_by(&leaf, c))
            .unwrap();
        (bundle, certificate, issuer)
    }

    /// A Rekor v2 entry for the genuine envelope with `body` (no proof:
    /// the body check alone).
    fn v2_entry(body: &serde_json::Value) -> TlogEntry {
        TlogEntry {
            log_index: 0,
            key_id: vec![0; 32],
            kind: "hashedrekord".into(),
            version: "0.0.2".into(),
            integrated_time: None,
            signed_entry_timestamp: None,
            inclusion_proof: None,
            body: serde_json::to_vec(body).unwrap(),
        }
    }

    #[test]
    fn rekor_v2_body_must_be_about_this_envelope_and_certificate() {
        use base64::engine::general_purpose::STANDARD;
        let (bundle, certificate, issuer) = genuine();
        let message = super::super::bundle::pae(&bundle.payload_type, &bundle.payload);
        let good = serde_json::json!({
            "kind": "hashedrekord",
            "apiVersion": "0.0.2",
            "spec": {"hashedRekordV002": {
                "data": {"algorithm": "SHA2_256", "digest": STANDARD.encode(Sha256::digest(&message))},
                "signature": {
                    "content": STANDARD.encode(&bundle.signature),
                    "verifier": {
                        "x509Certificate": {"rawBytes": STANDARD.encode(&certificate)},
                        "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                    },
                },
            }},
        });
        let check = |body: &serde_json::Value| {
            check_hashedrekord_body(&v2_entry(body), &bundle, &certificate, &message)
        };
        check(&good).unwrap();
        let spec = "/spec/hashedRekordV002";
        let issuer_der = issuer.to_der().unwrap();
        type Edit = Box<dyn Fn(&mut serde_json::Value)>;
        let set = |pointer: &str, value: serde_json::Value| -> Edit {
            let pointer = format!("{spec}{pointer}");
            Box::new(move |b| *b.pointer_mut(&pointer).unwrap() = value.clone())
        };
        let verifier = format!("{spec}/signature/verifier");
        let cases: Vec<(&str, Edit)> = vec![
            ("kind", Box::new(|b| b["kind"] = "dsse".into())),
            (
                "api version",
                Box::new(|b| b["apiVersion"] = "0.0.1".into()),
            ),
            (
                "no hashedRekordV002",
                Box::new(|b| {
                    let v = b["spec"]["hashedRekordV002"].take();
                    b["spec"] = serde_json::json!({ "dsseV002": v });
                }),
            ),
            (
                "digest algorithm label",
                set("/data/algorithm", "SHA2_384".into()),
            ),
            (
                "digest of other bytes",
                set("/data/digest", STANDARD.encode([0u8; 32]).into()),
            ),
            (
                "another signature",
                set("/signature/content", STANDARD.encode([1u8; 70]).into()),
            ),
            (
                "key details",
                set(
                    "/signature/verifier/keyDetails",
                    "PKIX_ECDSA_P384_SHA_384".into(),
                ),
            ),
            (
                "another certificate",
                set(
                    "/signature/verifier/x509Certificate/rawBytes",
                    STANDARD.encode(&issuer_der).into(),
                ),
            ),
            (
                "a public key beside the certificate",
                Box::new({
                    let verifier = verifier.clone();
                    move |b| {
                        b.pointer_mut(&verifier).unwrap()["publicKey"] =
                            serde_json::json!({"rawBytes": "AAAA"});
                    }
                }),
            ),
            (
                "a public key instead of the certificate",
                Box::new(move |b| {
                    let v = b.pointer_mut(&verifier).unwrap();
                    v.as_object_mut().unwrap().remove("x509Certificate");
                    v["publicKey"] = serde_json::json!({"rawBytes": "AAAA"});
                }),
            ),
        ];
        for (what, edit) in cases {
            let mut body = good.clone();
            edit(&mut body);
            assert!(check(&body).is_err(), "{what}: accepted");
        }
    }

    #[test]
    fn certificate_links_take_no_unsigned_algorithm_changes() {
        let (_, certificate, issuer) = genuine();
        let leaf = cert::parse(&certificate).unwrap();
        assert!(cert::signed_by(&leaf, &issuer));
        // NULL parameters are allowed, anything else is not; the outer
        // algorithm must be the signed one.
        let mut outer_null = leaf.clone();
        outer_null.signature_algorithm.parameters = Some(der::Any::null());
        assert!(!cert::signed_by(&outer_null, &issuer));
        let mut outer_other = leaf.clone();
        outer_other.signature_algorithm.oid = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
        assert!(!cert::signed_by(&outer_other, &issuer));
        let mut octets = leaf.clone();
        octets.signature_algorithm.parameters =
            Some(der::Any::new(der::Tag::OctetString, Vec::<u8>::new()).unwrap());
        octets.tbs_certificate.signature.parameters = octets.signature_algorithm.parameters.clone();
        assert!(!cert::signed_by(&octets, &issuer));
    }

    #[test]
    fn ed25519_log_keys_must_be_ed25519() {
        let mut root: serde_json::Value = serde_json::from_slice(PRODUCTION_ROOT).unwrap();
        // The v1 log's ECDSA key labelled PKIX_ED25519.
        let ecdsa = root["tlogs"][0]["publicKey"]["rawBytes"].clone();
        root["tlogs"][1]["publicKey"]["rawBytes"] = ecdsa;
        let err = TrustedRoot::parse(&serde_json::to_vec(&root).unwrap()).unwrap_err();
        assert!(err.contains("not an Ed25519 key"), "{err}");
    }

    #[test]
    fn windows_are_inclusive_and_open_ended() {
        let w = Window {
            start: Some(epoch(10)),
            end: None,
        };
        assert!(!w.covers(epoch(9)));
        assert!(w.covers(epoch(10)));
        assert!(w.covers(epoch(u32::MAX as u64)));
        let w = Window {
            start: None,
            end: Some(epoch(10)),
        };
        assert!(w.covers(epoch(10)));
        assert!(!w.covers(epoch(11)));
    }
}
