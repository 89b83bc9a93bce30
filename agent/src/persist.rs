//! Atomic files and the persisted node state.
//!
//! A state file is replaced by writing a temporary file beside it, syncing
//! it, renaming it over the old one and syncing the directory. A crash at any
//! point leaves either the old file or the new one, never a mixture. What a
//! load finds, and what it makes of it:
//!
//! | found | result |
//! | --- | --- |
//! | a valid `state.json` | that state |
//! | a leftover `state.json.tmp` | removed; it was never acknowledged |
//! | no `state.json`, no audit log | first start: `active` |
//! | no `state.json` but an audit log | `quarantined`: state was lost |
//! | an unreadable, truncated or invalid `state.json` | `quarantined`, the bad file kept aside |

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::state::{Actor, NodeRecord, NodeState};

/// File name of the node state under the state directory.
pub const STATE_FILE: &str = "state.json";
/// File name of the audit log under the state directory.
pub const AUDIT_FILE: &str = "audit.jsonl";
/// Largest state file read back.
pub const MAX_STATE_BYTES: u64 = 64 * 1024;

const STATE_FORMAT: &str = "ccnode-node-state";
const STATE_VERSION: u32 = 1;

/// Errors from reading or writing persistent state.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot create state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The new file is in place (readers see it), but syncing its
    /// directory failed: a crash may still bring the old one back.
    #[error("{path} is written, but its directory could not be synced")]
    NotDurable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot encode state")]
    Encode(#[source] serde_json::Error),
    #[error("state directory {path} is in use by another ccnoded")]
    Locked { path: PathBuf },
}

/// Writes `bytes` to `dir/name` atomically and durably, with mode 0600.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), PersistError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let werr = |p: &Path| {
        let p = p.to_owned();
        move |source| PersistError::Write { path: p, source }
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(werr(&tmp))?;
    file.write_all(bytes).map_err(werr(&tmp))?;
    file.sync_all().map_err(werr(&tmp))?;
    drop(file);
    crash_point("state-before-rename");
    fs::rename(&tmp, &path).map_err(werr(&path))?;
    crash_point("state-after-rename");
    sync_dir(dir).map_err(|source| PersistError::NotDurable { path, source })
}

#[cfg(not(test))]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Directories whose sync fails, for tests (a failing fsync cannot be
/// arranged on a real file system).
#[cfg(test)]
pub(crate) static FAIL_DIR_SYNC: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

#[cfg(test)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    if FAIL_DIR_SYNC.lock().unwrap().iter().any(|d| d == dir) {
        return Err(io::Error::other("test: the directory sync fails"));
    }
    File::open(dir)?.sync_all()
}

/// Test hook: in debug builds, `CCNODE_TEST_CRASH_AT=<point>` aborts the
/// process at that point, so tests can show what a crash there leaves
/// behind. Release builds compile it to nothing.
pub fn crash_point(point: &str) {
    #[cfg(debug_assertions)]
    if std::env::var_os("CCNODE_TEST_CRASH_AT").is_some_and(|v| v == point) {
        eprintln!("ccnoded: CCNODE_TEST_CRASH_AT={point}: aborting");
        std::process::abort();
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

/// File name of the lock held on the state directory while a daemon runs.
pub const LOCK_FILE: &str = "lock";

/// Exclusive ownership of a state directory, released when dropped (or when
/// the process dies: it is an `flock`).
#[derive(Debug)]
pub struct DirLock {
    _lock: nix::fcntl::Flock<File>,
}

/// Takes the state directory for this process, creating it if needed. A
/// second daemon on the same directory is refused before it reads or
/// touches anything there.
pub fn lock_dir(dir: &Path) -> Result<DirLock, PersistError> {
    ensure_dir(dir)?;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|source| PersistError::Write {
            path: path.clone(),
            source,
        })?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(DirLock { _lock: lock }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(PersistError::Locked {
            path: dir.to_owned(),
        }),
        Err((_, errno)) => Err(PersistError::Write {
            path,
            source: errno.into(),
        }),
    }
}

/// Creates the state directory (mode 0700) if it does not exist.
pub fn ensure_dir(dir: &Path) -> Result<(), PersistError> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(source) => Err(PersistError::CreateDir {
            path: dir.to_owned(),
            source,
        }),
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format: String,
    version: u32,
    record: NodeRecord,
}

/// Encodes a record as the state file's bytes.
pub fn encode_state(record: &NodeRecord) -> Result<Vec<u8>, PersistError> {
    let file = StateFile {
        format: STATE_FORMAT.to_owned(),
        version: STATE_VERSION,
        record: record.clone(),
    };
    let mut bytes = serde_json::to_vec_pretty(&file).map_err(PersistError::Encode)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Writes the node record to `dir/state.json` atomically.
pub fn save_state(dir: &Path, record: &NodeRecord) -> Result<(), PersistError> {
    write_atomic(dir, STATE_FILE, &encode_state(record)?)
}

/// What loading the state directory found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// A valid state file.
    Restored(NodeRecord),
    /// Nothing: the node's first start. The record is `active`.
    FirstStart(NodeRecord),
    /// The state could not be trusted; the record is `quarantined` and
    /// must be saved before anything else happens.
    Recovered { record: NodeRecord, problem: String },
}

impl Loaded {
    pub fn record(&self) -> &NodeRecord {
        match self {
            Loaded::Restored(r) | Loaded::FirstStart(r) => r,
            Loaded::Recovered { record, .. } => record,
        }
    }
}

/// Reads the node state from `dir`, applying the rules in the module docs.
/// Never resets an untrustworthy state to `active`.
pub fn load_state(dir: &Path, now: SystemTime) -> Result<Loaded, PersistError> {
    ensure_dir(dir)?;
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    if tmp.exists() {
        tracing::warn!(path = %tmp.display(), "discarding an unfinished state write");
        fs::remove_file(&tmp).map_err(|source| PersistError::Write { path: tmp, source })?;
    }
    let quarantine = |problem: String, seq: u64| Loaded::Recovered {
        record: NodeRecord {
            state: NodeState::Quarantined,
            reason: problem.clone(),
            by: Actor::system("state"),
            since: now,
            seq,
        },
        problem,
    };
    match read_capped(&path) {
        Ok(bytes) => match decode_state(&bytes) {
            Ok(record) => Ok(Loaded::Restored(record)),
            Err(why) => {
                let kept = keep_aside(&path, now);
                Ok(quarantine(
                    format!("state file {} is invalid ({why}); {kept}", path.display()),
                    0,
                ))
            }
        },
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let audit = dir.join(AUDIT_FILE);
            let audit_len = fs::metadata(&audit).map(|m| m.len()).unwrap_or(0);
            if audit_len > 0 {
                Ok(quarantine(
                    format!(
                        "state file {} is missing but the audit log is not: state was lost",
                        path.display()
                    ),
                    0,
                ))
            } else {
                Ok(Loaded::FirstStart(NodeRecord {
                    state: NodeState::Active,
                    reason: "first start".to_owned(),
                    by: Actor::system("ccnoded"),
                    since: now,
                    seq: 0,
                }))
            }
        }
        Err(err) => {
            let kept = keep_aside(&path, now);
            Ok(quarantine(
                format!(
                    "state file {} cannot be read ({err}); {kept}",
                    path.display()
                ),
                0,
            ))
        }
    }
}

fn read_capped(path: &Path) -> io::Result<Vec<u8>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_STATE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {MAX_STATE_BYTES} bytes"),
        ));
    }
    Ok(bytes)
}

/// Decodes a state file's bytes, as [`encode_state`] writes them, into the
/// node record; the error says why the bytes are not a valid state file
/// (empty, not JSON, unknown fields, another format or version). Pure: the
/// caller applies [`MAX_STATE_BYTES`]. Public for the `state_file` fuzz
/// target (fuzz/).
pub fn decode_state(bytes: &[u8]) -> Result<NodeRecord, String> {
    if bytes.is_empty() {
        return Err("empty".to_owned());
    }
    let file: StateFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if file.format != STATE_FORMAT {
        return Err(format!("format is {:?}", file.format));
    }
    if file.version != STATE_VERSION {
        return Err(format!("unsupported version {}", file.version));
    }
    Ok(file.record)
}

/// Renames a bad state file out of the way so it can be examined; says
/// where it went.
fn keep_aside(path: &Path, now: SystemTime) -> String {
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let aside = path.with_extension(format!("json.corrupt-{secs}"));
    match fs::rename(path, &aside) {
        Ok(()) => format!("kept as {}", aside.display()),
        Err(err) => format!("could not keep it aside: {err}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(state: NodeState, reason: &str, seq: u64) -> NodeRecord {
        NodeRecord {
            state,
            reason: reason.into(),
            by: Actor::Admin {
                uid: 0,
                gid: 0,
                pid: 1,
            },
            since: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            seq,
        }
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_100)
    }

    #[test]
    fn a_state_directory_has_one_owner() {
        let dir = tempfile::tempdir().unwrap();
        let lock = lock_dir(dir.path()).unwrap();
        assert!(matches!(
            lock_dir(dir.path()),
            Err(PersistError::Locked { .. })
        ));
        drop(lock);
        lock_dir(dir.path()).unwrap();
    }

    #[test]
    fn first_start_is_active() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = load_state(dir.path(), now()).unwrap();
        assert!(matches!(loaded, Loaded::FirstStart(ref r) if r.state == NodeState::Active));
    }

    #[test]
    fn saved_state_is_restored_with_private_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let r = record(NodeState::Quarantined, "bad fan", 4);
        save_state(dir.path(), &r).unwrap();
        assert_eq!(load_state(dir.path(), now()).unwrap(), Loaded::Restored(r));
        let mode = fs::metadata(dir.path().join(STATE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn unfinished_write_is_discarded_and_old_state_kept() {
        let dir = tempfile::tempdir().unwrap();
        let old = record(NodeState::Quarantined, "old reason", 2);
        save_state(dir.path(), &old).unwrap();
        // A crash between writing the temporary file and the rename.
        let new = encode_state(&record(NodeState::Active, "new", 3)).unwrap();
        fs::write(dir.path().join("state.json.tmp"), &new[..new.len() / 2]).unwrap();
        assert_eq!(
            load_state(dir.path(), now()).unwrap(),
            Loaded::Restored(old)
        );
        assert!(!dir.path().join("state.json.tmp").exists());
    }

    #[test]
    fn every_corruption_quarantines() {
        let good = encode_state(&record(NodeState::Active, "ok", 1)).unwrap();
        let mut flipped = good.clone();
        let at = flipped.iter().position(|&b| b == b'a').unwrap();
        flipped[at] = b'#';
        let cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            good[..good.len() / 2].to_vec(),
            b"\x00\x01\x02garbage".to_vec(),
            flipped,
            br#"{"format":"ccnode-node-state","version":9,"record":{}}"#.to_vec(),
            br#"{"format":"other","version":1,"record":{"state":"active","reason":"","by":{"kind":"system","component":"x"},"since":"2026-01-01T00:00:00Z","seq":0}}"#.to_vec(),
            vec![b' '; (MAX_STATE_BYTES + 1) as usize],
        ];
        for bytes in cases {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join(STATE_FILE), &bytes).unwrap();
            let loaded = load_state(dir.path(), now()).unwrap();
            match loaded {
                Loaded::Recovered { record, problem } => {
                    assert_eq!(record.state, NodeState::Quarantined);
                    assert!(problem.contains("state file"), "{problem}");
                }
                other => panic!("corrupt file loaded as {other:?}"),
            }
            let kept = fs::read_dir(dir.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().contains("corrupt"));
            assert!(kept, "the bad file is kept for examination");
        }
    }

    #[test]
    fn lost_state_with_audit_history_quarantines() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(AUDIT_FILE), b"{}\n").unwrap();
        let loaded = load_state(dir.path(), now()).unwrap();
        assert_eq!(loaded.record().state, NodeState::Quarantined);
    }

    #[test]
    fn symlinked_state_file_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere.json");
        fs::write(
            &elsewhere,
            encode_state(&record(NodeState::Active, "x", 1)).unwrap(),
        )
        .unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join(STATE_FILE)).unwrap();
        assert_eq!(
            load_state(dir.path(), now()).unwrap().record().state,
            NodeState::Quarantined
        );
    }
}
