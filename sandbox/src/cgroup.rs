//! cgroup v2 limits for workers, when ccnoded has a delegated subtree.

use std::io;
use std::path::{Path, PathBuf};

use crate::profile::CgroupLimits;

/// Why workers run without cgroup limits, or `None` when a delegated
/// cgroup v2 subtree with the memory and pids controllers is available at
/// `parent`.
pub fn unavailable_reason(parent: &Path) -> Option<String> {
    let controllers = match std::fs::read_to_string(parent.join("cgroup.controllers")) {
        Ok(c) => c,
        Err(e) => {
            return Some(format!(
                "{} is not a cgroup v2 directory ({e})",
                parent.display()
            ))
        }
    };
    for needed in ["memory", "pids"] {
        if !controllers.split_whitespace().any(|c| c == needed) {
            return Some(format!(
                "the {needed} controller is not available in {}",
                parent.display()
            ));
        }
    }
    let subtree = parent.join("cgroup.subtree_control");
    match std::fs::read_to_string(&subtree) {
        Ok(enabled) => {
            for needed in ["memory", "pids"] {
                if !enabled.split_whitespace().any(|c| c == needed) {
                    return Some(format!(
                        "the {needed} controller is not enabled for children in {}",
                        subtree.display()
                    ));
                }
            }
            None
        }
        Err(e) => Some(format!("cannot read {}: {e}", subtree.display())),
    }
}

/// Creates the worker's cgroup with its limits and moves `pid` into it.
pub fn place(cg: &CgroupLimits, pid: i32) -> io::Result<PathBuf> {
    let dir = cg.parent.join(&cg.name);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    std::fs::write(dir.join("memory.max"), cg.memory_max.to_string())?;
    std::fs::write(dir.join("memory.swap.max"), "0").or_else(|e| {
        // Without swap accounting the file is absent: nothing to limit.
        if e.kind() == io::ErrorKind::NotFound {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    std::fs::write(dir.join("pids.max"), cg.pids_max.to_string())?;
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_directory_is_not_a_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let reason = unavailable_reason(dir.path()).unwrap();
        assert!(reason.contains("not a cgroup v2 directory"), "{reason}");
    }

    #[test]
    fn missing_controllers_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu io memory\n").unwrap();
        let reason = unavailable_reason(dir.path()).unwrap();
        assert!(reason.contains("pids controller"), "{reason}");
        std::fs::write(dir.path().join("cgroup.controllers"), "memory pids\n").unwrap();
        std::fs::write(dir.path().join("cgroup.subtree_control"), "memory\n").unwrap();
        let reason = unavailable_reason(dir.path()).unwrap();
        assert!(reason.contains("not enabled for children"), "{reason}");
        std::fs::write(dir.path().join("cgroup.subtree_control"), "memory pids\n").unwrap();
        assert_eq!(unavailable_reason(dir.path()), None);
    }
}
