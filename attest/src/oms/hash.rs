//! One read pass per file: each chunk is read from the opened file, hashed,
//! and written into a memfd; the memfd is sealed once complete. The bytes in
//! the memfd are therefore exactly the bytes that were hashed, whatever
//! happens on disk afterwards.
//!
//! With nothing to hand over (a verdict only), files are hashed straight
//! from the page cache through guarded mappings ([`super::mapped`]), which
//! saves the copy; a file that shrinks under a mapping is refused as
//! changed, as a short read is on the `pread` path.
//!
//! Work is split into items (a whole file, or a shard) run in parallel on
//! rayon's pool, largest first; BLAKE3 additionally hashes each chunk across
//! cores, so one large file uses every core.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use rayon::prelude::*;
use sha2::Digest;

use super::manifest::{HashType, Manifest, Method, Serialization, MAX_RESOURCES};
use super::walk::ModelFile;
use super::{mapped, safetensors, OmsError};

/// Read size for SHA-256 and BLAKE2b: fits in L2, so the hash reads it
/// from cache right after the kernel wrote it.
const CHUNK: usize = 1 << 20;
/// Read size for BLAKE3, large enough for its multi-threaded update.
const CHUNK_BLAKE3: usize = 16 << 20;
/// Mapping size for the verdict-only path: bounds the address space each
/// hashing thread holds, large enough that mapping costs nothing next to
/// hashing.
const WINDOW: usize = 64 << 20;

/// One verified file, as a sealed, read-only memfd.
#[derive(Debug)]
pub struct VerifiedFile {
    /// Path relative to the model root.
    pub name: String,
    pub size: u64,
    file: File,
}

impl VerifiedFile {
    /// The sealed fd (read-only; writes, growth and shrinking are sealed).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Takes the fd, to hand it to a worker.
    pub fn into_fd(self) -> OwnedFd {
        self.file.into()
    }

    /// Reads up to `buf.len()` bytes at `offset` (short at the end).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        read_full_at(&self.file, buf, offset)
    }
}

/// Whether verification copies the bytes into sealed memfds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOver {
    /// Copy every file into a sealed memfd as it is hashed (what a worker
    /// load needs: no window between check and use).
    SealedCopy,
    /// Verdict only: hash, compare, check formats, hand nothing over (what
    /// `ccnode-verify` does by default; `VerifiedModel::files` is empty).
    VerdictOnly,
}

/// A model whose signature verified, with exactly the verified bytes.
#[derive(Debug)]
pub struct VerifiedModel {
    /// The model name in the signed statement.
    pub model_name: String,
    /// SHA-256 over the resource digests (hex), for attestation claims.
    pub manifest_digest: String,
    /// Who signed it (key hint or certificate subject), as the policy saw it.
    pub signer: String,
    pub serialization: Serialization,
    /// The files, sorted by name (empty with [`HandOver::VerdictOnly`]).
    pub files: Vec<VerifiedFile>,
    /// How many files were verified.
    pub file_count: usize,
    /// Bytes read and hashed.
    pub bytes_hashed: u64,
}

enum Hasher {
    Sha256(sha2::Sha256),
    Blake2b(Box<blake2::Blake2b512>),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    fn new(t: HashType) -> Hasher {
        match t {
            HashType::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            HashType::Blake2b => Hasher::Blake2b(Box::default()),
            HashType::Blake3 => Hasher::Blake3(Box::default()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Blake2b(h) => h.update(data),
            Hasher::Blake3(h) => {
                if data.len() >= 1 << 20 {
                    h.update_rayon(data);
                } else {
                    h.update(data);
                }
            }
        }
    }

    fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Blake2b(h) => h.finalize().to_vec(),
            Hasher::Blake3(h) => h.finalize().as_bytes().to_vec(),
        }
    }
}

struct Item {
    file: usize,
    start: u64,
    end: u64,
    key: String,
}

/// Shard bounds as the reference tool cuts them; none for an empty file.
fn shards(size: u64, shard_size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < size {
        let end = start.saturating_add(shard_size).min(size);
        out.push((start, end));
        start = end;
    }
    out
}

fn new_memfd(size: u64) -> Result<File, OmsError> {
    let fd = memfd_create(
        c"ccnode-model",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .map_err(|e| OmsError::Memfd(e.into()))?;
    let file = File::from(fd);
    file.set_len(size).map_err(OmsError::Memfd)?;
    Ok(file)
}

pub(crate) fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn hash_item(
    item: &Item,
    src: &ModelFile,
    dst: Option<&File>,
    hash_type: HashType,
) -> Result<Vec<u8>, OmsError> {
    let io = |source| OmsError::Io {
        path: src.name.clone().into(),
        source,
    };
    let chunk = if hash_type == HashType::Blake3 {
        CHUNK_BLAKE3
    } else {
        CHUNK
    };
    let len = usize::try_from(item.end - item.start).unwrap_or(usize::MAX);
    let mut hasher = Hasher::new(hash_type);
    let mut off = item.start;
    // Through guarded mappings of the page cache where they can be had
    // (whatever cannot be mapped is read with pread below):
    // - verdict only: hash the mapped file, no copy at all;
    // - hand-over: one kernel copy from the mapped file into the memfd,
    //   then hash the memfd's bytes (never the file's), each chunk right
    //   after it was written, while it is in cache.
    while off < item.end {
        let n = usize::try_from(item.end - off)
            .unwrap_or(usize::MAX)
            .min(WINDOW);
        let Some(w) = mapped::Window::map(&src.file, off, n).map_err(io)? else {
            break;
        };
        // Start reading the next window from disk while this one is hashed
        // (a no-op when it is cached). Advice only: its result is moot.
        let next = off + n as u64;
        if next < item.end {
            let _ = nix::fcntl::posix_fadvise(
                src.file.as_raw_fd(),
                next as i64,
                WINDOW as i64,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
        }
        match dst {
            None => hasher.update(w.bytes()),
            Some(dst) => {
                let Some(copy) = mapped::Window::map_lazy(dst, off, n).map_err(OmsError::Memfd)?
                else {
                    break;
                };
                let mut at = 0;
                while at < n {
                    let c = chunk.min(n - at);
                    match dst.write_all_at(&w.bytes()[at..at + c], off + at as u64) {
                        Ok(()) => {}
                        // The kernel's copy met a page past a new end of
                        // the file: it shrank under us.
                        Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                            return Err(OmsError::Changed(src.name.clone()))
                        }
                        Err(e) => return Err(OmsError::Memfd(e)),
                    }
                    hasher.update(&copy.bytes()[at..at + c]);
                    at += c;
                }
                if copy.faulted() {
                    return Err(OmsError::Changed(src.name.clone()));
                }
            }
        }
        if w.faulted() {
            return Err(OmsError::Changed(src.name.clone()));
        }
        off += n as u64;
    }
    let mut buf = vec![0u8; chunk.min(len.max(1))];
    while off < item.end {
        let want = usize::try_from(item.end - off)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = read_full_at(&src.file, &mut buf[..want], off).map_err(io)?;
        if n < want {
            return Err(OmsError::Changed(src.name.clone()));
        }
        hasher.update(&buf[..n]);
        if let Some(dst) = dst {
            dst.write_all_at(&buf[..n], off).map_err(OmsError::Memfd)?;
        }
        off += n as u64;
    }
    if item.end == src.size {
        // The file must not have grown: what was hashed is the whole file.
        let mut probe = [0u8; 1];
        if read_full_at(&src.file, &mut probe, src.size).map_err(io)? != 0 {
            return Err(OmsError::Changed(src.name.clone()));
        }
    }
    // Nor shrunk: a cut inside the last mapped page does not fault (the
    // kernel zeroes the page's tail), so the size is asked again.
    if src.file.metadata().map_err(io)?.len() != src.size {
        return Err(OmsError::Changed(src.name.clone()));
    }
    Ok(hasher.finish())
}

fn seal(file: File) -> Result<File, OmsError> {
    let seals = SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_SEAL;
    fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).map_err(|e| OmsError::Memfd(e.into()))?;
    // A read-only open file description of the same memfd; where /proc is
    // not mounted the sealed fd itself is handed over (writes fail on it
    // anyway, they are sealed).
    match File::open(format!("/proc/self/fd/{}", file.as_raw_fd())) {
        Ok(ro) => Ok(ro),
        Err(_) => Ok(file),
    }
}

/// Hashes every file once (into sealed memfds with
/// [`HandOver::SealedCopy`]), compares with the manifest, and checks file
/// formats (on the sealed bytes when there are any).
pub fn hash_and_seal(
    files: Vec<ModelFile>,
    manifest: Manifest,
    signer: String,
    hand_over: HandOver,
) -> Result<VerifiedModel, OmsError> {
    for f in &files {
        if safetensors::is_pickle_name(&f.name) {
            return Err(OmsError::Pickle {
                path: f.name.clone(),
                why: "a pickle format's file name",
            });
        }
    }
    let ser = &manifest.serialization;
    let mut items = Vec::new();
    for (i, f) in files.iter().enumerate() {
        match ser.method {
            Method::Files => items.push(Item {
                file: i,
                start: 0,
                end: f.size,
                key: f.name.clone(),
            }),
            Method::Shards { shard_size } => {
                // A tiny signed shard_size must not make the item list
                // unbounded: more shards than a manifest may list can never
                // match anyway.
                let count = f.size.div_ceil(shard_size) as usize;
                if items.len().saturating_add(count) > MAX_RESOURCES {
                    return Err(OmsError::TooLarge {
                        what: "shard count",
                        found: (items.len() as u64).saturating_add(count as u64),
                        limit: MAX_RESOURCES as u64,
                    });
                }
                for (start, end) in shards(f.size, shard_size) {
                    items.push(Item {
                        file: i,
                        start,
                        end,
                        key: format!("{}:{start}:{end}", f.name),
                    });
                }
            }
        }
    }
    // Names first: a file the manifest does not list (a sparse terabyte,
    // say) is never read, and when the names already fail the comparison
    // nothing is copied; the listed ones are still hashed, so that the
    // error names every mismatched file too.
    let extra: Vec<String> = items
        .iter()
        .filter(|i| !manifest.resources.contains_key(&i.key))
        .map(|i| i.key.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let missing: Vec<String> = {
        let present: BTreeSet<&str> = items.iter().map(|i| i.key.as_str()).collect();
        manifest
            .resources
            .keys()
            .filter(|k| !present.contains(k.as_str()))
            .cloned()
            .collect()
    };
    let names_match = extra.is_empty() && missing.is_empty();
    if !names_match {
        items.retain(|i| manifest.resources.contains_key(&i.key));
    }
    let memfds = match hand_over {
        HandOver::SealedCopy if names_match => files
            .iter()
            .map(|f| new_memfd(f.size).map(Some))
            .collect::<Result<Vec<_>, _>>()?,
        _ => files.iter().map(|_| None).collect(),
    };
    items.sort_by_key(|i| std::cmp::Reverse(i.end - i.start));
    let hash_type = ser.hash_type;
    // Longest first, each free thread taking the next item: rayon's own
    // splitting of the list hands one thread a contiguous run (say two
    // large shards and the small tails), which on two cores left one idle
    // for the last 7% of a shards run.
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let workers = rayon::current_num_threads().clamp(1, items.len().max(1));
    let per_worker: Vec<Vec<(String, Vec<u8>)>> = (0..workers)
        .into_par_iter()
        .map(|_| {
            let mut out = Vec::new();
            while !failed.load(Ordering::Relaxed) {
                let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    break;
                };
                let d = hash_item(
                    item,
                    &files[item.file],
                    memfds[item.file].as_ref(),
                    hash_type,
                )
                .inspect_err(|_| failed.store(true, Ordering::Relaxed))?;
                out.push((item.key.clone(), d));
            }
            Ok(out)
        })
        .collect::<Result<_, OmsError>>()?;
    let digests: Vec<(String, Vec<u8>)> = per_worker.into_iter().flatten().collect();
    // Workers stop early only after an error, which collect returned; a
    // missing digest would in any case fail the comparison below.
    debug_assert_eq!(digests.len(), items.len());
    let bytes_hashed = items.iter().map(|i| i.end - i.start).sum();
    let actual: BTreeMap<String, Vec<u8>> = digests.into_iter().collect();

    let mismatched: Vec<String> = actual
        .iter()
        .filter(|(k, d)| manifest.resources.get(*k).is_some_and(|e| e != *d))
        .map(|(k, _)| k.clone())
        .collect();
    if !(extra.is_empty() && missing.is_empty() && mismatched.is_empty()) {
        return Err(OmsError::Mismatch {
            extra,
            missing,
            mismatched,
        });
    }

    // An empty file under shards serialization has no shard, so no signed
    // resource covers it (the reference tool accepts it all the same): it
    // carries no signed byte and is not handed over.
    let unsigned = |f: &ModelFile| matches!(ser.method, Method::Shards { .. }) && f.size == 0;
    let file_count = files.iter().filter(|f| !unsigned(f)).count();
    let mut out = Vec::with_capacity(files.len());
    for (f, memfd) in files.into_iter().zip(memfds) {
        if unsigned(&f) {
            continue;
        }
        match memfd {
            Some(memfd) => {
                let file = seal(memfd)?;
                safetensors::check_file(&f.name, f.size, &file)?;
                out.push(VerifiedFile {
                    name: f.name,
                    size: f.size,
                    file,
                });
            }
            // Verdict only: the checks read the opened files themselves.
            None => safetensors::check_file(&f.name, f.size, &f.file)?,
        }
    }
    Ok(VerifiedModel {
        model_name: manifest.model_name,
        manifest_digest: manifest.digest,
        signer,
        serialization: manifest.serialization,
        files: out,
        file_count,
        bytes_hashed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn shards_match_reference_cuts() {
        assert_eq!(shards(0, 10), vec![]);
        assert_eq!(shards(5, 10), vec![(0, 5)]);
        assert_eq!(shards(10, 10), vec![(0, 10)]);
        assert_eq!(shards(25, 10), vec![(0, 10), (10, 20), (20, 25)]);
        assert_eq!(shards(u64::MAX, u64::MAX - 1).len(), 2);
    }

    fn opened(len: usize) -> (tempfile::TempDir, std::path::PathBuf, ModelFile, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.bin");
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let mf = ModelFile {
            name: "w.bin".into(),
            file,
            size: len as u64,
        };
        (dir, path, mf, data)
    }

    fn manifest(method: Method, resources: &[(&str, Vec<u8>)]) -> Manifest {
        Manifest {
            model_name: "m".into(),
            digest: String::new(),
            serialization: Serialization {
                method,
                hash_type: HashType::Sha256,
                allow_symlinks: false,
                ignore_paths: Vec::new(),
            },
            resources: resources
                .iter()
                .map(|(k, d)| (k.to_string(), d.clone()))
                .collect(),
        }
    }

    /// A file the manifest does not list is named, never read: its fd here
    /// is write-only, so any read of it would fail with an I/O error.
    #[test]
    fn an_unlisted_file_is_named_without_being_read() {
        let (dir, _p, mut mf, data) = opened(10_000);
        mf.name = "w.dat".into();
        let digest = sha2::Sha256::digest(&data).to_vec();
        let unlisted = dir.path().join("huge.dat");
        std::fs::write(&unlisted, b"never read").unwrap();
        let wo = std::fs::OpenOptions::new()
            .write(true)
            .open(&unlisted)
            .unwrap();
        let extra = ModelFile {
            name: "huge.dat".into(),
            file: wo,
            size: 1 << 40,
        };
        for hand_over in [HandOver::SealedCopy, HandOver::VerdictOnly] {
            let (_d, _p, mut listed, _) = opened(10_000);
            listed.name = "w.dat".into();
            let wo = extra.file.try_clone().unwrap();
            let files = vec![
                listed,
                ModelFile {
                    name: extra.name.clone(),
                    file: wo,
                    size: extra.size,
                },
            ];
            let err = hash_and_seal(
                files,
                manifest(
                    Method::Files,
                    &[("w.dat", digest.clone()), ("gone", vec![0; 32])],
                ),
                "k".into(),
                hand_over,
            )
            .unwrap_err();
            match err {
                OmsError::Mismatch {
                    extra,
                    missing,
                    mismatched,
                } => {
                    assert_eq!(extra, ["huge.dat"]);
                    assert_eq!(missing, ["gone"]);
                    assert!(mismatched.is_empty());
                }
                other => panic!("{other:?}"),
            }
        }
        // The listed files are still hashed, so a changed one is named too.
        let err = hash_and_seal(
            vec![mf],
            manifest(
                Method::Files,
                &[("w.dat", vec![0; 32]), ("gone", vec![0; 32])],
            ),
            "k".into(),
            HandOver::SealedCopy,
        )
        .unwrap_err();
        assert!(
            matches!(&err, OmsError::Mismatch { missing, mismatched, .. }
                if missing == &["gone"] && mismatched == &["w.dat"]),
            "{err:?}"
        );
    }

    /// Under shards serialization an empty file has no shard, so nothing
    /// signed covers it: the model verifies (as with the reference tool)
    /// but the file is not handed over. Under files serialization it is a
    /// signed resource like any other.
    #[test]
    fn an_empty_file_is_handed_over_only_when_signed() {
        let (dir, _p, mut mf, data) = opened(10_000);
        mf.name = "w.dat".into();
        let empty_path = dir.path().join("empty");
        std::fs::write(&empty_path, b"").unwrap();
        let empty = || ModelFile {
            name: "empty".into(),
            file: File::open(&empty_path).unwrap(),
            size: 0,
        };
        let whole = sha2::Sha256::digest(&data).to_vec();
        let shard = |a: usize, b: usize| sha2::Sha256::digest(&data[a..b]).to_vec();
        let m = manifest(
            Method::Shards { shard_size: 6000 },
            &[
                ("w.dat:0:6000", shard(0, 6000)),
                ("w.dat:6000:10000", shard(6000, 10_000)),
            ],
        );
        let mf2 = ModelFile {
            name: mf.name.clone(),
            file: mf.file.try_clone().unwrap(),
            size: mf.size,
        };
        let model = hash_and_seal(vec![empty(), mf], m, "k".into(), HandOver::SealedCopy).unwrap();
        let names: Vec<&str> = model.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["w.dat"]);
        assert_eq!(model.file_count, 1);
        let empty_digest = sha2::Sha256::digest(b"").to_vec();
        let m = manifest(Method::Files, &[("empty", empty_digest), ("w.dat", whole)]);
        let model = hash_and_seal(vec![empty(), mf2], m, "k".into(), HandOver::SealedCopy).unwrap();
        let names: Vec<&str> = model.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["empty", "w.dat"]);
    }

    fn whole(mf: &ModelFile) -> Item {
        Item {
            file: 0,
            start: 0,
            end: mf.size,
            key: mf.name.clone(),
        }
    }

    #[test]
    fn both_read_paths_hash_the_same_bytes() {
        // Larger than one mapping window, so the verdict path maps twice.
        let (_d, _p, mf, data) = opened(WINDOW + 4096 + 17);
        let want = sha2::Sha256::digest(&data).to_vec();
        assert_eq!(
            hash_item(&whole(&mf), &mf, None, HashType::Sha256).unwrap(),
            want
        );
        let memfd = new_memfd(mf.size).unwrap();
        let got = hash_item(&whole(&mf), &mf, Some(&memfd), HashType::Sha256).unwrap();
        assert_eq!(got, want);
        let shard = Item {
            file: 0,
            start: 4097,
            end: 4097 + 70_000,
            key: String::new(),
        };
        let want = sha2::Sha256::digest(&data[4097..4097 + 70_000]).to_vec();
        assert_eq!(
            hash_item(&shard, &mf, None, HashType::Sha256).unwrap(),
            want
        );
    }

    #[test]
    fn a_file_that_shrinks_after_open_is_refused_on_both_paths() {
        // Whole pages cut (the mapping faults), and a cut inside the last
        // page of a file whose tail is zeros (nothing faults, the hash of
        // the zero-filled page would match).
        for (size, cut, copy) in [
            (4 << 20, 1 << 20, false),
            (4 << 20, 1 << 20, true),
            (8192, 5000, false),
            (8192, 5000, true),
        ] {
            let (_d, path, mf, mut data) = opened(size);
            if size == 8192 {
                data[5000..].fill(0);
                std::fs::write(&path, &data).unwrap();
            }
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(cut)
                .unwrap();
            let memfd = copy.then(|| new_memfd(mf.size).unwrap());
            let r = hash_item(&whole(&mf), &mf, memfd.as_ref(), HashType::Sha256);
            assert!(
                matches!(r, Err(OmsError::Changed(ref n)) if n == "w.bin"),
                "size={size} cut={cut} copy={copy}: {r:?}"
            );
        }
    }

    #[test]
    fn a_file_that_grows_after_open_is_refused() {
        let (_d, path, mf, _) = opened(8192);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"more")
            .unwrap();
        let r = hash_item(&whole(&mf), &mf, None, HashType::Sha256);
        assert!(matches!(r, Err(OmsError::Changed(_))), "{r:?}");
    }
}
