//! Who is on the other end of an admin connection, and what they may do.
//!
//! The kernel tells us: `SO_PEERCRED` gives the peer's uid, gid and pid and
//! `SO_PEERGROUPS` its supplementary groups, both as they were when it
//! connected. No name service lookups, nothing the peer can claim.

use std::io;
use std::os::fd::AsRawFd;

/// The credentials of a connected peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    pub groups: Vec<u32>,
}

/// What a peer may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Every command.
    Admin,
    /// Read-only commands only.
    ReadOnly,
    /// Nothing: the connection is refused.
    None,
}

/// The groups that grant access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub admin_gid: u32,
    pub read_only_gid: Option<u32>,
    /// The daemon's own uid: a peer running as the same user could take
    /// over the daemon anyway, so it is an admin.
    pub self_uid: u32,
}

impl Policy {
    pub fn access(&self, peer: &Peer) -> Access {
        let member = |gid: u32| peer.gid == gid || peer.groups.contains(&gid);
        if peer.uid == 0 || peer.uid == self.self_uid || member(self.admin_gid) {
            Access::Admin
        } else if self.read_only_gid.is_some_and(member) {
            Access::ReadOnly
        } else {
            Access::None
        }
    }
}

/// Reads the peer's credentials from a connected Unix stream socket.
pub fn peer_of(sock: &impl AsRawFd) -> io::Result<Peer> {
    let fd = sock.as_raw_fd();
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `fd` is a valid socket for the duration of the call; `cred`
    // is a live, writable ucred and `len` holds its exact size, so the
    // kernel writes at most that many bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short SO_PEERCRED answer",
        ));
    }
    Ok(Peer {
        uid: cred.uid,
        gid: cred.gid,
        pid: cred.pid,
        groups: peer_groups(fd)?,
    })
}

/// `SO_PEERGROUPS` (Linux 4.13+): the peer's supplementary groups.
fn peer_groups(fd: libc::c_int) -> io::Result<Vec<u32>> {
    // NGROUPS_MAX is 65536 on Linux; start small and grow on ERANGE.
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is a live, writable buffer of exactly `len`
        // bytes; the kernel writes at most `len` bytes and reports the
        // size it needs in `len`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        let needed = len as usize / std::mem::size_of::<libc::gid_t>();
        if err.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() && needed <= 65_536 {
            groups.resize(needed, 0);
            continue;
        }
        return Err(err);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        admin_gid: 900,
        read_only_gid: Some(901),
        self_uid: 0,
    };

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            pid: 1,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn access_by_uid_and_groups() {
        assert_eq!(POLICY.access(&peer(0, 0, &[])), Access::Admin);
        assert_eq!(POLICY.access(&peer(1000, 900, &[])), Access::Admin);
        assert_eq!(POLICY.access(&peer(1000, 100, &[5, 900])), Access::Admin);
        assert_eq!(POLICY.access(&peer(1000, 901, &[])), Access::ReadOnly);
        assert_eq!(POLICY.access(&peer(1000, 100, &[901])), Access::ReadOnly);
        assert_eq!(POLICY.access(&peer(1000, 100, &[5, 6])), Access::None);
        let no_ro = Policy {
            read_only_gid: None,
            ..POLICY
        };
        assert_eq!(no_ro.access(&peer(1000, 901, &[])), Access::None);
        let as_user = Policy {
            self_uid: 1000,
            ..POLICY
        };
        assert_eq!(as_user.access(&peer(1000, 100, &[])), Access::Admin);
    }

    #[test]
    fn reads_own_credentials_over_a_socketpair() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let p = peer_of(&a).unwrap();
        assert_eq!(p.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(p.gid, nix::unistd::getegid().as_raw());
        assert_eq!(p.pid, std::process::id() as i32);
    }
}
