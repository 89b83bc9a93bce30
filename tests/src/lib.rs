//! Harnesses for ccnode's end-to-end tests and benchmarks.
//!
//! [`TestNode`] runs the real `ccnoded` binary on a private state directory,
//! admin socket and loopback port, and waits for it the way systemd does: on
//! `READY=1` over a notification socket. It speaks the admin protocol itself
//! (raw JSON lines), so tests check the wire format independently of the
//! agent's own client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod api;
pub mod bench;
pub mod prometheus;
pub mod swtpm;

/// How long anything in a test may take before the harness gives up. Not a
/// performance assertion: a bound so a broken daemon fails the test instead
/// of hanging it.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A running (or stopped) ccnoded with its own directory.
#[derive(Debug)]
pub struct TestNode {
    bin: PathBuf,
    dir: tempfile::TempDir,
    admin_toml: String,
    http_toml: String,
    gpu_toml: String,
    attestation_toml: String,
    extra_toml: String,
    env: Vec<(String, String)>,
    /// A cgroup v2 directory the daemon starts in (as systemd starts a
    /// unit in its own group).
    cgroup: Option<PathBuf>,
    child: Option<Child>,
    notify: Option<Notifications>,
    /// The metrics endpoint's address, read from `status` after start.
    pub http_addr: Option<SocketAddr>,
}

/// Messages the daemon sent to its notification socket.
#[derive(Debug, Clone)]
pub struct Notifications {
    messages: Arc<Mutex<Vec<String>>>,
    path: PathBuf,
}

impl Notifications {
    fn listen(path: PathBuf) -> Notifications {
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().unwrap().push(msg);
            }
        });
        Notifications { messages, path }
    }

    /// Every message so far.
    pub fn all(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    /// Waits until a message containing `needle` arrives.
    pub fn wait_for(&self, needle: &str) -> Option<String> {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if let Some(m) = self.all().into_iter().find(|m| m.contains(needle)) {
                return Some(m);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl TestNode {
    /// A node for `bin` (the `ccnoded` binary) on the harness's base
    /// config; add to it with [`TestNode::with_admin`] and
    /// [`TestNode::with_toml`].
    pub fn new(bin: impl Into<PathBuf>) -> TestNode {
        let dir = tempfile::Builder::new()
            .prefix("ccnode-test-")
            .tempdir()
            .expect("temp dir");
        TestNode {
            bin: bin.into(),
            dir,
            admin_toml: String::new(),
            http_toml: String::new(),
            gpu_toml: String::new(),
            attestation_toml: String::new(),
            extra_toml: String::new(),
            env: Vec::new(),
            cgroup: None,
            child: None,
            notify: None,
            http_addr: None,
        }
    }

    /// Starts the daemon in the cgroup v2 directory `dir` (which must
    /// exist), as systemd starts a unit in its own group.
    pub fn in_cgroup(mut self, dir: &Path) -> TestNode {
        self.cgroup = Some(dir.to_owned());
        self
    }

    /// Adds keys to the `[admin]` table (`mode = "0666"`).
    pub fn with_admin(mut self, toml: &str) -> TestNode {
        self.admin_toml.push_str(toml);
        self.admin_toml.push('\n');
        self
    }

    /// Adds keys to the `[http]` table (`max_connections = 2`). A
    /// `header_read_timeout` here replaces the base config's (2s); `listen`
    /// stays the harness's free loopback port.
    pub fn with_http(mut self, toml: &str) -> TestNode {
        self.http_toml.push_str(toml);
        self.http_toml.push('\n');
        self
    }

    /// Adds keys to the `[gpu]` table (`backend = "sim"`). The base
    /// config has `backend = "none"`; sub-tables (`[gpu.health]`) go in
    /// [`TestNode::with_toml`].
    pub fn with_gpu(mut self, toml: &str) -> TestNode {
        self.gpu_toml.push_str(toml);
        self.gpu_toml.push('\n');
        self
    }

    /// Adds keys to the `[attestation]` table (`tcti = "swtpm:..."`). The
    /// base config has `enabled = false`.
    pub fn with_attestation(mut self, toml: &str) -> TestNode {
        self.attestation_toml.push_str(toml);
        self.attestation_toml.push('\n');
        self
    }

    /// Adds whole tables the base config does not have.
    pub fn with_toml(mut self, toml: &str) -> TestNode {
        self.extra_toml.push_str(toml);
        self.extra_toml.push('\n');
        self
    }

    /// Sets an environment variable for the daemon.
    pub fn with_env(mut self, key: &str, value: &str) -> TestNode {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Drops the environment variables set with [`TestNode::with_env`] and
    /// starts the (stopped) node again on the same directory.
    pub fn restart_clean(mut node: TestNode) -> TestNode {
        node.env.clear();
        node.spawn()
            .unwrap_or_else(|log| panic!("ccnoded did not restart:\n{log}"));
        node
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/admin.sock")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("ccnoded.toml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("ccnoded.log")
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn write_config(&self) {
        let socket = format!("\"{}\"", self.socket().display());
        let admin = merge_keys(
            &[
                ("socket", socket.as_str()),
                ("group", "0"),
                ("read_timeout", "\"2s\""),
                ("write_timeout", "\"2s\""),
            ],
            &self.admin_toml,
        );
        let http = merge_keys(
            &[
                ("listen", "\"127.0.0.1:0\""),
                ("header_read_timeout", "\"2s\""),
            ],
            &self.http_toml,
        );
        let text = format!(
            r#"[node]
id = "test-node"
state_dir = "{state}"
shutdown_grace = "5s"
worker_threads = 2

[log]
format = "json"
level = "info"

[admin]
{admin}
[http]
{http}
[gpu]
{gpu}
[attestation]
{attestation}
{other}
"#,
            attestation = merge_keys(&[("enabled", "false")], &self.attestation_toml),
            gpu = merge_keys(&[("backend", "\"none\"")], &self.gpu_toml),
            state = self.state_dir().display(),
            other = self.extra_toml,
        );
        std::fs::write(self.config_path(), text).expect("write config");
    }

    /// Starts the daemon and waits for `READY=1`. Panics (with the daemon's
    /// log) if it does not get ready.
    pub fn start(mut self) -> TestNode {
        self.spawn()
            .unwrap_or_else(|log| panic!("ccnoded did not start:\n{log}"));
        self
    }

    /// Starts the daemon; on failure returns its log (and exit status).
    pub fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "already running");
        self.write_config();
        let notify = Notifications::listen(self.dir.path().join("notify.sock"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(self.config_path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NOTIFY_SOCKET", &notify.path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(dir) = &self.cgroup {
            use std::os::unix::ffi::OsStrExt;
            use std::os::unix::process::CommandExt;
            let procs = std::ffi::CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
                .expect("no NUL in the cgroup path");
            // SAFETY: between fork and exec the closure calls only open,
            // write and close (async-signal-safe) on a path made before
            // the fork, and allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // "0": the writing process itself.
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if n == 1 {
                        Ok(())
                    } else {
                        Err(err)
                    }
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn ccnoded");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if notify.all().iter().any(|m| m.contains("READY=1")) {
                break;
            }
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Err(format!("exited with {status}\n{}", self.log()));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!("no READY=1 within {PATIENCE:?}\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
        self.notify = Some(notify);
        let status = self.request(r#"{"v":1,"cmd":"status"}"#);
        let url = status["result"]["metrics_url"]
            .as_str()
            .expect("status has metrics_url");
        let addr = url
            .trim_start_matches("http://")
            .trim_end_matches("/metrics");
        self.http_addr = Some(addr.parse().expect("metrics address"));
        Ok(())
    }

    /// Runs the daemon to completion with the current config (for start-up
    /// failures); returns its exit status and log.
    pub fn run_to_exit(&mut self) -> (ExitStatus, String) {
        self.write_config();
        let out = Command::new(&self.bin)
            .arg("--config")
            .arg(self.config_path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .output()
            .expect("run ccnoded");
        let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
        log.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status, log)
    }

    pub fn notifications(&self) -> &Notifications {
        self.notify.as_ref().expect("started")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for the daemon to exit (bounded by [`PATIENCE`]).
    pub fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ccnoded did not exit within {PATIENCE:?}\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops (if running) and starts again on the same directory.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            let status = self.stop();
            assert!(status.success(), "clean stop: {status}\n{}", self.log());
        }
        self.spawn()
            .unwrap_or_else(|log| panic!("ccnoded did not restart:\n{log}"));
    }

    /// Opens a raw connection to the admin socket.
    pub fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(self.socket()).expect("connect admin socket");
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.set_write_timeout(Some(PATIENCE)).unwrap();
        s
    }

    /// Sends one request line on a new connection and returns the response.
    pub fn request(&self, line: &str) -> Value {
        let mut s = self.connect();
        send_line(&mut s, line)
    }

    /// The attestation endpoint's URL, as the admin `status` reports it.
    pub fn attestation_url(&self) -> String {
        let s = self.request(r#"{"v":1,"cmd":"status"}"#);
        s["result"]["attestation_url"]
            .as_str()
            .unwrap_or_else(|| panic!("no attestation_url in {s}"))
            .to_owned()
    }

    /// The OpenAI API's address (the node must have `[api] enabled`).
    pub fn api_addr(&self) -> SocketAddr {
        let s = self.request(r#"{"v":1,"cmd":"status"}"#);
        let url = s["result"]["api_url"]
            .as_str()
            .unwrap_or_else(|| panic!("no api_url in {s}"));
        url.trim_start_matches("http://")
            .trim_end_matches("/v1")
            .parse()
            .expect("API address")
    }

    /// `GET path` on the metrics endpoint: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.http_addr.expect("started"), path)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The lines of one TOML table: `base` keys, each replaced by a line of
/// `overrides` that sets the same key, then the other override lines.
fn merge_keys(base: &[(&str, &str)], overrides: &str) -> String {
    let key_of = |line: &str| line.split('=').next().unwrap_or("").trim().to_owned();
    let overridden: Vec<String> = overrides.lines().map(key_of).collect();
    let mut out = String::new();
    for (key, value) in base {
        if !overridden.iter().any(|k| k == key) {
            out.push_str(&format!("{key} = {value}\n"));
        }
    }
    for line in overrides.lines() {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Writes `line` (a newline is added) and reads one JSON response line.
pub fn send_line(s: &mut UnixStream, line: &str) -> Value {
    s.write_all(line.as_bytes()).expect("write request");
    s.write_all(b"\n").expect("write newline");
    read_response(s).expect("a response")
}

/// Reads one JSON response line; `None` on EOF.
pub fn read_response(s: &mut UnixStream) -> Option<Value> {
    let mut reader = BufReader::new(s.try_clone().expect("clone"));
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => None,
        Ok(_) => Some(serde_json::from_str(&line).expect("response is JSON")),
        Err(e) => panic!("reading response: {e}"),
    }
}

/// A minimal HTTP/1.1 GET: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect http");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read http response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The path of a system tool, or `None` (with a message) when it is missing.
/// The README's test command installs every tool the suite needs; a tool
/// missing under CI is an error, not a skip.
pub fn tool(name: &str) -> PathBuf {
    for dir in std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
    {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{name}` is not installed; run ./scripts/test.sh, which installs what the tests need");
}

/// A simulated GPU host for `gpu.backend = "sim"`: two H100s, the second
/// with three `1g.10gb` MIG devices, and their device tree under /dev (the
/// jail binds device nodes at their own paths inside its /dev). Both
/// directories are removed on drop.
#[derive(Debug)]
pub struct SimGpus {
    _dir: tempfile::TempDir,
    _devtree: tempfile::TempDir,
    /// The simulation file (`gpu.sim_file`).
    pub sim: PathBuf,
    /// The device tree's root (`device_root` in the file).
    pub devtree: PathBuf,
}

impl SimGpus {
    pub fn new() -> SimGpus {
        let dir = tempfile::tempdir().expect("temp dir");
        let tree = tempfile::Builder::new()
            .prefix("ccnode-test-sim-")
            .tempdir_in("/dev")
            .expect("temp dir under /dev");
        let devtree = tree.path().to_owned();
        let sim = dir.path().join("gpus.toml");
        std::fs::write(
            &sim,
            format!(
                "driver_version = \"550.127.05\"\ncuda_driver_version = \"12.4\"\n\
                 device_root = \"{}\"\n\
                 [[gpus]]\nname = \"NVIDIA H100 80GB HBM3\"\nmemory_gib = 80\n\
                 vbios_version = \"96.00.99.00.01\"\n\
                 [[gpus]]\nname = \"NVIDIA H100 80GB HBM3\"\nmemory_gib = 80\n\
                 vbios_version = \"96.00.99.00.01\"\nmig = {{ \"1g.10gb\" = 3 }}\n",
                devtree.display()
            ),
        )
        .expect("write the sim file");
        SimGpus {
            _dir: dir,
            _devtree: tree,
            sim,
            devtree,
        }
    }

    /// The `[gpu]` keys that select it.
    pub fn gpu_toml(&self) -> String {
        format!("backend = \"sim\"\nsim_file = \"{}\"", self.sim.display())
    }
}

impl Default for SimGpus {
    fn default() -> Self {
        SimGpus::new()
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on a v2-only
/// host, `/sys/fs/cgroup/unified` on a hybrid one), if anywhere.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next() == Some("cgroup2"))
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// A cgroup v2 group of the test's own, `<v2 mount>/ccnode-test-<what>-<pid>`,
/// created; `None` (with a SKIPPED line) where no v2 hierarchy is mounted.
pub fn scratch_cgroup2(what: &str) -> Option<PathBuf> {
    let Some(v2) = cgroup2_mount() else {
        eprintln!("SKIPPED: no cgroup v2 hierarchy mounted here");
        return None;
    };
    let group = v2.join(format!("ccnode-test-{what}-{}", std::process::id()));
    std::fs::create_dir(&group)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", group.display()));
    Some(group)
}

/// Removes an empty cgroup, waiting out the moment after a reap when the
/// kernel still counts the dead process in it.
pub fn remove_cgroup(dir: &Path) {
    let deadline = Instant::now() + PATIENCE;
    while let Err(e) = std::fs::remove_dir(dir) {
        assert!(
            e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline,
            "{}: {e}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
