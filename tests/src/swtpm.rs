//! A real TPM 2.0 for tests: the swtpm emulator on a free loopback port
//! pair, with a fresh state directory per instance, killed on drop.
//!
//! ```no_run
//! let tpm = ccnode_testkit::swtpm::Swtpm::start();
//! // tss-esapi / tpm2-tools: tpm.tcti() == "swtpm:host=127.0.0.1,port=N"
//! ```

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{tool, PATIENCE};

/// A running swtpm.
#[derive(Debug)]
pub struct Swtpm {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

/// A port P such that P and P+1 were both free a moment ago.
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let a = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let p = a.local_addr().unwrap().port();
        if p == u16::MAX {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no free loopback port pair");
}

impl Swtpm {
    /// Starts swtpm (`--tpm2`, TCP server and control ports, `startup-clear`
    /// so the TPM is ready) and waits until it accepts connections. Retries
    /// on a port clash. Panics if swtpm is not installed or never starts.
    pub fn start() -> Swtpm {
        let bin = tool("swtpm");
        let dir = tempfile::Builder::new()
            .prefix("ccnode-swtpm-")
            .tempdir()
            .expect("swtpm state dir");
        let mut last_log = String::new();
        for _ in 0..10 {
            let port = free_port_pair();
            let log = dir.path().join("swtpm.log");
            let mut child = Command::new(&bin)
                .arg("socket")
                .arg("--tpm2")
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .arg("--tpmstate")
                .arg(format!("dir={}", dir.path().display()))
                .arg("--flags")
                .arg("not-need-init,startup-clear")
                .arg("--log")
                .arg(format!("file={},level=1", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn swtpm");
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let deadline = Instant::now() + PATIENCE;
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    // Exited: most likely the port was taken meanwhile.
                    last_log = std::fs::read_to_string(&log).unwrap_or_default();
                    break;
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                    return Swtpm { child, port, dir };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("swtpm did not listen on {addr} within {PATIENCE:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        panic!("swtpm did not start after 10 attempts; last log:\n{last_log}");
    }

    /// The TCTI string for tss-esapi and tpm2-tools
    /// (`TPM2TOOLS_TCTI`): `swtpm:host=127.0.0.1,port=N`.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The TPM command port (the control port is one above).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The emulator's state directory.
    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
