//! The TPM: configuration (TCTI, attestation key, PCR selection, the ccnode
//! PCR), the bounded parsers of TPM structures the verifier needs
//! ([`wire`]), and, with the `tpm` feature, the service that talks to a TPM
//! through tss-esapi ([`TpmService`]).
//!
//! # The ccnode PCR
//!
//! ccnoded extends one PCR, [`DEFAULT_CCNODE_PCR`] (13) unless configured
//! otherwise, with every policy and model it loads. The PCR must be one that
//! software at locality 0 can extend, that nothing at locality 0 can reset,
//! and that nothing else on a ccnode host extends:
//!
//! - 0–7: firmware (UEFI, option ROMs, Secure Boot state);
//! - 8, 9: GRUB (commands, files), and the kernel measures the initrd into 9;
//! - 10: IMA;
//! - 11, 12: systemd-stub and systemd-pcrphase (UKI sections, boot phases,
//!   kernel command line, credentials);
//! - 14: shim (MOK lists);
//! - 15: systemd (machine-id, file systems, cryptsetup volume keys);
//! - 16: debug, and 23: application support: both resettable from
//!   locality 0, so a compromised process could erase the history;
//! - 17–22: dynamic root of trust: extendable only from localities 1–4,
//!   which Linux user space (locality 0) cannot use (all-ones until a DRTM
//!   launch).
//!
//! That leaves 13, which systemd-stub extends only with system-extension
//! images carried next to a UKI (a feature ccnode images do not use). A
//! clash cannot pass unnoticed: ccnode's event log then no longer replays to
//! the PCR, which [`TpmService::open`] reports and the verifier's
//! `ccnode_event_log` check fails.

pub mod key;
pub mod wire;

#[cfg(feature = "tpm")]
mod service;

#[cfg(feature = "tpm")]
pub use service::{AkInfo, Quote, TpmService};

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The TCTI ccnoded uses when none is configured.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";
/// The persistent handle of the attestation key by default: the first
/// handle after the ones the TCG registry reserves for EKs (0x81010000,
/// 0x81010001) in the endorsement-key range.
pub const DEFAULT_AK_HANDLE: u32 = 0x8101_0002;
/// The PCR ccnoded extends by default (see the module documentation).
pub const DEFAULT_CCNODE_PCR: u32 = 13;

/// The PCRs ccnoded may extend, and a verifier may name as ccnode's: the
/// static OS range. 0–7 belong to the firmware (whose log the verifier
/// replays), 16 and 23 can be reset from locality 0, 17–22 cannot be
/// extended from it.
pub const CCNODE_PCR_RANGE: std::ops::RangeInclusive<u32> = 8..=15;
/// The firmware event log's usual place.
pub const DEFAULT_FIRMWARE_LOG: &str = "/sys/kernel/security/tpm0/binary_bios_measurements";
/// PCRs a TPM 2.0 PC Client TPM has (0–23).
pub const PCR_COUNT: u32 = 24;

/// Persistent handles an owner may create (TPM 2.0 part 2, `TPM_HT_PERSISTENT`
/// owner range).
const PERSISTENT_OWNER_RANGE: std::ops::RangeInclusive<u32> = 0x8100_0000..=0x817f_ffff;

/// Why the TPM could not do what was asked. Variants are stable (see
/// [`TpmError::code`]); messages say what was expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// A TPM setting is invalid (TCTI string, handle, PCR selection).
    #[error("invalid tpm configuration: {0}")]
    Config(String),
    /// The TCTI could not be opened (no device, no simulator listening).
    #[error("cannot open tpm through {tcti}: {detail}")]
    Open { tcti: String, detail: String },
    /// A TPM command failed.
    #[error("tpm {op} failed: {detail}")]
    Command { op: &'static str, detail: String },
    /// The persistent handle holds a key that is not the attestation key
    /// ccnode would create (it is never overwritten).
    #[error("persistent handle {handle:#010x} holds a key that is not a ccnode attestation key: {reason}")]
    AkMismatch { handle: u32, reason: String },
    /// The PCRs kept changing between reading them and quoting them.
    #[error("pcr values changed during the quote {attempts} times in a row")]
    PcrChanged { attempts: u32 },
    /// The ccnode event log file cannot be read or written.
    #[error("ccnode event log {path}: {detail}")]
    EventLog { path: PathBuf, detail: String },
    /// An event cannot be recorded (too large, log full, not canonicalisable).
    #[error("cannot record event: {0}")]
    Event(String),
    /// The TPM returned something this code does not accept.
    #[error("unexpected tpm response: {0}")]
    Unexpected(String),
}

impl TpmError {
    /// A short, stable label for metrics, JSON errors and exit codes.
    pub fn code(&self) -> &'static str {
        match self {
            TpmError::Config(_) => "tpm_config",
            TpmError::Open { .. } => "tpm_unavailable",
            TpmError::Command { .. } => "tpm_command",
            TpmError::AkMismatch { .. } => "ak_mismatch",
            TpmError::PcrChanged { .. } => "pcr_changed",
            TpmError::EventLog { .. } => "event_log",
            TpmError::Event(_) => "event",
            TpmError::Unexpected(_) => "tpm_unexpected",
        }
    }
}

/// How to reach the TPM: `device:PATH` (a kernel TPM device, normally the
/// resource manager `/dev/tpmrm0`) or `swtpm:host=HOST,port=PORT` (the swtpm
/// emulator's TCP socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tcti {
    Device(PathBuf),
    Swtpm { host: IpAddr, port: u16 },
}

impl Default for Tcti {
    fn default() -> Self {
        Tcti::Device(PathBuf::from("/dev/tpmrm0"))
    }
}

impl FromStr for Tcti {
    type Err = TpmError;

    fn from_str(s: &str) -> Result<Self, TpmError> {
        let bad = |why: &str| {
            TpmError::Config(format!(
                "tcti {s:?}: {why} (expected \"device:/dev/tpmrm0\" or \"swtpm:host=127.0.0.1,port=2321\")"
            ))
        };
        if s.len() > 256 {
            return Err(bad("longer than 256 bytes"));
        }
        let (kind, rest) = s.split_once(':').ok_or_else(|| bad("no kind: prefix"))?;
        match kind {
            "device" => {
                if !rest.starts_with('/') {
                    return Err(bad("the device path must be absolute"));
                }
                if rest.contains(',') || rest.contains('\0') {
                    return Err(bad("the device path must not contain ',' or NUL"));
                }
                Ok(Tcti::Device(PathBuf::from(rest)))
            }
            "swtpm" => {
                let mut host = None;
                let mut port = None;
                for part in rest.split(',') {
                    let (k, v) = part
                        .split_once('=')
                        .ok_or_else(|| bad(&format!("{part:?} is not key=value")))?;
                    match k {
                        "host" if host.is_none() => {
                            host =
                                Some(v.parse::<IpAddr>().map_err(|_| {
                                    bad(&format!("host {v:?} is not an IP address"))
                                })?)
                        }
                        "port" if port.is_none() => {
                            port = Some(
                                v.parse::<u16>()
                                    .ok()
                                    .filter(|p| *p != 0 && *p != u16::MAX)
                                    .ok_or_else(|| {
                                        bad(&format!("port {v:?} is not in 1..=65534"))
                                    })?,
                            )
                        }
                        "host" | "port" => return Err(bad(&format!("{k} given twice"))),
                        other => return Err(bad(&format!("unknown key {other:?}"))),
                    }
                }
                Ok(Tcti::Swtpm {
                    host: host.ok_or_else(|| bad("missing host="))?,
                    port: port.ok_or_else(|| bad("missing port="))?,
                })
            }
            other => Err(bad(&format!("unknown kind {other:?}"))),
        }
    }
}

impl fmt::Display for Tcti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tcti::Device(p) => write!(f, "device:{}", p.display()),
            Tcti::Swtpm { host, port } => write!(f, "swtpm:host={host},port={port}"),
        }
    }
}

impl Serialize for Tcti {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Tcti {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The attestation key's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum AkAlgorithm {
    /// ECDSA on NIST P-256 with SHA-256 (the default).
    #[default]
    #[serde(rename = "ecc-p256")]
    EccP256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, 2048-bit modulus.
    #[serde(rename = "rsa-2048")]
    Rsa2048,
}

impl AkAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            AkAlgorithm::EccP256 => "ecc-p256",
            AkAlgorithm::Rsa2048 => "rsa-2048",
        }
    }
}

impl FromStr for AkAlgorithm {
    type Err = TpmError;
    fn from_str(s: &str) -> Result<Self, TpmError> {
        match s {
            "ecc-p256" => Ok(AkAlgorithm::EccP256),
            "rsa-2048" => Ok(AkAlgorithm::Rsa2048),
            other => Err(TpmError::Config(format!(
                "ak algorithm {other:?} is not \"ecc-p256\" or \"rsa-2048\""
            ))),
        }
    }
}

/// The sha256 PCRs a quote covers, ascending, without duplicates. Only the
/// sha256 bank is quoted (the evidence format names the bank, so others can
/// be added without a format change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrSelection {
    pcrs: Vec<u32>,
}

impl PcrSelection {
    /// A selection of `pcrs` (each below [`PCR_COUNT`]; order and duplicates
    /// do not matter).
    pub fn new(pcrs: impl IntoIterator<Item = u32>) -> Result<Self, TpmError> {
        let mut v: Vec<u32> = pcrs.into_iter().collect();
        if let Some(bad) = v.iter().find(|p| **p >= PCR_COUNT) {
            return Err(TpmError::Config(format!(
                "pcr {bad} is out of range 0..={}",
                PCR_COUNT - 1
            )));
        }
        v.sort_unstable();
        v.dedup();
        if v.is_empty() {
            return Err(TpmError::Config("the pcr selection is empty".into()));
        }
        Ok(PcrSelection { pcrs: v })
    }

    /// sha256 PCRs 0–7 and `ccnode_pcr`.
    pub fn default_with(ccnode_pcr: u32) -> Result<Self, TpmError> {
        Self::new((0..8).chain([ccnode_pcr]))
    }

    /// The PCR indices, ascending.
    pub fn pcrs(&self) -> &[u32] {
        &self.pcrs
    }

    /// The hash bank: always `sha256`.
    pub fn bank(&self) -> &'static str {
        "sha256"
    }
}

impl FromStr for PcrSelection {
    type Err = TpmError;

    /// `sha256:0-7,13` (ranges and single indices; the `sha256:` prefix
    /// is optional).
    fn from_str(s: &str) -> Result<Self, TpmError> {
        let bad = |why: String| TpmError::Config(format!("pcr selection {s:?}: {why}"));
        if s.len() > 256 {
            return Err(bad("longer than 256 bytes".into()));
        }
        let list = match s.split_once(':') {
            Some(("sha256", rest)) => rest,
            Some((bank, _)) => return Err(bad(format!("bank {bank:?} is not sha256"))),
            None => s,
        };
        let mut pcrs = Vec::new();
        for part in list.split(',') {
            let part = part.trim();
            let num = |t: &str| {
                t.trim()
                    .parse::<u32>()
                    .map_err(|_| bad(format!("{t:?} is not a PCR index")))
            };
            if let Some((a, b)) = part.split_once('-') {
                let (a, b) = (num(a)?, num(b)?);
                if a > b || b >= PCR_COUNT {
                    return Err(bad(format!("range {part:?} is empty or out of 0..=23")));
                }
                pcrs.extend(a..=b);
            } else {
                pcrs.push(num(part)?);
            }
        }
        PcrSelection::new(pcrs).map_err(|e| match e {
            TpmError::Config(m) => bad(m),
            other => other,
        })
    }
}

impl fmt::Display for PcrSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.pcrs.iter().map(u32::to_string).collect();
        write!(f, "sha256:{}", list.join(","))
    }
}

/// Everything the TPM side needs, as ccnoded's config gives it.
#[derive(Debug, Clone)]
pub struct TpmConfig {
    /// How to reach the TPM.
    pub tcti: Tcti,
    /// Where the attestation key is persisted.
    pub ak_handle: u32,
    /// The attestation key's algorithm (used when it is created; an existing
    /// key of another algorithm is refused).
    pub ak_algorithm: AkAlgorithm,
    /// The PCRs each quote covers; must include `ccnode_pcr`.
    pub pcrs: PcrSelection,
    /// The PCR ccnode extends with its own events.
    pub ccnode_pcr: u32,
    /// The firmware event log; `None` or a missing file: not included.
    pub firmware_log: Option<PathBuf>,
    /// Where ccnode's event log is kept (a file in ccnoded's state
    /// directory, written atomically, read back at start).
    pub event_log: PathBuf,
}

impl TpmConfig {
    /// The defaults, with the event log at `event_log`.
    pub fn new(event_log: impl Into<PathBuf>) -> TpmConfig {
        TpmConfig {
            tcti: Tcti::default(),
            ak_handle: DEFAULT_AK_HANDLE,
            ak_algorithm: AkAlgorithm::default(),
            pcrs: PcrSelection::default_with(DEFAULT_CCNODE_PCR)
                .unwrap_or(PcrSelection { pcrs: vec![0] }),
            ccnode_pcr: DEFAULT_CCNODE_PCR,
            firmware_log: Some(PathBuf::from(DEFAULT_FIRMWARE_LOG)),
            event_log: event_log.into(),
        }
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), TpmError> {
        if !PERSISTENT_OWNER_RANGE.contains(&self.ak_handle) {
            return Err(TpmError::Config(format!(
                "ak handle {:#010x} is not a persistent handle in 0x81000000..=0x817fffff",
                self.ak_handle
            )));
        }
        if !CCNODE_PCR_RANGE.contains(&self.ccnode_pcr) {
            return Err(TpmError::Config(format!(
                "ccnode pcr {} must be one of 8..=15 (0-7 are the firmware's, 16 and 23 can be reset from locality 0, 17-22 cannot be extended from it)",
                self.ccnode_pcr
            )));
        }
        if !self.pcrs.pcrs().contains(&self.ccnode_pcr) {
            return Err(TpmError::Config(format!(
                "pcr selection {} does not include the ccnode pcr {}",
                self.pcrs, self.ccnode_pcr
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcti_strings() {
        assert_eq!(
            "device:/dev/tpmrm0".parse::<Tcti>().unwrap(),
            Tcti::Device("/dev/tpmrm0".into())
        );
        let t: Tcti = "swtpm:host=127.0.0.1,port=2321".parse().unwrap();
        assert_eq!(t.to_string(), "swtpm:host=127.0.0.1,port=2321");
        assert_eq!(
            "swtpm:port=9,host=::1".parse::<Tcti>().unwrap().to_string(),
            "swtpm:host=::1,port=9"
        );
        for bad in [
            "",
            "/dev/tpmrm0",
            "device:",
            "device:dev/tpm0",
            "device:/dev/tpm0,x",
            "mssim:host=127.0.0.1,port=1",
            "swtpm:",
            "swtpm:host=localhost,port=1",
            "swtpm:host=127.0.0.1",
            "swtpm:port=1",
            "swtpm:host=127.0.0.1,port=0",
            "swtpm:host=127.0.0.1,port=65535",
            "swtpm:host=127.0.0.1,port=x",
            "swtpm:host=127.0.0.1,port=1,port=2",
            "swtpm:host=127.0.0.1,port=1,extra=2",
            "swtpm:host=127.0.0.1,port",
        ] {
            let err = bad.parse::<Tcti>().unwrap_err();
            assert_eq!(err.code(), "tpm_config", "{bad}");
            assert!(err.to_string().contains("expected"), "{err}");
        }
    }

    #[test]
    fn pcr_selections() {
        let s: PcrSelection = "sha256:0-7,13".parse().unwrap();
        assert_eq!(s.pcrs(), &[0, 1, 2, 3, 4, 5, 6, 7, 13]);
        assert_eq!(s.to_string(), "sha256:0,1,2,3,4,5,6,7,13");
        assert_eq!("13,2,2".parse::<PcrSelection>().unwrap().pcrs(), &[2, 13]);
        for bad in ["", "sha1:0", "24", "7-3", "0-24", "a", "1,,2", "-1"] {
            assert!(bad.parse::<PcrSelection>().is_err(), "{bad}");
        }
    }

    #[test]
    fn config_validation() {
        let mut c = TpmConfig::new("/tmp/x");
        c.validate().unwrap();
        for outside in [0, 7, 16, 23] {
            c.ccnode_pcr = outside;
            c.pcrs = PcrSelection::default_with(outside).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("must be one of 8..=15"), "{outside}: {e}");
        }
        c.pcrs = PcrSelection::default_with(13).unwrap();
        c.ccnode_pcr = 9;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("does not include"));
        c.ccnode_pcr = 13;
        c.ak_handle = 0x8001_0000;
        assert!(c.validate().is_err());
        assert_eq!(
            "rsa-2048".parse::<AkAlgorithm>().unwrap(),
            AkAlgorithm::Rsa2048
        );
        assert!("rsa".parse::<AkAlgorithm>().is_err());
    }
}
