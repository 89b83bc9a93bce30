//! ccnode-test-worker: a minimal worker speaking the control protocol on
//! fd 3, with ways to misbehave, for supervision tests and the spawn
//! benchmark. `ccnode-test-worker [MODE]`, MODE one of:
//! `well` (default: ready, answer health, exit 0 on shutdown),
//! `exit N`, `sigsys`, `silent`, `flood`, `flood-ready` (`ready` again
//! and again, as fast as it can), `oversize`, `malformed`,
//! `ignore-shutdown`, `close-linger` (shuts its control socket down
//! after `ready` and sleeps), `deaf` (never reads after `ready`),
//! `trickle` (after `ready`, sends a frame a byte every 20 ms), `fork-bomb`,
//! `plant DIR` (reads its sim VRAM,
//! `DIR/$CUDA_VISIBLE_DEVICES`, exits 66 if a previous tenant's [`SECRET`]
//! is in it, else writes the secret over all of it and behaves well);
//! without arguments, MODE is read from `CCNODE_TEST_WORKER_MODE`.

use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;

use ccnode_sandbox::control::{message, read_frame, write_frame, DEFAULT_MAX_FRAME};

/// What `plant` writes, over and over, into the worker's sim VRAM.
const SECRET: &[u8] = b"CCNODE-TENANT-SECRET-";

fn plant(dir: &str) {
    let device = std::env::var("CUDA_VISIBLE_DEVICES").expect("a device");
    let path = std::path::Path::new(dir).join(device);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut before = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut before).expect("read the VRAM");
    if before.windows(SECRET.len()).any(|w| w == SECRET) {
        eprintln!(
            "ccnode-test-worker: a previous tenant's secret is in {}",
            path.display()
        );
        std::process::exit(66);
    }
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).expect("seek");
    let len = before.len();
    let bytes: Vec<u8> = SECRET.iter().copied().cycle().take(len).collect();
    f.write_all(&bytes).expect("plant the secret");
    f.sync_all().expect("sync");
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // Started by ccnoded as an inference worker it gets no arguments: the
    // mode then comes from the environment (tests allow it through).
    if args.is_empty() {
        if let Ok(m) = std::env::var("CCNODE_TEST_WORKER_MODE") {
            args = m.split_whitespace().map(str::to_owned).collect();
        }
    }
    let mode = args.first().map(String::as_str).unwrap_or("well");
    // SAFETY: fd 3 is the control socket the supervisor hands every worker.
    let mut sock = unsafe { UnixStream::from_raw_fd(3) };
    match mode {
        "stderr" => {
            // A long line, one that would forge a log line, then many.
            eprintln!("{}", "x".repeat(10_000));
            eprintln!("forged\rline\u{1b}[2J");
            for i in 0..1000 {
                eprintln!("line {i}");
            }
            std::process::exit(3);
        }
        "silent" => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        "oversize" => {
            let _ = sock.write_all(&(64u32 << 20).to_be_bytes());
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
        "malformed" => {
            let _ = sock.write_all(&[0, 0, 0, 5, b'h', b'e', b'l', b'l', b'o']);
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
        _ => {}
    }
    if mode == "plant" {
        plant(args.get(1).map(String::as_str).unwrap_or("."));
    }
    write_frame(&mut sock, &message("ready")).expect("send ready");
    match mode {
        "exit" => std::process::exit(args.get(1).and_then(|c| c.parse().ok()).unwrap_or(1)),
        "sigsys" => {
            // SAFETY: unshare with an integer flag; the sandbox forbids it.
            unsafe { libc::unshare(libc::CLONE_NEWNS) };
            std::process::exit(0);
        }
        "flood" => loop {
            if write_frame(&mut sock, &message("noise")).is_err() {
                std::process::exit(1);
            }
        },
        "close-linger" => {
            // Shut down, not just closed: the jail holds the socket too.
            let _ = sock.shutdown(std::net::Shutdown::Both);
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        "trickle" => {
            // A frame the limit allows, sent a byte every 20 ms: whole
            // after twenty minutes, if anyone waited that long.
            let _ = sock.write_all(&60_000u32.to_be_bytes());
            loop {
                if sock.write_all(b" ").is_err() {
                    std::process::exit(1);
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        "deaf" => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        "flood-ready" => loop {
            if write_frame(&mut sock, &message("ready")).is_err() {
                std::process::exit(1);
            }
        },
        "fork-bomb" => {
            let mut children = 0u32;
            // SAFETY: fork in a single-threaded process; children only sleep.
            while unsafe { libc::fork() } >= 0 {
                children += 1;
                if children > 100_000 {
                    break;
                }
            }
            // Parent continues here (children too, but they block in the
            // loop's next fork failing and then answer nothing: they sleep).
            if std::process::id() != 2 {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
        }
        _ => {}
    }
    loop {
        let frame = match read_frame(&mut sock, DEFAULT_MAX_FRAME) {
            Ok(f) => f,
            Err(_) => std::process::exit(0),
        };
        match frame["type"].as_str() {
            Some("health") => {
                let _ = write_frame(&mut sock, &message("healthy"));
            }
            Some("shutdown") if mode != "ignore-shutdown" => std::process::exit(0),
            _ => {}
        }
    }
}
