//! AMD SEV-SNP: the attestation report, its certificate chain to a pinned
//! AMD root, its signature, the binding and a policy; and, on a guest, the
//! report from `/dev/sev-guest`.
//!
//! # Sources
//!
//! - AMD, *SEV Secure Nested Paging Firmware ABI Specification* (pub.
//!   56860): the ATTESTATION_REPORT, GUEST_POLICY, PLATFORM_INFO and
//!   TCB_VERSION structures (with the Turin TCB layout), and the ECDSA
//!   P-384 signature format (R and S as 72-byte little-endian integers,
//!   zero-extended). The PDF was not at hand offline: the offsets below are
//!   the spec's as implemented by the `sev` crate (virtee/sev 8.0.0,
//!   `firmware/guest/types/snp.rs` `AttestationReport` and
//!   `firmware/host/types/snp.rs` `TcbVersion`, whose comments cite the
//!   spec's tables), by Go implementations of the same table, and checked
//!   on the genuine Milan report in attest/tests/fixtures/snp-milan (every
//!   field decodes to a plausible value and its signature verifies over
//!   0x000..0x2A0 with the R/S positions below).
//! - AMD, *Versioned Chip Endorsement Key (VCEK) Certificate and KDS
//!   Interface Specification* (pub. 57230): the extensions
//!   (1.3.6.1.4.1.3704.1.2 productName, .1.3.1 blSPL, .1.3.2 teeSPL, .1.3.3
//!   snpSPL, .1.3.8 ucodeSPL, .1.3.9 fmcSPL, .1.4 hwID) and RSASSA-PSS with
//!   SHA-384 (salt 48) for the ARK, ASK/ASVK and VCEK/VLEK signatures; as
//!   seen in the fixture VCEK (the SPLs are DER INTEGERs in the extension
//!   value, hwID the raw 64 bytes).
//! - AMD, *SEV-ES Guest-Hypervisor Communication Block Standardization*
//!   (pub. 56421), "SNP Extended Guest Request": the certificate table and
//!   its GUIDs (byte order as AMD's sev-tool, libuuid, writes them).
//! - Linux `include/uapi/linux/sev-guest.h` for the ioctls (the `guest` submodule).
//!
//! # The report (1184 bytes, all integers little-endian)
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0x000 | 4 | VERSION (2, 3 or 5 accepted) |
//! | 0x004 | 4 | GUEST_SVN |
//! | 0x008 | 8 | POLICY ([`GuestPolicy`]) |
//! | 0x010 | 16 | FAMILY_ID |
//! | 0x020 | 16 | IMAGE_ID |
//! | 0x030 | 4 | VMPL |
//! | 0x034 | 4 | SIGNATURE_ALGO (1 = ECDSA P-384 with SHA-384) |
//! | 0x038 | 8 | CURRENT_TCB |
//! | 0x040 | 8 | PLATFORM_INFO ([`PlatformInfo`]) |
//! | 0x048 | 4 | AUTHOR_KEY_EN (bit 0), MASK_CHIP_KEY (bit 1), SIGNING_KEY (bits 4:2: 0 VCEK, 1 VLEK, 7 none) |
//! | 0x04C | 4 | reserved |
//! | 0x050 | 64 | REPORT_DATA |
//! | 0x090 | 48 | MEASUREMENT |
//! | 0x0C0 | 32 | HOST_DATA |
//! | 0x0E0 | 48 | ID_KEY_DIGEST |
//! | 0x110 | 48 | AUTHOR_KEY_DIGEST |
//! | 0x140 | 32 | REPORT_ID |
//! | 0x160 | 32 | REPORT_ID_MA |
//! | 0x180 | 8 | REPORTED_TCB |
//! | 0x188 | 1+1+1 | CPUID_FAM_ID, CPUID_MOD_ID, CPUID_STEP (version 3+; reserved in 2) |
//! | 0x18B | 21 | reserved |
//! | 0x1A0 | 64 | CHIP_ID (zero when MaskChipId is set) |
//! | 0x1E0 | 8 | COMMITTED_TCB |
//! | 0x1E8 | 1+1+1 | CURRENT_BUILD, CURRENT_MINOR, CURRENT_MAJOR (+1 reserved) |
//! | 0x1EC | 1+1+1 | COMMITTED_BUILD, COMMITTED_MINOR, COMMITTED_MAJOR (+1 reserved) |
//! | 0x1F0 | 8 | LAUNCH_TCB |
//! | 0x1F8 | 8 | LAUNCH_MIT_VECTOR (version 5+; reserved before) |
//! | 0x200 | 8 | CURRENT_MIT_VECTOR (version 5+; reserved before) |
//! | 0x208 | 152 | reserved |
//! | 0x2A0 | 512 | SIGNATURE: R (72) at 0x2A0, S (72) at 0x2E8, reserved |
//!
//! The signature covers bytes 0x000..0x2A0. This verifier also requires the
//! unused high 24 bytes of R and S and the reserved rest of the signature
//! field to be zero, so that no byte of the report can change unnoticed.
//!
//! # TCB versions and processor generations
//!
//! A TCB_VERSION is 8 bytes whose layout depends on the generation: Milan
//! and Genoa put BOOT_LOADER, TEE at bytes 0, 1 and SNP, MICROCODE at 6, 7;
//! Turin puts FMC, BOOT_LOADER, TEE, SNP at bytes 0 to 3 and MICROCODE at 7.
//! [`parse_report`] decodes with the generation the report itself names
//! (CPUID_FAM_ID 1Ah or later: the Turin layout), and a version-2 report,
//! which names none, with the Milan/Genoa layout. [`verify_report`] then
//! takes the generation from the pinned ARK the chain ends at, re-decodes
//! every TCB with it ([`SnpReport::for_generation`]), and refuses a report
//! whose CPUID fields or a VCEK whose productName names another generation.
//!
//! # Trust
//!
//! The roots are the ARKs pinned here (Milan, Genoa, Turin; see
//! `snp/certs/README.md`): a supplied ARK must be one of them, byte for
//! byte or by public key. The ASKs are built in as well, so a VCEK can be
//! checked without its chain; a VLEK's ASVK is not, and must be supplied.
//! Nothing is fetched from the network, ever: certificates come from the
//! evidence's certificate table, or a local directory ([`SnpPolicy::cert_dir`]).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine as _;
use const_oid::db::rfc5912::{ID_RSASSA_PSS, ID_SHA_384};
use der::{Decode, Encode, Reader as _};
use p384::ecdsa::signature::Verifier as _;
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256, Sha384};
use x509_cert::Certificate;

mod guest;

/// Bytes in an ATTESTATION_REPORT.
pub const REPORT_LEN: usize = 0x4A0;
/// Bytes covered by the signature (0x000..0x2A0).
pub const SIGNED_LEN: usize = 0x2A0;
/// SIGNATURE_ALGO for ECDSA P-384 with SHA-384, the only one defined.
pub const SIG_ALGO_ECDSA_P384_SHA384: u32 = 1;
/// Largest certificate table accepted (the Linux driver's limit is 16 KiB).
pub const MAX_CERT_TABLE: usize = 256 << 10;
/// Most entries in a certificate table.
pub const MAX_CERT_ENTRIES: usize = 32;
/// Largest report file ([`report_from_file_bytes`]: hex text, whitespace).
pub const MAX_REPORT_FILE: usize = 64 << 10;
/// Largest certificate accepted, and largest file read from a cert_dir.
pub const MAX_CERT: usize = 64 << 10;
/// Most files looked at in a cert_dir.
pub const MAX_CERT_DIR_FILES: usize = 256;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Why a report, its certificates or its evidence are refused. Every
/// message names what was expected and what was found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnpError {
    #[error("an SEV-SNP report is {REPORT_LEN} bytes, this one is {0}")]
    ReportLength(usize),
    #[error("report file: {0}")]
    ReportFile(String),
    #[error("report version {0} is not supported (this verifier reads versions 2, 3 and 5)")]
    UnsupportedVersion(u32),
    #[error("report signature algorithm {0} is not 1 (ECDSA P-384 with SHA-384)")]
    UnsupportedSignatureAlgo(u32),
    #[error("the report is unsigned: MASK_CHIP_KEY is set (the platform masks its signing key)")]
    ReportNotSigned,
    #[error("the report says it is signed with {report}, the certificate given is a {cert}")]
    SigningKeyMismatch { report: String, cert: String },
    #[error("malformed report signature: {0}")]
    SignatureMalformed(String),
    #[error("the report signature does not verify with the {0} over bytes 0x000..0x2A0")]
    BadSignature(String),
    #[error("{which} certificate: {reason}")]
    Certificate { which: &'static str, reason: String },
    #[error("{which} certificate has no {extension} extension ({oid})")]
    MissingExtension {
        which: &'static str,
        extension: &'static str,
        oid: &'static str,
    },
    #[error("the ARK {subject} (sha256 {sha256}) is not a pinned AMD root (expected one of ARK-Milan, ARK-Genoa, ARK-Turin)")]
    ArkNotPinned { subject: String, sha256: String },
    #[error("the ARK {0} is not self-signed")]
    ArkNotSelfSigned(String),
    #[error("the {ask} ({ask_subject}) is not signed by {expected}: {reason}")]
    AskNotSignedByArk {
        ask: &'static str,
        ask_subject: String,
        expected: String,
        reason: String,
    },
    #[error("the {ek} ({ek_subject}) is not signed by the {ask} {ask_subject}: {reason}")]
    VcekNotSignedByAsk {
        ek: &'static str,
        ek_subject: String,
        ask: &'static str,
        ask_subject: String,
        reason: String,
    },
    #[error(
        "{which} certificate {subject} is not valid now: valid from {not_before} to {not_after}"
    )]
    CertificateNotValid {
        which: &'static str,
        subject: String,
        not_before: String,
        not_after: String,
    },
    #[error("generation mismatch: {0}")]
    GenerationMismatch(String),
    #[error("the report's CHIP_ID {report} is not the VCEK's hwID {cert}")]
    ChipIdMismatch { report: String, cert: String },
    #[error("reported TCB {component} is {report}, the {ek} certifies {cert}")]
    TcbMismatch {
        component: &'static str,
        report: String,
        cert: String,
        ek: &'static str,
    },
    #[error("certificate table: {0}")]
    CertTable(String),
    #[error("missing certificate: {0}")]
    MissingCertificate(String),
    #[error("malformed sev-snp evidence: {0}")]
    Evidence(String),
    #[error(
        "report_data {found} is not the evidence binding followed by 32 zero bytes ({expected})"
    )]
    ReportDataMismatch { expected: String, found: String },
    #[error("the policy lists no allowed_measurements, so every report is refused")]
    NoAllowedMeasurements,
    #[error("measurement {measurement} is not among the policy's {allowed} allowed_measurements")]
    MeasurementNotAllowed { measurement: String, allowed: usize },
    #[error("the policy sets no min_tcb, so any firmware TCB, an old vulnerable one too, would pass: set min_tcb, or allow_any_tcb = true")]
    NoMinTcb,
    #[error("reported TCB {component} is {found}, the policy's min_tcb is {min}")]
    TcbTooLow {
        component: &'static str,
        found: String,
        min: u8,
    },
    #[error("the guest policy allows debugging (POLICY bit 19), the verifier policy does not set allow_debug")]
    DebugNotAllowed,
    #[error("the report is for VMPL {vmpl}, the policy's max_vmpl is {max}")]
    VmplTooHigh { vmpl: u32, max: u32 },
    #[error("the guest policy allows a migration agent (POLICY bit 18), the verifier policy does not set allow_migrate_ma")]
    MigrateMaNotAllowed,
    #[error("the guest policy does not require a single socket (POLICY bit 20), the verifier policy sets require_single_socket")]
    SingleSocketRequired,
    #[error("FAMILY_ID {0} is not among the policy's allowed_family_ids")]
    FamilyIdNotAllowed(String),
    #[error("IMAGE_ID {0} is not among the policy's allowed_image_ids")]
    ImageIdNotAllowed(String),
    #[error("snp policy: {0}")]
    Policy(String),
    #[error("cannot open the SEV-SNP guest device {path}: {source}")]
    Device {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{ioctl} failed: {message}")]
    Firmware {
        ioctl: &'static str,
        errno: i32,
        message: String,
    },
}

// ---------------------------------------------------------------------------
// Report structure.

/// AMD EPYC generations with a pinned root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Generation {
    Milan,
    Genoa,
    Turin,
}

impl Generation {
    pub const ALL: [Generation; 3] = [Generation::Milan, Generation::Genoa, Generation::Turin];

    pub fn name(self) -> &'static str {
        match self {
            Generation::Milan => "Milan",
            Generation::Genoa => "Genoa",
            Generation::Turin => "Turin",
        }
    }

    /// From the report's CPUID_FAM_ID and CPUID_MOD_ID (the ranges the `sev`
    /// crate's `Generation::identify_cpu` uses: family 19h models 0h-Fh
    /// Milan, 10h-1Fh and A0h-AFh Genoa; family 1Ah models 0h-11h Turin).
    pub fn from_cpuid(family: u8, model: u8) -> Option<Generation> {
        match (family, model) {
            (0x19, 0x00..=0x0F) => Some(Generation::Milan),
            (0x19, 0x10..=0x1F | 0xA0..=0xAF) => Some(Generation::Genoa),
            (0x1A, 0x00..=0x11) => Some(Generation::Turin),
            _ => None,
        }
    }

    /// From a VCEK's productName (`Milan-B0`, `Genoa-...`) or an AMD
    /// certificate's CN (`ARK-Milan`, `SEV-Genoa`, `SEV-VLEK-Turin`).
    pub fn from_product(name: &str) -> Option<Generation> {
        Generation::ALL.into_iter().find(|g| {
            name.split(['-', ' ', '_'])
                .any(|part| part.eq_ignore_ascii_case(g.name()))
        })
    }

    pub fn tcb_layout(self) -> TcbLayout {
        match self {
            Generation::Milan | Generation::Genoa => TcbLayout::Legacy,
            Generation::Turin => TcbLayout::Turin,
        }
    }
}

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How the 8 bytes of a TCB_VERSION are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcbLayout {
    /// Milan, Genoa: BOOT_LOADER [0], TEE [1], SNP [6], MICROCODE [7].
    Legacy,
    /// Turin: FMC [0], BOOT_LOADER [1], TEE [2], SNP [3], MICROCODE [7].
    Turin,
}

/// A TCB_VERSION, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcbVersion {
    /// The 8 bytes as in the report.
    pub raw: [u8; 8],
    /// FMC SVN (Turin layout only).
    pub fmc: Option<u8>,
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
}

impl TcbVersion {
    pub fn decode(raw: [u8; 8], layout: TcbLayout) -> TcbVersion {
        match layout {
            TcbLayout::Legacy => TcbVersion {
                raw,
                fmc: None,
                bootloader: raw[0],
                tee: raw[1],
                snp: raw[6],
                microcode: raw[7],
            },
            TcbLayout::Turin => TcbVersion {
                raw,
                fmc: Some(raw[0]),
                bootloader: raw[1],
                tee: raw[2],
                snp: raw[3],
                microcode: raw[7],
            },
        }
    }

    /// The 8 bytes as a u64 (little-endian, as the firmware writes it).
    pub fn as_u64(&self) -> u64 {
        u64::from_le_bytes(self.raw)
    }

    fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "raw": hex::encode(self.raw),
            "fmc": self.fmc,
            "bootloader": self.bootloader,
            "tee": self.tee,
            "snp": self.snp,
            "microcode": self.microcode,
        })
    }
}

impl std::fmt::Display for TcbVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(fmc) = self.fmc {
            write!(f, "fmc {fmc}, ")?;
        }
        write!(
            f,
            "bootloader {}, tee {}, snp {}, microcode {}",
            self.bootloader, self.tee, self.snp, self.microcode
        )
    }
}

/// GUEST_POLICY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestPolicy(pub u64);

impl GuestPolicy {
    fn bit(self, n: u32) -> bool {
        self.0 >> n & 1 == 1
    }
    /// Bits 7:0: the lowest ABI minor version the guest accepts.
    pub fn abi_minor(self) -> u8 {
        self.0 as u8
    }
    /// Bits 15:8: the lowest ABI major version.
    pub fn abi_major(self) -> u8 {
        (self.0 >> 8) as u8
    }
    /// Bit 16: SMT allowed.
    pub fn smt(self) -> bool {
        self.bit(16)
    }
    /// Bit 18: association with a migration agent allowed.
    pub fn migrate_ma(self) -> bool {
        self.bit(18)
    }
    /// Bit 19: debugging allowed (the hypervisor can read guest memory).
    pub fn debug(self) -> bool {
        self.bit(19)
    }
    /// Bit 20: the guest may run on one socket only.
    pub fn single_socket(self) -> bool {
        self.bit(20)
    }
    /// Bit 21: CXL may be populated with guest memory.
    pub fn cxl_allow(self) -> bool {
        self.bit(21)
    }
    /// Bit 22: AES-256-XTS required for memory encryption.
    pub fn mem_aes_256_xts(self) -> bool {
        self.bit(22)
    }
    /// Bit 23: RAPL must be disabled.
    pub fn rapl_dis(self) -> bool {
        self.bit(23)
    }
    /// Bit 24: ciphertext hiding required.
    pub fn ciphertext_hiding(self) -> bool {
        self.bit(24)
    }
    /// Bit 25 (version 5): page swapping disabled.
    pub fn page_swap_disable(self) -> bool {
        self.bit(25)
    }
}

/// PLATFORM_INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlatformInfo(pub u64);

impl PlatformInfo {
    fn bit(self, n: u32) -> bool {
        self.0 >> n & 1 == 1
    }
    pub fn smt_enabled(self) -> bool {
        self.bit(0)
    }
    pub fn tsme_enabled(self) -> bool {
        self.bit(1)
    }
    pub fn ecc_enabled(self) -> bool {
        self.bit(2)
    }
    pub fn rapl_disabled(self) -> bool {
        self.bit(3)
    }
    pub fn ciphertext_hiding_enabled(self) -> bool {
        self.bit(4)
    }
    /// Version 3+.
    pub fn alias_check_complete(self) -> bool {
        self.bit(5)
    }
    /// Version 5: SEV-TIO enabled.
    pub fn tio_enabled(self) -> bool {
        self.bit(7)
    }
}

/// Which key signed the report (SIGNING_KEY, bits 4:2 of the word at 0x48).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningKey {
    Vcek,
    Vlek,
    /// 7: no key (an unsigned report).
    None,
    Reserved(u8),
}

impl std::fmt::Display for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SigningKey::Vcek => f.write_str("VCEK"),
            SigningKey::Vlek => f.write_str("VLEK"),
            SigningKey::None => f.write_str("no key"),
            SigningKey::Reserved(v) => write!(f, "reserved signing key {v}"),
        }
    }
}

/// The flags word at 0x48.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyInfo(pub u32);

impl KeyInfo {
    /// Bit 0: AUTHOR_KEY_DIGEST is present.
    pub fn author_key_en(self) -> bool {
        self.0 & 1 == 1
    }
    /// Bit 1: MASK_CHIP_KEY (the report is not signed).
    pub fn mask_chip_key(self) -> bool {
        self.0 >> 1 & 1 == 1
    }
    /// Bits 4:2.
    pub fn signing_key(self) -> SigningKey {
        match (self.0 >> 2) & 7 {
            0 => SigningKey::Vcek,
            1 => SigningKey::Vlek,
            7 => SigningKey::None,
            v => SigningKey::Reserved(v as u8),
        }
    }
}

/// A firmware version (build, minor, major as stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirmwareVersion {
    pub major: u8,
    pub minor: u8,
    pub build: u8,
}

impl std::fmt::Display for FirmwareVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{} build {}", self.major, self.minor, self.build)
    }
}

/// CPUID fields (version 3+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpuid {
    /// Extended family + family.
    pub family: u8,
    /// Extended model + model.
    pub model: u8,
    pub stepping: u8,
}

/// A parsed ATTESTATION_REPORT. Fields are as the report states them;
/// trust them only after [`verify_report`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnpReport {
    pub version: u32,
    pub guest_svn: u32,
    pub policy: GuestPolicy,
    pub family_id: [u8; 16],
    pub image_id: [u8; 16],
    pub vmpl: u32,
    pub signature_algo: u32,
    pub current_tcb: TcbVersion,
    pub platform_info: PlatformInfo,
    pub key_info: KeyInfo,
    pub report_data: [u8; 64],
    pub measurement: [u8; 48],
    pub host_data: [u8; 32],
    pub id_key_digest: [u8; 48],
    pub author_key_digest: [u8; 48],
    pub report_id: [u8; 32],
    pub report_id_ma: [u8; 32],
    pub reported_tcb: TcbVersion,
    /// Version 3+.
    pub cpuid: Option<Cpuid>,
    pub chip_id: [u8; 64],
    pub committed_tcb: TcbVersion,
    pub current_version: FirmwareVersion,
    pub committed_version: FirmwareVersion,
    pub launch_tcb: TcbVersion,
    /// Version 5+.
    pub launch_mit_vector: Option<u64>,
    /// Version 5+.
    pub current_mit_vector: Option<u64>,
    /// R, 72 bytes little-endian.
    pub signature_r: [u8; 72],
    /// S, 72 bytes little-endian.
    pub signature_s: [u8; 72],
    /// The generation the TCBs were decoded for: from the CPUID fields at
    /// parse time, from the certificate chain after [`verify_report`].
    pub generation: Option<Generation>,
    /// The layout the TCBs were decoded with.
    pub tcb_layout: TcbLayout,
    raw: Vec<u8>,
}

fn arr<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[off..off + N]);
    a
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(arr(b, off))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(arr(b, off))
}

/// Parses the 1184-byte report (layout in the module header).
pub fn parse_report(bytes: &[u8]) -> Result<SnpReport, SnpError> {
    if bytes.len() != REPORT_LEN {
        return Err(SnpError::ReportLength(bytes.len()));
    }
    let b = bytes;
    let version = u32_at(b, 0x000);
    if !matches!(version, 2 | 3 | 5) {
        return Err(SnpError::UnsupportedVersion(version));
    }
    let cpuid = (version >= 3).then(|| Cpuid {
        family: b[0x188],
        model: b[0x189],
        stepping: b[0x18A],
    });
    let generation = cpuid.and_then(|c| Generation::from_cpuid(c.family, c.model));
    let tcb_layout = match (generation, cpuid) {
        (Some(g), _) => g.tcb_layout(),
        (None, Some(c)) if c.family >= 0x1A => TcbLayout::Turin,
        _ => TcbLayout::Legacy,
    };
    let tcb = |off| TcbVersion::decode(arr(b, off), tcb_layout);
    let fw = |off: usize| FirmwareVersion {
        build: b[off],
        minor: b[off + 1],
        major: b[off + 2],
    };
    Ok(SnpReport {
        version,
        guest_svn: u32_at(b, 0x004),
        policy: GuestPolicy(u64_at(b, 0x008)),
        family_id: arr(b, 0x010),
        image_id: arr(b, 0x020),
        vmpl: u32_at(b, 0x030),
        signature_algo: u32_at(b, 0x034),
        current_tcb: tcb(0x038),
        platform_info: PlatformInfo(u64_at(b, 0x040)),
        key_info: KeyInfo(u32_at(b, 0x048)),
        report_data: arr(b, 0x050),
        measurement: arr(b, 0x090),
        host_data: arr(b, 0x0C0),
        id_key_digest: arr(b, 0x0E0),
        author_key_digest: arr(b, 0x110),
        report_id: arr(b, 0x140),
        report_id_ma: arr(b, 0x160),
        reported_tcb: tcb(0x180),
        cpuid,
        chip_id: arr(b, 0x1A0),
        committed_tcb: tcb(0x1E0),
        current_version: fw(0x1E8),
        committed_version: fw(0x1EC),
        launch_tcb: tcb(0x1F0),
        launch_mit_vector: (version >= 5).then(|| u64_at(b, 0x1F8)),
        current_mit_vector: (version >= 5).then(|| u64_at(b, 0x200)),
        signature_r: arr(b, 0x2A0),
        signature_s: arr(b, 0x2E8),
        generation,
        tcb_layout,
        raw: bytes.to_vec(),
    })
}

/// A report file's bytes: the binary report, or its hex (upper or lower
/// case, whitespace anywhere).
pub fn report_from_file_bytes(bytes: &[u8]) -> Result<SnpReport, SnpError> {
    if bytes.len() > MAX_REPORT_FILE {
        return Err(SnpError::ReportFile(format!(
            "{} bytes exceed the limit of {MAX_REPORT_FILE}",
            bytes.len()
        )));
    }
    let text = !bytes.is_empty()
        && bytes
            .iter()
            .all(|c| c.is_ascii_hexdigit() || c.is_ascii_whitespace());
    if !text {
        return parse_report(bytes);
    }
    let digits: Vec<u8> = bytes
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let raw = hex::decode(&digits).map_err(|e| {
        SnpError::ReportFile(format!(
            "hex text of {} digits does not decode: {e}",
            digits.len()
        ))
    })?;
    parse_report(&raw)
}

impl SnpReport {
    /// The report as parsed.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Bytes 0x000..0x2A0, what the signature covers.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.raw[..SIGNED_LEN]
    }

    /// CHIP_ID is all zero (MaskChipId).
    pub fn chip_id_masked(&self) -> bool {
        self.chip_id == [0; 64]
    }

    /// The report with its TCBs decoded for `generation`; refused when the
    /// report's CPUID fields name another generation.
    pub fn for_generation(&self, generation: Generation) -> Result<SnpReport, SnpError> {
        if let Some(c) = self.cpuid {
            let named = Generation::from_cpuid(c.family, c.model);
            if named != Some(generation) {
                return Err(SnpError::GenerationMismatch(format!(
                    "the report's CPUID family {:#04x} model {:#04x} is {}, the certificate chain is {generation}",
                    c.family,
                    c.model,
                    named.map_or("not a known SEV-SNP generation", Generation::name)
                )));
            }
        }
        let layout = generation.tcb_layout();
        let mut r = self.clone();
        let re = |t: TcbVersion| TcbVersion::decode(t.raw, layout);
        r.current_tcb = re(r.current_tcb);
        r.reported_tcb = re(r.reported_tcb);
        r.committed_tcb = re(r.committed_tcb);
        r.launch_tcb = re(r.launch_tcb);
        r.generation = Some(generation);
        r.tcb_layout = layout;
        Ok(r)
    }

    /// The report's fields as JSON (byte strings in hex).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "version": self.version,
            "guest_svn": self.guest_svn,
            "policy": {
                "raw": format!("{:#x}", self.policy.0),
                "abi_major": self.policy.abi_major(),
                "abi_minor": self.policy.abi_minor(),
                "smt": self.policy.smt(),
                "migrate_ma": self.policy.migrate_ma(),
                "debug": self.policy.debug(),
                "single_socket": self.policy.single_socket(),
            },
            "family_id": hex::encode(self.family_id),
            "image_id": hex::encode(self.image_id),
            "vmpl": self.vmpl,
            "signature_algo": self.signature_algo,
            "current_tcb": self.current_tcb.to_json(),
            "platform_info": format!("{:#x}", self.platform_info.0),
            "author_key_en": self.key_info.author_key_en(),
            "mask_chip_key": self.key_info.mask_chip_key(),
            "signing_key": self.key_info.signing_key().to_string(),
            "report_data": hex::encode(self.report_data),
            "measurement": hex::encode(self.measurement),
            "host_data": hex::encode(self.host_data),
            "id_key_digest": hex::encode(self.id_key_digest),
            "author_key_digest": hex::encode(self.author_key_digest),
            "report_id": hex::encode(self.report_id),
            "report_id_ma": hex::encode(self.report_id_ma),
            "reported_tcb": self.reported_tcb.to_json(),
            "cpuid": self.cpuid.map(|c| serde_json::json!({
                "family": c.family, "model": c.model, "stepping": c.stepping,
            })),
            "chip_id": hex::encode(self.chip_id),
            "committed_tcb": self.committed_tcb.to_json(),
            "current_version": self.current_version.to_string(),
            "committed_version": self.committed_version.to_string(),
            "launch_tcb": self.launch_tcb.to_json(),
            "launch_mit_vector": self.launch_mit_vector,
            "current_mit_vector": self.current_mit_vector,
            "generation": self.generation.map(Generation::name),
        })
    }
}

// ---------------------------------------------------------------------------
// Certificates.

/// The pinned ARKs and the built-in ASKs, PEM (see snp/certs/README.md).
pub mod certs {
    pub const ARK_MILAN: &str = include_str!("snp/certs/milan-ark.pem");
    pub const ASK_MILAN: &str = include_str!("snp/certs/milan-ask.pem");
    pub const ARK_GENOA: &str = include_str!("snp/certs/genoa-ark.pem");
    pub const ASK_GENOA: &str = include_str!("snp/certs/genoa-ask.pem");
    pub const ARK_TURIN: &str = include_str!("snp/certs/turin-ark.pem");
    pub const ASK_TURIN: &str = include_str!("snp/certs/turin-ask.pem");
}

impl Generation {
    /// The pinned ARK, PEM.
    pub fn ark_pem(self) -> &'static str {
        match self {
            Generation::Milan => certs::ARK_MILAN,
            Generation::Genoa => certs::ARK_GENOA,
            Generation::Turin => certs::ARK_TURIN,
        }
    }
    /// The built-in ASK (the VCEK signer), PEM.
    pub fn ask_pem(self) -> &'static str {
        match self {
            Generation::Milan => certs::ASK_MILAN,
            Generation::Genoa => certs::ASK_GENOA,
            Generation::Turin => certs::ASK_TURIN,
        }
    }
}

/// A parsed certificate with its DER.
#[derive(Debug, Clone)]
struct Cert {
    der: Vec<u8>,
    cert: Certificate,
}

impl Cert {
    fn parse(which: &'static str, bytes: &[u8]) -> Result<Cert, SnpError> {
        let bad = |reason: String| SnpError::Certificate { which, reason };
        if bytes.len() > MAX_CERT {
            return Err(bad(format!(
                "{} bytes exceed the limit of {MAX_CERT}",
                bytes.len()
            )));
        }
        let begin = b"-----BEGIN";
        let pem_at = bytes.windows(begin.len()).position(|w| w == begin);
        let der = if let Some(at) = pem_at.filter(|_| bytes.first() != Some(&0x30)) {
            // The first PEM block (text before it and after it ignored).
            let text = std::str::from_utf8(&bytes[at..])
                .map_err(|_| bad("PEM text is not UTF-8".into()))?;
            let end = "-----END CERTIFICATE-----";
            let block = text
                .find(end)
                .map(|e| &text[..e + end.len()])
                .ok_or_else(|| bad("no -----END CERTIFICATE----- line".into()))?;
            let (label, der) = der::pem::decode_vec(block.as_bytes())
                .map_err(|e| bad(format!("not a PEM certificate: {e}")))?;
            if label != "CERTIFICATE" {
                return Err(bad(format!("PEM label {label:?} is not CERTIFICATE")));
            }
            der
        } else {
            bytes.to_vec()
        };
        let cert = Certificate::from_der(&der)
            .map_err(|e| bad(format!("not a DER X.509 certificate: {e}")))?;
        Ok(Cert { der, cert })
    }

    fn subject(&self) -> String {
        self.cert.tbs_certificate.subject.to_string()
    }

    fn common_name(&self) -> Option<String> {
        common_name(&self.cert.tbs_certificate.subject)
    }

    fn issuer_cn(&self) -> Option<String> {
        common_name(&self.cert.tbs_certificate.issuer)
    }

    fn self_issued(&self) -> bool {
        self.cert.tbs_certificate.subject == self.cert.tbs_certificate.issuer
    }

    fn spki_der(&self) -> Option<Vec<u8>> {
        self.cert
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .ok()
    }

    /// The tbsCertificate exactly as encoded (not re-encoded).
    fn tbs_bytes(&self) -> Result<&[u8], String> {
        let mut r = der::SliceReader::new(&self.der).map_err(|e| e.to_string())?;
        let _outer = der::Header::decode(&mut r).map_err(|e| e.to_string())?;
        r.tlv_bytes().map_err(|e| e.to_string())
    }

    fn check_validity(&self, which: &'static str, now: SystemTime) -> Result<(), SnpError> {
        let v = &self.cert.tbs_certificate.validity;
        if now < v.not_before.to_system_time() || now > v.not_after.to_system_time() {
            return Err(SnpError::CertificateNotValid {
                which,
                subject: self.subject(),
                not_before: v.not_before.to_string(),
                not_after: v.not_after.to_string(),
            });
        }
        Ok(())
    }

    /// This certificate's RSASSA-PSS SHA-384 signature verifies with
    /// `issuer`'s key (and names it as issuer).
    fn signed_by(&self, issuer: &Cert) -> Result<(), String> {
        let c = &self.cert;
        if c.tbs_certificate.issuer != issuer.cert.tbs_certificate.subject {
            return Err(format!(
                "its issuer is {}, not {}",
                c.tbs_certificate.issuer,
                issuer.subject()
            ));
        }
        if c.signature_algorithm.oid != ID_RSASSA_PSS {
            return Err(format!(
                "signature algorithm {} is not RSASSA-PSS",
                c.signature_algorithm.oid
            ));
        }
        if c.tbs_certificate.signature != c.signature_algorithm {
            return Err("the inner and outer signature algorithms differ".into());
        }
        let params = c
            .signature_algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.to_der().ok())
            .ok_or("RSASSA-PSS without parameters")?;
        let params = rsa::pkcs1::RsaPssParams::try_from(params.as_slice())
            .map_err(|e| format!("malformed RSASSA-PSS parameters: {e}"))?;
        if params.hash.oid != ID_SHA_384 || params.salt_len != 48 {
            return Err(format!(
                "RSASSA-PSS with hash {} and salt {} is not SHA-384 with salt 48",
                params.hash.oid, params.salt_len
            ));
        }
        use rsa::pkcs8::DecodePublicKey as _;
        let spki = issuer.spki_der().ok_or("issuer key does not encode")?;
        let key = rsa::RsaPublicKey::from_public_key_der(&spki)
            .map_err(|e| format!("the issuer key is not RSA: {e}"))?;
        let sig = c
            .signature
            .as_bytes()
            .ok_or("the signature is not a whole number of bytes")?;
        let sig = rsa::pss::Signature::try_from(sig).map_err(|e| e.to_string())?;
        let tbs = self.tbs_bytes()?;
        rsa::pss::VerifyingKey::<Sha384>::new(key)
            .verify(tbs, &sig)
            .map_err(|_| "the RSASSA-PSS SHA-384 signature does not verify".to_string())
    }

    fn extension(&self, oid: &str) -> Result<Option<&[u8]>, String> {
        let Some(exts) = &self.cert.tbs_certificate.extensions else {
            return Ok(None);
        };
        let mut found = exts.iter().filter(|e| e.extn_id.to_string() == oid);
        let first = found.next();
        if found.next().is_some() {
            return Err(format!("extension {oid} appears twice"));
        }
        Ok(first.map(|e| e.extn_value.as_bytes()))
    }

    fn is_ca(&self) -> bool {
        use x509_cert::ext::pkix::BasicConstraints;
        matches!(
            self.extension("2.5.29.19"),
            Ok(Some(v)) if BasicConstraints::from_der(v).is_ok_and(|b| b.ca)
        )
    }
}

fn common_name(name: &x509_cert::name::Name) -> Option<String> {
    for rdn in name.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid == const_oid::db::rfc4519::CN {
                if let Ok(s) = atv.value.decode_as::<der::asn1::Utf8StringRef<'_>>() {
                    return Some(s.to_string());
                }
                if let Ok(s) = atv.value.decode_as::<der::asn1::PrintableStringRef<'_>>() {
                    return Some(s.to_string());
                }
                if let Ok(s) = atv.value.decode_as::<der::asn1::Ia5StringRef<'_>>() {
                    return Some(s.to_string());
                }
            }
        }
    }
    None
}

/// The TCB a VCEK or VLEK certifies (its SPL extensions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertTcb {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
    pub fmc: Option<u8>,
}

/// What kind of endorsement key a certificate holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EkKind {
    Vcek,
    Vlek,
}

impl EkKind {
    pub fn name(self) -> &'static str {
        match self {
            EkKind::Vcek => "VCEK",
            EkKind::Vlek => "VLEK",
        }
    }
    fn signer(self) -> &'static str {
        match self {
            EkKind::Vcek => "ASK",
            EkKind::Vlek => "ASVK",
        }
    }
}

/// A VCEK or VLEK certificate, parsed.
#[derive(Debug, Clone)]
pub struct EndorsementCert {
    cert: Cert,
    pub kind: EkKind,
    /// hwID (VCEK only): 64 bytes, or 8 on Turin.
    pub hw_id: Option<Vec<u8>>,
    pub tcb: CertTcb,
    /// productName, e.g. `Milan-B0`.
    pub product_name: Option<String>,
    key: p384::ecdsa::VerifyingKey,
}

mod oid {
    pub const PRODUCT_NAME: &str = "1.3.6.1.4.1.3704.1.2";
    pub const BL_SPL: &str = "1.3.6.1.4.1.3704.1.3.1";
    pub const TEE_SPL: &str = "1.3.6.1.4.1.3704.1.3.2";
    pub const SNP_SPL: &str = "1.3.6.1.4.1.3704.1.3.3";
    pub const UCODE_SPL: &str = "1.3.6.1.4.1.3704.1.3.8";
    pub const FMC_SPL: &str = "1.3.6.1.4.1.3704.1.3.9";
    pub const HW_ID: &str = "1.3.6.1.4.1.3704.1.4";
}

impl EndorsementCert {
    /// Parses a VCEK or VLEK certificate (DER or PEM).
    pub fn from_bytes(bytes: &[u8]) -> Result<EndorsementCert, SnpError> {
        let cert = Cert::parse("VCEK/VLEK", bytes)?;
        let cn = cert.common_name().unwrap_or_default();
        let kind = match cn.as_str() {
            "SEV-VCEK" => EkKind::Vcek,
            "SEV-VLEK" => EkKind::Vlek,
            other => {
                return Err(SnpError::Certificate {
                    which: "VCEK/VLEK",
                    reason: format!(
                        "subject CN {other:?} is neither SEV-VCEK nor SEV-VLEK ({})",
                        cert.subject()
                    ),
                })
            }
        };
        let which = kind.name();
        let bad = |reason: String| SnpError::Certificate { which, reason };
        let ext = |oid: &str| cert.extension(oid).map_err(bad);
        let spl = |name: &'static str, oid: &'static str| -> Result<Option<u8>, SnpError> {
            match ext(oid)? {
                None => Ok(None),
                Some(v) => u8::from_der(v).map(Some).map_err(|e| {
                    bad(format!(
                        "{name} extension ({oid}) is not an INTEGER 0..=255: {e}"
                    ))
                }),
            }
        };
        let need = |name: &'static str, oid: &'static str| -> Result<u8, SnpError> {
            spl(name, oid)?.ok_or(SnpError::MissingExtension {
                which,
                extension: name,
                oid,
            })
        };
        let tcb = CertTcb {
            bootloader: need("blSPL", oid::BL_SPL)?,
            tee: need("teeSPL", oid::TEE_SPL)?,
            snp: need("snpSPL", oid::SNP_SPL)?,
            microcode: need("ucodeSPL", oid::UCODE_SPL)?,
            fmc: spl("fmcSPL", oid::FMC_SPL)?,
        };
        let hw_id = ext(oid::HW_ID)?.map(<[u8]>::to_vec);
        if let Some(h) = &hw_id {
            if h.len() != 64 && h.len() != 8 {
                return Err(bad(format!("hwID is {} bytes, not 64 (or 8)", h.len())));
            }
        }
        if kind == EkKind::Vcek && hw_id.is_none() {
            return Err(SnpError::MissingExtension {
                which,
                extension: "hwID",
                oid: oid::HW_ID,
            });
        }
        let product_name = match ext(oid::PRODUCT_NAME)? {
            None => None,
            Some(v) => Some(
                der::asn1::Ia5StringRef::from_der(v)
                    .map(|s| s.to_string())
                    .or_else(|_| der::asn1::Utf8StringRef::from_der(v).map(|s| s.to_string()))
                    .map_err(|e| bad(format!("productName is not a string: {e}")))?,
            ),
        };
        use p384::pkcs8::DecodePublicKey as _;
        let spki = cert
            .spki_der()
            .ok_or_else(|| bad("key does not encode".into()))?;
        let key = p384::ecdsa::VerifyingKey::from_public_key_der(&spki).map_err(|e| {
            bad(format!(
                "the key is not ECDSA P-384 ({}): {e}",
                cert.cert
                    .tbs_certificate
                    .subject_public_key_info
                    .algorithm
                    .oid
            ))
        })?;
        Ok(EndorsementCert {
            cert,
            kind,
            hw_id,
            tcb,
            product_name,
            key,
        })
    }

    pub fn der(&self) -> &[u8] {
        &self.cert.der
    }

    pub fn subject(&self) -> String {
        self.cert.subject()
    }

    /// The subject's CN (`SEV-VCEK`, `SEV-VLEK`).
    pub fn common_name(&self) -> String {
        self.cert.common_name().unwrap_or_default()
    }

    /// The generation its productName (or else its issuer's CN) names.
    pub fn generation(&self) -> Option<Generation> {
        self.product_name
            .as_deref()
            .and_then(Generation::from_product)
            .or_else(|| {
                self.cert
                    .issuer_cn()
                    .as_deref()
                    .and_then(Generation::from_product)
            })
    }

    /// hwID equals CHIP_ID (an 8-byte Turin hwID: the first 8 bytes, the
    /// rest zero).
    fn hw_id_matches(&self, chip_id: &[u8; 64]) -> bool {
        match self.hw_id.as_deref() {
            Some(h) if h.len() == 64 => h == chip_id,
            Some(h) if h.len() == 8 => h == &chip_id[..8] && chip_id[8..] == [0; 56],
            _ => false,
        }
    }

    fn tcb_matches(&self, t: &TcbVersion) -> bool {
        let c = &self.tcb;
        c.bootloader == t.bootloader
            && c.tee == t.tee
            && c.snp == t.snp
            && c.microcode == t.microcode
            && c.fmc == t.fmc
    }
}

/// Which pinned ARK (and ASK) a chain verified to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainInfo {
    pub generation: Generation,
    pub ark_subject: String,
    pub ask_subject: String,
    /// The ASK's (or ASVK's) CN, e.g. `SEV-Milan`.
    pub ask_name: String,
    /// The ASK was the built-in one (none was supplied).
    pub builtin_ask: bool,
}

impl ChainInfo {
    /// How `ek` chains to the root, for people:
    /// `VCEK (Milan) -> SEV-Milan (built in) -> pinned ARK-Milan`.
    pub fn describe(&self, ek: &EndorsementCert) -> String {
        format!(
            "{} ({}) -> {}{} -> pinned ARK-{}",
            ek.kind.name(),
            ek.product_name.as_deref().unwrap_or("no productName"),
            self.ask_name,
            if self.builtin_ask { " (built in)" } else { "" },
            self.generation
        )
    }
}

fn pinned_ark(g: Generation) -> Cert {
    // The pinned PEMs are constants checked by the unit tests
    // (`pinned_certificates`), so they parse.
    Cert::parse("ARK", g.ark_pem().as_bytes()).unwrap_or_else(|e| panic!("pinned ARK {g}: {e}"))
}

fn builtin_ask(g: Generation) -> Cert {
    Cert::parse("ASK", g.ask_pem().as_bytes()).unwrap_or_else(|e| panic!("built-in ASK {g}: {e}"))
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Verifies the endorsement key's chain: the ARK is a pinned one (a
/// supplied ARK must equal one, byte for byte or by public key; with none
/// the pinned ones are tried), it is self-signed, it signed the ASK (ASVK
/// for a VLEK; with none, the built-in ASK named as the VCEK's issuer), the
/// ASK signed the VCEK/VLEK, and all three are valid at `now`.
pub fn verify_chain(
    ek: &EndorsementCert,
    ask_der: Option<&[u8]>,
    ark_der: Option<&[u8]>,
    now: SystemTime,
) -> Result<ChainInfo, SnpError> {
    let signer = ek.kind.signer();
    // The candidate roots.
    let candidates: Vec<(Generation, Cert)> = match ark_der {
        Some(bytes) => {
            let given = Cert::parse("ARK", bytes)?;
            let spki = given.spki_der();
            let pinned = Generation::ALL
                .into_iter()
                .map(|g| (g, pinned_ark(g)))
                .find(|(_, p)| p.der == given.der || (spki.is_some() && p.spki_der() == spki));
            match pinned {
                Some(p) => vec![p],
                None => {
                    return Err(SnpError::ArkNotPinned {
                        subject: given.subject(),
                        sha256: sha256_hex(&given.der),
                    })
                }
            }
        }
        None => Generation::ALL
            .into_iter()
            .map(|g| (g, pinned_ark(g)))
            .collect(),
    };
    // The ASK.
    let (ask, builtin) = match ask_der {
        Some(bytes) => (Cert::parse(signer, bytes)?, false),
        None if ek.kind == EkKind::Vlek => {
            return Err(SnpError::MissingCertificate(
                "a VLEK is signed by its ASVK, which is not built in: supply it".into(),
            ))
        }
        None => {
            let issuer = &ek.cert.cert.tbs_certificate.issuer;
            let found = candidates
                .iter()
                .map(|(g, _)| builtin_ask(*g))
                .find(|a| &a.cert.tbs_certificate.subject == issuer);
            match found {
                Some(a) => (a, true),
                None => {
                    return Err(SnpError::MissingCertificate(format!(
                        "no built-in ASK is the VCEK's issuer {issuer}: supply the chain"
                    )))
                }
            }
        }
    };
    if ask.self_issued() {
        return Err(SnpError::Certificate {
            which: signer,
            reason: format!("{} is self-issued: a root, not an {signer}", ask.subject()),
        });
    }
    if !ask.is_ca() {
        return Err(SnpError::Certificate {
            which: signer,
            reason: format!("{} is not a CA (basicConstraints)", ask.subject()),
        });
    }
    // The ARK: the candidate that signed the ASK.
    let mut reasons = Vec::new();
    let mut root = None;
    for (g, ark) in &candidates {
        match ask.signed_by(ark) {
            Ok(()) => {
                root = Some((*g, ark));
                break;
            }
            Err(r) => reasons.push(format!("{}: {r}", ark.common_name().unwrap_or_default())),
        }
    }
    let Some((generation, ark)) = root else {
        return Err(SnpError::AskNotSignedByArk {
            ask: signer,
            ask_subject: ask.subject(),
            expected: if candidates.len() == 1 {
                format!(
                    "the pinned {}",
                    candidates[0].1.common_name().unwrap_or_default()
                )
            } else {
                "any pinned ARK".into()
            },
            reason: reasons.join("; "),
        });
    };
    ark.signed_by(ark)
        .map_err(|_| SnpError::ArkNotSelfSigned(ark.subject()))?;
    ek.cert
        .signed_by(&ask)
        .map_err(|reason| SnpError::VcekNotSignedByAsk {
            ek: ek.kind.name(),
            ek_subject: ek.subject(),
            ask: signer,
            ask_subject: ask.subject(),
            reason,
        })?;
    ark.check_validity("ARK", now)?;
    ask.check_validity(signer, now)?;
    ek.cert.check_validity(ek.kind.name(), now)?;
    if let Some(named) = ek.generation() {
        if named != generation {
            return Err(SnpError::GenerationMismatch(format!(
                "the {} names {named} ({}), its chain ends at ARK-{generation}",
                ek.kind.name(),
                ek.product_name.as_deref().unwrap_or("issuer")
            )));
        }
    }
    Ok(ChainInfo {
        generation,
        ark_subject: ark.subject(),
        ask_subject: ask.subject(),
        ask_name: ask.common_name().unwrap_or_default(),
        builtin_ask: builtin,
    })
}

/// The report's signature: SIGNATURE_ALGO 1, signed (not MASK_CHIP_KEY) by
/// the kind of key `ek` is, R and S well formed (high bytes and the reserved
/// rest of the field zero), and ECDSA P-384 SHA-384 over bytes 0..0x2A0
/// verifying with `ek`'s key.
pub fn verify_signature(report: &SnpReport, ek: &EndorsementCert) -> Result<(), SnpError> {
    if report.signature_algo != SIG_ALGO_ECDSA_P384_SHA384 {
        return Err(SnpError::UnsupportedSignatureAlgo(report.signature_algo));
    }
    if report.key_info.mask_chip_key() {
        return Err(SnpError::ReportNotSigned);
    }
    let says = report.key_info.signing_key();
    let matches = matches!(
        (says, ek.kind),
        (SigningKey::Vcek, EkKind::Vcek) | (SigningKey::Vlek, EkKind::Vlek)
    );
    if !matches {
        return Err(SnpError::SigningKeyMismatch {
            report: says.to_string(),
            cert: ek.kind.name().into(),
        });
    }
    let raw = report.raw();
    if report.signature_r[48..] != [0; 24] || report.signature_s[48..] != [0; 24] {
        return Err(SnpError::SignatureMalformed(
            "R or S does not fit 48 bytes (their high 24 bytes must be zero)".into(),
        ));
    }
    if let Some(i) = raw[0x330..].iter().position(|b| *b != 0) {
        return Err(SnpError::SignatureMalformed(format!(
            "reserved byte {:#05x} of the signature field is {:#04x}, not zero",
            0x330 + i,
            raw[0x330 + i]
        )));
    }
    let be = |le: &[u8; 72]| {
        let mut b = [0u8; 48];
        for (d, s) in b.iter_mut().zip(le[..48].iter().rev()) {
            *d = *s;
        }
        b
    };
    let sig =
        p384::ecdsa::Signature::from_scalars(be(&report.signature_r), be(&report.signature_s))
            .map_err(|_| {
                SnpError::SignatureMalformed("R or S is zero or not below the group order".into())
            })?;
    ek.key
        .verify(report.signed_bytes(), &sig)
        .map_err(|_| SnpError::BadSignature(format!("{} {}", ek.kind.name(), ek.subject())))
}

/// CHIP_ID equals the VCEK's hwID (a VLEK has none; a masked CHIP_ID, all
/// zero, cannot be compared and passes: the signature still binds the
/// report to that chip's VCEK).
pub fn check_chip_id(report: &SnpReport, ek: &EndorsementCert) -> Result<String, SnpError> {
    if ek.kind == EkKind::Vlek {
        return Ok("signed with a VLEK (per cloud provider): no chip id to compare".into());
    }
    if report.chip_id_masked() {
        return Ok("CHIP_ID is masked (all zero): not compared".into());
    }
    if ek.hw_id_matches(&report.chip_id) {
        return Ok(format!(
            "CHIP_ID {}… is the VCEK's hwID",
            hex::encode(&report.chip_id[..8])
        ));
    }
    Err(SnpError::ChipIdMismatch {
        report: hex::encode(report.chip_id),
        cert: ek.hw_id.as_deref().map(hex::encode).unwrap_or_default(),
    })
}

/// REPORTED_TCB equals the TCB the VCEK/VLEK certifies (decode the report
/// for the right generation first: [`SnpReport::for_generation`]).
pub fn check_tcb(report: &SnpReport, ek: &EndorsementCert) -> Result<String, SnpError> {
    let t = &report.reported_tcb;
    let c = &ek.tcb;
    let ekn = ek.kind.name();
    let cmp = |component: &'static str, r: u8, e: u8| {
        if r == e {
            Ok(())
        } else {
            Err(SnpError::TcbMismatch {
                component,
                report: r.to_string(),
                cert: e.to_string(),
                ek: ekn,
            })
        }
    };
    cmp("bootloader", t.bootloader, c.bootloader)?;
    cmp("tee", t.tee, c.tee)?;
    cmp("snp", t.snp, c.snp)?;
    cmp("microcode", t.microcode, c.microcode)?;
    if t.fmc != c.fmc {
        let show = |v: Option<u8>| v.map_or("none".to_string(), |v| v.to_string());
        return Err(SnpError::TcbMismatch {
            component: "fmc",
            report: show(t.fmc),
            cert: show(c.fmc),
            ek: ekn,
        });
    }
    Ok(format!("reported TCB ({t}) is the one the {ekn} certifies"))
}

/// A report that verified.
#[derive(Debug, Clone)]
pub struct VerifiedSnp {
    /// The report, its TCBs decoded for the chain's generation.
    pub report: SnpReport,
    pub generation: Generation,
    pub signing_key: EkKind,
    pub chain: ChainInfo,
    /// What was checked, one line per check.
    pub details: Vec<String>,
}

/// Verifies a report: the certificate chain to a pinned ARK
/// ([`verify_chain`]), the signature ([`verify_signature`]), CHIP_ID against
/// hwID ([`check_chip_id`]) and REPORTED_TCB against the certificate's TCB
/// ([`check_tcb`]), all certificates valid at `now`. `vcek_or_vlek`, `ask`
/// and `ark` are DER (or PEM).
pub fn verify_report(
    report: &SnpReport,
    vcek_or_vlek: &[u8],
    ask: Option<&[u8]>,
    ark: Option<&[u8]>,
    now: SystemTime,
) -> Result<VerifiedSnp, SnpError> {
    let ek = EndorsementCert::from_bytes(vcek_or_vlek)?;
    verify_report_with(report, &ek, ask, ark, now)
}

/// [`verify_report`] with the endorsement certificate already parsed.
pub fn verify_report_with(
    report: &SnpReport,
    ek: &EndorsementCert,
    ask: Option<&[u8]>,
    ark: Option<&[u8]>,
    now: SystemTime,
) -> Result<VerifiedSnp, SnpError> {
    let chain = verify_chain(ek, ask, ark, now)?;
    let report = report.for_generation(chain.generation)?;
    verify_signature(&report, ek)?;
    let chip = check_chip_id(&report, ek)?;
    let tcb = check_tcb(&report, ek)?;
    let details = vec![
        chain.describe(ek),
        format!("ECDSA P-384 signature by the {} verifies", ek.kind.name()),
        chip,
        tcb,
    ];
    Ok(VerifiedSnp {
        generation: chain.generation,
        signing_key: ek.kind,
        chain,
        report,
        details,
    })
}

// ---------------------------------------------------------------------------
// The certificate table (SNP_GET_EXT_REPORT, configfs-tsm auxblob).

const fn guid(s: &[u8; 32]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = (hexval(s[2 * i]) << 4) | hexval(s[2 * i + 1]);
        i += 1;
    }
    out
}

const fn hexval(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => panic!("not a lower-case hex digit"),
    }
}

/// The GUIDs, in the byte order the table holds them (RFC 4122 order, as
/// AMD's sev-tool, the `sev` crate and Linux write them).
pub mod guids {
    use super::guid;
    /// 63da758d-e664-4564-adc5-f4b93be8accd
    pub const VCEK: [u8; 16] = guid(b"63da758de6644564adc5f4b93be8accd");
    /// a8074bc2-a25a-483e-aae6-39c045a0b8a1
    pub const VLEK: [u8; 16] = guid(b"a8074bc2a25a483eaae639c045a0b8a1");
    /// 4ab7b379-bbac-4fe4-a02f-05aef327c782 (the ASK, or a VLEK's ASVK)
    pub const ASK: [u8; 16] = guid(b"4ab7b379bbac4fe4a02f05aef327c782");
    /// c0b406a4-a803-4952-9743-3fb6014cd0ae
    pub const ARK: [u8; 16] = guid(b"c0b406a4a803495297433fb6014cd0ae");
}

/// What an entry holds, by its GUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    Vcek,
    Vlek,
    Ask,
    Ark,
    Other([u8; 16]),
}

impl CertKind {
    pub fn of(guid: &[u8; 16]) -> CertKind {
        match *guid {
            guids::VCEK => CertKind::Vcek,
            guids::VLEK => CertKind::Vlek,
            guids::ASK => CertKind::Ask,
            guids::ARK => CertKind::Ark,
            other => CertKind::Other(other),
        }
    }
}

/// One entry, with its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertTableEntry {
    pub guid: [u8; 16],
    pub kind: CertKind,
    pub data: Vec<u8>,
}

/// A parsed certificate table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertTable {
    pub entries: Vec<CertTableEntry>,
}

impl CertTable {
    /// The data of the entry of `kind`.
    pub fn get(&self, kind: CertKind) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.data.as_slice())
    }
}

const ENTRY: usize = 24;

/// Parses a certificate table: entries of a 16-byte GUID, a u32 offset and
/// a u32 length (little-endian), ended by an all-zero entry; each entry's
/// data lies after the entries, inside the buffer. Refused: no terminator,
/// more than [`MAX_CERT_ENTRIES`], a zero GUID with a non-zero offset or
/// length, an empty, out-of-bounds or table-overlapping range, a GUID twice.
pub fn parse_cert_table(bytes: &[u8]) -> Result<CertTable, SnpError> {
    let bad = |m: String| Err(SnpError::CertTable(m));
    if bytes.len() > MAX_CERT_TABLE {
        return bad(format!(
            "{} bytes exceed the limit of {MAX_CERT_TABLE}",
            bytes.len()
        ));
    }
    let mut raw = Vec::new();
    let table_end = loop {
        let i = raw.len();
        let off = i * ENTRY;
        let Some(e) = bytes.get(off..off + ENTRY) else {
            return bad(format!(
                "no all-zero terminating entry within the {} bytes ({i} entries read)",
                bytes.len()
            ));
        };
        if e.iter().all(|b| *b == 0) {
            break off + ENTRY;
        }
        let g: [u8; 16] = arr(e, 0);
        let (offset, length) = (u32_at(e, 16), u32_at(e, 20));
        if g == [0; 16] {
            return bad(format!(
                "entry {i} has a zero GUID but offset {offset} and length {length}"
            ));
        }
        if i == MAX_CERT_ENTRIES {
            return bad(format!("more than {MAX_CERT_ENTRIES} entries"));
        }
        raw.push((g, offset as usize, length as usize));
    };
    let mut entries: Vec<CertTableEntry> = Vec::with_capacity(raw.len());
    for (i, (g, offset, length)) in raw.into_iter().enumerate() {
        let name = uuid_string(&g);
        if length == 0 {
            return bad(format!("entry {i} ({name}) is empty"));
        }
        if offset < table_end {
            return bad(format!(
                "entry {i} ({name}) at offset {offset} overlaps the table's {table_end} bytes of entries"
            ));
        }
        let end = offset + length;
        if end > bytes.len() {
            return bad(format!(
                "entry {i} ({name}) spans {offset}..{end}, past the end of the {}-byte table",
                bytes.len()
            ));
        }
        if entries.iter().any(|e| e.guid == g) {
            return bad(format!("GUID {name} appears twice"));
        }
        entries.push(CertTableEntry {
            guid: g,
            kind: CertKind::of(&g),
            data: bytes[offset..end].to_vec(),
        });
    }
    Ok(CertTable { entries })
}

/// Builds a certificate table (the entries, the terminator, then the data).
pub fn build_cert_table(entries: &[([u8; 16], &[u8])]) -> Vec<u8> {
    let mut head = Vec::new();
    let mut data = Vec::new();
    let base = (entries.len() + 1) * ENTRY;
    for (g, d) in entries {
        head.extend_from_slice(g);
        head.extend_from_slice(&((base + data.len()) as u32).to_le_bytes());
        head.extend_from_slice(&(d.len() as u32).to_le_bytes());
        data.extend_from_slice(d);
    }
    head.extend_from_slice(&[0; ENTRY]);
    head.extend_from_slice(&data);
    head
}

/// How much of a certificate buffer the table uses: None when it holds no
/// entry; the whole buffer when it does not parse (the verifier then says
/// why).
fn cert_table_extent(buf: &[u8]) -> Option<usize> {
    if buf.len() < ENTRY || buf[..ENTRY].iter().all(|b| *b == 0) {
        return None;
    }
    let Ok(table) = parse_cert_table(buf) else {
        return Some(buf.len());
    };
    let mut end = (table.entries.len() + 1) * ENTRY;
    for (i, _) in table.entries.iter().enumerate() {
        let e = &buf[i * ENTRY..(i + 1) * ENTRY];
        end = end.max(u32_at(e, 16) as usize + u32_at(e, 20) as usize);
    }
    Some(end)
}

fn uuid_string(g: &[u8; 16]) -> String {
    let h = hex::encode(g);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

// ---------------------------------------------------------------------------
// Evidence and policy.

/// `tee.evidence` for kind `sev-snp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnpEvidence {
    /// The 1184-byte report, standard base64.
    pub report: String,
    /// The host's certificate table, standard base64, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_table: Option<String>,
}

impl SnpEvidence {
    pub fn new(report: &[u8], cert_table: Option<&[u8]>) -> SnpEvidence {
        SnpEvidence {
            report: B64.encode(report),
            cert_table: cert_table.map(|t| B64.encode(t)),
        }
    }
}

/// REPORT_DATA for an evidence binding: the 32 bytes, then 32 zero bytes.
pub fn report_data_for(binding: &[u8; 32]) -> [u8; 64] {
    let mut d = [0u8; 64];
    d[..32].copy_from_slice(binding);
    d
}

/// The minimum TCB a policy accepts (each component `>=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinTcb {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
    /// Compared only for reports with an FMC component (Turin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fmc: Option<u8>,
}

/// The verifier's SEV-SNP policy: the `[snp]` table of the verifier policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnpPolicy {
    /// Launch measurements accepted (48 bytes of hex each). Empty: every
    /// report is refused.
    #[serde(default, deserialize_with = "hex_list")]
    pub allowed_measurements: Vec<[u8; 48]>,
    /// Compared with REPORTED_TCB (the TCB the VCEK is derived for, which
    /// the certificate check ties to the VCEK).
    #[serde(default)]
    pub min_tcb: Option<MinTcb>,
    /// Accept any REPORTED_TCB when `min_tcb` is unset. Without either,
    /// every report is refused: a verifier that does not say which
    /// firmware it accepts would accept a rollback to any.
    #[serde(default)]
    pub allow_any_tcb: bool,
    /// Accept guests whose policy allows debugging.
    #[serde(default)]
    pub allow_debug: bool,
    /// Highest VMPL accepted.
    #[serde(default)]
    pub max_vmpl: u32,
    /// Accept guests whose policy allows a migration agent.
    #[serde(default)]
    pub allow_migrate_ma: bool,
    /// Require the guest policy's SINGLE_SOCKET bit.
    #[serde(default)]
    pub require_single_socket: bool,
    /// FAMILY_IDs accepted (16 bytes of hex each); unset: any.
    #[serde(default, deserialize_with = "opt_hex_list")]
    pub allowed_family_ids: Option<Vec<[u8; 16]>>,
    /// IMAGE_IDs accepted (16 bytes of hex each); unset: any.
    #[serde(default, deserialize_with = "opt_hex_list")]
    pub allowed_image_ids: Option<Vec<[u8; 16]>>,
    /// A local directory of DER or PEM certificates (VCEKs, ASKs, ARKs) used
    /// when the evidence carries no certificate table.
    #[serde(default)]
    pub cert_dir: Option<PathBuf>,
}

fn decode_hex_n<const N: usize, E: serde::de::Error>(s: &str) -> Result<[u8; N], E> {
    let v = hex::decode(s).map_err(|_| E::custom(format!("{s:?} is not hex")))?;
    <[u8; N]>::try_from(v.as_slice())
        .map_err(|_| E::custom(format!("{s:?} is {} bytes, not {N}", v.len())))
}

fn hex_list<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<Vec<[u8; N]>, D::Error> {
    let v: Vec<String> = Vec::deserialize(d)?;
    if v.len() > crate::verify::MAX_POLICY_ITEMS {
        return Err(serde::de::Error::custom(format!(
            "more than {} entries",
            crate::verify::MAX_POLICY_ITEMS
        )));
    }
    v.iter().map(|s| decode_hex_n::<N, D::Error>(s)).collect()
}

fn opt_hex_list<'de, D: Deserializer<'de>, const N: usize>(
    d: D,
) -> Result<Option<Vec<[u8; N]>>, D::Error> {
    hex_list(d).map(Some)
}

impl SnpPolicy {
    /// Parses a policy from TOML: the whole text is the `[snp]` table's
    /// contents.
    pub fn from_toml(text: &str) -> Result<SnpPolicy, SnpError> {
        let p: SnpPolicy = toml::from_str(text).map_err(|e| SnpError::Policy(e.to_string()))?;
        p.validate()?;
        Ok(p)
    }

    /// The `[snp]` table of a verifier policy file's TOML; None when it has
    /// none.
    pub fn from_verifier_toml(text: &str) -> Result<Option<SnpPolicy>, SnpError> {
        let v: toml::Table = toml::from_str(text).map_err(|e| SnpError::Policy(e.to_string()))?;
        match v.get("snp") {
            None => Ok(None),
            Some(t) => {
                let p: SnpPolicy = t
                    .clone()
                    .try_into()
                    .map_err(|e: toml::de::Error| SnpError::Policy(e.to_string()))?;
                p.validate()?;
                Ok(Some(p))
            }
        }
    }

    /// Checks the values serde cannot.
    pub fn validate(&self) -> Result<(), SnpError> {
        if self.max_vmpl > 3 {
            return Err(SnpError::Policy(format!(
                "max_vmpl {} is not 0 to 3",
                self.max_vmpl
            )));
        }
        Ok(())
    }
}

/// Checks a (verified) report against the policy; Ok says what passed.
/// The first failure, in this order: measurement, debug, VMPL, migration
/// agent, single socket, minimum TCB, family id, image id.
pub fn check_policy(report: &SnpReport, policy: &SnpPolicy) -> Result<String, SnpError> {
    if policy.allowed_measurements.is_empty() {
        return Err(SnpError::NoAllowedMeasurements);
    }
    if !policy.allowed_measurements.contains(&report.measurement) {
        return Err(SnpError::MeasurementNotAllowed {
            measurement: hex::encode(report.measurement),
            allowed: policy.allowed_measurements.len(),
        });
    }
    if report.policy.debug() && !policy.allow_debug {
        return Err(SnpError::DebugNotAllowed);
    }
    if report.vmpl > policy.max_vmpl {
        return Err(SnpError::VmplTooHigh {
            vmpl: report.vmpl,
            max: policy.max_vmpl,
        });
    }
    if report.policy.migrate_ma() && !policy.allow_migrate_ma {
        return Err(SnpError::MigrateMaNotAllowed);
    }
    if policy.require_single_socket && !report.policy.single_socket() {
        return Err(SnpError::SingleSocketRequired);
    }
    let t = &report.reported_tcb;
    if policy.min_tcb.is_none() && !policy.allow_any_tcb {
        return Err(SnpError::NoMinTcb);
    }
    if let Some(min) = &policy.min_tcb {
        let low = |component: &'static str, found: u8, min: u8| {
            (found < min).then(|| SnpError::TcbTooLow {
                component,
                found: found.to_string(),
                min,
            })
        };
        let fmc = match (t.fmc, min.fmc) {
            (Some(f), Some(m)) => low("fmc", f, m),
            _ => None,
        };
        if let Some(e) = low("bootloader", t.bootloader, min.bootloader)
            .or_else(|| low("tee", t.tee, min.tee))
            .or_else(|| low("snp", t.snp, min.snp))
            .or_else(|| low("microcode", t.microcode, min.microcode))
            .or(fmc)
        {
            return Err(e);
        }
    }
    if let Some(ids) = &policy.allowed_family_ids {
        if !ids.contains(&report.family_id) {
            return Err(SnpError::FamilyIdNotAllowed(hex::encode(report.family_id)));
        }
    }
    if let Some(ids) = &policy.allowed_image_ids {
        if !ids.contains(&report.image_id) {
            return Err(SnpError::ImageIdNotAllowed(hex::encode(report.image_id)));
        }
    }
    Ok(format!(
        "measurement {} allowed; VMPL {} <= {}; debug {}; TCB {t}{}",
        hex::encode(report.measurement),
        report.vmpl,
        policy.max_vmpl,
        if report.policy.debug() {
            "allowed"
        } else {
            "off"
        },
        if policy.min_tcb.is_some() {
            " meets min_tcb"
        } else {
            " not checked (allow_any_tcb)"
        }
    ))
}

/// The certificates for a report.
#[derive(Debug, Clone)]
pub struct ResolvedCerts {
    pub ek: EndorsementCert,
    pub ask: Option<Vec<u8>>,
    pub ark: Option<Vec<u8>>,
    /// Where they came from, for messages.
    pub source: String,
}

/// Finds the certificates for `report`: from the evidence's certificate
/// table, else from `cert_dir` (the VCEK whose hwID is the report's
/// CHIP_ID, preferring one whose TCB is the report's, or the VLEK whose TCB
/// is; the ASK named as its issuer; the ARK named as the ASK's issuer).
/// Nothing is fetched.
pub fn resolve_certs(
    report: &SnpReport,
    table: Option<&CertTable>,
    cert_dir: Option<&Path>,
) -> Result<ResolvedCerts, SnpError> {
    let kind = match report.key_info.signing_key() {
        SigningKey::Vcek => EkKind::Vcek,
        SigningKey::Vlek => EkKind::Vlek,
        other => {
            return Err(SnpError::MissingCertificate(format!(
                "the report is signed with {other}: there is no certificate to find"
            )))
        }
    };
    if let Some(t) = table {
        let ek = t.get(match kind {
            EkKind::Vcek => CertKind::Vcek,
            EkKind::Vlek => CertKind::Vlek,
        });
        if let Some(ek) = ek {
            return Ok(ResolvedCerts {
                ek: EndorsementCert::from_bytes(ek)?,
                ask: t.get(CertKind::Ask).map(<[u8]>::to_vec),
                ark: t.get(CertKind::Ark).map(<[u8]>::to_vec),
                source: "the evidence's certificate table".into(),
            });
        }
    }
    let Some(dir) = cert_dir else {
        return Err(SnpError::MissingCertificate(format!(
            "{} and the policy sets no cert_dir",
            if table.is_some() {
                format!("the certificate table holds no {}", kind.name())
            } else {
                "the evidence has no certificate table".to_string()
            }
        )));
    };
    let all = load_cert_dir(dir)?;
    let mut eks: Vec<EndorsementCert> = all
        .iter()
        .filter_map(|c| EndorsementCert::from_bytes(&c.der).ok())
        .filter(|e| e.kind == kind)
        .filter(|e| {
            kind == EkKind::Vlek || report.chip_id_masked() || e.hw_id_matches(&report.chip_id)
        })
        .collect();
    // The same chip has one VCEK per TCB: prefer the one for this report's
    // (as the certificate states it, whatever the layout).
    let layout_tcb = |e: &EndorsementCert| {
        let g = e
            .generation()
            .map(Generation::tcb_layout)
            .unwrap_or(report.tcb_layout);
        TcbVersion::decode(report.reported_tcb.raw, g)
    };
    eks.sort_by_key(|e| !e.tcb_matches(&layout_tcb(e)));
    let Some(ek) = eks.into_iter().next() else {
        return Err(SnpError::MissingCertificate(format!(
            "cert_dir {} ({} certificates) holds no {}{}",
            dir.display(),
            all.len(),
            kind.name(),
            if kind == EkKind::Vcek && !report.chip_id_masked() {
                format!(" for chip id {}…", hex::encode(&report.chip_id[..8]))
            } else {
                String::new()
            }
        )));
    };
    let issuer = &ek.cert.cert.tbs_certificate.issuer;
    let ask = all
        .iter()
        .find(|c| &c.cert.tbs_certificate.subject == issuer && !c.self_issued());
    let ark = ask.and_then(|a| {
        all.iter().find(|c| {
            c.self_issued() && c.cert.tbs_certificate.subject == a.cert.tbs_certificate.issuer
        })
    });
    Ok(ResolvedCerts {
        ask: ask.map(|c| c.der.clone()),
        ark: ark.map(|c| c.der.clone()),
        ek,
        source: format!("cert_dir {}", dir.display()),
    })
}

/// Every certificate in a directory's files (DER, or PEM with one or more
/// certificates); files that hold none are skipped.
fn load_cert_dir(dir: &Path) -> Result<Vec<Cert>, SnpError> {
    let io = |e: std::io::Error| {
        SnpError::MissingCertificate(format!("cannot read cert_dir {}: {e}", dir.display()))
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .take(MAX_CERT_DIR_FILES + 1)
        .collect();
    if paths.len() > MAX_CERT_DIR_FILES {
        return Err(SnpError::MissingCertificate(format!(
            "cert_dir {} holds more than {MAX_CERT_DIR_FILES} files",
            dir.display()
        )));
    }
    paths.sort();
    let mut out = Vec::new();
    for p in paths {
        let Ok(meta) = std::fs::metadata(&p) else {
            continue;
        };
        if !meta.is_file() || meta.len() > MAX_CERT as u64 {
            continue;
        }
        let Ok(bytes) = std::fs::read(&p) else {
            continue;
        };
        out.extend(certs_in(&bytes));
    }
    Ok(out)
}

/// The certificates in a file's bytes: one DER, or every PEM CERTIFICATE.
fn certs_in(bytes: &[u8]) -> Vec<Cert> {
    if bytes.first() == Some(&0x30) {
        return Cert::parse("file", bytes).into_iter().collect();
    }
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Vec::new();
    };
    let begin = "-----BEGIN CERTIFICATE-----";
    let end = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(s) = rest.find(begin) {
        let Some(e) = rest[s..].find(end) else {
            break;
        };
        let block = &rest[s..s + e + end.len()];
        if let Ok(c) = Cert::parse("file", block.as_bytes()) {
            out.push(c);
        }
        rest = &rest[s + e + end.len()..];
    }
    out
}

/// (ASK, ARK), each DER, either absent.
pub type SplitChain = (Option<Vec<u8>>, Option<Vec<u8>>);

/// The certificates in a PEM (or DER) chain file, as AMD ships
/// `cert_chain` (ASK then ARK): (ASK, ARK), each as DER, told apart by
/// which is self-issued.
pub fn split_chain(bytes: &[u8]) -> Result<SplitChain, SnpError> {
    let certs = certs_in(bytes);
    if certs.is_empty() || certs.len() > 2 {
        return Err(SnpError::Certificate {
            which: "chain",
            reason: format!(
                "holds {} certificates, not the ASK and ARK (or the ASK alone)",
                certs.len()
            ),
        });
    }
    let (mut ask, mut ark) = (None, None);
    for c in certs {
        let slot = if c.self_issued() { &mut ark } else { &mut ask };
        if slot.is_some() {
            return Err(SnpError::Certificate {
                which: "chain",
                reason: "holds two ARKs or two ASKs".into(),
            });
        }
        *slot = Some(c.der);
    }
    Ok((ask, ark))
}

/// Verifies `tee.evidence` of kind `sev-snp` against the evidence
/// `binding` and `policy`; Ok is a one-line account, Err why not.
/// Certificates come from the evidence's table, else `policy.cert_dir`
/// (never the network); then the chain and signature ([`verify_report`]),
/// then REPORT_DATA = [`report_data_for`]`(binding)`, then [`check_policy`].
pub fn verify_evidence(
    ev: &serde_json::Value,
    binding: &[u8; 32],
    policy: &SnpPolicy,
    now: SystemTime,
) -> Result<String, String> {
    verify_evidence_detailed(ev, binding, policy, now)
        .map(|(_, msg)| msg)
        .map_err(|e| e.to_string())
}

/// [`verify_evidence`], with the verified report and a typed error.
pub fn verify_evidence_detailed(
    ev: &serde_json::Value,
    binding: &[u8; 32],
    policy: &SnpPolicy,
    now: SystemTime,
) -> Result<(VerifiedSnp, String), SnpError> {
    let ev: SnpEvidence =
        serde_json::from_value(ev.clone()).map_err(|e| SnpError::Evidence(e.to_string()))?;
    if ev.report.len() > REPORT_LEN * 2 {
        return Err(SnpError::Evidence(format!(
            "report of {} base64 characters is too long",
            ev.report.len()
        )));
    }
    if ev
        .cert_table
        .as_ref()
        .is_some_and(|t| t.len() > MAX_CERT_TABLE / 3 * 4 + 4)
    {
        return Err(SnpError::Evidence("cert_table too long".into()));
    }
    let raw = B64
        .decode(&ev.report)
        .map_err(|_| SnpError::Evidence("report is not base64".into()))?;
    let report = parse_report(&raw)?;
    let table = match &ev.cert_table {
        None => None,
        Some(t) => {
            Some(parse_cert_table(&B64.decode(t).map_err(|_| {
                SnpError::Evidence("cert_table is not base64".into())
            })?)?)
        }
    };
    let certs = resolve_certs(&report, table.as_ref(), policy.cert_dir.as_deref())?;
    let verified = verify_report_with(
        &report,
        &certs.ek,
        certs.ask.as_deref(),
        certs.ark.as_deref(),
        now,
    )?;
    let expected = report_data_for(binding);
    if verified.report.report_data != expected {
        return Err(SnpError::ReportDataMismatch {
            expected: hex::encode(expected),
            found: hex::encode(verified.report.report_data),
        });
    }
    let pol = check_policy(&verified.report, policy)?;
    let msg = format!(
        "SEV-SNP report v{} (VMPL {}) signed by a {} chaining to ARK-{} (certificates from {}), bound to this evidence; {pol}",
        verified.report.version,
        verified.report.vmpl,
        verified.signing_key.name(),
        verified.generation,
        certs.source
    );
    Ok((verified, msg))
}

// ---------------------------------------------------------------------------
// Producing.

/// The default guest device.
pub const SEV_GUEST_DEVICE: &str = "/dev/sev-guest";

/// Asks the SEV-SNP firmware, through the guest device (normally
/// [`SEV_GUEST_DEVICE`]), for a report with `report_data` at `vmpl` (0 to
/// 3, at least the guest's own). Returns the report and the host's
/// certificate table: from SNP_GET_EXT_REPORT, or, when the host or driver
/// offers no extended report, SNP_GET_REPORT and no table.
pub fn sev_guest_report(
    device: &Path,
    report_data: &[u8; 64],
    vmpl: u32,
) -> Result<(Vec<u8>, Option<Vec<u8>>), SnpError> {
    guest::report(device, report_data, vmpl)
}

/// The `sev-snp` evidence document for `binding`, from the guest device.
pub fn guest_evidence(
    device: &Path,
    binding: &[u8; 32],
    vmpl: u32,
) -> Result<SnpEvidence, SnpError> {
    let (report, table) = sev_guest_report(device, &report_data_for(binding), vmpl)?;
    Ok(SnpEvidence::new(&report, table.as_deref()))
}

#[cfg(test)]
mod tests;
