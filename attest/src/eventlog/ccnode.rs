//! ccnode's own event log: one entry per extension of the ccnode PCR
//! (policy loads, model loads, agent starts), so a verifier can replay it
//! from zeros and see exactly what this boot of the node loaded.
//!
//! Each event's digest commits to its type and data:
//!
//! ```text
//! digest = sha256( u32be(len(DOMAIN)) || DOMAIN
//!               || u32be(len(type))   || type
//!               || u32be(len(JCS(data))) || JCS(data) )
//! DOMAIN = "ccnode-event-v1"
//! ```
//!
//! and the PCR is extended with that digest (sha256 bank):
//! `pcr = sha256(pcr || digest)`, starting from 32 zero bytes.
//!
//! The log is persisted in ccnoded's state directory (atomically: temp
//! file, fsync, rename, fsync of the directory) **before** the PCR is
//! extended. A crash between the two leaves one entry the PCR lacks; at the
//! next start [`MeasuredLog::reconcile`] drops exactly that entry when it
//! is the only difference. A PCR at all zeros with a non-empty log means the
//! TPM was reset (a reboot): the old log is set aside and a new one begun.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::jcs;

/// Domain separation for event digests.
pub const EVENT_DOMAIN: &[u8] = b"ccnode-event-v1";
/// Most events in one boot's log.
pub const MAX_EVENTS: usize = 4096;
/// Largest canonical event data.
pub const MAX_EVENT_DATA: usize = 1024;
/// Longest event type.
pub const MAX_EVENT_TYPE: usize = 64;
/// Largest persisted log file (`MAX_EVENTS` events of the largest size,
/// hex-digested, with room for JSON syntax).
pub const MAX_LOG_FILE: u64 = (MAX_EVENTS as u64) * (MAX_EVENT_DATA as u64 * 2 + 512);

/// Event types ccnoded records.
pub mod event_type {
    /// ccnoded started (data: agent version).
    pub const AGENT_START: &str = "agent_start";
    /// A node policy was loaded (data: its digest and source).
    pub const POLICY_LOAD: &str = "policy_load";
    /// A model passed verification and was loaded (data: name, digest).
    pub const MODEL_LOAD: &str = "model_load";
}

/// One extension of the ccnode PCR.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CcnodeEvent {
    /// Position in the log, from 0.
    pub seq: u64,
    /// The PCR extended (sha256 bank).
    pub pcr: u32,
    /// What happened: `agent_start`, `policy_load`, `model_load`, or
    /// another `[a-z0-9_]` word.
    #[serde(rename = "type")]
    pub event_type: String,
    /// What was loaded, as JSON (canonicalised for the digest).
    pub data: serde_json::Value,
    /// The sha256 digest extended into the PCR, hex.
    pub digest: String,
}

/// Why an event log is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventLogError {
    #[error("event {seq}: {reason}")]
    Event { seq: u64, reason: String },
    #[error("{0} events exceed the limit of {MAX_EVENTS}")]
    TooMany(usize),
}

/// Checks an event type: 1 to [`MAX_EVENT_TYPE`] characters of `[a-z0-9_]`.
pub fn check_event_type(t: &str) -> Result<(), String> {
    if t.is_empty() || t.len() > MAX_EVENT_TYPE {
        return Err(format!("event type must be 1 to {MAX_EVENT_TYPE} bytes"));
    }
    if !t
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!("event type {t:?} is not [a-z0-9_]"));
    }
    Ok(())
}

/// The digest of an event of `event_type` with `data`.
pub fn event_digest(event_type: &str, data: &serde_json::Value) -> Result<[u8; 32], String> {
    check_event_type(event_type)?;
    let canon = jcs::canonicalize(data).map_err(|e| e.to_string())?;
    if canon.len() > MAX_EVENT_DATA {
        return Err(format!(
            "event data of {} bytes exceeds {MAX_EVENT_DATA}",
            canon.len()
        ));
    }
    let mut h = Sha256::new();
    for part in [EVENT_DOMAIN, event_type.as_bytes(), &canon] {
        h.update((part.len() as u32).to_be_bytes());
        h.update(part);
    }
    Ok(h.finalize().into())
}

/// `sha256(pcr || digest)`.
pub fn extend(pcr: &[u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(pcr);
    h.update(digest);
    h.finalize().into()
}

/// Checks every event (sequence, PCR, digest over its data) and replays the
/// log from zeros. Returns the PCR value the log implies.
pub fn replay(events: &[CcnodeEvent], pcr: u32) -> Result<[u8; 32], EventLogError> {
    if events.len() > MAX_EVENTS {
        return Err(EventLogError::TooMany(events.len()));
    }
    let mut value = [0u8; 32];
    for (i, e) in events.iter().enumerate() {
        let fail = |reason: String| EventLogError::Event { seq: e.seq, reason };
        if e.seq != i as u64 {
            return Err(fail(format!("sequence number {} at position {i}", e.seq)));
        }
        if e.pcr != pcr {
            return Err(fail(format!("pcr {} is not the ccnode pcr {pcr}", e.pcr)));
        }
        let recomputed = event_digest(&e.event_type, &e.data).map_err(fail)?;
        if hex::encode(recomputed) != e.digest {
            return Err(fail(format!(
                "digest {} does not match its type and data (expected {})",
                e.digest,
                hex::encode(recomputed)
            )));
        }
        value = extend(&value, &recomputed);
    }
    Ok(value)
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogFile {
    version: u32,
    pcr: u32,
    events: Vec<CcnodeEvent>,
}

/// What reconciling the persisted log with the PCR found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogStatus {
    /// The log replays to the PCR.
    Consistent,
    /// The PCR was at zeros (the TPM was reset since the log was written):
    /// the old log (this many events) was moved aside and a new one begun.
    Reset { discarded: usize },
    /// The last entry was written but the PCR never extended (a crash in
    /// between): it was dropped.
    DroppedUnextended,
    /// The log does not replay to the PCR: something else extended it, or
    /// the log was lost or altered. Evidence from this boot will fail the
    /// verifier's `ccnode_event_log` check.
    Mismatch { expected: String, found: String },
}

/// The persisted ccnode event log.
#[derive(Debug)]
pub struct MeasuredLog {
    path: PathBuf,
    pcr: u32,
    events: Vec<CcnodeEvent>,
}

impl MeasuredLog {
    /// Loads the log at `path` (an absent file is an empty log).
    pub fn load(path: &Path, pcr: u32) -> Result<MeasuredLog, String> {
        let events = match File::open(path) {
            Ok(f) => {
                let mut buf = Vec::new();
                f.take(MAX_LOG_FILE + 1)
                    .read_to_end(&mut buf)
                    .map_err(|e| format!("cannot read: {e}"))?;
                if buf.len() as u64 > MAX_LOG_FILE {
                    return Err(format!("larger than {MAX_LOG_FILE} bytes"));
                }
                let file: LogFile = serde_json::from_slice(&buf)
                    .map_err(|e| format!("not a ccnode event log: {e}"))?;
                if file.version != 1 {
                    return Err(format!("version {} is not 1", file.version));
                }
                if file.pcr != pcr {
                    return Err(format!(
                        "written for pcr {}, but the ccnode pcr is now {pcr}",
                        file.pcr
                    ));
                }
                replay(&file.events, pcr).map_err(|e| e.to_string())?;
                file.events
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("cannot open: {e}")),
        };
        Ok(MeasuredLog {
            path: path.to_owned(),
            pcr,
            events,
        })
    }

    pub fn events(&self) -> &[CcnodeEvent] {
        &self.events
    }

    pub fn pcr(&self) -> u32 {
        self.pcr
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The PCR value the log implies.
    pub fn expected_pcr(&self) -> [u8; 32] {
        let mut v = [0u8; 32];
        for e in &self.events {
            if let Ok(d) = hex::decode(&e.digest) {
                if let Ok(d) = <[u8; 32]>::try_from(d.as_slice()) {
                    v = extend(&v, &d);
                }
            }
        }
        v
    }

    /// Brings the log in line with the PCR's current value `current` (see
    /// the module documentation), persisting any change.
    pub fn reconcile(&mut self, current: &[u8; 32]) -> Result<LogStatus, String> {
        if self.expected_pcr() == *current {
            return Ok(LogStatus::Consistent);
        }
        if *current == [0u8; 32] {
            let discarded = self.events.len();
            let aside = self.path.with_extension("previous-boot.json");
            if self.path.exists() {
                fs::rename(&self.path, &aside)
                    .map_err(|e| format!("cannot move the old log aside: {e}"))?;
            }
            self.events.clear();
            self.persist()?;
            return Ok(LogStatus::Reset { discarded });
        }
        if let Some(last) = self.events.pop() {
            if self.expected_pcr() == *current {
                self.persist()?;
                return Ok(LogStatus::DroppedUnextended);
            }
            self.events.push(last);
        }
        Ok(LogStatus::Mismatch {
            expected: hex::encode(self.expected_pcr()),
            found: hex::encode(current),
        })
    }

    /// Appends an event and persists the log (before the caller extends
    /// the PCR with the returned digest).
    pub fn append(
        &mut self,
        event_type: &str,
        data: serde_json::Value,
    ) -> Result<(CcnodeEvent, [u8; 32]), String> {
        if self.events.len() >= MAX_EVENTS {
            return Err(format!("the event log is full ({MAX_EVENTS} events)"));
        }
        let digest = event_digest(event_type, &data)?;
        let event = CcnodeEvent {
            seq: self.events.len() as u64,
            pcr: self.pcr,
            event_type: event_type.to_owned(),
            data,
            digest: hex::encode(digest),
        };
        self.events.push(event.clone());
        if let Err(e) = self.persist() {
            self.events.pop();
            return Err(e);
        }
        Ok((event, digest))
    }

    /// Removes the last event (its extension failed) and persists.
    pub fn rollback_last(&mut self) -> Result<(), String> {
        self.events.pop();
        self.persist()
    }

    fn persist(&self) -> Result<(), String> {
        let file = LogFile {
            version: 1,
            pcr: self.pcr,
            events: self.events.clone(),
        };
        let bytes = serde_json::to_vec(&file).map_err(|e| e.to_string())?;
        write_atomic(&self.path, &bytes).map_err(|e| format!("cannot write: {e}"))
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, fsync, rename over `path`, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn append_replay_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.json");
        let mut log = MeasuredLog::load(&path, 13).unwrap();
        assert!(log.events().is_empty());
        let (e0, d0) = log
            .append(event_type::POLICY_LOAD, json!({"digest": "ab"}))
            .unwrap();
        let (_, d1) = log
            .append(event_type::MODEL_LOAD, json!({"name": "m", "digest": "cd"}))
            .unwrap();
        assert_eq!(e0.seq, 0);
        let pcr = extend(&extend(&[0; 32], &d0), &d1);
        assert_eq!(replay(log.events(), 13).unwrap(), pcr);
        let mut again = MeasuredLog::load(&path, 13).unwrap();
        assert_eq!(again.events(), log.events());
        assert_eq!(again.reconcile(&pcr).unwrap(), LogStatus::Consistent);
        // Written but never extended: the last entry is dropped.
        let one = extend(&[0; 32], &d0);
        assert_eq!(again.reconcile(&one).unwrap(), LogStatus::DroppedUnextended);
        assert_eq!(MeasuredLog::load(&path, 13).unwrap().events().len(), 1);
        // Foreign extension: a mismatch, nothing changed.
        let foreign = extend(&one, &[7; 32]);
        assert!(matches!(
            again.reconcile(&foreign).unwrap(),
            LogStatus::Mismatch { .. }
        ));
        // TPM reset: a new log.
        assert_eq!(
            again.reconcile(&[0; 32]).unwrap(),
            LogStatus::Reset { discarded: 1 }
        );
        assert!(MeasuredLog::load(&path, 13).unwrap().events().is_empty());
        assert!(MeasuredLog::load(&path, 12)
            .unwrap_err()
            .contains("written for pcr 13"));
    }

    #[test]
    fn replay_rejects_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MeasuredLog::load(&dir.path().join("l"), 13).unwrap();
        log.append("model_load", json!({"name": "a"})).unwrap();
        log.append("model_load", json!({"name": "b"})).unwrap();
        let good = log.events().to_vec();
        let mut bad = good.clone();
        bad[1].data = json!({"name": "c"});
        assert!(replay(&bad, 13)
            .unwrap_err()
            .to_string()
            .contains("does not match"));
        let mut bad = good.clone();
        bad.swap(0, 1);
        assert!(replay(&bad, 13).is_err());
        let mut bad = good.clone();
        bad[0].pcr = 12;
        assert!(replay(&bad, 13).is_err());
        assert!(replay(&good, 12).is_err());
        assert!(log.append("Bad Type", json!(1)).is_err());
        assert!(log
            .append("x", json!("y".repeat(MAX_EVENT_DATA)))
            .unwrap_err()
            .contains("exceeds"));
    }

    #[test]
    fn load_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        fs::write(&p, b"{not json").unwrap();
        assert!(MeasuredLog::load(&p, 13)
            .unwrap_err()
            .contains("not a ccnode"));
        fs::write(&p, br#"{"version":2,"pcr":13,"events":[]}"#).unwrap();
        assert!(MeasuredLog::load(&p, 13).is_err());
    }
}
