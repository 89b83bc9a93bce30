//! The admin socket server.
//!
//! The socket is bound inside a fresh private directory (mode 0700), given
//! its configured mode and group there, and only then renamed to its
//! configured path: no moment exists where it is reachable with looser
//! permissions than configured.
//!
//! Every connection is bounded: a cap on connections (more are refused with
//! `too_many_connections`), 64 KiB per request line, a deadline for each
//! request line and for each response.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::peer::{self, Access, Peer, Policy};
use super::protocol::{parse_request, Command, ErrorCode, Request, Response};
use crate::config::{AdminConfig, ADMIN_MAX_REQUEST_BYTES};
use crate::node::{Node, TransitionError};
use crate::state::{self, Actor, Event, NodeRecord};

/// Errors creating the admin socket.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another process is already serving {path}")]
    InUse { path: PathBuf },
    #[error("cannot create admin socket {path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The bound admin socket.
#[derive(Debug)]
pub struct AdminListener {
    listener: UnixListener,
    path: PathBuf,
}

impl AdminListener {
    /// Binds the socket at `path` with `mode` and group `gid`, as described
    /// in the module docs. Must run inside a tokio runtime.
    pub fn bind(path: &Path, mode: u32, gid: u32) -> Result<AdminListener, BindError> {
        let io_err = |what| {
            let path = path.to_owned();
            move |source| BindError::Io { path, what, source }
        };
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(io_err("creating its directory"))?;
        if path.exists() {
            // A live daemon answers; a stale socket from a crash does not.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse {
                    path: path.to_owned(),
                });
            }
        }
        let staging = tempfile::Builder::new()
            .prefix(".admin-sock-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(parent)
            .map_err(io_err("creating a private staging directory"))?;
        let staged = staging.path().join("s");
        let std_listener =
            std::os::unix::net::UnixListener::bind(&staged).map_err(io_err("binding"))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
            .map_err(io_err("setting its mode"))?;
        // Under systemd with Group= the socket already has its group: skip
        // the chown, so the unit's syscall filter need not allow it.
        let current_gid = std::os::unix::fs::MetadataExt::gid(
            &std::fs::metadata(&staged).map_err(io_err("reading its owner"))?,
        );
        if current_gid != gid {
            nix::unistd::chown(&staged, None, Some(nix::unistd::Gid::from_raw(gid)))
                .map_err(|e| io_err("setting its group")(e.into()))?;
        }
        std::fs::rename(&staged, path).map_err(io_err("moving it into place"))?;
        drop(staging);
        std_listener
            .set_nonblocking(true)
            .map_err(io_err("making it non-blocking"))?;
        let listener = UnixListener::from_std(std_listener).map_err(io_err("registering it"))?;
        Ok(AdminListener {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What connection handlers share.
#[derive(Debug)]
pub struct AdminContext {
    pub node: Arc<Node>,
    pub policy: Policy,
    pub max_connections: usize,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    /// Extra facts for `status` (listener addresses, build).
    pub status_extra: Value,
    pub gpu: Option<Arc<crate::gpu::GpuMonitor>>,
    /// The model manager, for `models`, `model_load`, `model_unload`.
    pub inference: Option<Arc<crate::inference::Manager>>,
    unauthorized_log: RateLimitedLog,
    overload_log: RateLimitedLog,
    credentials_log: RateLimitedLog,
    /// Refused commands from read-only peers are audited at this rate at
    /// most; beyond it they are only counted, so a peer cannot grow the
    /// audit log without bound.
    refusal_audits: TokenBucket,
}

impl AdminContext {
    pub fn new(
        node: Arc<Node>,
        policy: Policy,
        cfg: &AdminConfig,
        status_extra: Value,
        gpu: Option<Arc<crate::gpu::GpuMonitor>>,
    ) -> Self {
        AdminContext {
            node,
            policy,
            max_connections: cfg.max_connections,
            read_timeout: cfg.read_timeout,
            write_timeout: cfg.write_timeout,
            status_extra,
            gpu,
            inference: None,
            unauthorized_log: RateLimitedLog::new(Duration::from_secs(10)),
            overload_log: RateLimitedLog::new(Duration::from_secs(10)),
            credentials_log: RateLimitedLog::new(Duration::from_secs(10)),
            refusal_audits: TokenBucket::new(20.0, 1.0),
        }
    }
}

/// Accepts connections until `stop` fires; each is served on `tracker` so
/// shutdown can wait for in-flight requests. Removes the socket file when it
/// stops.
pub async fn serve(
    listener: AdminListener,
    ctx: Arc<AdminContext>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(ctx.max_connections));
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %err, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let ctx = ctx.clone();
        let stop = stop.clone();
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                tracker.spawn(async move {
                    ctx.node.metrics().admin_connections.inc();
                    serve_connection(stream, &ctx, &stop).await;
                    ctx.node.metrics().admin_connections.dec();
                    drop(permit);
                });
            }
            Err(_) => {
                ctx.node
                    .metrics()
                    .admin_refused
                    .with_label_values(&["connection_limit"])
                    .inc();
                ctx.overload_log
                    .warn("admin connection refused: too many connections");
                tracker.spawn(async move {
                    let resp = Response::err(
                        None,
                        ErrorCode::TooManyConnections,
                        format!(
                            "the daemon serves at most {} connections",
                            ctx.max_connections
                        ),
                    );
                    let mut stream = stream;
                    let _ =
                        tokio::time::timeout(ctx.write_timeout, stream.write_all(&resp.to_line()))
                            .await;
                });
            }
        }
    }
    if let Err(err) = std::fs::remove_file(&listener.path) {
        tracing::warn!(path = %listener.path.display(), error = %err, "cannot remove admin socket");
    }
}

enum ReadError {
    Io,
    TooLarge,
    /// EOF in the middle of a line.
    Truncated,
}

/// Reads one line of at most `max` bytes (newline excluded) into `buf`.
/// `Ok(false)` is a clean EOF between requests.
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<bool, ReadError> {
    buf.clear();
    loop {
        let available = r.fill_buf().await.map_err(|_| ReadError::Io)?;
        if available.is_empty() {
            return if buf.is_empty() {
                Ok(false)
            } else {
                Err(ReadError::Truncated)
            };
        }
        if let Some(i) = available.iter().position(|&b| b == b'\n') {
            if buf.len() + i > max {
                return Err(ReadError::TooLarge);
            }
            buf.extend_from_slice(&available[..i]);
            r.consume(i + 1);
            return Ok(true);
        }
        let n = available.len();
        if buf.len() + n > max {
            return Err(ReadError::TooLarge);
        }
        buf.extend_from_slice(available);
        r.consume(n);
    }
}

async fn serve_connection(stream: UnixStream, ctx: &AdminContext, stop: &CancellationToken) {
    let metrics = ctx.node.metrics();
    let peer = match peer::peer_of(&stream) {
        Ok(p) => p,
        Err(err) => {
            metrics
                .admin_refused
                .with_label_values(&["peer_credentials"])
                .inc();
            ctx.credentials_log
                .warn(&format!("cannot read admin peer credentials: {err}"));
            return;
        }
    };
    let access = ctx.policy.access(&peer);
    let (read_half, mut write_half) = stream.into_split();
    if access == Access::None {
        metrics
            .admin_refused
            .with_label_values(&["unauthorized"])
            .inc();
        ctx.unauthorized_log.warn(&format!(
            "admin connection refused: uid {} gid {} pid {} is not authorised",
            peer.uid, peer.gid, peer.pid
        ));
        let resp = Response::err(
            None,
            ErrorCode::PermissionDenied,
            "this user may not use the admin socket",
        );
        let _ =
            tokio::time::timeout(ctx.write_timeout, write_half.write_all(&resp.to_line())).await;
        return;
    }
    let mut reader = BufReader::with_capacity(8 * 1024, read_half);
    let mut buf = Vec::with_capacity(1024);
    loop {
        let read = tokio::select! {
            // Between requests, shutdown ends the connection at once.
            _ = stop.cancelled() => {
                let resp = Response::err(None, ErrorCode::ShuttingDown, "the daemon is shutting down");
                let _ = tokio::time::timeout(ctx.write_timeout, write_half.write_all(&resp.to_line())).await;
                return;
            }
            read = tokio::time::timeout(
                ctx.read_timeout,
                read_line(&mut reader, &mut buf, ADMIN_MAX_REQUEST_BYTES),
            ) => read,
        };
        let (resp, close) = match read {
            Err(_elapsed) => (
                Response::err(
                    None,
                    ErrorCode::Timeout,
                    format!(
                        "no complete request within {}",
                        humantime::format_duration(ctx.read_timeout)
                    ),
                ),
                true,
            ),
            Ok(Ok(false)) => return,
            Ok(Err(ReadError::Io | ReadError::Truncated)) => return,
            Ok(Err(ReadError::TooLarge)) => (
                Response::err(
                    None,
                    ErrorCode::RequestTooLarge,
                    format!("requests are limited to {ADMIN_MAX_REQUEST_BYTES} bytes"),
                ),
                true,
            ),
            Ok(Ok(true)) => (handle_line(ctx, &peer, access, &buf).await, false),
        };
        if let Some(err) = &resp.error {
            if matches!(err.code, ErrorCode::Timeout | ErrorCode::RequestTooLarge) {
                metrics
                    .admin_requests
                    .with_label_values(&["unknown", err.code.as_str()])
                    .inc();
            }
        }
        let written =
            tokio::time::timeout(ctx.write_timeout, write_half.write_all(&resp.to_line())).await;
        if close || !matches!(written, Ok(Ok(()))) {
            return;
        }
    }
}

/// Parses, authorises and runs one request; counts it.
async fn handle_line(ctx: &AdminContext, peer: &Peer, access: Access, line: &[u8]) -> Response {
    let metrics = ctx.node.metrics();
    let request = match parse_request(line) {
        Ok(r) => r,
        Err(e) => {
            let command = e.command.map_or("unknown", Command::as_str);
            metrics
                .admin_requests
                .with_label_values(&[command, e.code.as_str()])
                .inc();
            return Response::err(e.id, e.code, e.message);
        }
    };
    let resp = run(ctx, peer, access, request.clone()).await;
    let result = resp.error.as_ref().map_or("ok", |e| e.code.as_str());
    metrics
        .admin_requests
        .with_label_values(&[request.command.as_str(), result])
        .inc();
    resp
}

/// `models`, `model_load`, `model_unload`: the model manager's work, on a
/// blocking thread (verification hashes the whole model).
async fn model_command(ctx: &AdminContext, req: &Request) -> Response {
    let id = req.id.clone();
    let Some(mgr) = ctx.inference.clone() else {
        return Response::err(
            id,
            ErrorCode::InferenceUnavailable,
            "this ccnoded serves no models",
        );
    };
    match req.command {
        Command::Models => Response::ok(id, json!({ "models": mgr.status() })),
        Command::ModelUnload => {
            let name = req.name.clone().unwrap_or_default();
            let res = tokio::task::spawn_blocking(move || mgr.unload(&name)).await;
            match res {
                Ok(Ok(())) => Response::ok(id, json!({ "unloaded": req.name })),
                Ok(Err(e)) => Response::err(id, ErrorCode::ModelNotLoaded, e.to_string()),
                Err(e) => Response::err(id, ErrorCode::ModelLoadFailed, e.to_string()),
            }
        }
        _ => {
            let cfg: crate::inference::ModelConfig =
                match serde_json::from_value(req.model.clone().unwrap_or_default()) {
                    Ok(c) => c,
                    Err(e) => {
                        return Response::err(
                            id,
                            ErrorCode::InvalidRequest,
                            format!("`model` is not a model entry: {e}"),
                        )
                    }
                };
            let name = cfg.name.clone();
            let res = tokio::task::spawn_blocking(move || mgr.load(cfg)).await;
            match res {
                Ok(Ok(())) => Response::ok(id, json!({ "loading": name })),
                Ok(Err(e)) => {
                    let mut r =
                        Response::err(id, ErrorCode::ModelLoadFailed, crate::error_chain(&e));
                    if let Some(err) = r.error.as_mut() {
                        err.detail = Some(e.code().to_owned());
                    }
                    r
                }
                Err(e) => Response::err(id, ErrorCode::ModelLoadFailed, e.to_string()),
            }
        }
    }
}

async fn run(ctx: &AdminContext, peer: &Peer, access: Access, req: Request) -> Response {
    let id = req.id.clone();
    let actor = Actor::Admin {
        uid: peer.uid,
        gid: peer.gid,
        pid: peer.pid,
    };
    if access == Access::ReadOnly && !req.command.is_read_only() {
        audit_refusal(ctx, &actor, &req, ErrorCode::PermissionDenied).await;
        return Response::err(
            id,
            ErrorCode::PermissionDenied,
            format!("`{}` needs the admin group", req.command.as_str()),
        );
    }
    let event = match req.command {
        Command::Status => return Response::ok(id, status_json(ctx)),
        Command::Audit => {
            let records = ctx.node.audit_log().recent(req.limit);
            return Response::ok(id, json!({ "records": records }));
        }
        Command::Gpus => {
            let mut v = ctx.gpu.as_ref().map_or_else(
                || json!({ "backend": "none", "simulated": false, "inventory": null }),
                |g| g.gpus_json(),
            );
            // Which of ccnoded's workers holds which device.
            let assignments = ctx
                .inference
                .as_ref()
                .map(|m| m.assignments())
                .unwrap_or_default();
            v["assignments"] = json!(assignments);
            // Each device's scrub state and latest scrub.
            let scrub = ctx
                .inference
                .as_ref()
                .and_then(|m| m.scrubber())
                .map(|s| s.status_json())
                .unwrap_or_default();
            v["scrub"] = json!(scrub);
            return Response::ok(id, v);
        }
        Command::Drift => {
            let v = ctx.gpu.as_ref().map_or_else(
                || json!({ "backend": "none", "simulated": false, "drift": [] }),
                |g| g.drift_json(),
            );
            return Response::ok(id, v);
        }
        Command::Models | Command::ModelLoad | Command::ModelUnload => {
            return model_command(ctx, &req).await
        }
        Command::Drain => Event::Drain,
        Command::Undrain => Event::Undrain,
        Command::Quarantine => Event::Quarantine,
        Command::Release => Event::Release,
    };
    let reason = match state::check_reason(req.reason.as_deref()) {
        Ok(r) => r,
        Err(err) => {
            let code = match err {
                state::ReasonError::Missing => ErrorCode::MissingField,
                _ => ErrorCode::InvalidRequest,
            };
            audit_refusal(ctx, &actor, &req, code).await;
            return Response::err(id, code, err.to_string());
        }
    };
    match ctx.node.transition(event, actor, reason).await {
        Ok(t) => Response::ok(
            id,
            json!({
                "changed": true,
                "from": t.from,
                "to": t.record.state,
                "node": record_json(&t.record),
            }),
        ),
        Err(TransitionError::Invalid(e)) => {
            Response::err(id, ErrorCode::InvalidTransition, e.to_string())
        }
        Err(TransitionError::Persist { applied, source }) => {
            let chain = crate::error_chain(&source);
            let message = if matches!(source, crate::persist::PersistError::NotDurable { .. }) {
                format!("the change is applied and saved, but may not survive a crash: {chain}")
            } else if applied {
                format!(
                    "the node is quarantined in memory, but the state could not be saved: {chain}"
                )
            } else {
                format!("nothing changed: the new state could not be saved: {chain}")
            };
            Response::err(id, ErrorCode::PersistFailed, message)
        }
    }
}

async fn audit_refusal(ctx: &AdminContext, actor: &Actor, req: &Request, code: ErrorCode) {
    if !ctx.refusal_audits.take() {
        return;
    }
    let record = crate::audit::AuditRecord {
        ts: std::time::SystemTime::now(),
        actor: actor.clone(),
        command: req.command.as_str().to_owned(),
        reason: req.reason.as_deref().map(refused_reason),
        result: code.as_str().to_owned(),
        from: Some(ctx.node.snapshot().state),
        to: None,
    };
    let audit = ctx.node.audit_log().clone();
    let res = tokio::task::spawn_blocking(move || audit.append(record))
        .await
        .expect("audit writer does not panic");
    if let Err(err) = res {
        ctx.node.metrics().audit_write_failures.inc();
        tracing::error!(error = %err, "audit record lost");
    }
}

/// A refused request's reason as it may be recorded: control characters
/// replaced (they would reach admins' terminals), at most 256 bytes.
fn refused_reason(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len().min(256));
    for c in reason.chars() {
        let c = if c.is_control() { '\u{FFFD}' } else { c };
        if out.len() + c.len_utf8() > 256 {
            break;
        }
        out.push(c);
    }
    out
}

fn record_json(r: &NodeRecord) -> Value {
    json!({
        "state": r.state,
        "reason": r.reason,
        "by": r.by,
        "since": crate::timefmt::format(r.since),
        "seq": r.seq,
    })
}

fn status_json(ctx: &AdminContext) -> Value {
    let mut v = record_json(&ctx.node.snapshot());
    let obj = v.as_object_mut().expect("record_json is an object");
    obj.insert("node_id".into(), ctx.node.id().into());
    obj.insert("version".into(), crate::VERSION.into());
    obj.insert("in_flight".into(), ctx.node.in_flight().into());
    if let Value::Object(extra) = &ctx.status_extra {
        for (k, v) in extra {
            obj.insert(k.clone(), v.clone());
        }
    }
    v
}

/// Logs at most one warning per interval and says how many were dropped:
/// peers must not be able to flood the journal.
#[derive(Debug)]
struct RateLimitedLog {
    interval: Duration,
    last: std::sync::Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimitedLog {
    fn new(interval: Duration) -> Self {
        RateLimitedLog {
            interval,
            last: std::sync::Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    fn warn(&self, message: &str) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < self.interval) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        tracing::warn!(suppressed, "{message}");
    }
}

/// A token bucket: `capacity` tokens, refilled at `per_sec`.
#[derive(Debug)]
struct TokenBucket {
    capacity: f64,
    per_sec: f64,
    state: std::sync::Mutex<(f64, Instant)>,
}

impl TokenBucket {
    fn new(capacity: f64, per_sec: f64) -> Self {
        TokenBucket {
            capacity,
            per_sec,
            state: std::sync::Mutex::new((capacity, Instant::now())),
        }
    }

    fn take(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(state.1).as_secs_f64() * self.per_sec;
        state.0 = (state.0 + refill).min(self.capacity);
        state.1 = now;
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_reasons_are_made_safe_to_print() {
        assert_eq!(refused_reason("a\u{1b}[2Jb"), "a\u{FFFD}[2Jb");
        let long = "é".repeat(1000);
        let r = refused_reason(&long);
        assert!(r.len() <= 256 && r.chars().all(|c| c == 'é'));
    }

    #[test]
    fn token_bucket_allows_a_burst_then_throttles() {
        let b = TokenBucket::new(3.0, 0.0);
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
    }

    #[tokio::test]
    async fn read_line_bounds_and_splits() {
        let data: &[u8] = b"abc\ndef\nxyz";
        let mut r = BufReader::with_capacity(2, data);
        let mut buf = Vec::new();
        assert!(matches!(read_line(&mut r, &mut buf, 10).await, Ok(true)));
        assert_eq!(buf, b"abc");
        assert!(matches!(read_line(&mut r, &mut buf, 10).await, Ok(true)));
        assert_eq!(buf, b"def");
        assert!(matches!(
            read_line(&mut r, &mut buf, 10).await,
            Err(ReadError::Truncated)
        ));
        let big = [b'a'; 100];
        let mut r = BufReader::with_capacity(7, &big[..]);
        assert!(matches!(
            read_line(&mut r, &mut buf, 10).await,
            Err(ReadError::TooLarge)
        ));
        let exact: &[u8] = b"0123456789\n";
        let mut r = BufReader::new(exact);
        assert!(matches!(read_line(&mut r, &mut buf, 10).await, Ok(true)));
        let mut r = BufReader::new(&b""[..]);
        assert!(matches!(read_line(&mut r, &mut buf, 10).await, Ok(false)));
    }
}
