//! The TPM service: one tss-esapi context behind a mutex, so calls are
//! serialised; the attestation key; quotes with their PCR values; and the
//! measured-operation extensions with ccnode's event log.
//!
//! Every method blocks on the TPM (a hardware TPM takes tens of
//! milliseconds per command, more for key creation). From async code, call
//! them through `tokio::task::spawn_blocking` (or a dedicated thread), never
//! on a runtime worker.
//!
//! The attestation key is an ordinary (non-primary) restricted signing key
//! created under the TCG default endorsement key (EK template L-1 for RSA,
//! L-2 for ECC, from the TCG EK Credential Profile) with tss-esapi's
//! `create_ak`, as rust-keylime does: a key whose parent is the EK is the
//! standard shape for proving, later, with credential activation against
//! the EK certificate, that the AK lives in this TPM. It is made
//! persistent with `EvictControl` (owner authorisation, empty) at the
//! configured handle; the EK is transient and flushed. At start an existing
//! key at the handle is reused when it is a restricted sha256 signing key
//! of the configured algorithm made inside the TPM, and refused otherwise
//! (never overwritten).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};

use sha2::{Digest as _, Sha256};
use tss_esapi::abstraction::{ak, ek, pcr, DefaultKey};
use tss_esapi::constants::CapabilityType;
use tss_esapi::handles::{KeyHandle, ObjectHandle, PcrHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{
    AsymmetricAlgorithm, HashingAlgorithm, SignatureSchemeAlgorithm,
};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::resource_handles::Provision;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    CapabilityData, Data, Digest, DigestValues, PcrSelectionList, PcrSlot, SignatureScheme,
};
use tss_esapi::tcti_ldr::{DeviceConfig, NetworkTPMConfig};
use tss_esapi::traits::Marshall;
use tss_esapi::{Context, TctiNameConf};

use super::key::AkPublicKey;
use super::wire::{self, attr, PublicKeyArea};
use super::{AkAlgorithm, Tcti, TpmConfig, TpmError};
use crate::eventlog::ccnode::{CcnodeEvent, LogStatus, MeasuredLog};

/// How many times a quote is retried when the PCRs change between reading
/// them and quoting.
pub const QUOTE_ATTEMPTS: u32 = 5;

/// The attestation key, as evidence presents it.
#[derive(Debug, Clone)]
pub struct AkInfo {
    pub algorithm: AkAlgorithm,
    pub handle: u32,
    /// SubjectPublicKeyInfo, PEM.
    pub public_pem: String,
    /// SubjectPublicKeyInfo, DER.
    pub spki_der: Vec<u8>,
    /// sha256 of the DER SPKI (what verifier policies list).
    pub spki_sha256: [u8; 32],
    /// The marshalled `TPMT_PUBLIC`.
    pub public_area: Vec<u8>,
    /// The TPM name (nameAlg || sha256(TPMT_PUBLIC)).
    pub name: Vec<u8>,
}

/// One quote with the PCR values it covers and ccnode's event log at the
/// time of the quote.
#[derive(Debug, Clone)]
pub struct Quote {
    /// Marshalled `TPMS_ATTEST`.
    pub attest: Vec<u8>,
    /// Marshalled `TPMT_SIGNATURE`.
    pub signature: Vec<u8>,
    /// sha256 PCR index → value, for the quoted selection.
    pub pcrs: BTreeMap<u32, [u8; 32]>,
    /// ccnode's event log as it stood when the quote was taken.
    pub ccnode_events: Vec<CcnodeEvent>,
    /// How many read-and-quote rounds it took (1 unless PCRs changed).
    pub attempts: u32,
}

struct Inner {
    ctx: Context,
    ak: KeyHandle,
    log: MeasuredLog,
}

/// The TPM, serialised. See the module documentation: every method blocks.
pub struct TpmService {
    inner: Mutex<Inner>,
    ak: AkInfo,
    config: TpmConfig,
    log_status: LogStatus,
}

impl std::fmt::Debug for TpmService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmService")
            .field("tcti", &self.config.tcti.to_string())
            .field("ak_handle", &format_args!("{:#010x}", self.ak.handle))
            .field("log_status", &self.log_status)
            .finish_non_exhaustive()
    }
}

fn cmd(op: &'static str) -> impl Fn(tss_esapi::Error) -> TpmError {
    move |e| TpmError::Command {
        op,
        detail: e.to_string(),
    }
}

fn selection_list(pcrs: &[u32]) -> Result<PcrSelectionList, TpmError> {
    let slots = pcrs
        .iter()
        .map(|p| {
            PcrSlot::try_from(1u32 << p)
                .map_err(|_| TpmError::Config(format!("pcr {p} is not a PCR slot")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    PcrSelectionList::builder()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(cmd("pcr selection"))
}

fn read_pcrs(ctx: &mut Context, pcrs: &[u32]) -> Result<BTreeMap<u32, [u8; 32]>, TpmError> {
    let data = pcr::read_all(ctx, selection_list(pcrs)?).map_err(cmd("PCR_Read"))?;
    let bank = data
        .pcr_bank(HashingAlgorithm::Sha256)
        .ok_or_else(|| TpmError::Unexpected("the TPM returned no sha256 PCR bank".into()))?;
    let mut out = BTreeMap::new();
    for p in pcrs {
        let slot = PcrSlot::try_from(1u32 << p)
            .map_err(|_| TpmError::Config(format!("pcr {p} is not a PCR slot")))?;
        let d = bank.get_digest(slot).ok_or_else(|| {
            TpmError::Unexpected(format!("the TPM returned no value for PCR {p}"))
        })?;
        let v = <[u8; 32]>::try_from(d.value()).map_err(|_| {
            TpmError::Unexpected(format!("PCR {p} value is {} bytes, not 32", d.len()))
        })?;
        out.insert(*p, v);
    }
    Ok(out)
}

fn open_context(tcti: &Tcti) -> Result<Context, TpmError> {
    let open_err = |detail: String| TpmError::Open {
        tcti: tcti.to_string(),
        detail,
    };
    let conf = match tcti {
        Tcti::Device(path) => {
            let p = path
                .to_str()
                .ok_or_else(|| open_err("the device path is not UTF-8".into()))?;
            TctiNameConf::Device(DeviceConfig::from_str(p).map_err(|e| open_err(e.to_string()))?)
        }
        Tcti::Swtpm { host, port } => TctiNameConf::Swtpm(
            NetworkTPMConfig::from_str(&format!("host={host},port={port}"))
                .map_err(|e| open_err(e.to_string()))?,
        ),
    };
    Context::new(conf).map_err(|e| open_err(e.to_string()))
}

fn persistent_handles(ctx: &mut Context) -> Result<Vec<u32>, TpmError> {
    let mut out = Vec::new();
    let mut next = 0x8100_0000u32;
    // At most a few rounds: a TPM holds a handful of persistent objects.
    for _ in 0..64 {
        let (data, more) = ctx
            .get_capability(CapabilityType::Handles, next, 64)
            .map_err(cmd("GetCapability(handles)"))?;
        let CapabilityData::Handles(list) = data else {
            return Err(TpmError::Unexpected(
                "GetCapability(handles) returned another capability".into(),
            ));
        };
        let handles: Vec<u32> = list.into_inner().into_iter().map(u32::from).collect();
        let Some(last) = handles.last().copied() else {
            break;
        };
        out.extend(handles.iter().filter(|h| **h >> 24 == 0x81));
        if !more || last >> 24 != 0x81 {
            break;
        }
        next = last + 1;
    }
    Ok(out)
}

/// Checks that `bytes` (a marshalled TPMT_PUBLIC) is an AK ccnode would
/// create with `algorithm`.
fn check_ak_area(bytes: &[u8], algorithm: AkAlgorithm) -> Result<(), String> {
    let area = wire::parse_public(bytes).map_err(|e| e.to_string())?;
    let missing = attr::AK_REQUIRED & !area.attributes;
    if missing != 0 {
        return Err(format!(
            "attributes {:#010x} lack {missing:#010x} (fixedTPM, fixedParent, sensitiveDataOrigin, restricted, sign)",
            area.attributes
        ));
    }
    if area.attributes & attr::DECRYPT != 0 {
        return Err("it is a decryption key".into());
    }
    if area.name_alg != wire::TPM_ALG_SHA256 {
        return Err(format!(
            "name algorithm {:#06x} is not sha256",
            area.name_alg
        ));
    }
    let (want_scheme, ok_key) = match (algorithm, &area.key) {
        (AkAlgorithm::EccP256, PublicKeyArea::Ecc { curve, .. }) => {
            (wire::TPM_ALG_ECDSA, *curve == wire::TPM_ECC_NIST_P256)
        }
        (AkAlgorithm::Rsa2048, PublicKeyArea::Rsa { key_bits, .. }) => {
            (wire::TPM_ALG_RSASSA, *key_bits == 2048)
        }
        (want, _) => return Err(format!("it is not an {} key", want.as_str())),
    };
    if !ok_key {
        return Err(format!("it is not an {} key", algorithm.as_str()));
    }
    if area.scheme != want_scheme || area.scheme_hash != Some(wire::TPM_ALG_SHA256) {
        return Err(format!(
            "signing scheme {:#06x}/{:?} is not {want_scheme:#06x} with sha256",
            area.scheme, area.scheme_hash
        ));
    }
    Ok(())
}

impl TpmService {
    /// Opens the TPM, loads or creates the attestation key, and loads and
    /// reconciles ccnode's event log with the ccnode PCR (see
    /// [`TpmService::log_status`]). Blocks.
    pub fn open(config: TpmConfig) -> Result<TpmService, TpmError> {
        config.validate()?;
        let mut ctx = open_context(&config.tcti)?;
        let handle = config.ak_handle;
        let persistent = PersistentTpmHandle::new(handle)
            .map_err(|_| TpmError::Config(format!("{handle:#010x} is not a persistent handle")))?;

        if !persistent_handles(&mut ctx)?.contains(&handle) {
            create_ak(&mut ctx, config.ak_algorithm, persistent)?;
        }
        let object = ctx
            .tr_from_tpm_public(TpmHandle::Persistent(persistent))
            .map_err(cmd("TR_FromTPMPublic(ak)"))?;
        let ak_handle = KeyHandle::from(object);
        let (public, name, _) = ctx.read_public(ak_handle).map_err(cmd("ReadPublic(ak)"))?;
        let public_area = public.marshall().map_err(cmd("marshal ak public"))?;
        check_ak_area(&public_area, config.ak_algorithm)
            .map_err(|reason| TpmError::AkMismatch { handle, reason })?;
        let area =
            wire::parse_public(&public_area).map_err(|e| TpmError::Unexpected(e.to_string()))?;
        let key = AkPublicKey::from_public_area(&area).map_err(TpmError::Unexpected)?;
        let spki_der = key.spki_der().map_err(TpmError::Unexpected)?;
        let ak = AkInfo {
            algorithm: config.ak_algorithm,
            handle,
            public_pem: key.spki_pem().map_err(TpmError::Unexpected)?,
            spki_sha256: Sha256::digest(&spki_der).into(),
            spki_der,
            name: name.value().to_vec(),
            public_area,
        };
        if area.name(&ak.public_area).as_deref() != Some(ak.name.as_slice()) {
            return Err(TpmError::Unexpected(
                "the TPM's name for the AK is not sha256 of its public area".into(),
            ));
        }

        let log_err = |detail: String| TpmError::EventLog {
            path: config.event_log.clone(),
            detail,
        };
        let mut log = MeasuredLog::load(&config.event_log, config.ccnode_pcr).map_err(log_err)?;
        let current = read_pcrs(&mut ctx, &[config.ccnode_pcr])?;
        let value = current.get(&config.ccnode_pcr).copied().unwrap_or([0; 32]);
        let log_status = log.reconcile(&value).map_err(log_err)?;

        Ok(TpmService {
            inner: Mutex::new(Inner {
                ctx,
                ak: ak_handle,
                log,
            }),
            ak,
            config,
            log_status,
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, TpmError> {
        self.inner
            .lock()
            .map_err(|_| TpmError::Unexpected("an earlier tpm call panicked".into()))
    }

    /// The attestation key.
    pub fn ak(&self) -> &AkInfo {
        &self.ak
    }

    pub fn config(&self) -> &TpmConfig {
        &self.config
    }

    /// What reconciling the persisted event log with the ccnode PCR found
    /// at open. [`LogStatus::Mismatch`] means evidence from this boot will
    /// fail the verifier's `ccnode_event_log` check: ccnoded should say so
    /// loudly (log an error, report it in status).
    pub fn log_status(&self) -> &LogStatus {
        &self.log_status
    }

    /// ccnode's event log so far.
    pub fn events(&self) -> Result<Vec<CcnodeEvent>, TpmError> {
        Ok(self.lock()?.log.events().to_vec())
    }

    /// Records an event (persisting the log first) and extends the ccnode
    /// PCR with its digest. Blocks.
    pub fn measure(
        &self,
        event_type: &str,
        data: serde_json::Value,
    ) -> Result<CcnodeEvent, TpmError> {
        let mut inner = self.lock()?;
        let (event, digest) = inner.log.append(event_type, data).map_err(|e| {
            if e.starts_with("cannot write") {
                TpmError::EventLog {
                    path: self.config.event_log.clone(),
                    detail: e,
                }
            } else {
                TpmError::Event(e)
            }
        })?;
        let pcr = PcrHandle::try_from(self.config.ccnode_pcr).map_err(|_| {
            TpmError::Config(format!("pcr {} has no handle", self.config.ccnode_pcr))
        })?;
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.to_vec()).map_err(cmd("digest"))?,
        );
        let index = self.config.ccnode_pcr;
        // The value before, so that a failed extend can be told apart from
        // one whose answer was lost.
        let before = match read_pcrs(&mut inner.ctx, &[index]) {
            Ok(v) => v.get(&index).copied(),
            Err(e) => {
                let _ = inner.log.rollback_last();
                return Err(e);
            }
        };
        let extended = inner
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.pcr_extend(pcr, values)
            })
            .map_err(cmd("PCR_Extend"));
        let Err(e) = extended else {
            return Ok(event);
        };
        let now = read_pcrs(&mut inner.ctx, &[index])
            .ok()
            .and_then(|v| v.get(&index).copied());
        match after_failed_extend(before, &digest, now) {
            // The TPM did it and the answer was lost: the entry stays, or
            // the PCR would be ahead of the log for the rest of the boot.
            ExtendOutcome::Extended => Ok(event),
            // Not extended: the entry must go, or the log would be ahead.
            ExtendOutcome::NotExtended => {
                let _ = inner.log.rollback_last();
                Err(e)
            }
            ExtendOutcome::Unknown => Err(TpmError::Unexpected(format!(
                "PCR_Extend of pcr {index} failed and its value is now neither the one before nor \
                 the one after this event ({e}): the event log and the PCR may disagree until reboot"
            ))),
        }
    }

    /// Reads the configured PCRs. Blocks.
    pub fn read_pcrs(&self) -> Result<BTreeMap<u32, [u8; 32]>, TpmError> {
        let mut inner = self.lock()?;
        read_pcrs(&mut inner.ctx, self.config.pcrs.pcrs())
    }

    /// Quotes the configured PCRs with `qualifying_data` (at most 64
    /// bytes), reading the PCR values with it: values are read, the quote is
    /// taken, and the quote's PCR digest must equal sha256 of the values
    /// read, or the round is retried (up to [`QUOTE_ATTEMPTS`]). Blocks.
    pub fn quote(&self, qualifying_data: &[u8]) -> Result<Quote, TpmError> {
        let data = Data::try_from(qualifying_data.to_vec()).map_err(|_| {
            TpmError::Config(format!(
                "qualifying data of {} bytes exceeds 64",
                qualifying_data.len()
            ))
        })?;
        let pcrs = self.config.pcrs.pcrs();
        let selection = selection_list(pcrs)?;
        let mut inner = self.lock()?;
        let ak = inner.ak;
        for attempt in 1..=QUOTE_ATTEMPTS {
            let values = read_pcrs(&mut inner.ctx, pcrs)?;
            let (attest, signature) = inner
                .ctx
                .execute_with_session(Some(AuthSession::Password), |ctx| {
                    ctx.quote(ak, data.clone(), SignatureScheme::Null, selection.clone())
                })
                .map_err(cmd("Quote"))?;
            let attest = attest.marshall().map_err(cmd("marshal TPMS_ATTEST"))?;
            let signature = signature
                .marshall()
                .map_err(cmd("marshal TPMT_SIGNATURE"))?;
            let info =
                wire::parse_quote(&attest).map_err(|e| TpmError::Unexpected(e.to_string()))?;
            let mut h = Sha256::new();
            for v in values.values() {
                h.update(v);
            }
            if h.finalize()[..] == info.pcr_digest[..] {
                return Ok(Quote {
                    attest,
                    signature,
                    pcrs: values,
                    ccnode_events: inner.log.events().to_vec(),
                    attempts: attempt,
                });
            }
        }
        Err(TpmError::PcrChanged {
            attempts: QUOTE_ATTEMPTS,
        })
    }
}

/// Creates the AK under a transient EK and persists it at `handle`.
fn create_ak(
    ctx: &mut Context,
    algorithm: AkAlgorithm,
    handle: PersistentTpmHandle,
) -> Result<(), TpmError> {
    let (ek_alg, sign_alg) = match algorithm {
        AkAlgorithm::EccP256 => (AsymmetricAlgorithm::Ecc, SignatureSchemeAlgorithm::EcDsa),
        AkAlgorithm::Rsa2048 => (AsymmetricAlgorithm::Rsa, SignatureSchemeAlgorithm::RsaSsa),
    };
    let ek = ctx
        .execute_with_nullauth_session(|ctx| ek::create_ek_object(ctx, ek_alg, DefaultKey))
        .map_err(cmd("CreatePrimary(ek)"))?;
    let result = (|| {
        let created = ak::create_ak(
            ctx,
            ek,
            HashingAlgorithm::Sha256,
            sign_alg,
            None,
            DefaultKey,
        )
        .map_err(cmd("Create(ak)"))?;
        let loaded = ak::load_ak(ctx, ek, None, created.out_private, created.out_public)
            .map_err(cmd("Load(ak)"))?;
        let persisted = ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.evict_control(
                    Provision::Owner,
                    ObjectHandle::from(loaded),
                    Persistent::Persistent(handle),
                )
            })
            .map_err(cmd("EvictControl(ak)"));
        let _ = ctx.flush_context(ObjectHandle::from(loaded));
        persisted.map(|_| ())
    })();
    let _ = ctx.flush_context(ObjectHandle::from(ek));
    result
}

/// What a PCR_Extend that returned an error did, from the PCR's value
/// before and after.
#[derive(Debug, PartialEq, Eq)]
enum ExtendOutcome {
    Extended,
    NotExtended,
    Unknown,
}

fn after_failed_extend(
    before: Option<[u8; 32]>,
    digest: &[u8; 32],
    now: Option<[u8; 32]>,
) -> ExtendOutcome {
    match (before, now) {
        (Some(b), Some(n)) if n == crate::eventlog::ccnode::extend(&b, digest) => {
            ExtendOutcome::Extended
        }
        (Some(b), Some(n)) if n == b => ExtendOutcome::NotExtended,
        _ => ExtendOutcome::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_extend_is_judged_by_the_pcr() {
        let before = [7u8; 32];
        let digest = [9u8; 32];
        let after = crate::eventlog::ccnode::extend(&before, &digest);
        assert_eq!(
            after_failed_extend(Some(before), &digest, Some(after)),
            ExtendOutcome::Extended
        );
        assert_eq!(
            after_failed_extend(Some(before), &digest, Some(before)),
            ExtendOutcome::NotExtended
        );
        // Something else extended it, or it cannot be read: not known.
        assert_eq!(
            after_failed_extend(Some(before), &digest, Some([1; 32])),
            ExtendOutcome::Unknown
        );
        assert_eq!(
            after_failed_extend(Some(before), &digest, None),
            ExtendOutcome::Unknown
        );
        assert_eq!(
            after_failed_extend(None, &digest, Some(after)),
            ExtendOutcome::Unknown
        );
    }
}
