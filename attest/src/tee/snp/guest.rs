//! The SEV-SNP guest device, `/dev/sev-guest`: `SNP_GET_EXT_REPORT` (the
//! report and the host's certificate table) and `SNP_GET_REPORT` (the
//! report alone), as raw ioctls.
//!
//! Why not the `sev` crate's `firmware::guest::Firmware`: it builds without
//! C dependencies (`default-features = false, features = ["snp"]`), but it
//! opens a hard-wired `/dev/sev-guest` (ccnode takes the path from its
//! configuration and the tests need another), returns the certificate table
//! already split into entries (the evidence carries the table as the host
//! wrote it, and the verifier parses it with bounds checks,
//! [`super::parse_cert_table`]), and brings a dozen crates for two ioctls.
//!
//! The ABI, from Linux `include/uapi/linux/sev-guest.h` and
//! `drivers/virt/coco/sev-guest/sev-guest.c`:
//!
//! ```c
//! struct snp_report_req { __u8 user_data[64]; __u32 vmpl; __u8 rsvd[28]; };
//! struct snp_report_resp { __u8 data[4000]; };   // MSG_REPORT_RSP
//! struct snp_guest_request_ioctl {
//!     __u8 msg_version; __u64 req_data; __u64 resp_data;
//!     union { __u64 exitinfo2; struct { __u32 fw_error; __u32 vmm_error; }; };
//! };
//! struct snp_ext_report_req {
//!     struct snp_report_req data; __u64 certs_address; __u32 certs_len;
//! };
//! #define SNP_GET_REPORT     _IOWR('S', 0x0, struct snp_guest_request_ioctl)
//! #define SNP_GET_EXT_REPORT _IOWR('S', 0x2, struct snp_guest_request_ioctl)
//! #define SNP_GUEST_VMM_ERR_INVALID_LEN 1
//! ```
//!
//! `MSG_REPORT_RSP` (SEV-SNP firmware ABI, "MSG_REPORT_RSP Message
//! Structure"): `STATUS` u32 at 0x0, `REPORT_SIZE` u32 at 0x4, reserved to
//! 0x20, the report at 0x20. The certificate buffer must be whole pages, at
//! most `SEV_FW_BLOB_MAX_SIZE` (16 KiB); when it is too small the driver
//! sets `vmm_error = SNP_GUEST_VMM_ERR_INVALID_LEN` and `certs_len` to the
//! size needed.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::path::Path;

use super::{SnpError, REPORT_LEN};

#[repr(C)]
#[derive(Clone, Copy)]
struct SnpReportReq {
    user_data: [u8; 64],
    vmpl: u32,
    rsvd: [u8; 28],
}

#[repr(C)]
struct SnpReportResp {
    data: [u8; 4000],
}

#[repr(C)]
struct SnpGuestRequestIoctl {
    msg_version: u8,
    req_data: u64,
    resp_data: u64,
    /// `fw_error` in the low 32 bits, `vmm_error` in the high 32.
    exitinfo2: u64,
}

#[repr(C)]
struct SnpExtReportReq {
    data: SnpReportReq,
    certs_address: u64,
    certs_len: u32,
}

// The kernel copies exactly these sizes; a layout slip here would have it
// read or write past our structures.
const _: () = assert!(std::mem::size_of::<SnpReportReq>() == 96);
const _: () = assert!(std::mem::size_of::<SnpReportResp>() == 4000);
const _: () = assert!(std::mem::size_of::<SnpGuestRequestIoctl>() == 32);
const _: () = assert!(std::mem::size_of::<SnpExtReportReq>() == 112);

nix::ioctl_readwrite!(snp_get_report, b'S', 0x0, SnpGuestRequestIoctl);
nix::ioctl_readwrite!(snp_get_ext_report, b'S', 0x2, SnpGuestRequestIoctl);

const PAGE: usize = 4096;
/// The largest certificate buffer asked for after the host said the first
/// (`SEV_FW_BLOB_MAX_SIZE`, 16 KiB, today's driver limit) was too small; a
/// driver that refuses it leaves us with the plain report.
const MAX_CERTS: usize = super::MAX_CERT_TABLE;
/// The first buffer: the driver's limit, which AMD's three certificates fit.
const FIRST_PAGES: usize = 4;
const VMM_ERR_INVALID_LEN: u32 = 1;
/// The `MSG_REPORT_REQ` message version ccnode sends.
const MSG_VERSION: u8 = 1;

/// One failed request, for the error message.
struct Failed {
    ioctl: &'static str,
    errno: nix::errno::Errno,
    fw_error: u32,
    vmm_error: u32,
    /// What was wrong with a response the ioctl did return.
    detail: Option<String>,
}

impl Failed {
    fn into_error(self) -> SnpError {
        SnpError::Firmware {
            ioctl: self.ioctl,
            errno: self.errno as i32,
            message: format!(
                "{} (fw_error {:#x}, vmm_error {:#x})",
                self.detail.as_deref().unwrap_or(self.errno.desc()),
                self.fw_error,
                self.vmm_error
            ),
        }
    }
}

fn split(exitinfo2: u64) -> (u32, u32) {
    (exitinfo2 as u32, (exitinfo2 >> 32) as u32)
}

/// The report out of a `MSG_REPORT_RSP`.
fn report_of(resp: &SnpReportResp) -> Result<Vec<u8>, String> {
    let word = |o: usize| {
        u32::from_le_bytes([
            resp.data[o],
            resp.data[o + 1],
            resp.data[o + 2],
            resp.data[o + 3],
        ])
    };
    let (status, size) = (word(0), word(4));
    if status != 0 {
        return Err(format!("the firmware answered status {status:#x}"));
    }
    if size as usize != REPORT_LEN {
        return Err(format!(
            "the firmware returned a report of {size} bytes, not {REPORT_LEN}"
        ));
    }
    Ok(resp.data[0x20..0x20 + REPORT_LEN].to_vec())
}

fn request(report_data: &[u8; 64], vmpl: u32) -> SnpReportReq {
    SnpReportReq {
        user_data: *report_data,
        vmpl,
        rsvd: [0; 28],
    }
}

fn get_report(dev: &File, report_data: &[u8; 64], vmpl: u32) -> Result<Vec<u8>, Failed> {
    let mut req = request(report_data, vmpl);
    let mut resp = Box::new(SnpReportResp { data: [0; 4000] });
    let mut io = SnpGuestRequestIoctl {
        msg_version: MSG_VERSION,
        req_data: &mut req as *mut SnpReportReq as u64,
        resp_data: &mut *resp as *mut SnpReportResp as u64,
        exitinfo2: 0,
    };
    // SAFETY: `io` is a live, correctly laid out snp_guest_request_ioctl
    // (sizes asserted above) whose req_data and resp_data point at a live
    // snp_report_req and a live 4000-byte snp_report_resp; the driver reads
    // the request, writes at most sizeof(snp_report_resp) to the response
    // and writes back `io`. All three outlive the call.
    let r = unsafe { snp_get_report(dev.as_raw_fd(), &mut io) };
    let (fw_error, vmm_error) = split(io.exitinfo2);
    let failed = |errno, detail| Failed {
        ioctl: "SNP_GET_REPORT",
        errno,
        fw_error,
        vmm_error,
        detail,
    };
    match r {
        Ok(_) => report_of(&resp).map_err(|d| failed(nix::errno::Errno::EIO, Some(d))),
        Err(errno) => Err(failed(errno, None)),
    }
}

/// (the report, the certificate buffer), or (why not, the pages the host
/// asked for when the buffer was too small).
type ExtReport = Result<(Vec<u8>, Vec<u8>), (Failed, Option<usize>)>;

/// `SNP_GET_EXT_REPORT` with a certificate buffer of `pages` pages.
fn get_ext_report_with(dev: &File, report_data: &[u8; 64], vmpl: u32, pages: usize) -> ExtReport {
    let mut certs = vec![0u8; pages * PAGE];
    let mut req = SnpExtReportReq {
        data: request(report_data, vmpl),
        certs_address: certs.as_mut_ptr() as u64,
        certs_len: certs.len() as u32,
    };
    let mut resp = Box::new(SnpReportResp { data: [0; 4000] });
    let mut io = SnpGuestRequestIoctl {
        msg_version: MSG_VERSION,
        req_data: &mut req as *mut SnpExtReportReq as u64,
        resp_data: &mut *resp as *mut SnpReportResp as u64,
        exitinfo2: 0,
    };
    // SAFETY: as in get_report, with req_data pointing at a live
    // snp_ext_report_req whose certs_address/certs_len describe `certs`, a
    // live buffer of exactly certs_len bytes (whole pages, at most 16 KiB)
    // that the driver writes at most certs_len bytes into. `certs`, `req`,
    // `resp` and `io` all outlive the call.
    let r = unsafe { snp_get_ext_report(dev.as_raw_fd(), &mut io) };
    let (fw_error, vmm_error) = split(io.exitinfo2);
    let failed = |errno, detail| Failed {
        ioctl: "SNP_GET_EXT_REPORT",
        errno,
        fw_error,
        vmm_error,
        detail,
    };
    // Kernels before 5.19 fail the ioctl when the buffer is too small, later
    // ones succeed with vmm_error set: look at vmm_error either way.
    if vmm_error == VMM_ERR_INVALID_LEN {
        let needed = (req.certs_len as usize).div_ceil(PAGE);
        return Err((
            failed(
                nix::errno::Errno::ENOSPC,
                Some(format!(
                    "the host needs {needed} pages for its certificates"
                )),
            ),
            Some(needed),
        ));
    }
    if let Err(errno) = r {
        return Err((failed(errno, None), None));
    }
    let report = report_of(&resp).map_err(|d| (failed(nix::errno::Errno::EIO, Some(d)), None))?;
    Ok((report, certs))
}

/// See [`super::sev_guest_report`].
pub(super) fn report(
    device: &Path,
    report_data: &[u8; 64],
    vmpl: u32,
) -> Result<(Vec<u8>, Option<Vec<u8>>), SnpError> {
    if vmpl > 3 {
        return Err(SnpError::Firmware {
            ioctl: "SNP_GET_EXT_REPORT",
            errno: 0,
            message: format!("VMPL {vmpl} is not 0 to 3"),
        });
    }
    // Read access is enough for the ioctls (as snpguest opens it).
    let dev = File::options()
        .read(true)
        .open(device)
        .map_err(|source| SnpError::Device {
            path: device.display().to_string(),
            source,
        })?;
    let mut pages = FIRST_PAGES;
    let mut tries = 0;
    let ext_failure = loop {
        tries += 1;
        match get_ext_report_with(&dev, report_data, vmpl, pages) {
            Ok((report, certs)) => {
                let table = super::cert_table_extent(&certs).map(|n| certs[..n].to_vec());
                return Ok((report, table));
            }
            Err((_, Some(needed))) if tries < 3 && needed > pages && needed * PAGE <= MAX_CERTS => {
                pages = needed;
            }
            Err((f, _)) => break f,
        }
    };
    // No extended report (an old or a certificate-less host, or a driver
    // without it): the plain report, with no certificates.
    match get_report(&dev, report_data, vmpl) {
        Ok(report) => Ok((report, None)),
        Err(plain) => {
            let ext = ext_failure.into_error();
            let plain = plain.into_error();
            Err(SnpError::Firmware {
                ioctl: "SNP_GET_EXT_REPORT and SNP_GET_REPORT",
                errno: match &plain {
                    SnpError::Firmware { errno, .. } => *errno,
                    _ => 0,
                },
                message: format!("{ext}; then {plain}"),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // _IOWR('S', nr, 32 bytes) = 3 << 30 | 32 << 16 | 'S' << 8 | nr.
        assert_eq!(nix::request_code_readwrite!(b'S', 0x0, 32), 0xC020_5300);
        assert_eq!(nix::request_code_readwrite!(b'S', 0x2, 32), 0xC020_5302);
        assert_eq!(
            nix::request_code_readwrite!(b'S', 0x2, std::mem::size_of::<SnpGuestRequestIoctl>()),
            0xC020_5302
        );
    }

    #[test]
    fn response_parsing() {
        let mut resp = SnpReportResp { data: [0; 4000] };
        resp.data[4..8].copy_from_slice(&(REPORT_LEN as u32).to_le_bytes());
        resp.data[0x20] = 2;
        let r = report_of(&resp).unwrap();
        assert_eq!(r.len(), REPORT_LEN);
        assert_eq!(r[0], 2);
        resp.data[0] = 0x16;
        assert!(report_of(&resp).unwrap_err().contains("status 0x16"));
        resp.data[0] = 0;
        resp.data[4] = 0;
        assert!(report_of(&resp).unwrap_err().contains("bytes, not 1184"));
    }
}
