//! configfs-tsm: the kernel's vendor-neutral interface for TEE reports
//! (Linux 6.7 and later, `Documentation/ABI/testing/configfs-tsm`), used
//! for SEV-SNP (provider `sev_guest`) and TDX (provider `tdx_guest`).
//!
//! One report is one directory under `/sys/kernel/config/tsm/report`:
//!
//! 1. `mkdir` a fresh entry (the kernel creates its attributes);
//! 2. write `privlevel` (SEV-SNP VMPL) when asked for, then the 64 bytes of
//!    `inblob` (the report data: for ccnode, the evidence binding);
//! 3. read `generation`, then `provider` (it must be the TEE the node is
//!    configured for), then `outblob` (the report or quote: reading it makes
//!    the kernel ask the firmware), then `auxblob` when present (SEV-SNP:
//!    the host's certificate table), then `generation` again;
//! 4. `rmdir` the entry, on every path.
//!
//! Each write bumps `generation`, so two equal readings around the blobs
//! prove that nobody wrote the entry while they were read; a different
//! reading is retried, a few times at most. (A write between ours and the
//! first reading would go unseen by that test: what proves the blobs answer
//! our `inblob` is the caller's check that the report carries the report
//! data it asked for, see [`super::snp`] and [`super::tdx`]; the entry is
//! ours alone by its name in any case.) Every read is bounded.
//!
//! The file operations go through [`ConfigFs`], so the tests drive the same
//! code against a fake configfs tree in a temporary directory; [`RealFs`] is
//! the only implementation shipped.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where the kernel mounts configfs-tsm reports.
pub const DEFAULT_ROOT: &str = "/sys/kernel/config/tsm/report";
/// Largest `outblob` read (a TDX quote with its PCK chain is about 5 to
/// 8 KiB; an SNP report is 1,184 bytes).
pub const MAX_OUTBLOB: usize = 64 << 10;
/// Largest `auxblob` read (the SNP certificate table: VCEK, ASK, ARK).
pub const MAX_AUXBLOB: usize = 64 << 10;
/// Largest small attribute (`generation`, `provider`).
const MAX_ATTRIBUTE: usize = 256;
/// Attempts when `generation` moves under us.
pub const ATTEMPTS: usize = 3;

/// The file operations configfs-tsm needs.
pub trait ConfigFs: Send + Sync + std::fmt::Debug {
    fn create_dir(&self, path: &Path) -> std::io::Result<()>;
    fn remove_dir(&self, path: &Path) -> std::io::Result<()>;
    /// Writes `data` to an existing attribute, in one `write`.
    fn write(&self, path: &Path, data: &[u8]) -> std::io::Result<()>;
    /// Reads an attribute, at most `limit + 1` bytes.
    fn read(&self, path: &Path, limit: usize) -> std::io::Result<Vec<u8>>;
}

/// The real filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl ConfigFs for RealFs {
    fn create_dir(&self, path: &Path) -> std::io::Result<()> {
        std::fs::create_dir(path)
    }

    fn remove_dir(&self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_dir(path)
    }

    fn write(&self, path: &Path, data: &[u8]) -> std::io::Result<()> {
        // Never create: configfs made the attribute, a missing one is an
        // interface we do not know.
        let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.write_all(data)
    }

    fn read(&self, path: &Path, limit: usize) -> std::io::Result<Vec<u8>> {
        let f = std::fs::File::open(path)?;
        let mut buf = Vec::new();
        f.take(limit as u64 + 1).read_to_end(&mut buf)?;
        Ok(buf)
    }
}

/// Why a configfs-tsm report could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TsmError {
    #[error(
        "configfs-tsm is not available at {root} (Linux 6.7 or later with a TEE guest driver)"
    )]
    Unavailable {
        root: String,
        #[source]
        source: std::io::Error,
    },
    #[error("configfs-tsm {what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("configfs-tsm provider is {found:?}, this node is configured for {expected:?}")]
    Provider { expected: String, found: String },
    #[error("configfs-tsm {what} is larger than {limit} bytes")]
    TooLarge { what: &'static str, limit: usize },
    #[error("configfs-tsm {what} is empty")]
    Empty { what: &'static str },
    #[error("configfs-tsm generation {0:?} is not a number")]
    Generation(String),
    #[error("configfs-tsm entry was written by someone else {ATTEMPTS} times in a row")]
    Raced,
}

/// What one report gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsmReport {
    pub provider: String,
    /// The report (SNP) or quote (TDX).
    pub outblob: Vec<u8>,
    /// The auxiliary blob (SNP: the certificate table), when the provider
    /// gives one and it is not empty.
    pub auxblob: Option<Vec<u8>>,
    pub generation: u64,
}

/// A configfs-tsm report source.
#[derive(Debug, Clone)]
pub struct Tsm {
    root: PathBuf,
    fs: Arc<dyn ConfigFs>,
}

static ENTRY: AtomicU64 = AtomicU64::new(0);

impl Tsm {
    /// Reports under `root` (normally [`DEFAULT_ROOT`]).
    pub fn new(root: impl Into<PathBuf>) -> Tsm {
        Tsm {
            root: root.into(),
            fs: Arc::new(RealFs),
        }
    }

    /// Reports under `root` through `fs` (tests).
    pub fn with_fs(root: impl Into<PathBuf>, fs: Arc<dyn ConfigFs>) -> Tsm {
        Tsm {
            root: root.into(),
            fs,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Gets one report for `inblob` from `expected_provider` (`sev_guest`,
    /// `tdx_guest`), at `privlevel` when given (SEV-SNP VMPL).
    pub fn report(
        &self,
        expected_provider: &str,
        inblob: &[u8; 64],
        privlevel: Option<u32>,
    ) -> Result<TsmReport, TsmError> {
        let name = format!(
            "ccnode-{}-{}",
            std::process::id(),
            ENTRY.fetch_add(1, Ordering::Relaxed)
        );
        let dir = self.root.join(name);
        self.fs.create_dir(&dir).map_err(|source| {
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ) {
                TsmError::Unavailable {
                    root: self.root.display().to_string(),
                    source,
                }
            } else {
                io("create", &dir, source)
            }
        })?;
        let out = self.report_in(&dir, expected_provider, inblob, privlevel);
        if let Err(e) = self.fs.remove_dir(&dir) {
            // The report (if any) is still good; the entry leaks until
            // someone removes it.
            tracing::warn!(entry = %dir.display(), error = %e, "cannot remove configfs-tsm entry");
        }
        out
    }

    fn report_in(
        &self,
        dir: &Path,
        expected_provider: &str,
        inblob: &[u8; 64],
        privlevel: Option<u32>,
    ) -> Result<TsmReport, TsmError> {
        let provider = self.attribute(dir, "provider")?;
        if provider != expected_provider {
            return Err(TsmError::Provider {
                expected: expected_provider.into(),
                found: provider,
            });
        }
        for _ in 0..ATTEMPTS {
            if let Some(level) = privlevel {
                let p = dir.join("privlevel");
                self.fs
                    .write(&p, level.to_string().as_bytes())
                    .map_err(|e| io("write", &p, e))?;
            }
            let p = dir.join("inblob");
            self.fs.write(&p, inblob).map_err(|e| io("write", &p, e))?;
            let before = self.generation(dir)?;
            let outblob = self.blob(dir, "outblob", MAX_OUTBLOB)?;
            if outblob.is_empty() {
                return Err(TsmError::Empty { what: "outblob" });
            }
            let auxblob = match self.blob(dir, "auxblob", MAX_AUXBLOB) {
                Ok(b) if b.is_empty() => None,
                Ok(b) => Some(b),
                // Providers without an auxiliary blob (TDX) have no file.
                Err(TsmError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    None
                }
                Err(e) => return Err(e),
            };
            let after = self.generation(dir)?;
            if before == after {
                return Ok(TsmReport {
                    provider,
                    outblob,
                    auxblob,
                    generation: after,
                });
            }
            tracing::debug!(
                before,
                after,
                "configfs-tsm entry written concurrently; again"
            );
        }
        Err(TsmError::Raced)
    }

    fn blob(&self, dir: &Path, name: &'static str, limit: usize) -> Result<Vec<u8>, TsmError> {
        let p = dir.join(name);
        let b = self.fs.read(&p, limit).map_err(|e| io("read", &p, e))?;
        if b.len() > limit {
            return Err(TsmError::TooLarge { what: name, limit });
        }
        Ok(b)
    }

    fn attribute(&self, dir: &Path, name: &'static str) -> Result<String, TsmError> {
        let b = self.blob(dir, name, MAX_ATTRIBUTE)?;
        Ok(String::from_utf8_lossy(&b).trim().to_string())
    }

    fn generation(&self, dir: &Path) -> Result<u64, TsmError> {
        let g = self.attribute(dir, "generation")?;
        g.parse().map_err(|_| TsmError::Generation(g))
    }
}

fn io(what: &'static str, path: &Path, source: std::io::Error) -> TsmError {
    TsmError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// A fake configfs-tsm tree in a real directory, for tests (here and in the
/// TEE producers' tests): `mkdir` creates the attributes, a write to
/// `inblob` bumps `generation` and writes `outblob` (and `auxblob`) from
/// the closure, `rmdir` removes the attributes first.
#[cfg(test)]
pub(crate) mod fake {
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use super::{ConfigFs, RealFs};

    type Answer = dyn Fn(&[u8]) -> (Vec<u8>, Option<Vec<u8>>) + Send + Sync;

    pub(crate) struct FakeTsm {
        pub provider: String,
        pub answer: Box<Answer>,
        /// Extra generation bumps to apply on the next reads of outblob
        /// (a concurrent writer).
        pub races: AtomicU64,
        pub removed: Mutex<Vec<String>>,
        pub privlevels: Mutex<Vec<String>>,
    }

    impl std::fmt::Debug for FakeTsm {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("FakeTsm")
                .field("provider", &self.provider)
                .finish()
        }
    }

    impl FakeTsm {
        pub(crate) fn new(
            provider: &str,
            answer: impl Fn(&[u8]) -> (Vec<u8>, Option<Vec<u8>>) + Send + Sync + 'static,
        ) -> Arc<FakeTsm> {
            Arc::new(FakeTsm {
                provider: provider.into(),
                answer: Box::new(answer),
                races: AtomicU64::new(0),
                removed: Mutex::new(Vec::new()),
                privlevels: Mutex::new(Vec::new()),
            })
        }

        fn bump(dir: &Path) -> std::io::Result<()> {
            let g: u64 = std::fs::read_to_string(dir.join("generation"))?
                .trim()
                .parse()
                .unwrap_or(0);
            std::fs::write(dir.join("generation"), format!("{}\n", g + 1))
        }
    }

    impl ConfigFs for FakeTsm {
        fn create_dir(&self, path: &Path) -> std::io::Result<()> {
            std::fs::create_dir(path)?;
            std::fs::write(path.join("provider"), format!("{}\n", self.provider))?;
            std::fs::write(path.join("generation"), "0\n")?;
            for a in ["inblob", "outblob", "privlevel", "privlevel_floor"] {
                std::fs::write(path.join(a), "")?;
            }
            if self.provider == "sev_guest" {
                std::fs::write(path.join("auxblob"), "")?;
            }
            Ok(())
        }

        fn remove_dir(&self, path: &Path) -> std::io::Result<()> {
            for e in std::fs::read_dir(path)? {
                std::fs::remove_file(e?.path())?;
            }
            std::fs::remove_dir(path)?;
            self.removed
                .lock()
                .unwrap()
                .push(path.file_name().unwrap().to_string_lossy().into());
            Ok(())
        }

        fn write(&self, path: &Path, data: &[u8]) -> std::io::Result<()> {
            RealFs.write(path, data)?;
            let dir = path.parent().unwrap();
            match path.file_name().and_then(|n| n.to_str()) {
                Some("inblob") => {
                    FakeTsm::bump(dir)?;
                    let (out, aux) = (self.answer)(data);
                    std::fs::write(dir.join("outblob"), out)?;
                    if let Some(aux) = aux {
                        std::fs::write(dir.join("auxblob"), aux)?;
                    }
                }
                Some("privlevel") => {
                    FakeTsm::bump(dir)?;
                    self.privlevels
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(data).into());
                }
                _ => {}
            }
            Ok(())
        }

        fn read(&self, path: &Path, limit: usize) -> std::io::Result<Vec<u8>> {
            let out = RealFs.read(path, limit)?;
            if path.file_name().and_then(|n| n.to_str()) == Some("outblob")
                && self
                    .races
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| r.checked_sub(1))
                    .is_ok()
            {
                FakeTsm::bump(path.parent().unwrap())?;
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::fake::FakeTsm;
    use super::*;

    fn echo(inblob: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
        let mut out = b"report:".to_vec();
        out.extend_from_slice(inblob);
        (out, Some(b"certs".to_vec()))
    }

    #[test]
    fn a_report_for_our_inblob_and_the_entry_removed() {
        let root = tempfile::tempdir().unwrap();
        let fake = FakeTsm::new("sev_guest", echo);
        let tsm = Tsm::with_fs(root.path(), fake.clone());
        let r = tsm.report("sev_guest", &[7; 64], Some(1)).unwrap();
        assert_eq!(&r.outblob[..7], b"report:");
        assert_eq!(&r.outblob[7..], &[7; 64]);
        assert_eq!(r.auxblob.as_deref(), Some(&b"certs"[..]));
        assert_eq!(r.provider, "sev_guest");
        assert_eq!(r.generation, 2, "privlevel then inblob");
        assert_eq!(*fake.privlevels.lock().unwrap(), vec!["1".to_string()]);
        assert_eq!(fake.removed.lock().unwrap().len(), 1);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn tdx_has_no_auxblob() {
        let root = tempfile::tempdir().unwrap();
        let fake = FakeTsm::new("tdx_guest", |i| (i.to_vec(), None));
        let r = Tsm::with_fs(root.path(), fake)
            .report("tdx_guest", &[1; 64], None)
            .unwrap();
        assert_eq!(r.outblob, vec![1; 64]);
        assert_eq!(r.auxblob, None);
    }

    #[test]
    fn the_wrong_provider_is_refused_and_cleaned_up() {
        let root = tempfile::tempdir().unwrap();
        let fake = FakeTsm::new("tdx_guest", echo);
        let err = Tsm::with_fs(root.path(), fake.clone())
            .report("sev_guest", &[0; 64], None)
            .unwrap_err();
        assert!(
            matches!(&err, TsmError::Provider { found, .. } if found == "tdx_guest"),
            "{err}"
        );
        assert_eq!(fake.removed.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_concurrent_writer_is_retried_then_given_up_on() {
        let root = tempfile::tempdir().unwrap();
        let fake = FakeTsm::new("sev_guest", echo);
        fake.races.store(1, Ordering::SeqCst);
        let tsm = Tsm::with_fs(root.path(), fake.clone());
        let r = tsm.report("sev_guest", &[3; 64], None).unwrap();
        assert_eq!(&r.outblob[7..], &[3; 64]);
        fake.races.store(ATTEMPTS as u64, Ordering::SeqCst);
        assert!(matches!(
            tsm.report("sev_guest", &[3; 64], None),
            Err(TsmError::Raced)
        ));
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn oversize_and_empty_blobs_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let big = FakeTsm::new("tdx_guest", |_| (vec![0; MAX_OUTBLOB + 1], None));
        assert!(matches!(
            Tsm::with_fs(root.path(), big).report("tdx_guest", &[0; 64], None),
            Err(TsmError::TooLarge {
                what: "outblob",
                ..
            })
        ));
        let empty = FakeTsm::new("tdx_guest", |_| (Vec::new(), None));
        assert!(matches!(
            Tsm::with_fs(root.path(), empty).report("tdx_guest", &[0; 64], None),
            Err(TsmError::Empty { what: "outblob" })
        ));
    }

    #[test]
    fn a_missing_root_says_configfs_tsm_is_unavailable() {
        let err = Tsm::new("/nonexistent/tsm/report")
            .report("sev_guest", &[0; 64], None)
            .unwrap_err();
        assert!(matches!(err, TsmError::Unavailable { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/tsm/report"));
    }
}
