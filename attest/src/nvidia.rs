//! NVIDIA GPU confidential-computing evidence (Hopper): the SPDM 1.1
//! GET_MEASUREMENTS report NVML returns
//! (`nvmlDeviceGetConfComputeGpuAttestationReport`), the GPU's device
//! certificate chain (`nvmlDeviceGetConfComputeGpuCertificate`,
//! `attestationCertChain`, PEM), and their verification against NVIDIA's
//! pinned Device Identity root.
//!
//! ## Format (as NVIDIA's nvtrust local verifier parses it; integers LE)
//!
//! The report is the request message followed by the response message.
//!
//! Request, [`REQUEST_LEN`] bytes: SPDMVersion (1), RequestResponseCode
//! `0xE0` (1), Param1 (1, bit 0: signature requested), Param2 (1, the
//! measurement operation), Nonce (32), SlotIDParam (1).
//!
//! Response: SPDMVersion (1), RequestResponseCode `0x60` (1), Param1 (1),
//! Param2 (1, bits 0..3: slot id), NumberOfBlocks (1),
//! MeasurementRecordLength (3), MeasurementRecord (that many bytes of DMTF
//! measurement blocks: Index (1), MeasurementSpecification (1, `1` = DMTF),
//! MeasurementSize (2), then DMTFSpecMeasurementValueType (1),
//! DMTFSpecMeasurementValueSize (2), the value), Nonce (32), OpaqueLength
//! (2), OpaqueData (NVIDIA TLVs: type (2), length (2), value), Signature
//! ([`SIGNATURE_LEN`]: ECDSA P-384 r‖s, big-endian).
//!
//! The signature is over SHA-384 of the whole report but the signature
//! (request ‖ response without the signature), made with the key of the
//! chain's first (leaf) certificate.
//!
//! ## What [`verify_report`] checks
//!
//! - the report parses strictly: every length is checked, nothing trails,
//!   at most [`MAX_REPORT`] bytes, SPDM version 1.1 in both messages,
//!   signature requested, every measurement requested (Param2 `0xFF`),
//!   response slot = request slot, at least one block,
//!   unique block indices, DMTF measurement specification, each block's
//!   size agrees with its value's size, unique opaque types;
//! - the chain ([`parse_pem_chain`]: at most [`MAX_CHAIN_CERTS`]
//!   certificates in [`MAX_CHAIN_PEM`] bytes): a root in the chain must be
//!   byte-identical to [`PINNED_ROOT_PEM`], which is then appended; each
//!   certificate's issuer name is the next one's subject and its signature
//!   verifies with the next one's key (ECDSA P-384/SHA-384 or
//!   P-256/SHA-256); every issuer is a CA (basicConstraints) and, where it
//!   has key usage, may sign certificates; the leaf, where it has key usage,
//!   may sign; every certificate, root included, is valid at `now`;
//! - the report signature verifies with the leaf's P-384 key;
//! - the request nonce equals the caller's nonce. The response nonce is the
//!   responder's own and is not compared with anything (as in nvtrust);
//! - where the report carries a FWID (opaque type 20) it equals the last 48
//!   bytes of the leaf's TCG DICE TcbInfo extension (2.23.133.5.4.1), as
//!   nvtrust compares them;
//! - the driver and VBIOS versions are present in the opaque data.
//!
//! ## What it does NOT check
//!
//! - revocation (nvtrust asks NVIDIA's OCSP service; there is no network
//!   here), certificate policies, name constraints, path lengths, or
//!   unknown critical extensions;
//! - reference measurements (RIMs): the measurements are returned for the
//!   caller to compare or report; nothing here says they are good values;
//! - that the GPU is the one named by [`GpuCcEvidence::uuid`]: the device
//!   certificate does not carry the NVML UUID, so the UUID is reported as
//!   the node says it;
//! - the CEC (Blackwell) report, which NVML may return beside this one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use base64::Engine as _;
use const_oid::db::rfc5280::{ID_CE_BASIC_CONSTRAINTS, ID_CE_KEY_USAGE};
use const_oid::ObjectIdentifier;
use der::{Decode, Encode};
use ecdsa::signature::hazmat::PrehashVerifier as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha384};
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage};
use x509_cert::Certificate;

/// Largest attestation report accepted (NVML's buffer,
/// `NVML_CC_GPU_ATTESTATION_REPORT_SIZE`).
pub const MAX_REPORT: usize = 8192;
/// Largest PEM certificate chain accepted.
pub const MAX_CHAIN_PEM: usize = 16 * 1024;
/// Most certificates in a chain (the pinned root included).
pub const MAX_CHAIN_CERTS: usize = 8;
/// Length of the SPDM GET_MEASUREMENTS request.
pub const REQUEST_LEN: usize = 37;
/// Length of the nonces.
pub const NONCE_LEN: usize = 32;
/// Length of the report signature (ECDSA P-384 r‖s).
pub const SIGNATURE_LEN: usize = 96;
/// The SPDM version accepted (1.1).
pub const SPDM_VERSION: u8 = 0x11;
/// GET_MEASUREMENTS request code.
pub const GET_MEASUREMENTS: u8 = 0xE0;
/// GET_MEASUREMENTS Param2 (measurement operation) asking for every block.
pub const ALL_MEASUREMENTS: u8 = 0xFF;
/// MEASUREMENTS response code.
pub const MEASUREMENTS: u8 = 0x60;
/// MeasurementSpecification value for DMTF.
pub const DMTF_MEASUREMENT_SPEC: u8 = 1;
/// Longest GPU UUID accepted in [`GpuCcEvidence`].
pub const MAX_UUID: usize = 128;
/// Most entries in a policy list.
pub const MAX_POLICY_VERSIONS: usize = 1024;
/// Length of the FWID compared with the leaf certificate.
pub const FWID_LEN: usize = 48;

/// NVIDIA Device Identity CA, the root GPU device chains end in (from
/// nvtrust's `verifier/certs/verifier_device_root.pem`).
pub const PINNED_ROOT_PEM: &str = include_str!("../certs/nvidia_device_identity_root.pem");

/// Opaque data types nvtrust names.
pub mod opaque {
    pub const CERT_ISSUER_NAME: u16 = 1;
    pub const CERT_AUTHORITY_KEY_IDENTIFIER: u16 = 2;
    pub const DRIVER_VERSION: u16 = 3;
    pub const GPU_INFO: u16 = 4;
    pub const SKU: u16 = 5;
    pub const VBIOS_VERSION: u16 = 6;
    pub const MANUFACTURER_ID: u16 = 7;
    pub const TAMPER_DETECTION: u16 = 8;
    pub const SMC: u16 = 9;
    pub const VPR: u16 = 10;
    pub const NVDEC0_STATUS: u16 = 11;
    pub const MSRSCNT: u16 = 12;
    pub const CPRINFO: u16 = 13;
    pub const BOARD_ID: u16 = 14;
    pub const CHIP_SKU: u16 = 15;
    pub const CHIP_SKU_MOD: u16 = 16;
    pub const PROJECT: u16 = 17;
    pub const PROJECT_SKU: u16 = 18;
    pub const PROJECT_SKU_MOD: u16 = 19;
    pub const FWID: u16 = 20;
    pub const PROTECTED_PCIE_STATUS: u16 = 21;
    pub const SWITCH_PDI: u16 = 22;
    pub const FLOORSWEPT_PORTS: u16 = 23;
    pub const POSITION_ID: u16 = 24;
    pub const LOCK_SWITCH_STATUS: u16 = 25;
    pub const GPU_LINK_CONN: u16 = 32;
    pub const INVALID: u16 = 255;

    /// nvtrust's name for an opaque type (`OPAQUE_FIELD_ID_` dropped).
    pub fn name(kind: u16) -> Option<&'static str> {
        Some(match kind {
            CERT_ISSUER_NAME => "CERT_ISSUER_NAME",
            CERT_AUTHORITY_KEY_IDENTIFIER => "CERT_AUTHORITY_KEY_IDENTIFIER",
            DRIVER_VERSION => "DRIVER_VERSION",
            GPU_INFO => "GPU_INFO",
            SKU => "SKU",
            VBIOS_VERSION => "VBIOS_VERSION",
            MANUFACTURER_ID => "MANUFACTURER_ID",
            TAMPER_DETECTION => "TAMPER_DETECTION",
            SMC => "SMC",
            VPR => "VPR",
            NVDEC0_STATUS => "NVDEC0_STATUS",
            MSRSCNT => "MSRSCNT",
            CPRINFO => "CPRINFO",
            BOARD_ID => "BOARD_ID",
            CHIP_SKU => "CHIP_SKU",
            CHIP_SKU_MOD => "CHIP_SKU_MOD",
            PROJECT => "PROJECT",
            PROJECT_SKU => "PROJECT_SKU",
            PROJECT_SKU_MOD => "PROJECT_SKU_MOD",
            FWID => "FWID",
            PROTECTED_PCIE_STATUS => "PROTECTED_PCIE_STATUS",
            SWITCH_PDI => "SWITCH_PDI",
            FLOORSWEPT_PORTS => "FLOORSWEPT_PORTS",
            POSITION_ID => "POSITION_ID",
            LOCK_SWITCH_STATUS => "LOCK_SWITCH_STATUS",
            GPU_LINK_CONN => "GPU_LINK_CONN",
            INVALID => "INVALID",
            _ => return None,
        })
    }
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
/// TCG DICE TcbInfo, where NVIDIA puts the FWID.
const TCG_DICE_TCB_INFO: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.23.133.5.4.1");

/// Why NVIDIA evidence was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NvidiaError {
    #[error("{what} is {found} bytes, over the limit of {limit}")]
    TooLarge {
        what: &'static str,
        limit: usize,
        found: usize,
    },
    #[error("{field} needs {need} bytes, {have} left")]
    Truncated {
        field: &'static str,
        need: usize,
        have: usize,
    },
    #[error("{count} bytes after the {after}")]
    TrailingBytes { after: &'static str, count: usize },
    #[error("{message} code is {found:#04x}, expected {expected:#04x}")]
    MessageCode {
        message: &'static str,
        expected: u8,
        found: u8,
    },
    #[error("{message} SPDM version is {found:#04x}, expected {expected:#04x}")]
    SpdmVersion {
        message: &'static str,
        expected: u8,
        found: u8,
    },
    #[error("the request does not ask for a signature (param1 {param1:#04x})")]
    SignatureNotRequested { param1: u8 },
    #[error(
        "the request asks for measurement operation {param2:#04x}, not all measurements (0xff)"
    )]
    NotAllMeasurements { param2: u8 },
    #[error("response slot {found} is not the requested slot {expected}")]
    SlotMismatch { expected: u8, found: u8 },
    #[error("the response has no measurement blocks")]
    NoMeasurementBlocks,
    #[error("measurement block {index}: specification {found}, expected {expected} (DMTF)")]
    MeasurementSpec { index: u8, expected: u8, found: u8 },
    #[error("measurement block {index}: size {found}, expected {expected} from its value")]
    MeasurementSize {
        index: u8,
        expected: usize,
        found: usize,
    },
    #[error("measurement block index {0} appears twice")]
    DuplicateBlock(u8),
    #[error("opaque data type {0} appears twice")]
    DuplicateOpaque(u16),
    #[error("opaque {field} is missing")]
    MissingOpaque { field: &'static str },
    #[error("opaque {field} is not printable text")]
    BadOpaqueText { field: &'static str },
    #[error("report text is not hex")]
    NotHex,
    #[error("certificate chain is not PEM: {0}")]
    Pem(String),
    #[error("certificate chain has no certificate")]
    EmptyChain,
    #[error("certificate chain has more than {limit} certificates")]
    TooManyCertificates { limit: usize },
    #[error("certificate {index} is not X.509: {reason}")]
    Certificate { index: usize, reason: String },
    #[error("the chain's root ({found}) is not the pinned NVIDIA root ({expected})")]
    RootMismatch { expected: String, found: String },
    #[error("certificate {index} names issuer {found}, the next certificate is {expected}")]
    IssuerMismatch {
        index: usize,
        expected: String,
        found: String,
    },
    #[error("certificate {index} ({subject}) is not signed by {issuer}")]
    CertificateSignature {
        index: usize,
        subject: String,
        issuer: String,
    },
    #[error("issuer {subject} is not a CA")]
    NotCa { subject: String },
    #[error("{subject}: key usage does not allow {usage}")]
    KeyUsage {
        subject: String,
        usage: &'static str,
    },
    #[error("{subject} is not valid until {not_before}, now is {now}")]
    NotYetValid {
        subject: String,
        not_before: String,
        now: String,
    },
    #[error("{subject} expired at {not_after}, now is {now}")]
    Expired {
        subject: String,
        not_after: String,
        now: String,
    },
    #[error("{subject}: unsupported key or signature algorithm ({detail})")]
    UnsupportedAlgorithm { subject: String, detail: String },
    #[error("the leaf key is {found}, the report signature needs P-384")]
    LeafKey { found: &'static str },
    #[error("the report signature does not verify with the leaf key")]
    ReportSignature,
    #[error("request nonce is {found}, expected {expected}")]
    NonceMismatch { expected: String, found: String },
    #[error("report FWID is {report}, the leaf certificate's is {certificate}")]
    FwidMismatch { report: String, certificate: String },
}

/// The SPDM GET_MEASUREMENTS request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpdmRequest {
    pub version: u8,
    /// Bit 0: signature requested.
    pub param1: u8,
    /// The measurement operation (`0xFF`: all measurements).
    pub param2: u8,
    /// The requester's (the verifier's) nonce.
    #[serde(with = "hex_bytes")]
    pub nonce: [u8; NONCE_LEN],
    /// Bits 0..3: the certificate slot.
    pub slot_id_param: u8,
}

impl SpdmRequest {
    /// Whether the requester asked for a signed response.
    pub fn signature_requested(&self) -> bool {
        self.param1 & 1 == 1
    }

    /// The certificate slot asked for.
    pub fn slot(&self) -> u8 {
        self.slot_id_param & 0x0F
    }
}

/// One DMTF measurement block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MeasurementBlock {
    pub index: u8,
    /// MeasurementSpecification (always [`DMTF_MEASUREMENT_SPEC`] here).
    pub spec: u8,
    /// DMTFSpecMeasurementValueType (bit 7: raw bit stream rather than a
    /// digest).
    pub value_type: u8,
    #[serde(with = "hex_bytes")]
    pub value: Vec<u8>,
}

/// One opaque-data TLV.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpaqueField {
    pub kind: u16,
    /// nvtrust's name, where it names the type.
    pub name: Option<&'static str>,
    #[serde(with = "hex_bytes")]
    pub value: Vec<u8>,
}

/// The SPDM MEASUREMENTS response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpdmResponse {
    pub version: u8,
    pub param1: u8,
    /// Bits 0..3: the slot the signing certificate is in.
    pub param2: u8,
    pub blocks: Vec<MeasurementBlock>,
    /// The responder's own nonce.
    #[serde(with = "hex_bytes")]
    pub nonce: [u8; NONCE_LEN],
    pub opaque: Vec<OpaqueField>,
    #[serde(with = "hex_bytes")]
    pub signature: [u8; SIGNATURE_LEN],
}

impl SpdmResponse {
    /// The value of opaque field `kind`.
    pub fn opaque(&self, kind: u16) -> Option<&[u8]> {
        self.opaque
            .iter()
            .find(|f| f.kind == kind)
            .map(|f| f.value.as_slice())
    }

    /// The driver version (opaque type 3), as text without its NULs.
    pub fn driver_version(&self) -> Result<String, NvidiaError> {
        let field = "driver version";
        let v = self
            .opaque(opaque::DRIVER_VERSION)
            .ok_or(NvidiaError::MissingOpaque { field })?;
        let text = std::str::from_utf8(v)
            .map_err(|_| NvidiaError::BadOpaqueText { field })?
            .trim_end_matches('\0');
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(NvidiaError::BadOpaqueText { field });
        }
        Ok(text.to_string())
    }

    /// The VBIOS version (opaque type 6), formatted as nvtrust's
    /// `format_vbios_version` does, in the upper case NVML uses
    /// (`96.00.9F.00.01`).
    pub fn vbios_version(&self) -> Result<String, NvidiaError> {
        let v = self
            .opaque(opaque::VBIOS_VERSION)
            .ok_or(NvidiaError::MissingOpaque {
                field: "vbios version",
            })?;
        Ok(format_vbios_version(v))
    }
}

/// nvtrust's `format_vbios_version`: the value as a little-endian hex
/// number, its low half then the last byte of its high half, dot-separated.
fn format_vbios_version(v: &[u8]) -> String {
    let value: String = hex::encode_upper(v.iter().rev().copied().collect::<Vec<u8>>());
    let half = value.len() / 2;
    let mut temp = String::new();
    temp.push_str(value.get(half..).unwrap_or(""));
    temp.push_str(value.get(half.saturating_sub(2)..half).unwrap_or(""));
    let pairs: Vec<&str> = (0..temp.len())
        .step_by(2)
        .filter_map(|i| temp.get(i..i + 2))
        .collect();
    pairs.join(".")
}

/// A parsed report: request and response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpdmReport {
    pub request: SpdmRequest,
    pub response: SpdmResponse,
    /// How many leading bytes of the report the signature covers.
    pub signed_len: usize,
}

/// A bounds-checked reader.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], NvidiaError> {
        if n > self.bytes.len() {
            return Err(NvidiaError::Truncated {
                field,
                need: n,
                have: self.bytes.len(),
            });
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, NvidiaError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, NvidiaError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    fn u24(&mut self, field: &'static str) -> Result<usize, NvidiaError> {
        let [a, b, c] = self.array(field)?;
        Ok(usize::from(a) | usize::from(b) << 8 | usize::from(c) << 16)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], NvidiaError> {
        let s = self.take(N, field)?;
        s.try_into().map_err(|_| NvidiaError::Truncated {
            field,
            need: N,
            have: s.len(),
        })
    }

    fn end(&self, after: &'static str) -> Result<(), NvidiaError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(NvidiaError::TrailingBytes {
                after,
                count: self.bytes.len(),
            })
        }
    }
}

/// Parses an attestation report (request ‖ response), strictly; see the
/// module header for the format and what is checked.
pub fn parse_report(bytes: &[u8]) -> Result<SpdmReport, NvidiaError> {
    if bytes.len() > MAX_REPORT {
        return Err(NvidiaError::TooLarge {
            what: "attestation report",
            limit: MAX_REPORT,
            found: bytes.len(),
        });
    }
    let mut r = Reader { bytes };
    let request = parse_request(&mut r)?;
    let response = parse_response(&mut r, &request)?;
    r.end("signature")?;
    Ok(SpdmReport {
        request,
        response,
        signed_len: bytes.len() - SIGNATURE_LEN,
    })
}

fn check_version(message: &'static str, found: u8) -> Result<(), NvidiaError> {
    if found != SPDM_VERSION {
        return Err(NvidiaError::SpdmVersion {
            message,
            expected: SPDM_VERSION,
            found,
        });
    }
    Ok(())
}

fn check_code(message: &'static str, expected: u8, found: u8) -> Result<(), NvidiaError> {
    if found != expected {
        return Err(NvidiaError::MessageCode {
            message,
            expected,
            found,
        });
    }
    Ok(())
}

fn parse_request(r: &mut Reader<'_>) -> Result<SpdmRequest, NvidiaError> {
    let version = r.u8("request version")?;
    check_version("request", version)?;
    check_code("request", GET_MEASUREMENTS, r.u8("request code")?)?;
    let param1 = r.u8("request param1")?;
    let param2 = r.u8("request param2")?;
    let nonce = r.array("request nonce")?;
    let slot_id_param = r.u8("request slot id")?;
    let request = SpdmRequest {
        version,
        param1,
        param2,
        nonce,
        slot_id_param,
    };
    if !request.signature_requested() {
        return Err(NvidiaError::SignatureNotRequested { param1 });
    }
    // 0xFF: every measurement block. A request for one index (1..=0xFE)
    // or for the count alone (0) gets a report that leaves the rest of the
    // GPU's state out, signed all the same.
    if param2 != ALL_MEASUREMENTS {
        return Err(NvidiaError::NotAllMeasurements { param2 });
    }
    Ok(request)
}

fn parse_response(r: &mut Reader<'_>, request: &SpdmRequest) -> Result<SpdmResponse, NvidiaError> {
    let version = r.u8("response version")?;
    check_version("response", version)?;
    check_code("response", MEASUREMENTS, r.u8("response code")?)?;
    let param1 = r.u8("response param1")?;
    let param2 = r.u8("response param2")?;
    if param2 & 0x0F != request.slot() {
        return Err(NvidiaError::SlotMismatch {
            expected: request.slot(),
            found: param2 & 0x0F,
        });
    }
    let count = r.u8("number of blocks")?;
    if count == 0 {
        return Err(NvidiaError::NoMeasurementBlocks);
    }
    let record_len = r.u24("measurement record length")?;
    let mut record = Reader {
        bytes: r.take(record_len, "measurement record")?,
    };
    let mut blocks = Vec::with_capacity(usize::from(count));
    let mut seen = BTreeSet::new();
    for _ in 0..count {
        let index = record.u8("block index")?;
        let spec = record.u8("block specification")?;
        if spec != DMTF_MEASUREMENT_SPEC {
            return Err(NvidiaError::MeasurementSpec {
                index,
                expected: DMTF_MEASUREMENT_SPEC,
                found: spec,
            });
        }
        let size = usize::from(record.u16("block size")?);
        let mut m = Reader {
            bytes: record.take(size, "measurement")?,
        };
        let value_type = m.u8("measurement value type")?;
        let value_size = usize::from(m.u16("measurement value size")?);
        if size != 3 + value_size {
            return Err(NvidiaError::MeasurementSize {
                index,
                expected: 3 + value_size,
                found: size,
            });
        }
        let value = m.take(value_size, "measurement value")?.to_vec();
        if !seen.insert(index) {
            return Err(NvidiaError::DuplicateBlock(index));
        }
        blocks.push(MeasurementBlock {
            index,
            spec,
            value_type,
            value,
        });
    }
    record.end("measurement blocks")?;
    let nonce = r.array("response nonce")?;
    let opaque_len = usize::from(r.u16("opaque length")?);
    let opaque = parse_opaque(r.take(opaque_len, "opaque data")?)?;
    let signature = r.array("signature")?;
    Ok(SpdmResponse {
        version,
        param1,
        param2,
        blocks,
        nonce,
        opaque,
        signature,
    })
}

fn parse_opaque(bytes: &[u8]) -> Result<Vec<OpaqueField>, NvidiaError> {
    let mut r = Reader { bytes };
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    while !r.bytes.is_empty() {
        let kind = r.u16("opaque type")?;
        let len = usize::from(r.u16("opaque size")?);
        let value = r.take(len, "opaque value")?.to_vec();
        if !seen.insert(kind) {
            return Err(NvidiaError::DuplicateOpaque(kind));
        }
        out.push(OpaqueField {
            kind,
            name: opaque::name(kind),
            value,
        });
    }
    Ok(out)
}

/// Parses a PEM certificate chain (leaf first): only CERTIFICATE blocks
/// and whitespace, at most [`MAX_CHAIN_CERTS`] certificates in
/// [`MAX_CHAIN_PEM`] bytes.
pub fn parse_pem_chain(pem: &[u8]) -> Result<Vec<Certificate>, NvidiaError> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    if pem.len() > MAX_CHAIN_PEM {
        return Err(NvidiaError::TooLarge {
            what: "certificate chain",
            limit: MAX_CHAIN_PEM,
            found: pem.len(),
        });
    }
    let text = std::str::from_utf8(pem).map_err(|_| NvidiaError::Pem("not UTF-8".into()))?;
    let mut rest = text;
    let mut out = Vec::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        if !rest.starts_with(BEGIN) {
            return Err(NvidiaError::Pem("text outside a certificate block".into()));
        }
        let end = rest
            .find(END)
            .ok_or_else(|| NvidiaError::Pem("unterminated certificate block".into()))?
            + END.len();
        let (block, tail) = rest.split_at(end);
        rest = tail;
        if out.len() == MAX_CHAIN_CERTS {
            return Err(NvidiaError::TooManyCertificates {
                limit: MAX_CHAIN_CERTS,
            });
        }
        let index = out.len();
        let (label, der) = der::pem::decode_vec(block.as_bytes())
            .map_err(|e| NvidiaError::Pem(format!("certificate {index}: {e}")))?;
        if label != "CERTIFICATE" {
            return Err(NvidiaError::Pem(format!(
                "certificate {index}: label {label:?}"
            )));
        }
        let cert = Certificate::from_der(&der).map_err(|e| NvidiaError::Certificate {
            index,
            reason: e.to_string(),
        })?;
        out.push(cert);
    }
    if out.is_empty() {
        return Err(NvidiaError::EmptyChain);
    }
    Ok(out)
}

/// The pinned NVIDIA Device Identity root.
pub fn pinned_root() -> Result<Certificate, NvidiaError> {
    parse_pem_chain(PINNED_ROOT_PEM.as_bytes())?
        .into_iter()
        .next()
        .ok_or(NvidiaError::EmptyChain)
}

/// An ECDSA verifying key of a supported curve.
enum EcKey {
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
}

fn subject(cert: &Certificate) -> String {
    cert.tbs_certificate.subject.to_string()
}

fn ec_key(cert: &Certificate) -> Result<EcKey, NvidiaError> {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let unsupported = |detail: String| NvidiaError::UnsupportedAlgorithm {
        subject: subject(cert),
        detail,
    };
    if spki.algorithm.oid != ID_EC_PUBLIC_KEY {
        return Err(unsupported(format!("key algorithm {}", spki.algorithm.oid)));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
        .ok_or_else(|| unsupported("no named curve".into()))?;
    let point = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| unsupported("key is not whole bytes".into()))?;
    let bad_point = |_| unsupported("invalid curve point".into());
    match curve {
        SECP384R1 => Ok(EcKey::P384(
            p384::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(bad_point)?,
        )),
        SECP256R1 => Ok(EcKey::P256(
            p256::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(bad_point)?,
        )),
        other => Err(unsupported(format!("curve {other}"))),
    }
}

/// Whether `child`'s signature verifies with `issuer`'s key: ECDSA P-384
/// with SHA-384, or P-256 with SHA-256.
fn signed_by(child: &Certificate, issuer: &Certificate) -> Result<bool, NvidiaError> {
    let key = ec_key(issuer)?;
    let tbs = child
        .tbs_certificate
        .to_der()
        .map_err(|e| NvidiaError::Certificate {
            index: 0,
            reason: e.to_string(),
        })?;
    let Some(sig) = child.signature.as_bytes() else {
        return Ok(false);
    };
    let alg = child.signature_algorithm.oid;
    Ok(match key {
        EcKey::P384(k) if alg == ECDSA_SHA384 => p384::ecdsa::Signature::from_der(sig)
            .is_ok_and(|s| k.verify_prehash(&Sha384::digest(&tbs), &s).is_ok()),
        EcKey::P256(k) if alg == ECDSA_SHA256 => p256::ecdsa::Signature::from_der(sig)
            .is_ok_and(|s| k.verify_prehash(&Sha256::digest(&tbs), &s).is_ok()),
        _ => {
            return Err(NvidiaError::UnsupportedAlgorithm {
                subject: subject(child),
                detail: format!("signature algorithm {alg} with the issuer's curve"),
            })
        }
    })
}

fn extension<'a, T: Decode<'a>>(
    cert: &'a Certificate,
    oid: ObjectIdentifier,
) -> Result<Option<T>, NvidiaError> {
    let Some(exts) = &cert.tbs_certificate.extensions else {
        return Ok(None);
    };
    let mut found = exts.iter().filter(|e| e.extn_id == oid);
    let Some(ext) = found.next() else {
        return Ok(None);
    };
    let bad = |reason: String| NvidiaError::Certificate { index: 0, reason };
    if found.next().is_some() {
        return Err(bad(format!("{}: duplicate extension {oid}", subject(cert))));
    }
    T::from_der(ext.extn_value.as_bytes())
        .map(Some)
        .map_err(|e| bad(format!("{}: extension {oid}: {e}", subject(cert))))
}

/// `t` as RFC 3339 where X.509 can express it (1970 to 9999), else as
/// seconds from the Unix epoch (never a panic).
fn rfc3339(t: SystemTime) -> String {
    match der::DateTime::from_system_time(t) {
        Ok(d) => d.to_string(),
        Err(_) => match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => format!("unix time {}", d.as_secs()),
            Err(e) => format!("{} s before the unix epoch", e.duration().as_secs()),
        },
    }
}

fn check_validity(cert: &Certificate, now: SystemTime) -> Result<(), NvidiaError> {
    let v = &cert.tbs_certificate.validity;
    let (nb, na) = (v.not_before.to_system_time(), v.not_after.to_system_time());
    if now < nb {
        return Err(NvidiaError::NotYetValid {
            subject: subject(cert),
            not_before: rfc3339(nb),
            now: rfc3339(now),
        });
    }
    if now > na {
        return Err(NvidiaError::Expired {
            subject: subject(cert),
            not_after: rfc3339(na),
            now: rfc3339(now),
        });
    }
    Ok(())
}

/// Verifies `chain` (leaf first) to the pinned root at `now` (see the module
/// header); returns the chain with the pinned root last.
pub fn verify_chain(
    chain: Vec<Certificate>,
    now: SystemTime,
) -> Result<Vec<Certificate>, NvidiaError> {
    let root = pinned_root()?;
    let mut chain = chain;
    if chain.len() > MAX_CHAIN_CERTS {
        return Err(NvidiaError::TooManyCertificates {
            limit: MAX_CHAIN_CERTS,
        });
    }
    if let Some(last) = chain.last() {
        let tbs = &last.tbs_certificate;
        if tbs.issuer == tbs.subject {
            if *last != root {
                return Err(NvidiaError::RootMismatch {
                    expected: subject(&root),
                    found: subject(last),
                });
            }
            chain.pop();
        }
    }
    if chain.is_empty() {
        return Err(NvidiaError::EmptyChain);
    }
    chain.push(root);
    for (index, pair) in chain.windows(2).enumerate() {
        let [child, issuer] = pair else {
            continue;
        };
        check_validity(child, now)?;
        if child.tbs_certificate.issuer != issuer.tbs_certificate.subject {
            return Err(NvidiaError::IssuerMismatch {
                index,
                expected: subject(issuer),
                found: child.tbs_certificate.issuer.to_string(),
            });
        }
        if !signed_by(child, issuer)? {
            return Err(NvidiaError::CertificateSignature {
                index,
                subject: subject(child),
                issuer: subject(issuer),
            });
        }
        let is_ca =
            extension::<BasicConstraints>(issuer, ID_CE_BASIC_CONSTRAINTS)?.is_some_and(|b| b.ca);
        if !is_ca {
            return Err(NvidiaError::NotCa {
                subject: subject(issuer),
            });
        }
        if let Some(ku) = extension::<KeyUsage>(issuer, ID_CE_KEY_USAGE)? {
            if !ku.key_cert_sign() {
                return Err(NvidiaError::KeyUsage {
                    subject: subject(issuer),
                    usage: "certificate signing",
                });
            }
        }
    }
    if let Some(root) = chain.last() {
        check_validity(root, now)?;
    }
    if let Some(leaf) = chain.first() {
        if let Some(ku) = extension::<KeyUsage>(leaf, ID_CE_KEY_USAGE)? {
            if !ku.digital_signature() {
                return Err(NvidiaError::KeyUsage {
                    subject: subject(leaf),
                    usage: "digital signature",
                });
            }
        }
    }
    Ok(chain)
}

/// The FWID nvtrust reads from a certificate: the last [`FWID_LEN`] bytes of
/// the TCG DICE TcbInfo extension's value.
fn certificate_fwid(cert: &Certificate) -> Option<&[u8]> {
    let ext = cert
        .tbs_certificate
        .extensions
        .as_ref()?
        .iter()
        .find(|e| e.extn_id == TCG_DICE_TCB_INFO)?;
    let v = ext.extn_value.as_bytes();
    v.get(v.len().checked_sub(FWID_LEN)?..)
}

/// A verified GPU report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifiedGpu {
    /// Measurement block index → value, hex.
    pub measurements: BTreeMap<u8, String>,
    /// Driver version from the opaque data (`550.90.07`).
    pub driver_version: String,
    /// VBIOS version from the opaque data (`96.00.9F.00.01`).
    pub vbios_version: String,
    /// The FWID from the opaque data, hex, when present.
    pub fwid: Option<String>,
    /// The responder's nonce, hex.
    pub response_nonce: String,
    /// The leaf (device) certificate's subject.
    pub leaf_subject: String,
    /// The leaf certificate's serial number, hex.
    pub leaf_serial: String,
    /// The whole parsed report.
    pub report: SpdmReport,
}

/// Verifies a report against its PEM chain, `expected_nonce` and `now`
/// (see the module header for every check).
pub fn verify_report(
    report: &[u8],
    cert_chain_pem: &[u8],
    expected_nonce: &[u8; NONCE_LEN],
    now: SystemTime,
) -> Result<VerifiedGpu, NvidiaError> {
    let parsed = parse_report(report)?;
    let chain = verify_chain(parse_pem_chain(cert_chain_pem)?, now)?;
    let leaf = chain.first().ok_or(NvidiaError::EmptyChain)?;
    verify_parsed(report, parsed, leaf, expected_nonce)
}

/// The checks after the chain: the report signature with `leaf`'s key, the
/// nonce, the FWID and the opaque versions.
fn verify_parsed(
    report: &[u8],
    parsed: SpdmReport,
    leaf: &Certificate,
    expected_nonce: &[u8; NONCE_LEN],
) -> Result<VerifiedGpu, NvidiaError> {
    let key = match ec_key(leaf)? {
        EcKey::P384(k) => k,
        EcKey::P256(_) => return Err(NvidiaError::LeafKey { found: "P-256" }),
    };
    let signed = report
        .get(..parsed.signed_len)
        .ok_or(NvidiaError::ReportSignature)?;
    let sig = p384::ecdsa::Signature::from_slice(&parsed.response.signature)
        .map_err(|_| NvidiaError::ReportSignature)?;
    key.verify_prehash(&Sha384::digest(signed), &sig)
        .map_err(|_| NvidiaError::ReportSignature)?;
    if parsed.request.nonce != *expected_nonce {
        return Err(NvidiaError::NonceMismatch {
            expected: hex::encode(expected_nonce),
            found: hex::encode(parsed.request.nonce),
        });
    }
    let fwid = parsed.response.opaque(opaque::FWID).map(hex::encode);
    if let Some(report_fwid) = &fwid {
        let cert_fwid = certificate_fwid(leaf).map(hex::encode).unwrap_or_default();
        if *report_fwid != cert_fwid {
            return Err(NvidiaError::FwidMismatch {
                report: report_fwid.clone(),
                certificate: cert_fwid,
            });
        }
    }
    Ok(VerifiedGpu {
        measurements: parsed
            .response
            .blocks
            .iter()
            .map(|b| (b.index, hex::encode(&b.value)))
            .collect(),
        driver_version: parsed.response.driver_version()?,
        vbios_version: parsed.response.vbios_version()?,
        fwid,
        response_nonce: hex::encode(parsed.response.nonce),
        leaf_subject: subject(leaf),
        leaf_serial: hex::encode(leaf.tbs_certificate.serial_number.as_bytes()),
        report: parsed,
    })
}

/// What ccnoded puts in the evidence for one GPU in CC mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuCcEvidence {
    /// NVML's UUID of the GPU (reported, not verified: see the module
    /// header).
    pub uuid: String,
    /// The 32-byte nonce the node asked with, hex.
    pub nonce: String,
    /// The attestation report, base64.
    pub report: String,
    /// The attestation certificate chain, PEM.
    pub cert_chain: String,
}

/// The `[nvidia]` table of the verifier policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NvidiaPolicy {
    /// Driver versions accepted (`550.90.07`); any when absent.
    pub allowed_driver_versions: Option<Vec<String>>,
    /// VBIOS versions accepted (`96.00.9F.00.01`, compared without regard
    /// to case); any when absent.
    pub allowed_vbios_versions: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyDocument {
    nvidia: NvidiaPolicy,
}

impl NvidiaPolicy {
    /// Reads a TOML document that holds exactly an `[nvidia]` table.
    pub fn from_toml(text: &str) -> Result<NvidiaPolicy, String> {
        let doc: PolicyDocument = toml::from_str(text).map_err(|e| e.to_string())?;
        doc.nvidia.validate()?;
        Ok(doc.nvidia)
    }

    /// Checks the list sizes against [`MAX_POLICY_VERSIONS`].
    pub fn validate(&self) -> Result<(), String> {
        for list in [&self.allowed_driver_versions, &self.allowed_vbios_versions]
            .into_iter()
            .flatten()
        {
            if list.len() > MAX_POLICY_VERSIONS {
                return Err(format!(
                    "an nvidia version list has more than {MAX_POLICY_VERSIONS} entries"
                ));
            }
        }
        Ok(())
    }
}

/// Verifies one GPU's evidence: the nonce it was asked with is
/// `expected_nonce`, the report and chain verify ([`verify_report`]), and
/// the driver and VBIOS versions are allowed by `policy`. Ok: what was
/// verified, for a person; Err: why not.
pub fn verify_gpu_evidence(
    ev: &GpuCcEvidence,
    expected_nonce: &[u8; NONCE_LEN],
    policy: &NvidiaPolicy,
    now: SystemTime,
) -> Result<String, String> {
    policy.validate()?;
    if ev.uuid.len() > MAX_UUID {
        return Err(format!("gpu uuid is over {MAX_UUID} bytes"));
    }
    let uuid = &ev.uuid;
    let nonce = crate::evidence::hex32(&ev.nonce)
        .ok_or_else(|| format!("gpu {uuid}: nonce is not 32 bytes of hex"))?;
    if nonce != *expected_nonce {
        return Err(format!(
            "gpu {uuid}: evidence nonce is {}, expected {}",
            ev.nonce,
            hex::encode(expected_nonce)
        ));
    }
    if ev.report.len() > MAX_REPORT.div_ceil(3) * 4 {
        return Err(format!("gpu {uuid}: report is over {MAX_REPORT} bytes"));
    }
    let report = B64
        .decode(&ev.report)
        .map_err(|_| format!("gpu {uuid}: report is not base64"))?;
    let v = verify_report(&report, ev.cert_chain.as_bytes(), expected_nonce, now)
        .map_err(|e| format!("gpu {uuid}: {e}"))?;
    if let Some(allowed) = &policy.allowed_driver_versions {
        if !allowed.contains(&v.driver_version) {
            return Err(format!(
                "gpu {uuid}: driver {} is not in allowed_driver_versions",
                v.driver_version
            ));
        }
    }
    if let Some(allowed) = &policy.allowed_vbios_versions {
        if !allowed
            .iter()
            .any(|a| a.eq_ignore_ascii_case(&v.vbios_version))
        {
            return Err(format!(
                "gpu {uuid}: vbios {} is not in allowed_vbios_versions",
                v.vbios_version
            ));
        }
    }
    Ok(format!(
        "gpu {uuid}: report signed by {} (serial {}), driver {}, vbios {}, {} measurements",
        v.leaf_subject,
        v.leaf_serial,
        v.driver_version,
        v.vbios_version,
        v.measurements.len()
    ))
}

/// Decodes a report given as hex text (nvtrust's sample format: one line,
/// surrounding whitespace ignored).
pub fn report_from_hex(text: &str) -> Result<Vec<u8>, NvidiaError> {
    let t = text.trim();
    if t.len() > MAX_REPORT * 2 {
        return Err(NvidiaError::TooLarge {
            what: "attestation report hex",
            limit: MAX_REPORT * 2,
            found: t.len(),
        });
    }
    hex::decode(t).map_err(|_| NvidiaError::NotHex)
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer, T: AsRef<[u8]>>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v.as_ref()))
    }
}

#[cfg(test)]
mod tests;
