//! The append-only audit log of admin actions and node transitions.
//!
//! One JSON object per line in `audit.jsonl` under the state directory,
//! opened with `O_APPEND`; each record is written with a single `write` and
//! synced before the action is acknowledged. A record that cannot be written
//! does not undo the action (the state file is the source of truth): it is
//! counted in `ccnode_audit_write_failures_total` and logged. The most recent
//! records are also kept in memory for the admin `audit` command.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::persist::AUDIT_FILE;
use crate::state::{Actor, NodeState};

/// How much of the end of the log is read back at start.
const TAIL_BYTES: u64 = 1024 * 1024;

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    #[serde(with = "crate::timefmt")]
    pub ts: SystemTime,
    pub actor: Actor,
    /// The admin command or system event (`drain`, `drain_complete`, ...).
    pub command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `ok`, or the stable error code the action was refused with.
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<NodeState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<NodeState>,
}

/// Errors from the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot append to audit log {path}")]
    Append {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The audit log. Appends block on disk I/O: call them off the runtime.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    capacity: usize,
    /// Held while appending (write and sync); serialises appends. With
    /// it, whether a failed write may have left part of a line.
    file: Mutex<(File, bool)>,
    /// Held only briefly: readers never wait for a sync.
    recent: Mutex<VecDeque<AuditRecord>>,
}

impl AuditLog {
    /// Opens (creating, mode 0600) the audit log in `state_dir` and reads
    /// back up to `capacity` of its most recent records.
    pub fn open(state_dir: &Path, capacity: usize) -> Result<AuditLog, AuditError> {
        let path = state_dir.join(AUDIT_FILE);
        let open_err = |source| AuditError::Open {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .append(true)
            .read(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(open_err)?;
        let (recent, torn) = read_tail(&file, capacity).map_err(open_err)?;
        if torn {
            // A crash cut the last record short: end its line, so the next
            // record starts on a line of its own.
            (&file).write_all(b"\n").map_err(open_err)?;
        }
        Ok(AuditLog {
            path,
            capacity,
            file: Mutex::new((file, false)),
            recent: Mutex::new(recent),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record durably. Blocking.
    pub fn append(&self, record: AuditRecord) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(&record).expect("audit records always serialise");
        line.push(b'\n');
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let (file, torn) = &mut *guard;
        let append_err = |source| AuditError::Append {
            path: self.path.clone(),
            source,
        };
        if *torn {
            // A write that failed part-way (disk full, say) may have left
            // a line unended: this record starts on a line of its own (the
            // reader skips an empty one).
            line.insert(0, b'\n');
        }
        if let Err(e) = file.write_all(&line) {
            *torn = true;
            return Err(append_err(e));
        }
        *torn = false;
        file.sync_data().map_err(append_err)?;
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == self.capacity {
            recent.pop_front();
        }
        recent.push_back(record);
        Ok(())
    }

    /// The most recent `limit` records, oldest first.
    pub fn recent(&self, limit: usize) -> Vec<AuditRecord> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let skip = recent.len().saturating_sub(limit);
        recent.iter().skip(skip).cloned().collect()
    }
}

/// Reads the last records; also says whether the file ends mid-line.
fn read_tail(file: &File, capacity: usize) -> io::Result<(VecDeque<AuditRecord>, bool)> {
    let mut file = file.try_clone()?;
    let len = file.seek(SeekFrom::End(0))?;
    let start = len.saturating_sub(TAIL_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(TAIL_BYTES).read_to_end(&mut bytes)?;
    let torn = bytes.last().is_some_and(|&b| b != b'\n');
    let mut lines = bytes.split(|&b| b == b'\n');
    if start > 0 {
        // The first line is cut somewhere in the middle.
        lines.next();
    }
    let mut recent = VecDeque::with_capacity(capacity.min(1024));
    let mut skipped = 0usize;
    for line in lines.filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<AuditRecord>(line) {
            Ok(record) => {
                if recent.len() == capacity {
                    recent.pop_front();
                }
                recent.push_back(record);
            }
            Err(_) => skipped += 1,
        }
    }
    if skipped > 0 {
        tracing::warn!(skipped, "audit log has lines that are not audit records");
    }
    Ok((recent, torn))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u32) -> AuditRecord {
        AuditRecord {
            ts: SystemTime::UNIX_EPOCH,
            actor: Actor::Admin {
                uid: i,
                gid: 0,
                pid: 1,
            },
            command: "drain".into(),
            reason: Some(format!("r{i}")),
            result: "ok".into(),
            from: Some(NodeState::Active),
            to: Some(NodeState::Drained),
        }
    }

    #[test]
    fn appends_survive_reopen_and_keep_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 3).unwrap();
        for i in 0..5 {
            log.append(rec(i)).unwrap();
        }
        assert_eq!(log.recent(10), vec![rec(2), rec(3), rec(4)]);
        assert_eq!(log.recent(1), vec![rec(4)]);
        drop(log);
        let log = AuditLog::open(dir.path(), 10).unwrap();
        assert_eq!(log.recent(10), (0..5).map(rec).collect::<Vec<_>>());
        let text = std::fs::read_to_string(dir.path().join(AUDIT_FILE)).unwrap();
        assert_eq!(text.lines().count(), 5);
    }

    #[test]
    fn a_torn_last_line_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 10).unwrap();
        log.append(rec(1)).unwrap();
        drop(log);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(AUDIT_FILE))
            .unwrap();
        f.write_all(b"{\"ts\":\"2026-").unwrap();
        let log = AuditLog::open(dir.path(), 10).unwrap();
        assert_eq!(log.recent(10), vec![rec(1)]);
        log.append(rec(2)).unwrap();
        drop(log);
        let log = AuditLog::open(dir.path(), 10).unwrap();
        assert_eq!(log.recent(10), vec![rec(1), rec(2)]);
    }

    #[test]
    fn a_record_after_a_failed_write_starts_a_line_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 10).unwrap();
        log.append(rec(1)).unwrap();
        // A disk that refuses the write, after part of the line went out.
        let real = {
            let mut guard = log.file.lock().unwrap();
            let full = OpenOptions::new().write(true).open("/dev/full").unwrap();
            std::mem::replace(&mut guard.0, full)
        };
        assert!(log.append(rec(2)).is_err());
        (&real).write_all(b"{\"ts\":\"2026-").unwrap();
        log.file.lock().unwrap().0 = real;
        log.append(rec(3)).unwrap();
        drop(log);
        let log = AuditLog::open(dir.path(), 10).unwrap();
        assert_eq!(log.recent(10), vec![rec(1), rec(3)]);
    }
}
