//! Intel TDX quotes: parsing and signature-chain verification, the `tdx`
//! TEE evidence kind and its policy.
//!
//! On a TDX guest ccnoded asks configfs-tsm for a quote
//! (`/sys/kernel/config/tsm/report`: 64 bytes of REPORTDATA to `inblob`,
//! the quote from `outblob`); REPORTDATA is the evidence binding followed by
//! 32 zero bytes ([`report_data_for`]). The evidence document is
//! `{"quote": base64}` ([`TdxEvidence`]).
//!
//! # Format (Intel DCAP quote version 4, TDX)
//!
//! All integers little-endian.
//!
//! ```text
//! header (48)      version u16 = 4, attestation key type u16 = 2
//!                  (ECDSA-256-with-P-256), tee type u32 = 0x81 (TDX),
//!                  QE SVN u16, PCE SVN u16, QE vendor id [16] (Intel's),
//!                  user data [20]
//! TD report (584)  TEE_TCB_SVN[16] MRSEAM[48] MRSIGNERSEAM[48]
//!                  SEAMATTRIBUTES[8] TDATTRIBUTES[8] XFAM[8] MRTD[48]
//!                  MRCONFIGID[48] MROWNER[48] MROWNERCONFIG[48]
//!                  RTMR0..3[4 x 48] REPORTDATA[64]
//! u32              signature data length
//! signature data   quote signature [64] (r || s, big-endian), over
//!                  SHA-256(header || TD report), by the attestation key;
//!                  attestation key [64] (x || y);
//!                  certification data: type u16 = 6, length u32, then
//!                    QE report [384] (an SGX report body; REPORTDATA at
//!                    offset 320), QE report signature [64] (by the PCK
//!                    key), QE auth data (u16 length + bytes), and nested
//!                    certification data: type u16 = 5, length u32, the
//!                    PCK certificate chain as PEM (leaf, PCK Platform or
//!                    Processor CA, Intel SGX Root CA; NUL padding allowed
//!                    at its end)
//! ```
//!
//! Bytes after the signature data must be zero (quote buffers come padded;
//! the published sample this module is tested on has 70 zero bytes there).
//! Every length is checked against what it covers, the whole quote is
//! bounded by [`MAX_QUOTE`], and anything else (another version, key type,
//! TEE type, QE vendor or certification data type) is refused. Version 5
//! quotes (TDX 1.5 body descriptors) are refused: not implemented.
//!
//! Sources for the layout: Intel, "Intel TDX DCAP Quote Generation Library
//! and Quote Verification Library" (quote format version 4), as implemented
//! in `Phala-Network/dcap-qvl` `src/quote.rs` (`Header`, `TDReport10`,
//! `EnclaveReport`, `QEReportCertificationData`, `AuthDataV4`); every
//! offset checked byte for byte against the genuine quote in
//! `attest/tests/fixtures/tdx/` (see its README.md).
//!
//! # What verification checks
//!
//! 1. The quote signature (ECDSA P-256, SHA-256) over header || TD report,
//!    with the attestation key in the quote.
//! 2. QE report REPORTDATA = SHA-256(attestation key || QE auth data) || 32
//!    zero bytes: the quoting enclave vouches for the attestation key.
//! 3. The QE report signature, with the PCK leaf certificate's key.
//! 4. The PCK chain: exactly a leaf ("Intel SGX PCK Certificate") and its
//!    CA ("Intel SGX PCK Platform CA" or "... Processor CA") below the root;
//!    each signed by its issuer (ECDSA P-256 SHA-256), issuer and subject
//!    names linked, every certificate (root included) valid at `now`,
//!    issuers CAs with keyCertSign, the leaf with digitalSignature, no
//!    unknown critical extension, and the top issuer the pinned
//!    [`INTEL_SGX_ROOT_CA_PEM`].
//! 5. The QE report is Intel's TD QE: MRSIGNER [`TD_QE_MRSIGNER`], ISVPRODID
//!    [`TD_QE_ISVPRODID`], MISCSELECT and ATTRIBUTES under Intel's masks
//!    (DEBUG clear), and ISVSVN at least the policy's `min_qe_isvsvn`
//!    (default [`DEFAULT_MIN_QE_ISVSVN`]). Without this, a PCK-certified
//!    debug QE, whose key the host can read, could sign any TD report.
//!
//! # What it does NOT check
//!
//! TCB status and revocation are not checked: no TCB info, no PCK or root
//! CRLs (Intel's collateral from the PCS). A quote from a platform whose TCB
//! is out of date, or whose PCK certificate was revoked, verifies here. The
//! QE identity is checked against values pinned here from Intel's `TD_QE`
//! identity (see below), not against a signed QE identity document. The
//! policy ([`TdxPolicy`]) decides on the TD's measurements and the QE's
//! ISVSVN.

use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::Engine as _;
use const_oid::db::rfc5280::{ID_CE_BASIC_CONSTRAINTS, ID_CE_KEY_USAGE};
use const_oid::db::rfc5912::{ECDSA_WITH_SHA_256, ID_EC_PUBLIC_KEY, SECP_256_R_1};
use der::{Decode, Encode};
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage};
use x509_cert::Certificate;

/// The TEE kind of TDX evidence (`tee.kind`).
pub const KIND: &str = "tdx";
/// Largest quote accepted (bytes).
pub const MAX_QUOTE: usize = 64 * 1024;
/// Largest base64 quote string accepted in evidence.
pub const MAX_QUOTE_BASE64: usize = MAX_QUOTE.div_ceil(3) * 4;
/// Most certificates in the PCK chain.
pub const MAX_PCK_CHAIN: usize = 4;
/// Most entries in a policy list.
pub const MAX_POLICY_ITEMS: usize = 256;
/// The quote header's length.
pub const HEADER_LEN: usize = 48;
/// The TD report body's length (TDX 1.0).
pub const TD_REPORT_LEN: usize = 584;
/// The QE report's length (an SGX report body).
pub const QE_REPORT_LEN: usize = 384;
/// The quote version parsed.
pub const QUOTE_VERSION: u16 = 4;
/// Attestation key type ECDSA-256-with-P-256.
pub const ATT_KEY_ECDSA_P256: u16 = 2;
/// TEE type TDX.
pub const TEE_TYPE_TDX: u32 = 0x81;
/// Intel's QE vendor id.
pub const INTEL_QE_VENDOR_ID: [u8; 16] = [
    0x93, 0x9a, 0x72, 0x33, 0xf7, 0x9c, 0x4c, 0xa9, 0x94, 0x0a, 0x0d, 0xb3, 0x95, 0x7f, 0x06, 0x07,
];
/// Certification data type: QE report certification data.
pub const CERT_TYPE_QE_REPORT: u16 = 6;
/// Certification data type: PCK certificate chain (PEM).
pub const CERT_TYPE_PCK_CHAIN: u16 = 5;
/// TDATTRIBUTES bit 0: the TD is debuggable (its memory is not private).
pub const TD_ATTRIBUTE_DEBUG: u64 = 1;

/// Intel's TD quoting enclave, as Intel's `TD_QE` identity (version 2,
/// from the PCS `tdx/certification/v4/qe/identity`) describes it: the
/// enclave signer, the product id, the expected MISCSELECT and ATTRIBUTES
/// under their masks. The attributes mask covers DEBUG (bit 1), so a
/// debug-mode QE, whose attestation key the host can read, is refused.
pub const TD_QE_MRSIGNER: [u8; 32] = [
    0xdc, 0x9e, 0x2a, 0x7c, 0x6f, 0x94, 0x8f, 0x17, 0x47, 0x4e, 0x34, 0xa7, 0xfc, 0x43, 0xed, 0x03,
    0x0f, 0x7c, 0x15, 0x63, 0xf1, 0xba, 0xbd, 0xdf, 0x63, 0x40, 0xc8, 0x2e, 0x0e, 0x54, 0xa8, 0xc5,
];
/// The TD QE's ISVPRODID.
pub const TD_QE_ISVPRODID: u16 = 2;
const TD_QE_MISCSELECT: [u8; 4] = [0; 4];
const TD_QE_MISCSELECT_MASK: [u8; 4] = [0xff; 4];
const TD_QE_ATTRIBUTES: [u8; 16] = [0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const TD_QE_ATTRIBUTES_MASK: [u8; 16] = [
    0xfb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0,
];
/// The lowest TD QE ISVSVN accepted when the policy names none: the
/// `UpToDate` level of Intel's `TD_QE` identity (tcbEvaluationDataNumber
/// 14 to 18).
pub const DEFAULT_MIN_QE_ISVSVN: u16 = 4;

/// The Intel SGX Root CA (CN=Intel SGX Root CA, O=Intel Corporation,
/// L=Santa Clara, ST=CA, C=US; serial 22650cd65a9d3489f383b49552bf501b392706ac;
/// valid 2018-05-21 to 2049-12-31), the anchor of every PCK chain.
/// SHA-256 of its DER: 44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3.
/// Public key (P-256) x = 0ba9c4c0c0c86193a3fe23d6b02cda10a8bbd4e88e48b4458561a36e705525f5,
/// y = 67918e2edc88e40d860bd0cc4ee26aacc988e505a953558c453f6b0904ae7394.
/// Byte-identical to the root in the genuine fixture's chain and to a copy
/// published independently in another public verifier (compared with
/// openssl); Intel serves it as `IntelSGXRootCA.der` from
/// certificates.trustedservices.intel.com.
pub const INTEL_SGX_ROOT_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIICjzCCAjSgAwIBAgIUImUM1lqdNInzg7SVUr9QGzknBqwwCgYIKoZIzj0EAwIw
aDEaMBgGA1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENv
cnBvcmF0aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJ
BgNVBAYTAlVTMB4XDTE4MDUyMTEwNDUxMFoXDTQ5MTIzMTIzNTk1OVowaDEaMBgG
A1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENvcnBvcmF0
aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJBgNVBAYT
AlVTMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEC6nEwMDIYZOj/iPWsCzaEKi7
1OiOSLRFhWGjbnBVJfVnkY4u3IjkDYYL0MxO4mqsyYjlBalTVYxFP2sJBK5zlKOB
uzCBuDAfBgNVHSMEGDAWgBQiZQzWWp00ifODtJVSv1AbOScGrDBSBgNVHR8ESzBJ
MEegRaBDhkFodHRwczovL2NlcnRpZmljYXRlcy50cnVzdGVkc2VydmljZXMuaW50
ZWwuY29tL0ludGVsU0dYUm9vdENBLmRlcjAdBgNVHQ4EFgQUImUM1lqdNInzg7SV
Ur9QGzknBqwwDgYDVR0PAQH/BAQDAgEGMBIGA1UdEwEB/wQIMAYBAf8CAQEwCgYI
KoZIzj0EAwIDSQAwRgIhAOW/5QkR+S9CiSDcNoowLuPRLsWGf/Yi7GSX94BgwTwg
AiEA4J0lrHoMs+Xo5o/sX6O9QWxHRAvZUGOdRQ7cvqRXaqI=
-----END CERTIFICATE-----
";

/// SHA-256 of the DER of [`INTEL_SGX_ROOT_CA_PEM`], checked on every use.
pub const INTEL_SGX_ROOT_CA_SHA256: &str =
    "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const LEAF_CN: &str = "Intel SGX PCK Certificate";
const CA_CNS: [&str; 2] = ["Intel SGX PCK Platform CA", "Intel SGX PCK Processor CA"];

/// Why a quote or TDX evidence is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TdxError {
    #[error("quote of {0} bytes exceeds the limit of {MAX_QUOTE}")]
    TooLarge(usize),
    #[error("quote truncated in {0}")]
    Truncated(&'static str),
    #[error("quote version {0} is not supported (only {QUOTE_VERSION})")]
    Version(u16),
    #[error("attestation key type {0} is not ecdsa p-256 ({ATT_KEY_ECDSA_P256})")]
    KeyType(u16),
    #[error("tee type {0:#x} is not tdx ({TEE_TYPE_TDX:#x})")]
    TeeType(u32),
    #[error("qe vendor id {0} is not intel's")]
    QeVendor(String),
    #[error("certification data type {found} is not supported here (expected {expected})")]
    CertDataType { found: u16, expected: u16 },
    #[error("{0} length does not match its contents")]
    Length(&'static str),
    #[error("non-zero bytes after the signature data")]
    TrailingData,
    #[error("pck certificate chain: {0}")]
    Pem(String),
    #[error("{0} is not a valid p-256 public key")]
    BadKey(&'static str),
    #[error("{0} is not a valid ecdsa signature encoding")]
    BadSignature(&'static str),
    #[error("quote signature does not verify with the attestation key")]
    QuoteSignature,
    #[error("qe report data is not sha256(attestation key || qe auth data) followed by zeros")]
    QeReportData,
    #[error("qe report signature does not verify with the pck certificate key")]
    QeReportSignature,
    #[error("the quoting enclave is not intel's td qe: {0}")]
    QeIdentity(String),
    #[error("pck chain refused: {0}")]
    Chain(String),
    #[error("malformed tdx evidence: {0}")]
    Evidence(String),
    #[error("tdx policy: {0}")]
    Policy(String),
}

/// The quote header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteHeader {
    pub version: u16,
    pub attestation_key_type: u16,
    pub tee_type: u32,
    pub qe_svn: u16,
    pub pce_svn: u16,
    pub qe_vendor_id: [u8; 16],
    pub user_data: [u8; 20],
}

/// The TD report body (TDX 1.0, 584 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdReport {
    pub tee_tcb_svn: [u8; 16],
    pub mrseam: [u8; 48],
    pub mrsignerseam: [u8; 48],
    pub seam_attributes: [u8; 8],
    pub td_attributes: [u8; 8],
    pub xfam: [u8; 8],
    pub mrtd: [u8; 48],
    pub mrconfigid: [u8; 48],
    pub mrowner: [u8; 48],
    pub mrownerconfig: [u8; 48],
    pub rtmr: [[u8; 48]; 4],
    pub report_data: [u8; 64],
}

impl TdReport {
    /// TDATTRIBUTES as a little-endian integer.
    pub fn td_attributes_u64(&self) -> u64 {
        u64::from_le_bytes(self.td_attributes)
    }

    /// Whether the TD is debuggable (TDATTRIBUTES bit 0).
    pub fn debug(&self) -> bool {
        self.td_attributes_u64() & TD_ATTRIBUTE_DEBUG != 0
    }
}

/// A parsed (not yet verified) quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdxQuote {
    pub header: QuoteHeader,
    pub report: TdReport,
    /// header || TD report: the bytes the quote signature covers.
    pub signed: Vec<u8>,
    /// r || s.
    pub signature: [u8; 64],
    /// x || y.
    pub attestation_key: [u8; 64],
    pub qe_report: [u8; QE_REPORT_LEN],
    /// r || s.
    pub qe_report_signature: [u8; 64],
    pub qe_auth_data: Vec<u8>,
    /// The PCK chain as carried, leaf first.
    pub pck_chain: Vec<Certificate>,
}

/// A quote whose signature chain verified to the pinned Intel root. TCB
/// status and revocation were NOT checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedTdx {
    pub header: QuoteHeader,
    /// The TD's measurements and attributes.
    pub report: TdReport,
    /// The PCK leaf certificate's subject and serial (hex), for the record.
    pub pck_subject: String,
    pub pck_serial: String,
    /// The quoting enclave's ISVSVN (its identity was checked against
    /// Intel's TD QE).
    pub qe_isvsvn: u16,
}

impl VerifiedTdx {
    /// A one-line summary of the measurements.
    pub fn summary(&self) -> String {
        let r = &self.report;
        format!(
            "mrtd={} rtmr0={} rtmr1={} rtmr2={} rtmr3={} mrseam={} td_attributes={} xfam={} tee_tcb_svn={} qe_isvsvn={}",
            hex::encode(r.mrtd),
            hex::encode(r.rtmr[0]),
            hex::encode(r.rtmr[1]),
            hex::encode(r.rtmr[2]),
            hex::encode(r.rtmr[3]),
            hex::encode(r.mrseam),
            hex::encode(r.td_attributes),
            hex::encode(r.xfam),
            hex::encode(r.tee_tcb_svn),
            self.qe_isvsvn,
        )
    }
}

/// The REPORTDATA ccnoded asks for: the binding, then 32 zero bytes.
pub fn report_data_for(binding: &[u8; 32]) -> [u8; 64] {
    let mut rd = [0u8; 64];
    rd[..32].copy_from_slice(binding);
    rd
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], TdxError> {
        if n > self.buf.len() {
            return Err(TdxError::Truncated(self.what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], TdxError> {
        self.take(N)?
            .try_into()
            .map_err(|_| TdxError::Truncated(self.what))
    }

    fn u16(&mut self) -> Result<u16, TdxError> {
        self.array::<2>().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, TdxError> {
        self.array::<4>().map(u32::from_le_bytes)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

fn parse_header(b: &[u8]) -> Result<QuoteHeader, TdxError> {
    let mut r = Reader::new(b, "header");
    let h = QuoteHeader {
        version: r.u16()?,
        attestation_key_type: r.u16()?,
        tee_type: r.u32()?,
        qe_svn: r.u16()?,
        pce_svn: r.u16()?,
        qe_vendor_id: r.array()?,
        user_data: r.array()?,
    };
    if h.version != QUOTE_VERSION {
        return Err(TdxError::Version(h.version));
    }
    if h.attestation_key_type != ATT_KEY_ECDSA_P256 {
        return Err(TdxError::KeyType(h.attestation_key_type));
    }
    if h.tee_type != TEE_TYPE_TDX {
        return Err(TdxError::TeeType(h.tee_type));
    }
    if h.qe_vendor_id != INTEL_QE_VENDOR_ID {
        return Err(TdxError::QeVendor(hex::encode(h.qe_vendor_id)));
    }
    Ok(h)
}

fn parse_report(b: &[u8]) -> Result<TdReport, TdxError> {
    let mut r = Reader::new(b, "td report");
    Ok(TdReport {
        tee_tcb_svn: r.array()?,
        mrseam: r.array()?,
        mrsignerseam: r.array()?,
        seam_attributes: r.array()?,
        td_attributes: r.array()?,
        xfam: r.array()?,
        mrtd: r.array()?,
        mrconfigid: r.array()?,
        mrowner: r.array()?,
        mrownerconfig: r.array()?,
        rtmr: [r.array()?, r.array()?, r.array()?, r.array()?],
        report_data: r.array()?,
    })
}

/// Parses the PEM chain of certification data type 5: PEM certificates,
/// whitespace between them, NUL padding at the end; nothing else.
fn parse_pem_chain(data: &[u8]) -> Result<Vec<Certificate>, TdxError> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let end_of_text = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let text = data
        .get(..end_of_text)
        .and_then(|t| std::str::from_utf8(t).ok())
        .ok_or_else(|| TdxError::Pem("not utf-8 text".into()))?;
    let mut rest = text.trim_start();
    let mut certs = Vec::new();
    while !rest.is_empty() {
        if !rest.starts_with(BEGIN) {
            return Err(TdxError::Pem("text outside a pem certificate".into()));
        }
        let end = rest
            .find(END)
            .map(|i| i + END.len())
            .ok_or_else(|| TdxError::Pem("unterminated pem certificate".into()))?;
        let (block, tail) = rest.split_at(end);
        let (label, der) =
            der::pem::decode_vec(block.as_bytes()).map_err(|e| TdxError::Pem(e.to_string()))?;
        if label != "CERTIFICATE" {
            return Err(TdxError::Pem(format!("pem label {label:?}")));
        }
        if certs.len() == MAX_PCK_CHAIN {
            return Err(TdxError::Pem(format!(
                "more than {MAX_PCK_CHAIN} certificates"
            )));
        }
        certs.push(Certificate::from_der(&der).map_err(|e| TdxError::Pem(e.to_string()))?);
        rest = tail.trim_start();
    }
    if certs.is_empty() {
        return Err(TdxError::Pem("no certificate".into()));
    }
    Ok(certs)
}

/// Parses a TDX quote (version 4, ECDSA P-256, Intel QE, certification data
/// type 6 with a nested PCK chain). Bounded by [`MAX_QUOTE`]; strict: every
/// length must match what it covers. Verifies nothing.
pub fn parse_quote(bytes: &[u8]) -> Result<TdxQuote, TdxError> {
    if bytes.len() > MAX_QUOTE {
        return Err(TdxError::TooLarge(bytes.len()));
    }
    let mut r = Reader::new(bytes, "header");
    let header = parse_header(r.take(HEADER_LEN)?)?;
    r.what = "td report";
    let report = parse_report(r.take(TD_REPORT_LEN)?)?;
    let signed = bytes
        .get(..HEADER_LEN + TD_REPORT_LEN)
        .ok_or(TdxError::Truncated("td report"))?
        .to_vec();
    r.what = "signature data length";
    let sig_len = r.u32()? as usize;
    r.what = "signature data";
    let sig_data = r.take(sig_len)?;
    if r.rest().iter().any(|&b| b != 0) {
        return Err(TdxError::TrailingData);
    }

    let mut s = Reader::new(sig_data, "signature data");
    let signature = s.array::<64>()?;
    let attestation_key = s.array::<64>()?;
    s.what = "certification data";
    let cert_type = s.u16()?;
    if cert_type != CERT_TYPE_QE_REPORT {
        return Err(TdxError::CertDataType {
            found: cert_type,
            expected: CERT_TYPE_QE_REPORT,
        });
    }
    let cert_len = s.u32()? as usize;
    let cert_data = s.take(cert_len)?;
    if !s.rest().is_empty() {
        return Err(TdxError::Length("signature data"));
    }

    let mut c = Reader::new(cert_data, "qe report certification data");
    let qe_report = c.array::<QE_REPORT_LEN>()?;
    let qe_report_signature = c.array::<64>()?;
    let auth_len = c.u16()? as usize;
    let qe_auth_data = c.take(auth_len)?.to_vec();
    c.what = "pck certification data";
    let nested_type = c.u16()?;
    if nested_type != CERT_TYPE_PCK_CHAIN {
        return Err(TdxError::CertDataType {
            found: nested_type,
            expected: CERT_TYPE_PCK_CHAIN,
        });
    }
    let nested_len = c.u32()? as usize;
    let pem = c.take(nested_len)?;
    if !c.rest().is_empty() {
        return Err(TdxError::Length("qe report certification data"));
    }
    let pck_chain = parse_pem_chain(pem)?;

    Ok(TdxQuote {
        header,
        report,
        signed,
        signature,
        attestation_key,
        qe_report,
        qe_report_signature,
        qe_auth_data,
        pck_chain,
    })
}

fn raw_key(xy: &[u8; 64], what: &'static str) -> Result<VerifyingKey, TdxError> {
    let mut sec1 = [0u8; 65];
    sec1[0] = 0x04;
    sec1[1..].copy_from_slice(xy);
    VerifyingKey::from_sec1_bytes(&sec1).map_err(|_| TdxError::BadKey(what))
}

fn raw_signature(rs: &[u8; 64], what: &'static str) -> Result<Signature, TdxError> {
    Signature::from_slice(rs).map_err(|_| TdxError::BadSignature(what))
}

/// The pinned Intel SGX Root CA, parsed (and its fingerprint checked).
pub fn intel_sgx_root_ca() -> Result<Certificate, TdxError> {
    let bad = |m: &str| TdxError::Chain(format!("pinned root: {m}"));
    let (_, der) =
        der::pem::decode_vec(INTEL_SGX_ROOT_CA_PEM.as_bytes()).map_err(|_| bad("pem"))?;
    if hex::encode(Sha256::digest(&der)) != INTEL_SGX_ROOT_CA_SHA256 {
        return Err(bad("fingerprint mismatch"));
    }
    Certificate::from_der(&der).map_err(|_| bad("der"))
}

fn chain_err(m: impl Into<String>) -> TdxError {
    TdxError::Chain(m.into())
}

fn common_name(cert: &Certificate) -> Option<String> {
    let mut found = None;
    for rdn in cert.tbs_certificate.subject.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid == const_oid::db::rfc4519::CN {
                let s = atv
                    .value
                    .decode_as::<der::asn1::Utf8StringRef<'_>>()
                    .map(|s| s.to_string())
                    .or_else(|_| {
                        atv.value
                            .decode_as::<der::asn1::PrintableStringRef<'_>>()
                            .map(|s| s.to_string())
                    })
                    .ok()?;
                if found.is_some() {
                    return None;
                }
                found = Some(s);
            }
        }
    }
    found
}

fn p256_key_of(cert: &Certificate) -> Result<VerifyingKey, TdxError> {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let subject = cert.tbs_certificate.subject.to_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<der::asn1::ObjectIdentifier>().ok());
    if spki.algorithm.oid != ID_EC_PUBLIC_KEY || curve != Some(SECP_256_R_1) {
        return Err(chain_err(format!("{subject}: key is not p-256")));
    }
    let bytes = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| chain_err(format!("{subject}: malformed key")))?;
    VerifyingKey::from_sec1_bytes(bytes).map_err(|_| chain_err(format!("{subject}: malformed key")))
}

fn check_signed_by(child: &Certificate, issuer: &Certificate) -> Result<(), TdxError> {
    let subject = child.tbs_certificate.subject.to_string();
    if child.tbs_certificate.issuer != issuer.tbs_certificate.subject {
        return Err(chain_err(format!(
            "{subject} is issued by {}, not {}",
            child.tbs_certificate.issuer, issuer.tbs_certificate.subject
        )));
    }
    let alg = &child.signature_algorithm;
    if alg.oid != ECDSA_WITH_SHA_256
        || alg.parameters.is_some()
        || *alg != child.tbs_certificate.signature
    {
        return Err(chain_err(format!(
            "{subject}: signature is not ecdsa-with-sha256"
        )));
    }
    let key = p256_key_of(issuer)?;
    let sig = child
        .signature
        .as_bytes()
        .and_then(|d| Signature::from_der(d).ok())
        .ok_or_else(|| chain_err(format!("{subject}: malformed signature")))?;
    let tbs = child
        .tbs_certificate
        .to_der()
        .map_err(|e| chain_err(format!("{subject}: {e}")))?;
    key.verify(&tbs, &sig).map_err(|_| {
        chain_err(format!(
            "{subject}: signature does not verify with the key of {}",
            issuer.tbs_certificate.subject
        ))
    })
}

fn check_validity(cert: &Certificate, now: SystemTime) -> Result<(), TdxError> {
    let v = &cert.tbs_certificate.validity;
    let subject = &cert.tbs_certificate.subject;
    if now < v.not_before.to_system_time() {
        return Err(chain_err(format!(
            "{subject} is not valid until {}",
            v.not_before
        )));
    }
    if now > v.not_after.to_system_time() {
        return Err(chain_err(format!("{subject} expired at {}", v.not_after)));
    }
    Ok(())
}

/// Checks extensions: no unknown critical one, basicConstraints and
/// keyUsage as the certificate's role needs.
fn check_extensions(cert: &Certificate, is_issuer: bool) -> Result<(), TdxError> {
    let subject = cert.tbs_certificate.subject.to_string();
    let exts = cert
        .tbs_certificate
        .extensions
        .as_deref()
        .unwrap_or_default();
    let mut ca = None;
    let mut usage = None;
    for e in exts {
        if e.extn_id == ID_CE_BASIC_CONSTRAINTS {
            let bc = BasicConstraints::from_der(e.extn_value.as_bytes())
                .map_err(|_| chain_err(format!("{subject}: malformed basic constraints")))?;
            if ca.replace(bc.ca).is_some() {
                return Err(chain_err(format!("{subject}: duplicate basic constraints")));
            }
        } else if e.extn_id == ID_CE_KEY_USAGE {
            let ku = KeyUsage::from_der(e.extn_value.as_bytes())
                .map_err(|_| chain_err(format!("{subject}: malformed key usage")))?;
            if usage.replace(ku).is_some() {
                return Err(chain_err(format!("{subject}: duplicate key usage")));
            }
        } else if e.critical {
            return Err(chain_err(format!(
                "{subject}: unknown critical extension {}",
                e.extn_id
            )));
        }
    }
    let usage = usage.ok_or_else(|| chain_err(format!("{subject}: no key usage")))?;
    if is_issuer {
        if ca != Some(true) {
            return Err(chain_err(format!("{subject} is not a ca")));
        }
        if !usage.key_cert_sign() {
            return Err(chain_err(format!("{subject}: key usage lacks keyCertSign")));
        }
    } else {
        if ca == Some(true) {
            return Err(chain_err(format!("{subject}: the pck certificate is a ca")));
        }
        if !usage.digital_signature() {
            return Err(chain_err(format!(
                "{subject}: key usage lacks digitalSignature"
            )));
        }
    }
    Ok(())
}

/// Verifies the PCK chain to `root`; returns the leaf's key.
fn verify_pck_chain(
    chain: &[Certificate],
    root: &Certificate,
    now: SystemTime,
) -> Result<VerifyingKey, TdxError> {
    let root_der = root.to_der().map_err(|e| chain_err(e.to_string()))?;
    let mut below: Vec<&Certificate> = chain.iter().collect();
    if below
        .last()
        .and_then(|c| c.to_der().ok())
        .is_some_and(|d| d == root_der)
    {
        below.pop();
    }
    let [leaf, ca] = below.as_slice() else {
        return Err(chain_err(format!(
            "{} certificates below the root, expected the pck certificate and its ca (or the chain does not end at the pinned intel sgx root ca)",
            below.len()
        )));
    };
    if common_name(leaf).as_deref() != Some(LEAF_CN) {
        return Err(chain_err(format!(
            "leaf {} is not an {LEAF_CN:?}",
            leaf.tbs_certificate.subject
        )));
    }
    if !common_name(ca).is_some_and(|cn| CA_CNS.contains(&cn.as_str())) {
        return Err(chain_err(format!(
            "issuer {} is not a pck platform or processor ca",
            ca.tbs_certificate.subject
        )));
    }
    check_signed_by(leaf, ca)?;
    check_signed_by(ca, root).map_err(|e| {
        chain_err(format!(
            "the chain does not end at the pinned intel sgx root ca ({e})"
        ))
    })?;
    for c in [*leaf, *ca, root] {
        check_validity(c, now)?;
    }
    check_extensions(leaf, false)?;
    check_extensions(ca, true)?;
    check_extensions(root, true)?;
    p256_key_of(leaf)
}

/// Verifies a parsed quote's signature chain to the pinned Intel SGX Root
/// CA at `now` (see the module header for the checks). TCB status and
/// revocation are NOT checked.
pub fn verify_quote(quote: &TdxQuote, now: SystemTime) -> Result<VerifiedTdx, TdxError> {
    verify_quote_with_root(quote, now, &intel_sgx_root_ca()?)
}

/// As [`verify_quote`], with the trust anchor given (tests swap in a root of
/// their own; production code uses [`verify_quote`]).
fn verify_quote_with_root(
    quote: &TdxQuote,
    now: SystemTime,
    root: &Certificate,
) -> Result<VerifiedTdx, TdxError> {
    // (a) The quote signature, by the attestation key.
    let ak = raw_key(&quote.attestation_key, "attestation key")?;
    let sig = raw_signature(&quote.signature, "quote signature")?;
    ak.verify(&quote.signed, &sig)
        .map_err(|_| TdxError::QuoteSignature)?;
    // (b) The QE vouches for the attestation key.
    let mut h = Sha256::new();
    h.update(quote.attestation_key);
    h.update(&quote.qe_auth_data);
    let mut expected = [0u8; 64];
    expected[..32].copy_from_slice(&h.finalize());
    if quote.qe_report.get(320..384) != Some(&expected[..]) {
        return Err(TdxError::QeReportData);
    }
    // (d) The PCK chain to the root.
    let pck = verify_pck_chain(&quote.pck_chain, root, now)?;
    // (c) The QE report, signed by the PCK key.
    let qe_sig = raw_signature(&quote.qe_report_signature, "qe report signature")?;
    pck.verify(&quote.qe_report, &qe_sig)
        .map_err(|_| TdxError::QeReportSignature)?;
    // (e) The signed QE report is Intel's TD QE, not a debug build of it
    // and not another enclave the PCK certified.
    let qe_isvsvn = check_qe_identity(&quote.qe_report)?;
    let leaf = quote.pck_chain.first().ok_or_else(|| chain_err("empty"))?;
    Ok(VerifiedTdx {
        header: quote.header.clone(),
        report: quote.report.clone(),
        pck_subject: leaf.tbs_certificate.subject.to_string(),
        pck_serial: hex::encode(leaf.tbs_certificate.serial_number.as_bytes()),
        qe_isvsvn,
    })
}

/// Compares a QE report (an SGX report body) with Intel's TD QE identity;
/// returns its ISVSVN. Offsets: MISCSELECT 16, ATTRIBUTES 48, MRSIGNER
/// 128, ISVPRODID 256, ISVSVN 258.
fn check_qe_identity(qe: &[u8; QE_REPORT_LEN]) -> Result<u16, TdxError> {
    let masked = |bytes: &[u8], mask: &[u8]| -> Vec<u8> {
        bytes.iter().zip(mask).map(|(b, m)| b & m).collect()
    };
    let refuse = |m: String| Err(TdxError::QeIdentity(m));
    if qe[128..160] != TD_QE_MRSIGNER {
        return refuse(format!("mrsigner {}", hex::encode(&qe[128..160])));
    }
    let prodid = u16::from_le_bytes([qe[256], qe[257]]);
    if prodid != TD_QE_ISVPRODID {
        return refuse(format!("isvprodid {prodid}, not {TD_QE_ISVPRODID}"));
    }
    if masked(&qe[16..20], &TD_QE_MISCSELECT_MASK) != TD_QE_MISCSELECT {
        return refuse(format!("miscselect {}", hex::encode(&qe[16..20])));
    }
    if masked(&qe[48..64], &TD_QE_ATTRIBUTES_MASK) != TD_QE_ATTRIBUTES {
        let debug = if qe[48] & 0x02 != 0 { " (debug)" } else { "" };
        return refuse(format!("attributes {}{debug}", hex::encode(&qe[48..64])));
    }
    Ok(u16::from_le_bytes([qe[258], qe[259]]))
}

/// The `tdx` evidence document (`tee.evidence`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TdxEvidence {
    /// The quote as configfs-tsm returned it, standard base64.
    pub quote: String,
}

impl TdxEvidence {
    /// Evidence carrying `quote`.
    pub fn new(quote: &[u8]) -> TdxEvidence {
        TdxEvidence {
            quote: B64.encode(quote),
        }
    }

    /// The quote bytes (bounded).
    pub fn quote_bytes(&self) -> Result<Vec<u8>, TdxError> {
        if self.quote.len() > MAX_QUOTE_BASE64 {
            return Err(TdxError::TooLarge(self.quote.len() / 4 * 3));
        }
        B64.decode(&self.quote)
            .map_err(|_| TdxError::Evidence("quote is not base64".into()))
    }
}

/// The `[tdx]` table of the verifier policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TdxPolicy {
    /// MRTD values accepted (48 bytes, hex). Empty: every quote is refused.
    #[serde(default)]
    pub allowed_mrtd: Vec<String>,
    /// RTMR index (`"0"`..`"3"`) → the exact value expected (hex).
    #[serde(default)]
    pub expected_rtmr: Option<BTreeMap<String, String>>,
    /// MRCONFIGID values accepted (hex); absent: not checked.
    #[serde(default)]
    pub allowed_mrconfigid: Option<Vec<String>>,
    /// Accept a debuggable TD (TDATTRIBUTES bit 0). Default false.
    #[serde(default)]
    pub allow_debug: bool,
    /// Minimum TEE_TCB_SVN, component-wise (16 bytes, hex); absent: every
    /// quote is refused unless `allow_any_tcb`.
    #[serde(default)]
    pub min_tee_tcb_svn: Option<String>,
    /// Accept any TEE_TCB_SVN when `min_tee_tcb_svn` is unset (a policy
    /// that names no minimum accepts a rollback to any TDX module).
    #[serde(default)]
    pub allow_any_tcb: bool,
    /// MRSEAM values accepted (hex); absent: not checked.
    #[serde(default)]
    pub allowed_mrseam: Option<Vec<String>>,
    /// Lowest quoting-enclave ISVSVN accepted; absent:
    /// [`DEFAULT_MIN_QE_ISVSVN`].
    #[serde(default)]
    pub min_qe_isvsvn: Option<u16>,
}

fn hex_n<const N: usize>(s: &str, what: &str) -> Result<[u8; N], TdxError> {
    hex::decode(s)
        .ok()
        .and_then(|v| <[u8; N]>::try_from(v.as_slice()).ok())
        .ok_or_else(|| TdxError::Policy(format!("{what}: {s:?} is not {N} bytes of hex")))
}

fn hex_list<const N: usize>(list: &[String], what: &str) -> Result<Vec<[u8; N]>, TdxError> {
    if list.len() > MAX_POLICY_ITEMS {
        return Err(TdxError::Policy(format!(
            "{what} has more than {MAX_POLICY_ITEMS} entries"
        )));
    }
    list.iter().map(|s| hex_n::<N>(s, what)).collect()
}

/// A validated [`TdxPolicy`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Checked {
    mrtd: Vec<[u8; 48]>,
    rtmr: BTreeMap<usize, [u8; 48]>,
    mrconfigid: Option<Vec<[u8; 48]>>,
    mrseam: Option<Vec<[u8; 48]>>,
    min_svn: Option<[u8; 16]>,
}

impl TdxPolicy {
    /// Parses a `[tdx]` table's contents (TOML).
    pub fn from_toml(text: &str) -> Result<TdxPolicy, TdxError> {
        let p: TdxPolicy = toml::from_str(text).map_err(|e| TdxError::Policy(e.to_string()))?;
        p.validate()?;
        Ok(p)
    }

    /// Checks every value's form (hex lengths, RTMR indices).
    pub fn validate(&self) -> Result<(), TdxError> {
        self.checked().map(|_| ())
    }

    fn checked(&self) -> Result<Checked, TdxError> {
        let mut rtmr = BTreeMap::new();
        for (k, v) in self.expected_rtmr.iter().flatten() {
            let i: usize = k.parse().ok().filter(|i| *i < 4).ok_or_else(|| {
                TdxError::Policy(format!("expected_rtmr.{k}: not an rtmr index (0..3)"))
            })?;
            rtmr.insert(i, hex_n::<48>(v, &format!("expected_rtmr.{k}"))?);
        }
        Ok(Checked {
            mrtd: hex_list(&self.allowed_mrtd, "allowed_mrtd")?,
            rtmr,
            mrconfigid: self
                .allowed_mrconfigid
                .as_deref()
                .map(|l| hex_list(l, "allowed_mrconfigid"))
                .transpose()?,
            mrseam: self
                .allowed_mrseam
                .as_deref()
                .map(|l| hex_list(l, "allowed_mrseam"))
                .transpose()?,
            min_svn: self
                .min_tee_tcb_svn
                .as_deref()
                .map(|s| hex_n::<16>(s, "min_tee_tcb_svn"))
                .transpose()?,
        })
    }

    /// Applies the policy to a verified quote; the error says why not.
    pub fn check(&self, v: &VerifiedTdx) -> Result<(), TdxError> {
        let c = self.checked()?;
        let r = &v.report;
        let refuse = |m: String| Err(TdxError::Policy(m));
        if c.mrtd.is_empty() {
            return refuse("allowed_mrtd is empty: every tdx quote is refused".into());
        }
        if !c.mrtd.contains(&r.mrtd) {
            return refuse(format!("mrtd {} is not allowed", hex::encode(r.mrtd)));
        }
        for (i, want) in &c.rtmr {
            let got = r
                .rtmr
                .get(*i)
                .ok_or_else(|| TdxError::Policy("rtmr index".into()))?;
            if got != want {
                return refuse(format!(
                    "rtmr{i} is {}, the policy expects {}",
                    hex::encode(got),
                    hex::encode(want)
                ));
            }
        }
        if let Some(list) = &c.mrconfigid {
            if !list.contains(&r.mrconfigid) {
                return refuse(format!(
                    "mrconfigid {} is not allowed",
                    hex::encode(r.mrconfigid)
                ));
            }
        }
        if let Some(list) = &c.mrseam {
            if !list.contains(&r.mrseam) {
                return refuse(format!("mrseam {} is not allowed", hex::encode(r.mrseam)));
            }
        }
        if r.debug() && !self.allow_debug {
            return refuse(
                "the td is debuggable (td attributes bit 0) and allow_debug is false".into(),
            );
        }
        let min_qe = self.min_qe_isvsvn.unwrap_or(DEFAULT_MIN_QE_ISVSVN);
        if v.qe_isvsvn < min_qe {
            return refuse(format!(
                "quoting enclave isvsvn {} is below the minimum {min_qe}",
                v.qe_isvsvn
            ));
        }
        if c.min_svn.is_none() && !self.allow_any_tcb {
            return refuse(
                "the policy sets no min_tee_tcb_svn, so any tdx module, an old vulnerable one too, would pass: set min_tee_tcb_svn, or allow_any_tcb = true".into(),
            );
        }
        if let Some(min) = c.min_svn {
            if let Some(i) = (0..16).find(|&i| r.tee_tcb_svn.get(i) < min.get(i)) {
                return refuse(format!(
                    "tee_tcb_svn {} is below the minimum {} at component {i}",
                    hex::encode(r.tee_tcb_svn),
                    hex::encode(min)
                ));
            }
        }
        Ok(())
    }
}

/// Verifies `tdx` TEE evidence (what the verifier's `tee` check calls): the
/// quote's signature chain to the pinned Intel root at `now`, REPORTDATA
/// = [`report_data_for`]`(binding)`, then the policy. Ok: a message listing
/// the measurements; Err: why not.
pub fn verify_evidence(
    ev: &serde_json::Value,
    binding: &[u8; 32],
    policy: &TdxPolicy,
    now: SystemTime,
) -> Result<String, String> {
    let root = intel_sgx_root_ca().map_err(|e| e.to_string())?;
    verify_evidence_with_root(ev, binding, policy, now, &root).map_err(|e| e.to_string())
}

fn verify_evidence_with_root(
    ev: &serde_json::Value,
    binding: &[u8; 32],
    policy: &TdxPolicy,
    now: SystemTime,
    root: &Certificate,
) -> Result<String, TdxError> {
    let ev = TdxEvidence::deserialize(ev).map_err(|e| TdxError::Evidence(e.to_string()))?;
    let quote = parse_quote(&ev.quote_bytes()?)?;
    let v = verify_quote_with_root(&quote, now, root)?;
    let want = report_data_for(binding);
    if v.report.report_data != want {
        return Err(TdxError::Evidence(format!(
            "report data {} is not the binding {} followed by zeros",
            hex::encode(v.report.report_data),
            hex::encode(binding)
        )));
    }
    policy.check(&v)?;
    Ok(format!(
        "tdx quote verified to the pinned intel sgx root ca and bound to this evidence (tcb status and revocation not checked): {}",
        v.summary()
    ))
}

#[cfg(test)]
mod tests;
