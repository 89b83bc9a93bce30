//! The OpenAI-compatible inference API: `GET /v1/models`,
//! `GET /v1/models/{id}`, `POST /v1/completions` and
//! `POST /v1/chat/completions`, plain or streamed as server-sent events.
//! docs/inference.md ("API") is the reference for clients.
//!
//! The API speaks only to an [`Inference`]: it validates a request, submits
//! it, and turns the generation's [`Piece`]s into OpenAI's shapes. Dropping
//! a [`Generation`] cancels it, so a client that goes away (its connection
//! closes while it waits, or a streamed body can no longer be sent) stops
//! the work: the generation lives in the request's future or in the
//! response body, both of which hyper drops with the connection.
//!
//! Bounded like the other endpoints: a connection cap (more are closed on
//! accept and counted), a deadline for request headers (and the TLS
//! handshake) and another for the body, a cap on head and body size, and a
//! cap on `max_tokens`. Connections still open when the grace period after
//! `stop` ends are closed, cancelling their generations. Errors are
//! OpenAI error objects with stable codes.

use crate::timefmt::unix_now;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE,
    RETRY_AFTER,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::{Histogram, IntCounter};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::attestation::{StartError, Tls};
use crate::config::ApiConfig;
use crate::inference::{
    ChatMessage, FinishReason, GenerateParams, Generation, Inference, Piece, Prompt, SubmitError,
};
use crate::metrics::Metrics;

/// Largest request head, in bytes.
const MAX_HEAD: usize = 16 * 1024;
/// `max_tokens` of a completion that gives none (OpenAI's default).
const COMPLETION_DEFAULT_MAX_TOKENS: u32 = 16;
/// `max_tokens` of a chat completion that gives none. OpenAI's default is
/// "up to the context"; a fixed default keeps a short-context model from
/// refusing every such request (`context_length_exceeded`).
const CHAT_DEFAULT_MAX_TOKENS: u32 = 256;
/// Most stop strings a request may give (OpenAI's limit).
const MAX_STOP: usize = 4;
/// Longest stop string, in bytes.
const MAX_STOP_BYTES: usize = 1024;
/// Longest client string quoted back in an error message, in characters.
const MAX_QUOTED: usize = 64;
/// The `model` label of requests that name no configured model.
const UNKNOWN_MODEL: &str = "unknown";

/// The bound API listener.
#[derive(Debug)]
pub struct ApiListener {
    listener: TcpListener,
}

impl ApiListener {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<ApiListener> {
        Ok(ApiListener {
            listener: TcpListener::bind(addr).await?,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Why `api.tls_cert` and `api.tls_key` could not be used.
#[derive(Debug, thiserror::Error)]
#[error("api TLS: {0}")]
pub struct TlsError(pub String);

/// Loads `api.tls_cert` and `api.tls_key` when configured (as the
/// attestation endpoint does: TLS 1.2 and 1.3, HTTP/1.1 by ALPN).
pub fn load_tls(cfg: &ApiConfig) -> Result<Option<Tls>, TlsError> {
    match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => crate::attestation::load_tls_files(cert, key)
            .map(Some)
            .map_err(|e| match e {
                StartError::Tls(message) => TlsError(message),
                other => TlsError(other.to_string()),
            }),
        _ => Ok(None),
    }
}

struct Ctx {
    inference: Arc<dyn Inference>,
    cfg: ApiConfig,
    metrics: Metrics,
}

impl Ctx {
    /// The `model` label for `model`: itself when it is a configured model
    /// id, else `unknown` (label values never come from a client).
    fn label(&self, model: Option<&str>) -> String {
        match model {
            Some(m) if self.inference.models().iter().any(|i| i.id == m) => m.to_owned(),
            _ => UNKNOWN_MODEL.to_owned(),
        }
    }
}

/// Serves the API until `stop` fires, then lets open requests finish
/// within `grace`; connections still open after it are closed, which
/// cancels their generations. Returns when every connection has ended.
pub async fn serve(
    listener: ApiListener,
    inference: Arc<dyn Inference>,
    cfg: ApiConfig,
    tls: Option<Tls>,
    metrics: Metrics,
    stop: CancellationToken,
    grace: Duration,
) {
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let handshake_timeout = cfg.header_read_timeout;
    let builder = crate::http::connection_builder(cfg.header_read_timeout, MAX_HEAD);
    let ctx = Arc::new(Ctx {
        inference,
        cfg,
        metrics,
    });
    let graceful = GracefulShutdown::new();
    let tracker = TaskTracker::new();
    let abort = CancellationToken::new();
    let refused = || ctx.metrics.api_refused.inc();
    while let Some((stream, _peer, permit)) =
        crate::http::accept_bounded(&listener.listener, &slots, &stop, "api", refused).await
    {
        // The client's close, seen on the socket itself (see watch_hangup);
        // `done` ends the watch with the connection.
        let gone = CancellationToken::new();
        let done = CancellationToken::new();
        match stream.as_fd().try_clone_to_owned() {
            Ok(fd) => {
                tokio::spawn(watch_hangup(fd, gone.clone(), done.clone()));
            }
            Err(err) => tracing::debug!(error = %err, "no hang-up watch for a connection"),
        }
        let service_ctx = ctx.clone();
        let service_gone = gone.clone();
        let service = hyper::service::service_fn(move |req| {
            let ctx = service_ctx.clone();
            let gone = service_gone.clone();
            async move {
                // Dropping the handler cancels its generation, as hyper
                // does when it sees the close itself.
                let resp = tokio::select! {
                    biased;
                    _ = gone.cancelled() => ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "client_gone",
                        "the client closed the connection",
                    )
                    .response(),
                    resp = handle(&ctx, req) => resp,
                };
                Ok::<_, Infallible>(resp.map(|body| body.ends_when(gone)))
            }
        });
        let served = crate::http::serve_connection(
            builder.clone(),
            graceful.watcher(),
            stream,
            tls.as_ref().map(|t| t.acceptor().clone()),
            handshake_timeout,
            ctx.cfg.write_timeout,
            service,
            "api",
        );
        let abort = abort.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = abort.cancelled() => {}
                _ = served => {}
            }
            // The watch holds a duplicate of the socket: closed now too.
            done.cancel();
            drop(permit);
        });
    }
    // No new connections while the open ones finish.
    drop(listener);
    crate::http::shut_down(graceful, grace, "api").await;
    abort.cancel();
    tracker.close();
    tracker.wait().await;
}

/// Cancels `gone` when the client closes its end of the connection, seen
/// on `fd` (a duplicate of the socket) as a read hang-up, without reading.
/// hyper looks for the close only while its read buffer is empty: after a
/// pipelined request or a stray CRLF behind the body, a client that left
/// would otherwise not cancel its generation. Ends when `done` fires,
/// closing the duplicate.
async fn watch_hangup(fd: std::os::fd::OwnedFd, gone: CancellationToken, done: CancellationToken) {
    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;
    // SAFETY: `fd` is an open descriptor that the AsyncFd owns from here
    // on: it stays open, refers to the same socket and is the number
    // `as_raw_fd` gives until the AsyncFd is dropped.
    let Ok(fd) = (unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }) else {
        return;
    };
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            ready = fd.readable() => match ready {
                Ok(mut guard) => {
                    if guard.ready().is_read_closed() {
                        gone.cancel();
                        return;
                    }
                    // Data, for hyper to read: wait for the next event.
                    guard.clear_ready();
                }
                Err(_) => return,
            },
        }
    }
}

// ---------------------------------------------------------------------------
// Responses and errors

/// A response body: a whole JSON document, or a stream of server-sent
/// events that owns the generation behind it. A stream ends (its
/// generation cancelled) when the client is gone.
#[derive(Debug)]
pub struct ApiBody(
    BodyKind,
    Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
);

#[derive(Debug)]
enum BodyKind {
    Full(Option<Bytes>),
    Sse(Box<Sse>),
}

impl ApiBody {
    fn full(bytes: Vec<u8>) -> ApiBody {
        ApiBody(BodyKind::Full(Some(Bytes::from(bytes))), None)
    }

    fn sse(sse: Sse) -> ApiBody {
        ApiBody(BodyKind::Sse(Box::new(sse)), None)
    }

    /// Ends a stream once `gone` fires.
    fn ends_when(mut self, gone: CancellationToken) -> ApiBody {
        self.1 = Some(Box::pin(gone.cancelled_owned()));
        self
    }
}

impl Body for ApiBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        match &mut this.0 {
            BodyKind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            BodyKind::Sse(sse) => {
                if this
                    .1
                    .as_mut()
                    .is_some_and(|g| g.as_mut().poll(cx).is_ready())
                {
                    // Dropped: the generation is cancelled.
                    sse.generation = None;
                    sse.out.clear();
                    return Poll::Ready(None);
                }
                sse.poll_event(cx).map(|e| e.map(|b| Ok(Frame::data(b))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            BodyKind::Full(bytes) => bytes.is_none(),
            BodyKind::Sse(sse) => sse.out.is_empty() && sse.generation.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            BodyKind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            BodyKind::Full(None) => SizeHint::with_exact(0),
            BodyKind::Sse(_) => SizeHint::default(),
        }
    }
}

type Resp = Response<ApiBody>;

/// An error answered as an OpenAI error object.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The request field at fault, as a path (`messages[0].role`).
    param: Option<String>,
    /// Seconds for `Retry-After`.
    retry_after: Option<u64>,
    /// Methods for `Allow` (405).
    allow: Option<&'static str>,
    /// Tells OpenAI's clients not to retry against this node
    /// (`x-should-retry: false`).
    no_retry: bool,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            param: None,
            retry_after: None,
            allow: None,
            no_retry: false,
        }
    }

    /// 400 about the field `param`.
    fn field(code: &'static str, param: impl Into<String>, message: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(StatusCode::BAD_REQUEST, code, message);
        e.param = Some(param.into());
        e
    }

    fn wrong_type(param: &str, expected: &str, found: &Value) -> ApiError {
        ApiError::field(
            "invalid_type",
            param,
            format!(
                "`{param}` must be {expected}, found {}",
                json_type_name(found)
            ),
        )
    }

    fn missing(param: &str) -> ApiError {
        ApiError::field(
            "missing_field",
            param,
            format!("you must provide the `{param}` parameter"),
        )
    }

    fn unsupported(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::field("unsupported_parameter", param, message)
    }

    fn from_submit(err: &SubmitError) -> ApiError {
        let status =
            StatusCode::from_u16(err.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut e = ApiError::new(status, err.code(), err.to_string());
        match err {
            SubmitError::UnknownModel(_) | SubmitError::NotReady(_) => {
                e.param = Some("model".to_owned())
            }
            SubmitError::QueueFull { retry_after, .. } => {
                e.retry_after = Some(retry_after_secs(*retry_after))
            }
            SubmitError::Draining | SubmitError::Quarantined => e.no_retry = true,
            SubmitError::TooLong(_) => {}
        }
        e
    }

    /// The OpenAI error `type`.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }
        })
    }

    fn response(&self) -> Resp {
        let mut resp = json_response(self.status, &self.to_json());
        let headers = resp.headers_mut();
        if let Some(secs) = self.retry_after {
            headers.insert(
                RETRY_AFTER,
                HeaderValue::from_str(&secs.to_string()).expect("digits are a valid header value"),
            );
        }
        if let Some(allow) = self.allow {
            headers.insert(ALLOW, HeaderValue::from_static(allow));
        }
        if self.no_retry {
            headers.insert(
                HeaderName::from_static("x-should-retry"),
                HeaderValue::from_static("false"),
            );
        }
        resp
    }
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A client string for an error message: quoted, and cut short.
fn quoted(s: &str) -> String {
    if s.chars().count() <= MAX_QUOTED {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX_QUOTED).collect();
        format!("{head:?}...")
    }
}

fn json_response(status: StatusCode, body: &Value) -> Resp {
    let mut resp = Response::new(ApiBody::full(
        serde_json::to_vec(body).expect("a Value serialises"),
    ));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A response id: `prefix` and 32 hex digits, unique in this process and
/// not guessable from the previous ones (not a secret either).
fn new_id(prefix: &str) -> String {
    static KEYS: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut h = KEYS.get_or_init(Default::default).build_hasher();
    h.write_u64(n);
    format!("{prefix}{:016x}{n:016x}", h.finish())
}

// ---------------------------------------------------------------------------
// Routing

#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Models,
    Model(String),
    Completions,
    Chat,
    NotFound,
}

impl Route {
    fn of(path: &str) -> Route {
        match path {
            "/v1/models" => Route::Models,
            "/v1/completions" => Route::Completions,
            "/v1/chat/completions" => Route::Chat,
            _ => match path.strip_prefix("/v1/models/").map(percent_decode) {
                Some(Some(id)) if !id.is_empty() => Route::Model(id),
                _ => Route::NotFound,
            },
        }
    }

    /// The `endpoint` label.
    fn endpoint(&self) -> &'static str {
        match self {
            Route::Models | Route::Model(_) => "models",
            Route::Completions => "completions",
            Route::Chat => "chat_completions",
            Route::NotFound => "other",
        }
    }
}

/// Decodes `%XX` escapes; `None` for a bad escape or a result that is not
/// UTF-8. (Model ids may hold `/`, which clients send as is or as `%2F`.)
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

async fn handle(ctx: &Ctx, req: Request<Incoming>) -> Resp {
    let route = Route::of(req.uri().path());
    let mut model = None;
    let resp = match handle_inner(ctx, &route, req, &mut model).await {
        Ok(resp) => resp,
        Err(err) => {
            if err.status.is_server_error() {
                tracing::warn!(code = err.code, message = %err.message, "api request failed");
            }
            err.response()
        }
    };
    let label = ctx.label(model.as_deref());
    ctx.metrics
        .api_requests
        .with_label_values(&[label.as_str(), route.endpoint(), resp.status().as_str()])
        .inc();
    resp
}

async fn handle_inner(
    ctx: &Ctx,
    route: &Route,
    req: Request<Incoming>,
    model: &mut Option<String>,
) -> Result<Resp, ApiError> {
    if let Err(e) = check_request(route, &req) {
        // Read first, as for a 413: a close with body bytes unread can
        // reset the connection before the client reads this answer.
        discard_body(ctx, req).await;
        return Err(e);
    }
    match route {
        Route::Models => return Ok(list_models(ctx)),
        Route::Model(id) => {
            *model = Some(id.clone());
            return get_model(ctx, id);
        }
        _ => {}
    }
    let body = read_body(ctx, req).await?;
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(map) = value else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the request body must be a JSON object",
        ));
    };
    *model = map.get("model").and_then(Value::as_str).map(str::to_owned);
    let cap = ctx.cfg.max_tokens_cap;
    let (kind, parsed) = match route {
        Route::Chat => (Kind::Chat, parse_chat(&map, cap)?),
        _ => (Kind::Completion, parse_completion(&map, cap)?),
    };
    let label = ctx.label(Some(&parsed.model));
    let stream = parsed.stream;
    let shape = Shape {
        kind,
        id: new_id(kind.id_prefix()),
        created: unix_now(),
        model: parsed.model.clone(),
        include_usage: parsed.include_usage,
    };
    // Before the submit: it may already hand the generation to a worker.
    let accepted = Instant::now();
    let generation = ctx
        .inference
        .submit(&parsed.model, parsed.params)
        .map_err(|e| ApiError::from_submit(&e))?;
    let timer = TokenTimer {
        accepted,
        last: None,
        ttft: ctx
            .metrics
            .api_time_to_first_token
            .with_label_values(&[label.as_str()]),
        inter: ctx
            .metrics
            .api_inter_token
            .with_label_values(&[label.as_str()]),
        tokens: ctx
            .metrics
            .api_tokens_generated
            .with_label_values(&[label.as_str()]),
    };
    if stream {
        start_stream(shape, generation, timer).await
    } else {
        whole(shape, generation, timer).await
    }
}

/// `application/json`, with parameters (`; charset=utf-8`) or without.
fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let ok = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the request body must be JSON (Content-Type: application/json)",
        ))
    }
}

/// The route's method, and for a POST the content type: refusals that
/// need nothing of the body.
fn check_request(route: &Route, req: &Request<Incoming>) -> Result<(), ApiError> {
    let (allow, post) = match route {
        Route::NotFound => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no such endpoint: {} {}",
                    req.method(),
                    quoted(req.uri().path())
                ),
            ))
        }
        Route::Models | Route::Model(_) => ("GET", false),
        Route::Completions | Route::Chat => ("POST", true),
    };
    let wanted = if post { Method::POST } else { Method::GET };
    if req.method() != wanted {
        let mut e = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("only {allow} is allowed here"),
        );
        e.allow = Some(allow);
        return Err(e);
    }
    if post {
        check_content_type(req.headers())?;
    }
    Ok(())
}

/// Reads and discards the body of a request refused without it (as
/// [`drain`] does for a 413): one declared larger than `DRAIN_CAP` is left
/// unread.
async fn discard_body(ctx: &Ctx, req: Request<Incoming>) {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let body = req.into_body();
    if hyper::body::Body::is_end_stream(&body) || declared.is_some_and(|d| d > DRAIN_CAP) {
        return;
    }
    drain(
        body,
        0,
        tokio::time::Instant::now() + ctx.cfg.request_timeout,
    )
    .await;
}

/// How much of a refused body is read and thrown away before the 413 is
/// sent. A client still sending its body when the server closes a
/// connection with unread data gets a TCP reset, which can reach it before
/// the 413 does (the `openai` client then reports a connection error, not
/// the answer). Bodies declared larger than this are refused unread.
const DRAIN_CAP: u64 = 16 << 20;

/// Longest pause in a refused body that draining waits out (a client that
/// stopped sending gets its 413 this long after its last byte).
const DRAIN_IDLE: Duration = Duration::from_millis(250);

/// Reads and discards the rest of a refused body, up to `DRAIN_CAP` bytes
/// in all, within `deadline`, and until the client pauses for `DRAIN_IDLE`.
async fn drain(mut body: Incoming, mut seen: u64, deadline: tokio::time::Instant) {
    while seen <= DRAIN_CAP {
        let until = deadline.min(tokio::time::Instant::now() + DRAIN_IDLE);
        match tokio::time::timeout_at(until, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    seen += data.len() as u64;
                }
            }
            _ => return,
        }
    }
}

async fn read_body(ctx: &Ctx, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let max = ctx.cfg.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than {max} bytes"),
        )
    };
    if let Some(declared) = req.headers().get(CONTENT_LENGTH) {
        // hyper has refused a Content-Length that is not a number.
        let declared = declared
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(u64::MAX);
        if declared > max {
            if declared <= DRAIN_CAP {
                let deadline = tokio::time::Instant::now() + ctx.cfg.request_timeout;
                drain(req.into_body(), 0, deadline).await;
            }
            return Err(too_large());
        }
    }
    let deadline = tokio::time::Instant::now() + ctx.cfg.request_timeout;
    let timed_out = || {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request body did not arrive in time",
        )
    };
    let mut body = req.into_body();
    let mut collected = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(timed_out()),
            Ok(None) => return Ok(Bytes::from(collected)),
            Ok(Some(Err(e))) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    format!("cannot read the request body: {e}"),
                ))
            }
            Ok(Some(Ok(frame))) => {
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                if (collected.len() + data.len()) as u64 > max {
                    let seen = (collected.len() + data.len()) as u64;
                    drain(body, seen, deadline).await;
                    return Err(too_large());
                }
                collected.extend_from_slice(data);
            }
        }
    }
}

fn model_object(id: &str, created: u64) -> Value {
    json!({ "id": id, "object": "model", "created": created, "owned_by": "ccnode" })
}

fn list_models(ctx: &Ctx) -> Resp {
    let data: Vec<Value> = ctx
        .inference
        .models()
        .iter()
        .map(|m| model_object(&m.id, m.created))
        .collect();
    json_response(StatusCode::OK, &json!({ "object": "list", "data": data }))
}

fn get_model(ctx: &Ctx, id: &str) -> Result<Resp, ApiError> {
    match ctx.inference.models().iter().find(|m| m.id == id) {
        Some(m) => Ok(json_response(
            StatusCode::OK,
            &model_object(&m.id, m.created),
        )),
        None => {
            let mut e = ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!("the model {} does not exist", quoted(id)),
            );
            e.param = Some("model".to_owned());
            Err(e)
        }
    }
}

// ---------------------------------------------------------------------------
// Request bodies

/// A request, validated.
#[derive(Debug, Clone, PartialEq)]
struct Parsed {
    model: String,
    params: GenerateParams,
    stream: bool,
    include_usage: bool,
}

/// The fields of a JSON object, read with their path for error messages.
/// `null` reads as absent, as OpenAI takes it.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    prefix: String,
}

impl<'a> Fields<'a> {
    fn new(map: &'a Map<String, Value>) -> Fields<'a> {
        Fields {
            map,
            prefix: String::new(),
        }
    }

    fn nested(map: &'a Map<String, Value>, prefix: String) -> Fields<'a> {
        Fields { map, prefix }
    }

    fn param(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(ApiError::wrong_type(&self.param(key), "a string", other)),
        }
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(ApiError::wrong_type(&self.param(key), "a boolean", other)),
        }
    }

    fn number(&self, key: &str) -> Result<Option<f64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => Err(ApiError::wrong_type(&self.param(key), "a number", other)),
        }
    }

    fn integer(&self, key: &str) -> Result<Option<i128>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let i = n
                    .as_u64()
                    .map(i128::from)
                    .or_else(|| n.as_i64().map(i128::from));
                match i {
                    Some(i) => Ok(Some(i)),
                    None => Err(ApiError::wrong_type(
                        &self.param(key),
                        "an integer",
                        &Value::Number(n.clone()),
                    )),
                }
            }
            Some(other) => Err(ApiError::wrong_type(&self.param(key), "an integer", other)),
        }
    }
}

/// What a field's value must be for this server to accept it: the
/// parameters below change the output in ways not implemented here, so
/// anything but their default is refused rather than ignored.
type IsDefault = fn(&Value) -> bool;

fn is_false(v: &Value) -> bool {
    v == &Value::Bool(false)
}
fn is_one(v: &Value) -> bool {
    v.as_u64() == Some(1)
}
fn is_zero(v: &Value) -> bool {
    v.as_f64() == Some(0.0)
}
fn is_empty_string(v: &Value) -> bool {
    v.as_str() == Some("")
}
fn is_empty_object(v: &Value) -> bool {
    v.as_object().is_some_and(Map::is_empty)
}
fn is_empty_array(v: &Value) -> bool {
    v.as_array().is_some_and(Vec::is_empty)
}
fn is_none_choice(v: &Value) -> bool {
    v.as_str() == Some("none")
}
fn is_text_format(v: &Value) -> bool {
    v.as_object()
        .is_some_and(|o| o.len() == 1 && o.get("type").and_then(Value::as_str) == Some("text"))
}
fn never(_: &Value) -> bool {
    false
}

const COMPLETION_UNSUPPORTED: &[(&str, IsDefault)] = &[
    ("n", is_one),
    ("best_of", is_one),
    ("echo", is_false),
    ("logprobs", never),
    ("suffix", is_empty_string),
    ("logit_bias", is_empty_object),
    ("presence_penalty", is_zero),
    ("frequency_penalty", is_zero),
];

const CHAT_UNSUPPORTED: &[(&str, IsDefault)] = &[
    ("n", is_one),
    ("logprobs", is_false),
    ("top_logprobs", is_zero),
    ("logit_bias", is_empty_object),
    ("presence_penalty", is_zero),
    ("frequency_penalty", is_zero),
    ("tools", is_empty_array),
    ("tool_choice", is_none_choice),
    ("functions", is_empty_array),
    ("function_call", is_none_choice),
    ("response_format", is_text_format),
];

fn refuse_unsupported(f: &Fields<'_>, table: &[(&str, IsDefault)]) -> Result<(), ApiError> {
    for (key, is_default) in table {
        if let Some(v) = f.get(key) {
            if !is_default(v) {
                return Err(ApiError::unsupported(
                    key,
                    format!(
                        "`{key}` is not supported by this server; leave it out or give its default"
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn parse_model(f: &Fields<'_>) -> Result<String, ApiError> {
    f.string("model")?
        .map(str::to_owned)
        .ok_or_else(|| ApiError::missing("model"))
}

/// The sampling and streaming fields both endpoints share.
struct Common {
    temperature: f64,
    top_p: f64,
    seed: Option<u64>,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

impl Common {
    /// The request, from what both endpoints share and what each parsed.
    fn into_parsed(self, model: String, prompt: Prompt, max_tokens: u32) -> Parsed {
        Parsed {
            model,
            params: GenerateParams {
                prompt,
                max_tokens,
                temperature: self.temperature,
                top_p: self.top_p,
                seed: self.seed,
                stop: self.stop,
            },
            stream: self.stream,
            include_usage: self.include_usage,
        }
    }
}

fn parse_common(f: &Fields<'_>) -> Result<Common, ApiError> {
    let temperature = f.number("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::field(
            "invalid_value",
            "temperature",
            format!("`temperature` must be between 0 and 2, found {temperature}"),
        ));
    }
    let top_p = f.number("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::field(
            "invalid_value",
            "top_p",
            format!("`top_p` must be above 0 and at most 1, found {top_p}"),
        ));
    }
    // OpenAI's seed is a signed 64-bit integer; negative seeds are taken
    // bit for bit.
    // `integer` gives a u64 or an i64: one of the two conversions holds.
    let seed = f
        .integer("seed")?
        .map(|s| u64::try_from(s).unwrap_or(s as i64 as u64));
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP {
                return Err(ApiError::field(
                    "invalid_value",
                    "stop",
                    format!(
                        "`stop` holds at most {MAX_STOP} strings, found {}",
                        items.len()
                    ),
                ));
            }
            let mut stop = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => stop.push(s.clone()),
                    other => {
                        return Err(ApiError::wrong_type(
                            &format!("stop[{i}]"),
                            "a string",
                            other,
                        ))
                    }
                }
            }
            stop
        }
        Some(other) => {
            return Err(ApiError::wrong_type(
                "stop",
                "a string or an array of strings",
                other,
            ))
        }
    };
    for s in &stop {
        if s.is_empty() || s.len() > MAX_STOP_BYTES {
            return Err(ApiError::field(
                "invalid_value",
                "stop",
                format!("stop strings must be 1 to {MAX_STOP_BYTES} bytes long"),
            ));
        }
    }
    let stream = f.boolean("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => {
            if !stream {
                return Err(ApiError::field(
                    "invalid_value",
                    "stream_options",
                    "`stream_options` is only allowed when `stream` is true",
                ));
            }
            Fields::nested(o, "stream_options".to_owned())
                .boolean("include_usage")?
                .unwrap_or(false)
        }
        Some(other) => return Err(ApiError::wrong_type("stream_options", "an object", other)),
    };
    Ok(Common {
        temperature,
        top_p,
        seed,
        stop,
        stream,
        include_usage,
    })
}

/// `max_tokens` (or another name for it) when given: 1 to `cap`.
fn parse_max_tokens(f: &Fields<'_>, key: &str, cap: u32) -> Result<Option<u32>, ApiError> {
    match f.integer(key)? {
        None => Ok(None),
        Some(n) if n < 1 => Err(ApiError::field(
            "invalid_value",
            key,
            format!("`{key}` must be at least 1, found {n}"),
        )),
        Some(n) if n > i128::from(cap) => Err(ApiError::field(
            "max_tokens_too_large",
            key,
            format!("`{key}` is {n}, more than this server allows ({cap})"),
        )),
        Some(n) => Ok(Some(u32::try_from(n).expect("at most the cap"))),
    }
}

fn parse_completion(map: &Map<String, Value>, cap: u32) -> Result<Parsed, ApiError> {
    let f = Fields::new(map);
    let model = parse_model(&f)?;
    let prompt = match f.get("prompt") {
        None => return Err(ApiError::missing("prompt")),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => s.clone(),
            [] => {
                return Err(ApiError::field(
                    "invalid_value",
                    "prompt",
                    "`prompt` must hold exactly one string",
                ))
            }
            items if items.iter().all(Value::is_string) => {
                return Err(ApiError::unsupported(
                    "prompt",
                    "one prompt per request: `prompt` must be a string or an array of one string",
                ))
            }
            _ => {
                return Err(ApiError::unsupported(
                    "prompt",
                    "token-id prompts are not supported: `prompt` must be a string or an array of one string",
                ))
            }
        },
        Some(other) => {
            return Err(ApiError::wrong_type(
                "prompt",
                "a string or an array of one string",
                other,
            ))
        }
    };
    let max_tokens =
        parse_max_tokens(&f, "max_tokens", cap)?.unwrap_or(COMPLETION_DEFAULT_MAX_TOKENS.min(cap));
    let common = parse_common(&f)?;
    refuse_unsupported(&f, COMPLETION_UNSUPPORTED)?;
    Ok(common.into_parsed(model, Prompt::Text(prompt), max_tokens))
}

fn parse_messages(f: &Fields<'_>) -> Result<Vec<ChatMessage>, ApiError> {
    let items = match f.get("messages") {
        None => return Err(ApiError::missing("messages")),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(ApiError::wrong_type("messages", "an array", other)),
    };
    if items.is_empty() {
        return Err(ApiError::field(
            "invalid_value",
            "messages",
            "`messages` must hold at least one message",
        ));
    }
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = format!("messages[{i}]");
        let Value::Object(obj) = item else {
            return Err(ApiError::wrong_type(&path, "an object", item));
        };
        let m = Fields::nested(obj, path);
        let role = m
            .string("role")?
            .ok_or_else(|| ApiError::missing(&m.param("role")))?;
        if !matches!(role, "system" | "user" | "assistant") {
            return Err(ApiError::field(
                "invalid_value",
                m.param("role"),
                format!(
                    "`{}` must be \"system\", \"user\" or \"assistant\", found {}",
                    m.param("role"),
                    quoted(role)
                ),
            ));
        }
        let content = match m.get("content") {
            None => return Err(ApiError::missing(&m.param("content"))),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    let ppath = format!("{}[{j}]", m.param("content"));
                    let Value::Object(pobj) = part else {
                        return Err(ApiError::wrong_type(&ppath, "an object", part));
                    };
                    let p = Fields::nested(pobj, ppath);
                    let kind = p
                        .string("type")?
                        .ok_or_else(|| ApiError::missing(&p.param("type")))?;
                    if kind != "text" {
                        return Err(ApiError::unsupported(
                            &p.param("type"),
                            format!(
                                "only text content parts are supported, found {}",
                                quoted(kind)
                            ),
                        ));
                    }
                    let text = p
                        .string("text")?
                        .ok_or_else(|| ApiError::missing(&p.param("text")))?;
                    texts.push(text);
                }
                texts.join("\n")
            }
            Some(other) => {
                return Err(ApiError::wrong_type(
                    &m.param("content"),
                    "a string or an array of content parts",
                    other,
                ))
            }
        };
        messages.push(ChatMessage {
            role: role.to_owned(),
            content,
        });
    }
    Ok(messages)
}

fn parse_chat(map: &Map<String, Value>, cap: u32) -> Result<Parsed, ApiError> {
    let f = Fields::new(map);
    let model = parse_model(&f)?;
    let messages = parse_messages(&f)?;
    let max_tokens = parse_max_tokens(&f, "max_tokens", cap)?;
    let max_completion_tokens = parse_max_tokens(&f, "max_completion_tokens", cap)?;
    let max_tokens = match (max_tokens, max_completion_tokens) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::field(
                "invalid_value",
                "max_completion_tokens",
                "`max_tokens` and `max_completion_tokens` differ; give one of them",
            ))
        }
        (a, b) => a.or(b).unwrap_or(CHAT_DEFAULT_MAX_TOKENS.min(cap)),
    };
    let common = parse_common(&f)?;
    refuse_unsupported(&f, CHAT_UNSUPPORTED)?;
    Ok(common.into_parsed(model, Prompt::Chat(messages), max_tokens))
}

// ---------------------------------------------------------------------------
// Generations into responses

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

impl Kind {
    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Completion => "cmpl-",
            Kind::Chat => "chatcmpl-",
        }
    }
}

/// What every object of one response shares.
#[derive(Debug)]
struct Shape {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

fn usage(prompt_tokens: u32, completion_tokens: u32) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": u64::from(prompt_tokens) + u64::from(completion_tokens),
    })
}

impl Shape {
    /// The non-streamed response.
    fn whole(&self, text: String, finish: FinishReason, usage: Value) -> Value {
        let (object, choice) = match self.kind {
            Kind::Completion => (
                "text_completion",
                json!({
                    "index": 0,
                    "text": text,
                    "logprobs": null,
                    "finish_reason": finish.as_str(),
                }),
            ),
            Kind::Chat => (
                "chat.completion",
                json!({
                    "index": 0,
                    "message": { "role": "assistant", "content": text, "refusal": null },
                    "logprobs": null,
                    "finish_reason": finish.as_str(),
                }),
            ),
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        })
    }

    fn chunk_object(&self) -> &'static str {
        match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        }
    }

    fn chunk(&self, choices: Value, usage: Option<Value>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.chunk_object(),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        v
    }

    /// The chat stream's first chunk: the assistant's role.
    fn role_chunk(&self) -> Value {
        self.chunk(
            json!([{
                "index": 0,
                "delta": { "role": "assistant", "content": "" },
                "logprobs": null,
                "finish_reason": null,
            }]),
            None,
        )
    }

    fn text_chunk(&self, text: &str) -> Value {
        let choice = match self.kind {
            Kind::Completion => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": null,
            }),
            Kind::Chat => json!({
                "index": 0, "delta": { "content": text }, "logprobs": null, "finish_reason": null,
            }),
        };
        self.chunk(json!([choice]), None)
    }

    fn finish_chunk(&self, finish: FinishReason) -> Value {
        let choice = match self.kind {
            Kind::Completion => json!({
                "index": 0, "text": "", "logprobs": null, "finish_reason": finish.as_str(),
            }),
            Kind::Chat => json!({
                "index": 0, "delta": {}, "logprobs": null, "finish_reason": finish.as_str(),
            }),
        };
        self.chunk(json!([choice]), None)
    }

    /// With `stream_options.include_usage`: the last chunk, no choices.
    fn usage_chunk(&self, usage: Value) -> Value {
        self.chunk(json!([]), Some(usage))
    }
}

/// Token timing and counts for the metrics, from the generation's
/// acceptance.
struct TokenTimer {
    accepted: Instant,
    last: Option<Instant>,
    ttft: Histogram,
    inter: Histogram,
    tokens: IntCounter,
}

impl std::fmt::Debug for TokenTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenTimer")
            .field("accepted", &self.accepted)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl TokenTimer {
    fn token(&mut self) {
        let now = Instant::now();
        match self.last {
            None => self.ttft.observe((now - self.accepted).as_secs_f64()),
            Some(last) => self.inter.observe((now - last).as_secs_f64()),
        }
        self.last = Some(now);
    }

    fn done(&self, completion_tokens: u32) {
        self.tokens.inc_by(u64::from(completion_tokens));
    }
}

fn ended_early() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "generation_ended",
        "the generation ended without a result",
    )
}

/// A generation's error before anything was sent: the request's fault
/// (400), the node's or model's state (503), or the server's (500).
fn piece_error(code: &'static str, message: String) -> ApiError {
    let status = match code {
        "context_length_exceeded" | "invalid_request" => StatusCode::BAD_REQUEST,
        "node_quarantined" | "node_draining" | "node_shutting_down" | "model_not_ready"
        | "model_unloaded" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, code, message)
}

/// A non-streamed response: every piece, then one JSON document. If the
/// connection closes meanwhile, hyper drops this future and with it the
/// generation, which cancels it.
async fn whole(
    shape: Shape,
    mut generation: Generation,
    mut timer: TokenTimer,
) -> Result<Resp, ApiError> {
    let mut text = String::new();
    loop {
        match generation.pieces.recv().await {
            Some(Piece::Token { text: t }) => {
                timer.token();
                text.push_str(&t);
            }
            Some(Piece::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                generation.cancel.disarm();
                timer.done(completion_tokens);
                let body =
                    shape.whole(text, finish_reason, usage(prompt_tokens, completion_tokens));
                return Ok(json_response(StatusCode::OK, &body));
            }
            Some(Piece::Error { code, message }) => {
                generation.cancel.disarm();
                return Err(piece_error(code, message));
            }
            None => return Err(ended_early()),
        }
    }
}

/// A streamed response. The status is sent with the first piece, so a
/// generation that fails before producing anything gets a plain error
/// response; after that, errors are events.
async fn start_stream(
    shape: Shape,
    mut generation: Generation,
    timer: TokenTimer,
) -> Result<Resp, ApiError> {
    let first = generation.pieces.recv().await;
    match first {
        None => return Err(ended_early()),
        Some(Piece::Error { code, message }) => {
            generation.cancel.disarm();
            return Err(piece_error(code, message));
        }
        Some(_) => {}
    }
    let mut sse = Sse {
        generation: Some(generation),
        out: VecDeque::new(),
        shape,
        timer,
    };
    if sse.shape.kind == Kind::Chat {
        let role = sse.shape.role_chunk();
        sse.push_event(&role);
    }
    sse.on_piece(first);
    let mut resp = Response::new(ApiBody::sse(sse));
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

/// The events of a streamed response, made as pieces arrive. Owns the
/// generation: when hyper drops the body (the client went away, or the
/// connection was closed at shutdown), the generation is cancelled.
struct Sse {
    /// `None` once the generation has ended.
    generation: Option<Generation>,
    /// Events made and not yet sent.
    out: VecDeque<Bytes>,
    shape: Shape,
    timer: TokenTimer,
}

impl std::fmt::Debug for Sse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sse")
            .field("id", &self.shape.id)
            .field("running", &self.generation.is_some())
            .field("queued_events", &self.out.len())
            .finish_non_exhaustive()
    }
}

impl Sse {
    fn push_event(&mut self, v: &Value) {
        let mut line = Vec::with_capacity(128);
        line.extend_from_slice(b"data: ");
        serde_json::to_writer(&mut line, v).expect("a Value serialises");
        line.extend_from_slice(b"\n\n");
        self.out.push_back(Bytes::from(line));
    }

    /// Ends the stream: the generation is over, nothing to cancel.
    fn finish(&mut self) {
        if let Some(mut g) = self.generation.take() {
            g.cancel.disarm();
        }
    }

    fn on_piece(&mut self, piece: Option<Piece>) {
        match piece {
            Some(Piece::Token { text }) => {
                self.timer.token();
                if !text.is_empty() {
                    let chunk = self.shape.text_chunk(&text);
                    self.push_event(&chunk);
                }
            }
            Some(Piece::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                self.timer.done(completion_tokens);
                let chunk = self.shape.finish_chunk(finish_reason);
                self.push_event(&chunk);
                if self.shape.include_usage {
                    let chunk = self
                        .shape
                        .usage_chunk(usage(prompt_tokens, completion_tokens));
                    self.push_event(&chunk);
                }
                self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                self.finish();
            }
            Some(Piece::Error { code, message }) => {
                let e = piece_error(code, message);
                tracing::warn!(code = e.code, message = %e.message, "api generation failed mid-stream");
                self.push_event(&e.to_json());
                self.finish();
            }
            None => {
                let e = ended_early();
                tracing::warn!(
                    code = e.code,
                    "api generation ended without a result mid-stream"
                );
                self.push_event(&e.to_json());
                // The sender is gone; dropping the generation armed costs
                // nothing and is the safe side.
                self.generation = None;
            }
        }
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        loop {
            if let Some(event) = self.out.pop_front() {
                return Poll::Ready(Some(event));
            }
            let Some(generation) = self.generation.as_mut() else {
                return Poll::Ready(None);
            };
            match generation.pieces.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(piece) => self.on_piece(piece),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    fn completion(v: Value) -> Result<Parsed, ApiError> {
        parse_completion(&obj(v), 4096)
    }

    fn chat(v: Value) -> Result<Parsed, ApiError> {
        parse_chat(&obj(v), 4096)
    }

    /// The (code, param) of a refusal, which must be a 400.
    fn refused(r: Result<Parsed, ApiError>) -> (&'static str, Option<String>) {
        let e = r.expect_err("must be refused");
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "{e:?}");
        (e.code, e.param)
    }

    #[test]
    fn completion_defaults_are_openais() {
        let p = completion(json!({"model": "m", "prompt": "hi"})).unwrap();
        assert_eq!(p.model, "m");
        assert_eq!(p.params.prompt, Prompt::Text("hi".into()));
        assert_eq!(p.params.max_tokens, 16);
        assert_eq!(p.params.temperature, 1.0);
        assert_eq!(p.params.top_p, 1.0);
        assert_eq!(p.params.seed, None);
        assert!(p.params.stop.is_empty());
        assert!(!p.stream && !p.include_usage);
        // A cap below 16 lowers the default instead of refusing.
        let p = parse_completion(&obj(json!({"model": "m", "prompt": "hi"})), 4).unwrap();
        assert_eq!(p.params.max_tokens, 4);
    }

    #[test]
    fn completion_fields_pass_through() {
        let p = completion(json!({
            "model": "m", "prompt": ["only one"], "max_tokens": 4096, "temperature": 0,
            "top_p": 0.25, "seed": -1, "stop": ["a", "b", "c", "d"], "stream": true,
            "stream_options": {"include_usage": true}, "n": 1, "echo": false,
            "presence_penalty": 0, "user": "someone", "logprobs": null, "unheard_of": [1, {"x": 2}],
        }))
        .unwrap();
        assert_eq!(p.params.prompt, Prompt::Text("only one".into()));
        assert_eq!(p.params.max_tokens, 4096);
        assert_eq!(p.params.temperature, 0.0, "0 is greedy");
        assert_eq!(p.params.top_p, 0.25);
        assert_eq!(
            p.params.seed,
            Some(u64::MAX),
            "negative seeds are taken bit for bit"
        );
        assert_eq!(p.params.stop, ["a", "b", "c", "d"]);
        assert!(p.stream && p.include_usage);
        let p = completion(
            json!({"model": "m", "prompt": "", "stop": "x", "seed": 18446744073709551615u64}),
        )
        .unwrap();
        assert_eq!(p.params.stop, ["x"]);
        assert_eq!(p.params.seed, Some(u64::MAX));
        // null is absent.
        let p = completion(json!({"model": "m", "prompt": "p", "max_tokens": null, "temperature": null, "stop": null, "stream_options": null})).unwrap();
        assert_eq!((p.params.max_tokens, p.params.temperature), (16, 1.0));
    }

    #[test]
    fn completion_refusals_name_code_and_param() {
        let base = || json!({"model": "m", "prompt": "p"});
        let with = |k: &str, v: Value| {
            let mut b = base();
            b[k] = v;
            b
        };
        let without = |k: &str| {
            let mut b = obj(base());
            b.remove(k);
            Value::Object(b)
        };
        for (body, code, param) in [
            (without("model"), "missing_field", "model"),
            (with("model", json!(3)), "invalid_type", "model"),
            (without("prompt"), "missing_field", "prompt"),
            (with("prompt", json!(7)), "invalid_type", "prompt"),
            (with("prompt", json!([])), "invalid_value", "prompt"),
            (
                with("prompt", json!(["a", "b"])),
                "unsupported_parameter",
                "prompt",
            ),
            (
                with("prompt", json!([1, 2, 3])),
                "unsupported_parameter",
                "prompt",
            ),
            (with("max_tokens", json!(0)), "invalid_value", "max_tokens"),
            (with("max_tokens", json!(-5)), "invalid_value", "max_tokens"),
            (
                with("max_tokens", json!(4097)),
                "max_tokens_too_large",
                "max_tokens",
            ),
            (
                with("max_tokens", json!(u64::MAX)),
                "max_tokens_too_large",
                "max_tokens",
            ),
            (
                with("max_tokens", json!(1e30)),
                "invalid_type",
                "max_tokens",
            ),
            (
                with("max_tokens", json!(16.5)),
                "invalid_type",
                "max_tokens",
            ),
            (
                with("max_tokens", json!("16")),
                "invalid_type",
                "max_tokens",
            ),
            (
                with("temperature", json!(2.01)),
                "invalid_value",
                "temperature",
            ),
            (
                with("temperature", json!(-0.5)),
                "invalid_value",
                "temperature",
            ),
            (
                with("temperature", json!("hot")),
                "invalid_type",
                "temperature",
            ),
            (with("top_p", json!(0)), "invalid_value", "top_p"),
            (with("top_p", json!(1.5)), "invalid_value", "top_p"),
            (with("seed", json!(1.5)), "invalid_type", "seed"),
            (
                with("stop", json!(["a", "b", "c", "d", "e"])),
                "invalid_value",
                "stop",
            ),
            (with("stop", json!([1])), "invalid_type", "stop[0]"),
            (with("stop", json!("")), "invalid_value", "stop"),
            (
                with("stop", json!("x".repeat(1025))),
                "invalid_value",
                "stop",
            ),
            (with("stop", json!({"a": 1})), "invalid_type", "stop"),
            (with("stream", json!("yes")), "invalid_type", "stream"),
            (
                with("stream_options", json!({"include_usage": true})),
                "invalid_value",
                "stream_options",
            ),
            (with("n", json!(2)), "unsupported_parameter", "n"),
            (with("n", json!("1")), "unsupported_parameter", "n"),
            (
                with("best_of", json!(3)),
                "unsupported_parameter",
                "best_of",
            ),
            (with("echo", json!(true)), "unsupported_parameter", "echo"),
            (
                with("logprobs", json!(1)),
                "unsupported_parameter",
                "logprobs",
            ),
            (
                with("suffix", json!("end")),
                "unsupported_parameter",
                "suffix",
            ),
            (
                with("logit_bias", json!({"50256": -100})),
                "unsupported_parameter",
                "logit_bias",
            ),
            (
                with("frequency_penalty", json!(0.5)),
                "unsupported_parameter",
                "frequency_penalty",
            ),
        ] {
            let shown = body.to_string();
            assert_eq!(
                refused(completion(body)),
                (code, Some(param.to_owned())),
                "{shown}"
            );
        }
        let mut streamed = base();
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": 1});
        assert_eq!(
            refused(completion(streamed)),
            ("invalid_type", Some("stream_options.include_usage".into()))
        );
    }

    #[test]
    fn chat_messages_and_token_limits() {
        let p = chat(json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief", "name": "ignored"},
                {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
                {"role": "assistant", "content": "ok"},
            ],
        }))
        .unwrap();
        let want = |role: &str, content: &str| ChatMessage {
            role: role.into(),
            content: content.into(),
        };
        assert_eq!(
            p.params.prompt,
            Prompt::Chat(vec![
                want("system", "be brief"),
                want("user", "one\ntwo"),
                want("assistant", "ok")
            ])
        );
        assert_eq!(
            p.params.max_tokens, CHAT_DEFAULT_MAX_TOKENS,
            "no limit given: the chat default"
        );
        let m = json!([{"role": "user", "content": "hi"}]);
        let p = chat(json!({"model": "m", "messages": m, "max_completion_tokens": 7})).unwrap();
        assert_eq!(p.params.max_tokens, 7);
        let p = chat(json!({"model": "m", "messages": m, "max_tokens": 9})).unwrap();
        assert_eq!(p.params.max_tokens, 9);
        let p =
            chat(json!({"model": "m", "messages": m, "max_tokens": 9, "max_completion_tokens": 9}))
                .unwrap();
        assert_eq!(p.params.max_tokens, 9);
        let p = chat(json!({"model": "m", "messages": m, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "logprobs": false})).unwrap();
        assert_eq!(p.params.max_tokens, CHAT_DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn chat_refusals_name_code_and_param() {
        let m = json!([{"role": "user", "content": "hi"}]);
        for (body, code, param) in [
            (json!({"model": "m"}), "missing_field", "messages"),
            (
                json!({"model": "m", "messages": "hi"}),
                "invalid_type",
                "messages",
            ),
            (
                json!({"model": "m", "messages": []}),
                "invalid_value",
                "messages",
            ),
            (
                json!({"model": "m", "messages": ["hi"]}),
                "invalid_type",
                "messages[0]",
            ),
            (
                json!({"model": "m", "messages": [{"content": "hi"}]}),
                "missing_field",
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "tool", "content": "hi"}]}),
                "invalid_value",
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user"}]}),
                "missing_field",
                "messages[0].content",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": null}]}),
                "missing_field",
                "messages[0].content",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": 5}]}),
                "invalid_type",
                "messages[0].content",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
                "unsupported_parameter",
                "messages[1].content[0].type",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}),
                "missing_field",
                "messages[0].content[0].text",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"text": "x"}]}]}),
                "missing_field",
                "messages[0].content[0].type",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": ["x"]}]}),
                "invalid_type",
                "messages[0].content[0]",
            ),
            (
                json!({"model": "m", "messages": m, "max_tokens": 0}),
                "invalid_value",
                "max_tokens",
            ),
            (
                json!({"model": "m", "messages": m, "max_completion_tokens": 100000}),
                "max_tokens_too_large",
                "max_completion_tokens",
            ),
            (
                json!({"model": "m", "messages": m, "max_tokens": 3, "max_completion_tokens": 4}),
                "invalid_value",
                "max_completion_tokens",
            ),
            (
                json!({"model": "m", "messages": m, "tools": [{"type": "function"}]}),
                "unsupported_parameter",
                "tools",
            ),
            (
                json!({"model": "m", "messages": m, "logprobs": true}),
                "unsupported_parameter",
                "logprobs",
            ),
            (
                json!({"model": "m", "messages": m, "response_format": {"type": "json_object"}}),
                "unsupported_parameter",
                "response_format",
            ),
            (
                json!({"model": "m", "messages": m, "n": 3}),
                "unsupported_parameter",
                "n",
            ),
            (json!({"messages": m}), "missing_field", "model"),
        ] {
            let shown = body.to_string();
            assert_eq!(
                refused(chat(body)),
                (code, Some(param.to_owned())),
                "{shown}"
            );
        }
    }

    #[test]
    fn long_client_strings_are_cut_in_messages() {
        let role = "r".repeat(10_000);
        let e =
            chat(json!({"model": "m", "messages": [{"role": role, "content": "x"}]})).unwrap_err();
        assert!(e.message.len() < 300, "{}", e.message);
        assert_eq!(quoted("ab"), "\"ab\"");
        assert!(quoted(&"é".repeat(100)).ends_with("\"..."));
    }

    #[test]
    fn routes() {
        assert_eq!(Route::of("/v1/models"), Route::Models);
        assert_eq!(Route::of("/v1/models/a"), Route::Model("a".into()));
        assert_eq!(
            Route::of("/v1/models/org/m-1"),
            Route::Model("org/m-1".into())
        );
        assert_eq!(
            Route::of("/v1/models/org%2Fm%20x"),
            Route::Model("org/m x".into())
        );
        assert_eq!(Route::of("/v1/models/"), Route::NotFound);
        assert_eq!(Route::of("/v1/models/%zz"), Route::NotFound);
        assert_eq!(Route::of("/v1/models/%"), Route::NotFound);
        assert_eq!(Route::of("/v1/models/%ff"), Route::NotFound, "not UTF-8");
        assert_eq!(Route::of("/v1/completions"), Route::Completions);
        assert_eq!(Route::of("/v1/chat/completions"), Route::Chat);
        assert_eq!(Route::of("/v1/chat/completions/"), Route::NotFound);
        assert_eq!(Route::of("/v1/embeddings"), Route::NotFound);
        assert_eq!(Route::of("/"), Route::NotFound);
        assert_eq!(Route::of("/v1/models/x").endpoint(), "models");
        assert_eq!(Route::of("/x").endpoint(), "other");
    }

    #[test]
    fn content_type_must_be_json() {
        let check = |v: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = v {
                h.insert(CONTENT_TYPE, HeaderValue::from_str(v).unwrap());
            }
            check_content_type(&h).map_err(|e| (e.status, e.code))
        };
        assert!(check(Some("application/json")).is_ok());
        assert!(check(Some("application/json; charset=utf-8")).is_ok());
        assert!(check(Some("Application/JSON ;charset=UTF-8")).is_ok());
        for bad in [
            None,
            Some("text/plain"),
            Some("application/jsonx"),
            Some("application/x-www-form-urlencoded"),
            Some(""),
        ] {
            assert_eq!(
                check(bad),
                Err((StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(30)), 30);
    }

    #[test]
    fn submit_errors_map_to_openai_errors() {
        let e = ApiError::from_submit(&SubmitError::QueueFull {
            model: "m".into(),
            retry_after: Duration::from_millis(2500),
        });
        assert_eq!(
            (e.status.as_u16(), e.code, e.retry_after),
            (429, "queue_full", Some(3))
        );
        assert_eq!(e.kind(), "rate_limit_error");
        let e = ApiError::from_submit(&SubmitError::UnknownModel("x".into()));
        assert_eq!(
            (e.status.as_u16(), e.code, e.kind()),
            (404, "model_not_found", "invalid_request_error")
        );
        assert_eq!(e.param.as_deref(), Some("model"));
        let e = ApiError::from_submit(&SubmitError::Draining);
        assert_eq!(
            (e.status.as_u16(), e.code, e.kind(), e.no_retry),
            (503, "node_draining", "server_error", true)
        );
        let e = ApiError::from_submit(&SubmitError::NotReady("m".into()));
        assert_eq!(
            (e.status.as_u16(), e.code, e.no_retry),
            (503, "model_not_ready", false)
        );
        let e = ApiError::from_submit(&SubmitError::TooLong("too long".into()));
        assert_eq!(
            (e.status.as_u16(), e.code),
            (400, "context_length_exceeded")
        );
        assert_eq!(
            e.to_json(),
            json!({"error": {"message": "too long", "type": "invalid_request_error", "param": null, "code": "context_length_exceeded"}})
        );
    }

    #[test]
    fn ids_are_prefixed_and_distinct() {
        let a = new_id("cmpl-");
        let b = new_id("cmpl-");
        assert!(a.starts_with("cmpl-") && a.len() == 5 + 32, "{a}");
        assert_ne!(a, b);
        assert_ne!(a[5..21], b[5..21], "the random part changes too");
    }
}

/// The API over real sockets, against a fake [`Inference`].
#[cfg(test)]
mod http_tests {
    use super::*;
    use crate::inference::ModelInfo;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::{mpsc, Notify};

    /// Long enough for anything that should happen to happen; the tests
    /// never assert how long something took.
    const PATIENCE: Duration = Duration::from_secs(20);

    /// What the fake saw.
    #[derive(Default)]
    struct Seen {
        submitted: Mutex<Vec<(String, GenerateParams)>>,
        submitted_notify: Notify,
        cancels: AtomicUsize,
        cancelled: Notify,
    }

    impl Seen {
        fn cancels(&self) -> usize {
            self.cancels.load(Ordering::SeqCst)
        }

        async fn wait_cancelled(&self) {
            tokio::time::timeout(PATIENCE, self.cancelled.notified())
                .await
                .expect("the generation was cancelled");
        }

        async fn wait_submitted(&self) {
            tokio::time::timeout(PATIENCE, self.submitted_notify.notified())
                .await
                .expect("a generation was submitted");
        }

        fn last(&self) -> (String, GenerateParams) {
            self.submitted
                .lock()
                .unwrap()
                .last()
                .cloned()
                .expect("one was submitted")
        }
    }

    /// The model decides the behaviour:
    /// - `echo`, `org/echo`: the prompt's words (a chat's last message) as
    ///   tokens, up to `max_tokens`;
    /// - `hold`: one token, then nothing until cancelled;
    /// - `broken`: one token, then an error; `broken-early`: an error;
    /// - `silent`: the sender goes away without a word;
    /// - `full`, `draining`, `quarantined`, `not-ready`, `too-long`: the
    ///   submit error of that name; anything else: unknown.
    struct Fake {
        seen: Arc<Seen>,
    }

    const MODELS: &[&str] = &[
        "echo",
        "org/echo",
        "hold",
        "broken",
        "broken-early",
        "silent",
        "full",
        "draining",
        "quarantined",
        "not-ready",
        "too-long",
    ];

    fn words(p: &Prompt) -> (Vec<String>, u32) {
        match p {
            Prompt::Text(t) => {
                let w: Vec<String> = t.split_whitespace().map(str::to_owned).collect();
                let n = w.len() as u32;
                (w, n)
            }
            Prompt::Chat(messages) => {
                let total = messages
                    .iter()
                    .map(|m| m.content.split_whitespace().count() as u32)
                    .sum();
                let last = messages.last().map(|m| m.content.as_str()).unwrap_or("");
                (last.split_whitespace().map(str::to_owned).collect(), total)
            }
        }
    }

    impl Inference for Fake {
        fn models(&self) -> Vec<ModelInfo> {
            MODELS
                .iter()
                .enumerate()
                .map(|(i, id)| ModelInfo {
                    id: (*id).to_owned(),
                    created: 1_700_000_000 + i as u64,
                    ready_workers: 1,
                })
                .collect()
        }

        fn submit(&self, model: &str, params: GenerateParams) -> Result<Generation, SubmitError> {
            match model {
                "full" => {
                    return Err(SubmitError::QueueFull {
                        model: model.to_owned(),
                        retry_after: Duration::from_millis(1500),
                    })
                }
                "draining" => return Err(SubmitError::Draining),
                "quarantined" => return Err(SubmitError::Quarantined),
                "not-ready" => return Err(SubmitError::NotReady(model.to_owned())),
                "too-long" => {
                    return Err(SubmitError::TooLong(
                        "the prompt is 9000 tokens; the model's context is 2048".to_owned(),
                    ))
                }
                "echo" | "org/echo" | "hold" | "broken" | "broken-early" | "silent" => {}
                other => return Err(SubmitError::UnknownModel(other.to_owned())),
            }
            self.seen
                .submitted
                .lock()
                .unwrap()
                .push((model.to_owned(), params.clone()));
            self.seen.submitted_notify.notify_one();
            let (tx, rx) = mpsc::channel(4);
            let stop = CancellationToken::new();
            let cancel = {
                let seen = self.seen.clone();
                let stop = stop.clone();
                CancelOnDrop::new(move || {
                    seen.cancels.fetch_add(1, Ordering::SeqCst);
                    seen.cancelled.notify_one();
                    stop.cancel();
                })
            };
            let model = model.to_owned();
            tokio::spawn(async move {
                let send = |p: Piece| {
                    let tx = tx.clone();
                    async move { tx.send(p).await.is_ok() }
                };
                match model.as_str() {
                    "hold" => {
                        send(Piece::Token {
                            text: "held".into(),
                        })
                        .await;
                        stop.cancelled().await;
                    }
                    "broken" => {
                        send(Piece::Token {
                            text: "partial".into(),
                        })
                        .await;
                        send(Piece::Error {
                            code: "worker_died",
                            message: "the worker exited".into(),
                        })
                        .await;
                    }
                    "broken-early" => {
                        send(Piece::Error {
                            code: "worker_died",
                            message: "the worker exited".into(),
                        })
                        .await;
                    }
                    "silent" => {}
                    _ => {
                        let (w, prompt_tokens) = words(&params.prompt);
                        let n = w.len().min(params.max_tokens as usize);
                        for (i, word) in w.iter().take(n).enumerate() {
                            let text = if i == 0 {
                                word.clone()
                            } else {
                                format!(" {word}")
                            };
                            if !send(Piece::Token { text }).await {
                                return;
                            }
                        }
                        send(Piece::Done {
                            finish_reason: if n < w.len() {
                                FinishReason::Length
                            } else {
                                FinishReason::Stop
                            },
                            prompt_tokens,
                            completion_tokens: n as u32,
                        })
                        .await;
                    }
                }
            });
            Ok(Generation { pieces: rx, cancel })
        }
    }

    use crate::inference::CancelOnDrop;

    struct Server {
        addr: SocketAddr,
        seen: Arc<Seen>,
        metrics: Metrics,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn test_config() -> ApiConfig {
        ApiConfig {
            enabled: true,
            max_body_bytes: 4096,
            ..ApiConfig::default()
        }
    }

    async fn start(cfg: ApiConfig) -> Server {
        start_tls(cfg, None).await
    }

    async fn start_tls(cfg: ApiConfig, tls: Option<Tls>) -> Server {
        let listener = ApiListener::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let fake = Fake { seen: seen.clone() };
        let metrics = Metrics::new("test-node");
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            Arc::new(fake),
            cfg,
            tls,
            metrics.clone(),
            stop.clone(),
            Duration::from_millis(200),
        ));
        Server {
            addr,
            seen,
            metrics,
            stop,
            task,
        }
    }

    impl Server {
        fn metrics_text(&self) -> String {
            String::from_utf8(self.metrics.render().0).unwrap()
        }
    }

    /// An HTTP/1.1 response head.
    #[derive(Debug)]
    struct Head {
        status: u16,
        headers: Vec<(String, String)>,
    }

    impl Head {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    #[derive(Debug)]
    struct Reply {
        head: Head,
        body: Vec<u8>,
    }

    impl Reply {
        fn status(&self) -> u16 {
            self.head.status
        }

        fn json(&self) -> Value {
            serde_json::from_slice(&self.body)
                .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
        }

        /// The error object's code, after checking its shape.
        fn error_code(&self) -> String {
            let v = self.json();
            let e = v["error"].as_object().unwrap_or_else(|| panic!("{v}"));
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
            assert!(e["type"].is_string(), "{v}");
            assert!(e.contains_key("param"), "{v}");
            assert_eq!(self.head.header("content-type"), Some("application/json"));
            e["code"].as_str().unwrap().to_owned()
        }
    }

    /// A deliberately small HTTP/1.1 client, so tests control every byte
    /// and when the connection goes away.
    struct Client<S> {
        io: S,
        buf: Vec<u8>,
    }

    impl Client<TcpStream> {
        async fn connect(addr: SocketAddr) -> Client<TcpStream> {
            Client::new(TcpStream::connect(addr).await.unwrap())
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
        fn new(io: S) -> Client<S> {
            Client {
                io,
                buf: Vec::new(),
            }
        }

        async fn write(&mut self, bytes: &[u8]) {
            self.io.write_all(bytes).await.unwrap();
            self.io.flush().await.unwrap();
        }

        /// Reads more; false at the end of the stream.
        async fn fill(&mut self) -> bool {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(PATIENCE, self.io.read(&mut chunk))
                .await
                .expect("the server answers")
                .unwrap_or(0);
            self.buf.extend_from_slice(&chunk[..n]);
            n > 0
        }

        async fn line(&mut self) -> String {
            loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    let line = String::from_utf8(self.buf[..i].to_vec()).unwrap();
                    self.buf.drain(..i + 2);
                    return line;
                }
                assert!(self.fill().await, "the connection ended mid-line");
            }
        }

        async fn head(&mut self) -> Head {
            let status_line = self.line().await;
            let status = status_line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("status line {status_line:?}"));
            let mut headers = Vec::new();
            loop {
                let line = self.line().await;
                if line.is_empty() {
                    return Head { status, headers };
                }
                let (n, v) = line.split_once(':').unwrap();
                headers.push((n.trim().to_owned(), v.trim().to_owned()));
            }
        }

        async fn exact(&mut self, n: usize) -> Vec<u8> {
            while self.buf.len() < n {
                assert!(self.fill().await, "the connection ended mid-body");
            }
            self.buf.drain(..n).collect()
        }

        /// The next chunk of a chunked body; `None` at its end.
        async fn chunk(&mut self) -> Option<Vec<u8>> {
            let size = self.line().await;
            let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
            if size == 0 {
                assert_eq!(self.line().await, "", "no trailers");
                return None;
            }
            let data = self.exact(size).await;
            assert_eq!(self.exact(2).await, b"\r\n");
            Some(data)
        }

        async fn body(&mut self, head: &Head) -> Vec<u8> {
            if head.header("transfer-encoding") == Some("chunked") {
                let mut body = Vec::new();
                while let Some(c) = self.chunk().await {
                    body.extend(c);
                }
                body
            } else {
                let n: usize = head
                    .header("content-length")
                    .expect("a length or chunks")
                    .parse()
                    .unwrap();
                self.exact(n).await
            }
        }

        async fn reply(&mut self) -> Reply {
            let head = self.head().await;
            let body = self.body(&head).await;
            Reply { head, body }
        }

        /// True if the server closed the connection without a response.
        async fn closed_without_reply(&mut self) -> bool {
            !self.fill().await && self.buf.is_empty()
        }
    }

    fn request(method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
        let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nUser-Agent: OpenAI/Python 1.0\r\nAuthorization: Bearer unused\r\n");
        if let Some(ct) = content_type {
            r.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        if method == "POST" || !body.is_empty() {
            r.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        r.push_str("\r\n");
        let mut r = r.into_bytes();
        r.extend_from_slice(body);
        r
    }

    async fn send(
        addr: SocketAddr,
        method: &str,
        path: &str,
        ct: Option<&str>,
        body: &[u8],
    ) -> Reply {
        let mut c = Client::connect(addr).await;
        c.write(&request(method, path, ct, body)).await;
        c.reply().await
    }

    async fn get(addr: SocketAddr, path: &str) -> Reply {
        send(addr, "GET", path, None, b"").await
    }

    async fn post(addr: SocketAddr, path: &str, body: Value) -> Reply {
        post_raw(addr, path, body.to_string().as_bytes()).await
    }

    async fn post_raw(addr: SocketAddr, path: &str, body: &[u8]) -> Reply {
        send(addr, "POST", path, Some("application/json"), body).await
    }

    /// A streamed response, read event by event.
    struct Events<S> {
        client: Client<S>,
        head: Head,
        pending: Vec<u8>,
    }

    #[derive(Debug, PartialEq)]
    enum Event {
        Data(Value),
        Done,
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> Events<S> {
        async fn open(mut client: Client<S>, path: &str, body: Value) -> Events<S> {
            client
                .write(&request(
                    "POST",
                    path,
                    Some("application/json"),
                    body.to_string().as_bytes(),
                ))
                .await;
            let head = client.head().await;
            assert_eq!(head.status, 200, "{head:?}");
            assert_eq!(head.header("content-type"), Some("text/event-stream"));
            assert_eq!(head.header("transfer-encoding"), Some("chunked"));
            Events {
                client,
                head,
                pending: Vec::new(),
            }
        }

        /// The next event; `None` when the body has ended.
        async fn next(&mut self) -> Option<Event> {
            loop {
                if let Some(i) = self.pending.windows(2).position(|w| w == b"\n\n") {
                    let raw: Vec<u8> = self.pending.drain(..i + 2).collect();
                    let text = std::str::from_utf8(&raw[..i]).unwrap();
                    let data = text
                        .strip_prefix("data: ")
                        .unwrap_or_else(|| panic!("not a data event: {text:?}"));
                    assert!(!data.contains('\n'), "one line per event");
                    return Some(if data == "[DONE]" {
                        Event::Done
                    } else {
                        Event::Data(serde_json::from_str(data).unwrap())
                    });
                }
                match self.client.chunk().await {
                    Some(c) => self.pending.extend(c),
                    None => {
                        assert!(self.pending.is_empty(), "a partial event at the end");
                        return None;
                    }
                }
            }
        }

        async fn data(&mut self) -> Value {
            match self.next().await {
                Some(Event::Data(v)) => v,
                other => panic!("expected a data event, got {other:?}"),
            }
        }
    }

    async fn events(addr: SocketAddr, path: &str, body: Value) -> Events<TcpStream> {
        Events::open(Client::connect(addr).await, path, body).await
    }

    fn created_is_now(v: &Value) {
        let created = v["created"].as_u64().unwrap();
        let now = unix_now();
        assert!(created <= now && created + 3600 > now, "{v}");
    }

    #[tokio::test]
    async fn models_are_listed_and_looked_up() {
        let s = start(test_config()).await;
        let r = get(s.addr, "/v1/models").await;
        assert_eq!(r.status(), 200);
        let v = r.json();
        assert_eq!(v["object"], "list");
        let data = v["data"].as_array().unwrap();
        let ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(ids, MODELS);
        assert_eq!(
            data[0],
            json!({"id": "echo", "object": "model", "created": 1_700_000_000u64, "owned_by": "ccnode"})
        );
        let r = get(s.addr, "/v1/models/hold").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.json()["id"], "hold");
        assert_eq!(r.json()["created"], 1_700_000_002u64);
        for path in ["/v1/models/org/echo", "/v1/models/org%2Fecho"] {
            let r = get(s.addr, path).await;
            assert_eq!(
                (r.status(), r.json()["id"].clone()),
                (200, json!("org/echo")),
                "{path}"
            );
        }
        let r = get(s.addr, "/v1/models/gpt-4").await;
        assert_eq!(r.status(), 404);
        assert_eq!(r.error_code(), "model_not_found");
        assert_eq!(r.json()["error"]["param"], "model");
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    }

    #[tokio::test]
    async fn a_completion_echoes_with_usage_and_defaults() {
        let s = start(test_config()).await;
        let r = post(
            s.addr,
            "/v1/completions",
            json!({"model": "echo", "prompt": "one two three", "max_tokens": 2}),
        )
        .await;
        assert_eq!(r.status(), 200, "{:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.head.header("content-type"), Some("application/json"));
        let v = r.json();
        assert!(v["id"].as_str().unwrap().starts_with("cmpl-"), "{v}");
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["model"], "echo");
        created_is_now(&v);
        assert_eq!(
            v["choices"],
            json!([{"index": 0, "text": "one two", "logprobs": null, "finish_reason": "length"}])
        );
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
        );
        let (model, params) = s.seen.last();
        assert_eq!(model, "echo");
        assert_eq!(params.max_tokens, 2);
        assert_eq!(
            (params.temperature, params.top_p, params.seed),
            (1.0, 1.0, None)
        );

        // Defaults, a one-string array, sampling passed through.
        let r = post(
            s.addr,
            "/v1/completions",
            json!({"model": "echo", "prompt": ["a b"], "temperature": 0, "top_p": 0.5, "seed": 42, "stop": ["\n", "END"], "user": "u", "not_an_openai_field": true}),
        )
        .await;
        assert_eq!(r.status(), 200);
        let v = r.json();
        assert_eq!(v["choices"][0]["text"], "a b");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["total_tokens"], 4);
        let (_, params) = s.seen.last();
        assert_eq!(params.prompt, Prompt::Text("a b".into()));
        assert_eq!(params.max_tokens, 16, "OpenAI's default");
        assert_eq!(
            (params.temperature, params.top_p, params.seed),
            (0.0, 0.5, Some(42))
        );
        assert_eq!(params.stop, ["\n", "END"]);
        assert_eq!(
            s.seen.cancels(),
            0,
            "finished generations are not cancelled"
        );
    }

    #[tokio::test]
    async fn a_chat_completion_answers_as_the_assistant() {
        let s = start(test_config()).await;
        let r = post(
            s.addr,
            "/v1/chat/completions",
            json!({
                "model": "echo",
                "messages": [
                    {"role": "system", "content": "you echo"},
                    {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]},
                ],
                "max_completion_tokens": 5,
            }),
        )
        .await;
        assert_eq!(r.status(), 200, "{:?}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"), "{v}");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "echo");
        created_is_now(&v);
        assert_eq!(
            v["choices"],
            json!([{
                "index": 0,
                "message": {"role": "assistant", "content": "hello there", "refusal": null},
                "logprobs": null,
                "finish_reason": "stop",
            }])
        );
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6})
        );
        let (_, params) = s.seen.last();
        assert_eq!(params.max_tokens, 5);
        assert_eq!(
            params.prompt,
            Prompt::Chat(vec![
                ChatMessage {
                    role: "system".into(),
                    content: "you echo".into()
                },
                ChatMessage {
                    role: "user".into(),
                    content: "hello\nthere".into()
                },
            ])
        );
        // No limit given: the chat default.
        let r = post(
            s.addr,
            "/v1/chat/completions",
            json!({"model": "echo", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
        assert_eq!(r.status(), 200);
        assert_eq!(s.seen.last().1.max_tokens, CHAT_DEFAULT_MAX_TOKENS);
    }

    #[tokio::test]
    async fn a_streamed_completion_is_chunks_then_usage_then_done() {
        let s = start(test_config()).await;
        let mut ev = events(
            s.addr,
            "/v1/completions",
            json!({"model": "echo", "prompt": "one two three", "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
        assert_eq!(ev.head.header("cache-control"), Some("no-cache"));
        let mut ids = Vec::new();
        for text in ["one", " two", " three"] {
            let c = ev.data().await;
            assert_eq!(c["object"], "text_completion");
            assert_eq!(c["model"], "echo");
            created_is_now(&c);
            assert_eq!(
                c["choices"],
                json!([{"index": 0, "text": text, "logprobs": null, "finish_reason": null}])
            );
            assert_eq!(c["usage"], Value::Null);
            assert!(c.as_object().unwrap().contains_key("usage"));
            ids.push(c["id"].clone());
        }
        let last = ev.data().await;
        assert_eq!(
            last["choices"],
            json!([{"index": 0, "text": "", "logprobs": null, "finish_reason": "stop"}])
        );
        let u = ev.data().await;
        assert_eq!(u["choices"], json!([]));
        assert_eq!(
            u["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6})
        );
        ids.push(last["id"].clone());
        ids.push(u["id"].clone());
        assert!(
            ids.iter().all(|i| i == &ids[0]),
            "one id per response: {ids:?}"
        );
        assert!(ids[0].as_str().unwrap().starts_with("cmpl-"));
        assert_eq!(ev.next().await, Some(Event::Done));
        assert_eq!(ev.next().await, None);
        assert_eq!(s.seen.cancels(), 0);
    }

    #[tokio::test]
    async fn a_streamed_chat_is_role_then_deltas_then_finish_then_done() {
        let s = start(test_config()).await;
        let mut ev = events(
            s.addr,
            "/v1/chat/completions",
            json!({"model": "echo", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 2, "stream": true}),
        )
        .await;
        let first = ev.data().await;
        assert_eq!(first["object"], "chat.completion.chunk");
        assert!(first["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(
            first["choices"],
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}])
        );
        assert!(
            first.get("usage").is_none(),
            "no usage unless asked: {first}"
        );
        for text in ["a", " b"] {
            let c = ev.data().await;
            assert_eq!(c["id"], first["id"]);
            assert_eq!(
                c["choices"],
                json!([{"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null}])
            );
        }
        let last = ev.data().await;
        assert_eq!(
            last["choices"],
            json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "length"}])
        );
        assert_eq!(ev.next().await, Some(Event::Done));
        assert_eq!(ev.next().await, None);

        // With usage asked for, a last chunk without choices carries it.
        let mut ev = events(
            s.addr,
            "/v1/chat/completions",
            json!({"model": "echo", "messages": [{"role": "user", "content": "a"}], "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
        assert_eq!(ev.data().await["usage"], Value::Null);
        assert_eq!(ev.data().await["choices"][0]["delta"]["content"], "a");
        assert_eq!(ev.data().await["choices"][0]["finish_reason"], "stop");
        let u = ev.data().await;
        assert_eq!(
            (
                u["choices"].clone(),
                u["usage"]["completion_tokens"].clone()
            ),
            (json!([]), json!(1))
        );
        assert_eq!(ev.next().await, Some(Event::Done));
    }

    #[tokio::test]
    async fn generation_errors_are_500s_or_error_events() {
        let s = start(test_config()).await;
        // Mid-stream: an error event, then the end (no [DONE]).
        let mut ev = events(
            s.addr,
            "/v1/chat/completions",
            json!({"model": "broken", "messages": [{"role": "user", "content": "x"}], "stream": true}),
        )
        .await;
        assert_eq!(ev.data().await["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(ev.data().await["choices"][0]["delta"]["content"], "partial");
        let e = ev.data().await;
        assert_eq!(
            e,
            json!({"error": {"message": "the worker exited", "type": "server_error", "param": null, "code": "worker_died"}})
        );
        assert_eq!(ev.next().await, None, "the stream ends after an error");

        // Not streamed, or failed before the first token: a plain 500.
        for (model, stream, code) in [
            ("broken", false, "worker_died"),
            ("broken-early", true, "worker_died"),
            ("broken-early", false, "worker_died"),
            ("silent", true, "generation_ended"),
            ("silent", false, "generation_ended"),
        ] {
            let r = post(
                s.addr,
                "/v1/completions",
                json!({"model": model, "prompt": "x", "stream": stream}),
            )
            .await;
            assert_eq!(r.status(), 500, "{model} {stream}");
            assert_eq!(r.error_code(), code, "{model} {stream}");
            assert_eq!(r.json()["error"]["type"], "server_error");
        }
        let text = s.metrics_text();
        assert!(
            text.contains(
                r#"ccnode_api_requests_total{endpoint="completions",model="silent",status="500"} 2"#
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn refusals_have_openai_statuses_codes_and_headers() {
        let s = start(test_config()).await;
        let c = "/v1/completions";
        let ch = "/v1/chat/completions";
        let ok_chat =
            |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        for (path, body, status, code) in [
            (c, b"{\"model\": \"echo\", ".to_vec(), 400, "invalid_json"),
            (c, b"not json".to_vec(), 400, "invalid_json"),
            (c, b"".to_vec(), 400, "invalid_json"),
            (c, b"[1, 2]".to_vec(), 400, "invalid_json"),
            (ch, b"\"a string\"".to_vec(), 400, "invalid_json"),
            (
                c,
                br#"{"model": "echo", "prompt": "x", "max_tokens": 1000000}"#.to_vec(),
                400,
                "max_tokens_too_large",
            ),
            (
                c,
                br#"{"model": "echo", "prompt": "x", "max_tokens": 0}"#.to_vec(),
                400,
                "invalid_value",
            ),
            (
                c,
                br#"{"model": "echo", "prompt": "x", "temperature": 3}"#.to_vec(),
                400,
                "invalid_value",
            ),
            (
                c,
                br#"{"model": "echo", "prompt": "x", "stream": 1}"#.to_vec(),
                400,
                "invalid_type",
            ),
            (c, br#"{"model": "echo"}"#.to_vec(), 400, "missing_field"),
            (
                ch,
                br#"{"model": "echo", "messages": [{"role": "tool", "content": "x"}]}"#.to_vec(),
                400,
                "invalid_value",
            ),
            (
                c,
                br#"{"model": "echo", "prompt": "x", "n": 2}"#.to_vec(),
                400,
                "unsupported_parameter",
            ),
            (
                c,
                br#"{"model": "gpt-4o", "prompt": "x"}"#.to_vec(),
                404,
                "model_not_found",
            ),
            (
                ch,
                ok_chat("too-long").to_string().into_bytes(),
                400,
                "context_length_exceeded",
            ),
            (
                ch,
                ok_chat("not-ready").to_string().into_bytes(),
                503,
                "model_not_ready",
            ),
            (
                ch,
                ok_chat("quarantined").to_string().into_bytes(),
                503,
                "node_quarantined",
            ),
        ] {
            let r = post_raw(s.addr, path, &body).await;
            let shown = String::from_utf8_lossy(&body);
            assert_eq!(r.status(), status, "{shown}");
            assert_eq!(r.error_code(), code, "{shown}");
        }

        let r = post(s.addr, c, json!({"model": "full", "prompt": "x"})).await;
        assert_eq!(r.status(), 429);
        assert_eq!(r.error_code(), "queue_full");
        assert_eq!(r.json()["error"]["type"], "rate_limit_error");
        assert_eq!(r.head.header("retry-after"), Some("2"), "1.5 s rounds up");

        let r = post(s.addr, ch, ok_chat("draining")).await;
        assert_eq!(r.status(), 503);
        assert_eq!(r.error_code(), "node_draining");
        assert_eq!(r.json()["error"]["type"], "server_error");
        assert_eq!(r.head.header("x-should-retry"), Some("false"));
        assert_eq!(r.head.header("retry-after"), None);

        let r = get(s.addr, "/v1/embeddings").await;
        assert_eq!((r.status(), r.error_code()), (404, "not_found".into()));
        let r = post(s.addr, "/v2/chat/completions", ok_chat("echo")).await;
        assert_eq!((r.status(), r.error_code()), (404, "not_found".into()));

        let r = get(s.addr, c).await;
        assert_eq!(
            (r.status(), r.error_code()),
            (405, "method_not_allowed".into())
        );
        assert_eq!(r.head.header("allow"), Some("POST"));
        let r = post(s.addr, "/v1/models", json!({})).await;
        assert_eq!(
            (r.status(), r.error_code()),
            (405, "method_not_allowed".into())
        );
        assert_eq!(r.head.header("allow"), Some("GET"));
        let r = send(s.addr, "DELETE", "/v1/models/echo", None, b"").await;
        assert_eq!(r.status(), 405);

        let body = json!({"model": "echo", "prompt": "x"}).to_string();
        for ct in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
        ] {
            let r = send(s.addr, "POST", c, ct, body.as_bytes()).await;
            assert_eq!(
                (r.status(), r.error_code()),
                (415, "unsupported_media_type".into()),
                "{ct:?}"
            );
        }
        for ct in ["application/json; charset=utf-8", "Application/JSON"] {
            let r = send(s.addr, "POST", c, Some(ct), body.as_bytes()).await;
            assert_eq!(r.status(), 200, "{ct}");
        }
    }

    #[tokio::test]
    async fn oversize_bodies_are_413_declared_or_chunked() {
        let s = start(test_config()).await;
        // Declared too large: refused before a byte of body is sent.
        let mut c = Client::connect(s.addr).await;
        c.write(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 4097\r\n\r\n").await;
        let r = c.reply().await;
        assert_eq!((r.status(), r.error_code()), (413, "body_too_large".into()));

        // Exactly at the limit is read (and parsed).
        let mut body = json!({"model": "echo", "prompt": "x"})
            .to_string()
            .into_bytes();
        body.resize(4096, b' ');
        let r = post_raw(s.addr, "/v1/completions", &body).await;
        assert_eq!(r.status(), 200);

        // Chunked, no length: refused once it passes the limit.
        let mut c = Client::connect(s.addr).await;
        c.write(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").await;
        let chunk = vec![b' '; 1024];
        for _ in 0..5 {
            c.write(format!("{:x}\r\n", chunk.len()).as_bytes()).await;
            c.write(&chunk).await;
            c.write(b"\r\n").await;
        }
        let r = c.reply().await;
        assert_eq!((r.status(), r.error_code()), (413, "body_too_large".into()));
        assert!(
            s.seen.submitted.lock().unwrap().len() == 1,
            "only the one within the limit"
        );
    }

    #[tokio::test]
    async fn a_client_sending_a_refused_body_still_reads_the_refusal() {
        // The client writes its whole body before reading, as HTTP clients
        // do; the server must not reset the connection under it, whatever
        // it refuses the request for.
        let s = start(test_config()).await;
        let body = vec![b' '; 4 << 20];
        for (method, path, content_type, status, code) in [
            (
                "POST",
                "/v1/completions",
                "application/json",
                413,
                "body_too_large",
            ),
            (
                "POST",
                "/v1/embeddings",
                "application/json",
                404,
                "not_found",
            ),
            (
                "PUT",
                "/v1/completions",
                "application/json",
                405,
                "method_not_allowed",
            ),
            (
                "POST",
                "/v1/completions",
                "text/plain",
                415,
                "unsupported_media_type",
            ),
        ] {
            for declared in [true, false] {
                for _ in 0..5 {
                    let mut c = Client::connect(s.addr).await;
                    let head = format!(
                        "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n"
                    );
                    if declared {
                        c.write(format!("{head}Content-Length: {}\r\n\r\n", body.len()).as_bytes())
                            .await;
                        c.write(&body).await;
                    } else {
                        c.write(format!("{head}Transfer-Encoding: chunked\r\n\r\n").as_bytes())
                            .await;
                        for piece in body.chunks(16 * 1024) {
                            c.write(format!("{:x}\r\n", piece.len()).as_bytes()).await;
                            c.write(piece).await;
                            c.write(b"\r\n").await;
                        }
                        c.write(b"0\r\n\r\n").await;
                    }
                    let r = c.reply().await;
                    assert_eq!(
                        (r.status(), r.error_code()),
                        (status, code.into()),
                        "{method} {path} {content_type}, declared: {declared}"
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn a_body_that_does_not_arrive_in_time_is_408() {
        let s = start(ApiConfig {
            request_timeout: Duration::from_millis(50),
            ..test_config()
        })
        .await;
        let mut c = Client::connect(s.addr).await;
        c.write(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"").await;
        let r = c.reply().await;
        assert_eq!(
            (r.status(), r.error_code()),
            (408, "request_timeout".into())
        );
        assert!(s.seen.submitted.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_client_leaving_mid_stream_cancels_the_generation() {
        let s = start(test_config()).await;
        let mut ev = events(
            s.addr,
            "/v1/chat/completions",
            json!({"model": "hold", "messages": [{"role": "user", "content": "x"}], "stream": true}),
        )
        .await;
        assert_eq!(ev.data().await["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(ev.data().await["choices"][0]["delta"]["content"], "held");
        assert_eq!(s.seen.cancels(), 0, "still running");
        drop(ev);
        s.seen.wait_cancelled().await;
        assert_eq!(s.seen.cancels(), 1);
        let text = s.metrics_text();
        assert!(text.contains(r#"ccnode_api_requests_total{endpoint="chat_completions",model="hold",status="200"} 1"#), "{text}");
    }

    #[tokio::test]
    async fn a_client_leaving_before_the_answer_cancels_the_generation() {
        let s = start(test_config()).await;
        // Bytes after the request (a stray CRLF, as some old clients send
        // after a body, or a pipelined request) must not hide the close.
        let trailers: [&[u8]; 3] = [b"", b"\r\n", b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n"];
        let mut cancels = 0;
        for trailing in trailers {
            for stream in [false, true] {
                let mut c = Client::connect(s.addr).await;
                let mut bytes = request(
                    "POST",
                    "/v1/completions",
                    Some("application/json"),
                    json!({"model": "hold", "prompt": "x", "stream": stream, "max_tokens": 4})
                        .to_string()
                        .as_bytes(),
                );
                bytes.extend_from_slice(trailing);
                c.write(&bytes).await;
                if stream {
                    // A stream's answer starts with its first piece; the
                    // generation then waits.
                    assert_eq!(c.head().await.status, 200);
                } else {
                    s.seen.wait_submitted().await;
                }
                assert_eq!(s.seen.cancels(), cancels);
                drop(c);
                s.seen.wait_cancelled().await;
                cancels += 1;
                assert_eq!(s.seen.cancels(), cancels, "{trailing:?}, stream: {stream}");
            }
        }
    }

    #[tokio::test]
    async fn shutdown_ends_open_streams_after_the_grace_period() {
        let s = start(test_config()).await;
        let mut ev = events(
            s.addr,
            "/v1/completions",
            json!({"model": "hold", "prompt": "x", "stream": true}),
        )
        .await;
        assert_eq!(ev.data().await["choices"][0]["text"], "held");
        s.stop.cancel();
        tokio::time::timeout(PATIENCE, s.task)
            .await
            .expect("serve returns after the grace period")
            .unwrap();
        assert_eq!(
            s.seen.cancels(),
            1,
            "the open stream's generation was cancelled"
        );
        // Its connection was closed mid-body: no [DONE], no last chunk, so
        // the client sees the answer is incomplete.
        while ev.client.fill().await {}
        let rest = String::from_utf8_lossy(&ev.client.buf).into_owned();
        assert!(
            !rest.contains("[DONE]") && !rest.ends_with("0\r\n\r\n"),
            "{rest:?}"
        );
        assert!(
            TcpStream::connect(s.addr).await.is_err(),
            "the listener is closed"
        );
    }

    #[tokio::test]
    async fn requests_are_served_concurrently() {
        let s = start(test_config()).await;
        // A generation that never ends does not hold up the others.
        let mut held = events(
            s.addr,
            "/v1/completions",
            json!({"model": "hold", "prompt": "x", "stream": true}),
        )
        .await;
        assert_eq!(held.data().await["choices"][0]["text"], "held");
        let mut tasks = Vec::new();
        for i in 0..24 {
            let addr = s.addr;
            tasks.push(tokio::spawn(async move {
                let prompt = format!("request {i} of many");
                match i % 4 {
                    0 => {
                        let r = post(addr, "/v1/completions", json!({"model": "echo", "prompt": prompt})).await;
                        r.json()["choices"][0]["text"].as_str().unwrap().to_owned()
                    }
                    1 => {
                        let r = post(addr, "/v1/chat/completions", json!({"model": "echo", "messages": [{"role": "user", "content": prompt}]})).await;
                        r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_owned()
                    }
                    _ => {
                        let chat = i % 4 == 3;
                        let body = if chat {
                            json!({"model": "echo", "messages": [{"role": "user", "content": prompt}], "stream": true})
                        } else {
                            json!({"model": "echo", "prompt": prompt, "stream": true})
                        };
                        let path = if chat { "/v1/chat/completions" } else { "/v1/completions" };
                        let mut ev = events(addr, path, body).await;
                        let mut text = String::new();
                        while let Some(Event::Data(c)) = ev.next().await {
                            let choice = &c["choices"][0];
                            let piece = if chat { &choice["delta"]["content"] } else { &choice["text"] };
                            text.push_str(piece.as_str().unwrap_or(""));
                        }
                        text
                    }
                }
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), format!("request {i} of many"));
        }
        assert_eq!(s.seen.cancels(), 0);
        drop(held);
        s.seen.wait_cancelled().await;
    }

    #[tokio::test]
    async fn a_kept_alive_connection_serves_several_requests() {
        let s = start(test_config()).await;
        let mut c = Client::connect(s.addr).await;
        for prompt in ["first", "second"] {
            c.write(&request(
                "POST",
                "/v1/completions",
                Some("application/json"),
                json!({"model": "echo", "prompt": prompt})
                    .to_string()
                    .as_bytes(),
            ))
            .await;
            let r = c.reply().await;
            assert_eq!(r.json()["choices"][0]["text"], prompt);
        }
        c.write(&request("GET", "/v1/models/echo", None, b"")).await;
        assert_eq!(c.reply().await.status(), 200);
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_and_counted() {
        let s = start(ApiConfig {
            max_connections: 1,
            ..test_config()
        })
        .await;
        let mut held = events(
            s.addr,
            "/v1/completions",
            json!({"model": "hold", "prompt": "x", "stream": true}),
        )
        .await;
        assert_eq!(held.data().await["choices"][0]["text"], "held");
        let mut c = Client::connect(s.addr).await;
        // The write may fail once the server has closed it.
        let _ =
            c.io.write_all(&request("GET", "/v1/models", None, b""))
                .await;
        assert!(c.closed_without_reply().await);
        assert!(s
            .metrics_text()
            .contains("ccnode_api_refused_connections_total 1"));
        drop(held);
        s.seen.wait_cancelled().await;
    }

    #[tokio::test]
    async fn metrics_count_requests_tokens_and_timings_with_closed_labels() {
        let s = start(test_config()).await;
        for _ in 0..2 {
            let r = post(
                s.addr,
                "/v1/completions",
                json!({"model": "echo", "prompt": "a b c"}),
            )
            .await;
            assert_eq!(r.status(), 200);
        }
        let mut ev = events(s.addr, "/v1/chat/completions", json!({"model": "echo", "messages": [{"role": "user", "content": "d e"}], "stream": true})).await;
        while ev.next().await.is_some() {}
        let r = post(
            s.addr,
            "/v1/completions",
            json!({"model": "a-client-chosen-name", "prompt": "x"}),
        )
        .await;
        assert_eq!(r.status(), 404);
        let r = post_raw(s.addr, "/v1/completions", b"{").await;
        assert_eq!(r.status(), 400);
        let r = post(
            s.addr,
            "/v1/completions",
            json!({"model": "full", "prompt": "x"}),
        )
        .await;
        assert_eq!(r.status(), 429);
        let r = get(s.addr, "/v1/models").await;
        assert_eq!(r.status(), 200);
        let r = get(s.addr, "/v1/models/another-client-name").await;
        assert_eq!(r.status(), 404);
        let r = get(s.addr, "/client/chosen/path").await;
        assert_eq!(r.status(), 404);

        let text = s.metrics_text();
        for line in [
            r#"ccnode_api_requests_total{endpoint="completions",model="echo",status="200"} 2"#,
            r#"ccnode_api_requests_total{endpoint="chat_completions",model="echo",status="200"} 1"#,
            r#"ccnode_api_requests_total{endpoint="completions",model="unknown",status="404"} 1"#,
            r#"ccnode_api_requests_total{endpoint="completions",model="unknown",status="400"} 1"#,
            r#"ccnode_api_requests_total{endpoint="completions",model="full",status="429"} 1"#,
            r#"ccnode_api_requests_total{endpoint="models",model="unknown",status="200"} 1"#,
            r#"ccnode_api_requests_total{endpoint="models",model="unknown",status="404"} 1"#,
            r#"ccnode_api_requests_total{endpoint="other",model="unknown",status="404"} 1"#,
            r#"ccnode_api_tokens_generated_total{model="echo"} 8"#,
            // One first token per generation, and the gaps between the rest.
            r#"ccnode_api_time_to_first_token_seconds_count{model="echo"} 3"#,
            r#"ccnode_api_inter_token_seconds_count{model="echo"} 5"#,
            r#"ccnode_api_time_to_first_token_seconds_bucket{model="echo",le="+Inf"} 3"#,
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
        assert!(
            !text.contains("client"),
            "no client-chosen label values:\n{text}"
        );
    }

    /// A self-signed certificate for 127.0.0.1, by openssl.
    fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
        std::fs::create_dir_all(dir).unwrap();
        let cert = dir.join("api.crt");
        let key = dir.join("api.key");
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=ccnode-api-test"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        (cert, key)
    }

    #[tokio::test]
    async fn over_tls_the_same_api_is_served() {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName};
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path());
        let cfg = ApiConfig {
            tls_cert: Some(cert.clone()),
            tls_key: Some(key),
            ..test_config()
        };
        let tls = load_tls(&cfg).unwrap().expect("configured");
        assert!(load_tls(&test_config()).unwrap().is_none());
        let missing = ApiConfig {
            tls_cert: Some(dir.path().join("absent.crt")),
            ..cfg.clone()
        };
        let err = load_tls(&missing).unwrap_err().to_string();
        assert!(
            err.starts_with("api TLS: cannot open") && err.contains("absent.crt"),
            "{err}"
        );
        let (_, other_key) = self_signed(&dir.path().join("other"));
        let mismatched = ApiConfig {
            tls_key: Some(other_key),
            ..cfg.clone()
        };
        let err = load_tls(&mismatched).unwrap_err().to_string();
        assert!(err.contains("certificate and key"), "{err}");
        let s = start_tls(cfg, Some(tls)).await;

        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&cert).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = TcpStream::connect(s.addr).await.unwrap();
        let io = connector
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .unwrap();
        let mut ev = Events::open(
            Client::new(io),
            "/v1/completions",
            json!({"model": "echo", "prompt": "over tls", "stream": true}),
        )
        .await;
        assert_eq!(ev.data().await["choices"][0]["text"], "over");
        assert_eq!(ev.data().await["choices"][0]["text"], " tls");
        assert_eq!(ev.data().await["choices"][0]["finish_reason"], "stop");
        assert_eq!(ev.next().await, Some(Event::Done));

        // Plain HTTP to the TLS port gets no answer.
        let mut c = Client::connect(s.addr).await;
        let _ =
            c.io.write_all(&request("GET", "/v1/models", None, b""))
                .await;
        assert!(!String::from_utf8_lossy(&{
            while c.fill().await {}
            c.buf.clone()
        })
        .contains("\"object\""));
    }
}
