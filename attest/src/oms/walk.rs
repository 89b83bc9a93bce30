//! Walks a model directory relative to directory fds: every entry is looked
//! up with `fstatat(AT_SYMLINK_NOFOLLOW)` in its parent's fd and opened with
//! `openat(O_NOFOLLOW)`, and the opened fd's own `fstat` decides what it is.
//! No path is resolved twice, so a rename or symlink swap during the walk
//! cannot redirect a read.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::dir::Dir;
use nix::fcntl::{openat, readlinkat, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};

use super::manifest::Serialization;
use super::OmsError;

/// Most files a model may hold.
pub const MAX_FILES: usize = 100_000;
/// Deepest directory nesting.
pub const MAX_DEPTH: usize = 64;
/// Longest relative path (bytes).
pub const MAX_PATH: usize = 4096;

/// A regular file of the model, opened.
#[derive(Debug)]
pub struct ModelFile {
    /// Path relative to the model root, `/`-separated, UTF-8.
    pub name: String,
    pub file: File,
    /// Size at open time (fstat of the opened fd).
    pub size: u64,
}

fn errno_io(path: &Path, e: nix::Error) -> OmsError {
    OmsError::Io {
        path: path.to_owned(),
        source: std::io::Error::from_raw_os_error(e as i32),
    }
}

/// Opens `dir` (refusing a symlink as the final component) and lists its
/// regular files recursively, skipping ignored paths and the file whose
/// (dev, ino) is `skip` (the signature file when it lies inside the model).
pub fn walk(
    dir: &Path,
    ser: &Serialization,
    skip: Option<(u64, u64)>,
) -> Result<Vec<ModelFile>, OmsError> {
    let fd = nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        nix::Error::ELOOP | nix::Error::ENOTDIR if is_symlink(dir) => {
            OmsError::Symlink(dir.display().to_string())
        }
        e => errno_io(dir, e),
    })?;
    // SAFETY: `open` returned a fresh fd that nothing else owns.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let root_fd = fd.try_clone().map_err(|e| OmsError::Io {
        path: dir.to_owned(),
        source: e,
    })?;
    let ctx = Walk {
        root: dir,
        root_fd: root_fd.as_raw_fd(),
        ser,
        skip,
    };
    let mut out = Vec::new();
    walk_dir(&ctx, fd, "", 0, &mut out)?;
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn is_symlink(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
}

/// What every level of the walk shares.
struct Walk<'a> {
    root: &'a Path,
    /// The model directory, for symlink targets (resolved beneath it).
    root_fd: RawFd,
    ser: &'a Serialization,
    skip: Option<(u64, u64)>,
}

/// Resolves a relative symlink target lexically against the link's
/// directory (`prefix`, empty or ending in `/`); `None` when it is absolute
/// or climbs out of the model.
fn resolve_link(prefix: &str, target: &str) -> Option<String> {
    if target.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = prefix.split('/').filter(|c| !c.is_empty()).collect();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Opens `rel` beneath `root_fd` one component at a time, each with
/// `O_NOFOLLOW`: a symlink anywhere on the way (a chained link) is refused.
fn open_beneath(root_fd: RawFd, rel: &str, link: &str) -> Result<(OwnedFd, FileStat), OmsError> {
    let refuse = |reason: &str| OmsError::Symlink(format!("{link} ({reason})"));
    let open_err = |e: nix::Error| match e {
        nix::Error::ELOOP => refuse("its target is a symlink"),
        nix::Error::ENOENT => refuse("dangling"),
        nix::Error::ENOTDIR => refuse("its target is not a file"),
        e => OmsError::Io {
            path: rel.into(),
            source: std::io::Error::from_raw_os_error(e as i32),
        },
    };
    let comps: Vec<&str> = rel.split('/').collect();
    let (last, dirs) = comps.split_last().ok_or_else(|| refuse("empty target"))?;
    let mut cur: Option<OwnedFd> = None;
    for c in dirs {
        let at = cur.as_ref().map_or(root_fd, |f| f.as_raw_fd());
        let fd = openat(
            Some(at),
            *c,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(open_err)?;
        // SAFETY: `openat` returned a fresh fd that nothing else owns.
        cur = Some(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
    let at = cur.as_ref().map_or(root_fd, |f| f.as_raw_fd());
    let st =
        fstatat(Some(at), *last, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).map_err(open_err)?;
    match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => {}
        SFlag::S_IFLNK => return Err(refuse("its target is a symlink")),
        _ => return Err(refuse("its target is not a regular file")),
    }
    let fd = openat(
        Some(at),
        *last,
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY
            | OFlag::O_NONBLOCK,
        Mode::empty(),
    )
    .map_err(open_err)?;
    // SAFETY: `openat` returned a fresh fd that nothing else owns.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let st = fstat(fd.as_raw_fd()).map_err(open_err)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(refuse("its target is not a regular file"));
    }
    Ok((fd, st))
}

fn walk_dir(
    ctx: &Walk<'_>,
    fd: OwnedFd,
    prefix: &str,
    depth: usize,
    out: &mut Vec<ModelFile>,
) -> Result<(), OmsError> {
    let (root, ser, skip) = (ctx.root, ctx.ser, ctx.skip);
    if depth > MAX_DEPTH {
        return Err(OmsError::TooLarge {
            what: "directory depth",
            found: depth as u64,
            limit: MAX_DEPTH as u64,
        });
    }
    let here = root.join(prefix);
    // `Dir` owns (and closes, also on error) the fd from now on.
    let raw = fd.into_raw_fd();
    let mut dir = Dir::from_fd(raw).map_err(|e| errno_io(&here, e))?;
    let mut names = Vec::new();
    for entry in dir.iter() {
        let entry = entry.map_err(|e| errno_io(&here, e))?;
        let bytes = entry.file_name().to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        let name = std::str::from_utf8(bytes).map_err(|_| OmsError::Entry {
            path: format!("{prefix}{}", String::from_utf8_lossy(bytes)),
            reason: "name is not UTF-8",
        })?;
        names.push(name.to_owned());
        if names.len() + out.len() > MAX_FILES {
            return Err(OmsError::TooLarge {
                what: "file count",
                found: (names.len() + out.len()) as u64,
                limit: MAX_FILES as u64,
            });
        }
    }
    for name in names {
        let rel = format!("{prefix}{name}");
        if rel.len() > MAX_PATH {
            return Err(OmsError::TooLarge {
                what: "path length",
                found: rel.len() as u64,
                limit: MAX_PATH as u64,
            });
        }
        if ser.is_ignored(&rel) {
            continue;
        }
        let path = root.join(&rel);
        let st = fstatat(
            Some(raw),
            name.as_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| errno_io(&path, e))?;
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFLNK {
            if !ser.allow_symlinks {
                return Err(OmsError::Symlink(rel));
            }
            // Allowed: the link is read once and its target opened beneath
            // the model's fd, component by component, never following a
            // further link; the file is listed under the link's name, as
            // the reference tool does.
            let target = readlinkat(Some(raw), name.as_str()).map_err(|e| errno_io(&path, e))?;
            let target = target.to_str().ok_or_else(|| OmsError::Entry {
                path: rel.clone(),
                reason: "symlink target is not UTF-8",
            })?;
            let resolved = resolve_link(prefix, target)
                .ok_or_else(|| OmsError::Symlink(format!("{rel} (points outside the model)")))?;
            let (f, st) = open_beneath(ctx.root_fd, &resolved, &rel)?;
            out.push(ModelFile {
                name: rel,
                file: File::from(f),
                size: st.st_size as u64,
            });
            continue;
        }
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
        if kind == SFlag::S_IFDIR {
            let child = openat(
                Some(raw),
                name.as_str(),
                flags | OFlag::O_DIRECTORY,
                Mode::empty(),
            )
            .map_err(|e| open_error(&path, &rel, e))?;
            // SAFETY: `openat` returned a fresh fd that nothing else owns.
            let child = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(child) };
            walk_dir(ctx, child, &format!("{rel}/"), depth + 1, out)?;
        } else if kind == SFlag::S_IFREG {
            let f = openat(
                Some(raw),
                name.as_str(),
                flags | OFlag::O_NONBLOCK,
                Mode::empty(),
            )
            .map_err(|e| open_error(&path, &rel, e))?;
            // SAFETY: `openat` returned a fresh fd that nothing else owns.
            let f = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(f) };
            let st = fstat(f.as_fd().as_raw_fd()).map_err(|e| errno_io(&path, e))?;
            if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
                return Err(OmsError::Entry {
                    path: rel,
                    reason: "not a regular file",
                });
            }
            if skip == Some((st.st_dev, st.st_ino)) {
                continue;
            }
            out.push(ModelFile {
                name: rel,
                file: File::from(f),
                size: st.st_size as u64,
            });
            if out.len() > MAX_FILES {
                return Err(OmsError::TooLarge {
                    what: "file count",
                    found: out.len() as u64,
                    limit: MAX_FILES as u64,
                });
            }
        } else {
            return Err(OmsError::Entry {
                path: rel,
                reason: "not a regular file or directory",
            });
        }
    }
    drop(dir);
    Ok(())
}

fn open_error(path: &Path, rel: &str, e: nix::Error) -> OmsError {
    match e {
        // Swapped for a symlink between fstatat and openat.
        nix::Error::ELOOP => OmsError::Symlink(rel.to_owned()),
        e => errno_io(path, e),
    }
}

#[cfg(test)]
mod tests {
    use super::resolve_link;

    #[test]
    fn link_targets_resolve_beneath_the_model() {
        assert_eq!(resolve_link("", "a.txt").as_deref(), Some("a.txt"));
        assert_eq!(resolve_link("d/", "../a.txt").as_deref(), Some("a.txt"));
        assert_eq!(resolve_link("d/e/", "./f/../g").as_deref(), Some("d/e/g"));
        assert_eq!(resolve_link("", "../outside"), None);
        assert_eq!(resolve_link("d/", "../../outside"), None);
        assert_eq!(resolve_link("", "/etc/passwd"), None);
        assert_eq!(resolve_link("", "."), None);
    }
}
