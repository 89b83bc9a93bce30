//! Per-worker device filtering on cgroup v2: a `BPF_PROG_TYPE_CGROUP_DEVICE`
//! program that allows read and write on exactly the worker's device nodes
//! and nothing else (no other device, no `mknod` of any), attached to the
//! worker's own group before the worker is moved in.
//!
//! cgroup v2 has no `devices` controller: the kernel asks the device
//! programs attached to a task's v2 group (and its ancestors) on every
//! open of a device node and every `mknod`, and refuses with `EPERM` when
//! one says no. systemd's `DeviceAllow=` and container runtimes (runc,
//! crun) use the same hook. The program is a plain list of comparisons,
//! built here from the `(type, major, minor)` of the nodes the jail opened;
//! nothing is loaded from a file and no helper function is called.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// One device node a worker may read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRule {
    /// `'c'` or `'b'`.
    pub kind: char,
    pub major: u32,
    pub minor: u32,
}

impl DeviceRule {
    /// The rule for what `st` describes (the `fstat` of a device node the
    /// jail opened), or `None` for something that is not a device node
    /// (the sim GPU backend's regular files, which no device filter
    /// governs).
    pub fn of(st: &nix::sys::stat::FileStat) -> Option<DeviceRule> {
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFCHR => 'c',
            libc::S_IFBLK => 'b',
            _ => return None,
        };
        Some(DeviceRule {
            kind,
            major: libc::major(st.st_rdev),
            minor: libc::minor(st.st_rdev),
        })
    }
}

impl std::fmt::Display for DeviceRule {
    /// The cgroup v1 `devices.allow` line: read and write, no mknod.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}:{} rw", self.kind, self.major, self.minor)
    }
}

/// At most this many rules in one program (a worker has the basic nodes
/// and a handful of GPU nodes; the kernel's limit is far above).
pub const MAX_RULES: usize = 1024;

/// One eBPF instruction, as the kernel reads it (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

// Opcodes (linux/bpf_common.h, linux/bpf.h).
const LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const ALU64_MOV_X: u8 = 0xbf;
const ALU64_MOV_K: u8 = 0xb7;
const ALU64_AND_K: u8 = 0x57;
const ALU64_RSH_K: u8 = 0x77;
const JMP_JNE_K: u8 = 0x55;
const JMP_JSET_K: u8 = 0x45;
const JMP_EXIT: u8 = 0x95;

// struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }:
// access_type is the device type (low 16 bits) and the access (high 16).
const DEVCG_DEV_BLOCK: i32 = 1;
const DEVCG_DEV_CHAR: i32 = 2;
const DEVCG_ACC_MKNOD: i32 = 1;

/// The program for `rules`: for each rule, allow (return 1) when type,
/// major and minor match and the access is not mknod; otherwise, after
/// the last rule, deny (return 0). An empty list denies every device.
///
/// Registers: r1 the context, r2 the type, r3 the access, r4 the major,
/// r5 the minor.
pub fn device_program(rules: &[DeviceRule]) -> io::Result<Vec<Insn>> {
    if rules.len() > MAX_RULES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} device rules, at most {MAX_RULES}", rules.len()),
        ));
    }
    let mut p = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0),
        insn(ALU64_MOV_X, 3, 2, 0, 0),
        insn(ALU64_AND_K, 2, 0, 0, 0xffff),
        insn(ALU64_RSH_K, 3, 0, 0, 16),
        insn(LDX_MEM_W, 4, 1, 4, 0),
        insn(LDX_MEM_W, 5, 1, 8, 0),
    ];
    for r in rules {
        let kind = match r.kind {
            'c' => DEVCG_DEV_CHAR,
            'b' => DEVCG_DEV_BLOCK,
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("device type {other:?} is neither 'c' nor 'b'"),
                ))
            }
        };
        // The immediates are sign-extended 32-bit values compared with the
        // zero-extended 32-bit fields: equal only for numbers below 2^31.
        let num = |n: u32| {
            i32::try_from(n).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("device number {n} is out of range"),
                )
            })
        };
        let (major, minor) = (num(r.major)?, num(r.minor)?);
        // Six instructions a rule; each jump skips to the next rule.
        p.extend([
            insn(JMP_JNE_K, 2, 0, 5, kind),
            insn(JMP_JNE_K, 4, 0, 4, major),
            insn(JMP_JNE_K, 5, 0, 3, minor),
            insn(JMP_JSET_K, 3, 0, 2, DEVCG_ACC_MKNOD),
            insn(ALU64_MOV_K, 0, 0, 0, 1),
            insn(JMP_EXIT, 0, 0, 0, 0),
        ]);
    }
    p.extend([insn(ALU64_MOV_K, 0, 0, 0, 0), insn(JMP_EXIT, 0, 0, 0, 0)]);
    Ok(p)
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

/// The head of `union bpf_attr` for `BPF_PROG_LOAD`, up to
/// `expected_attach_type`; the kernel takes a shorter attr as zeros.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for `BPF_PROG_ATTACH`.
#[repr(C)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// The `bpf(2)` call `cmd` with `attr`, the head of a `union bpf_attr`
/// (the kernel reads `size_of::<A>()` bytes and takes the rest as zeros).
///
/// # Safety
/// `A` is the repr(C) layout the kernel expects for `cmd`, and every
/// pointer and fd in `attr` is valid for the whole call (buffers the
/// kernel writes into: for the lengths `attr` gives).
unsafe fn bpf<A>(cmd: libc::c_long, attr: &A) -> libc::c_long {
    // SAFETY: `attr` is a live, initialised value of the size passed; the
    // rest is the caller's promise.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const A,
            std::mem::size_of::<A>(),
        )
    }
}

/// Loads `program` as a cgroup device program. The verifier's log is in
/// the error when the kernel refuses it.
pub fn load(program: &[Insn]) -> io::Result<OwnedFd> {
    let license = CString::new("Apache-2.0").expect("no NUL");
    let mut log = vec![0u8; 64 * 1024];
    let mut name = [0u8; 16];
    name[..13].copy_from_slice(b"ccnode_devcg\0");
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: u32::try_from(program.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "program too long"))?,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: BPF_CGROUP_DEVICE,
    };
    // SAFETY: a BPF_PROG_LOAD attr head; the instruction array, the
    // license string and the log buffer it points to outlive the call, and
    // the kernel writes at most `log_size` bytes into the log.
    let fd = unsafe { bpf(BPF_PROG_LOAD, &attr) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let verifier = String::from_utf8_lossy(&log[..end]);
        let verifier = verifier.trim();
        return Err(io::Error::new(
            e.kind(),
            if verifier.is_empty() {
                format!("loading the device program: {e}")
            } else {
                format!("loading the device program: {e}; verifier: {verifier}")
            },
        ));
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches a loaded device program to the cgroup v2 directory `cgroup`
/// (an fd of the group's directory). No flags: nothing can be attached
/// below it, so no descendant group can loosen it. The group keeps the
/// program; the program's fd may be closed afterwards.
pub fn attach(cgroup: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: program.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: 0,
        replace_bpf_fd: 0,
    };
    // SAFETY: a BPF_PROG_ATTACH attr; both fds are borrowed for the
    // duration of the call.
    if unsafe { bpf(BPF_PROG_ATTACH, &attr) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("attaching the device program: {e}"),
        ));
    }
    Ok(())
}

/// Why device programs cannot be used here, or `None` when the kernel
/// loads one (checked by loading, then closing, a program that denies
/// every device: this needs `CAP_SYS_ADMIN` and the `bpf` system call).
pub fn unavailable_reason() -> Option<String> {
    match device_program(&[]).and_then(|p| load(&p)) {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(kind: char, major: u32, minor: u32) -> DeviceRule {
        DeviceRule { kind, major, minor }
    }

    #[test]
    fn each_rule_is_six_instructions_and_every_jump_lands_on_the_next_rule() {
        let rules = [rule('c', 1, 3), rule('b', 8, 0), rule('c', 195, 255)];
        let p = device_program(&rules).unwrap();
        assert_eq!(p.len(), 6 + 6 * rules.len() + 2);
        for (i, r) in rules.iter().enumerate() {
            let start = 6 + 6 * i;
            for j in 0..4 {
                let at = start + j;
                let target = at as i64 + 1 + i64::from(p[at].off);
                assert_eq!(target, (start + 6) as i64, "rule {i} jump {j}");
            }
            assert_eq!(p[start + 1].imm, r.major as i32);
            assert_eq!(p[start + 2].imm, r.minor as i32);
        }
        // The end denies.
        assert_eq!(p[p.len() - 2], insn(ALU64_MOV_K, 0, 0, 0, 0));
        assert_eq!(p[p.len() - 1].code, JMP_EXIT);
    }

    #[test]
    fn bad_rules_are_refused() {
        assert!(device_program(&[rule('x', 1, 3)]).is_err());
        assert!(device_program(&[rule('c', 1 << 31, 3)]).is_err());
        assert!(device_program(&vec![rule('c', 1, 3); MAX_RULES + 1]).is_err());
        assert!(device_program(&vec![rule('c', 1, 3); MAX_RULES]).is_ok());
    }

    #[test]
    fn rules_read_from_nodes() {
        let st = |p: &str| nix::sys::stat::stat(p).unwrap();
        let null = DeviceRule::of(&st("/dev/null")).unwrap();
        assert_eq!(null, rule('c', 1, 3));
        assert_eq!(null.to_string(), "c 1:3 rw");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nvidia0");
        std::fs::write(&file, "").unwrap();
        assert_eq!(DeviceRule::of(&st(file.to_str().unwrap())), None);
    }
}
