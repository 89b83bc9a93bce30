//! The HTTP endpoint: `/metrics` for Prometheus, `/healthz` (the process
//! is alive and serving) and `/readyz` (the node takes work).
//!
//! Bounded: a connection cap (more are closed on accept and counted), a
//! deadline for request headers, a cap on header size, a cap on the
//! declared body size, and a deadline for each write to make progress
//! (a client that does not read its answers is closed). The endpoints take
//! no body.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;
use crate::node::Node;

/// Largest request head accepted, in bytes.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The bound HTTP listener.
#[derive(Debug)]
pub struct HttpListener {
    listener: TcpListener,
}

impl HttpListener {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<HttpListener> {
        Ok(HttpListener {
            listener: TcpListener::bind(addr).await?,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

#[derive(Debug)]
struct Ctx {
    node: Arc<Node>,
    gpu: Option<Arc<crate::gpu::GpuMonitor>>,
    max_body_bytes: u64,
}

/// Serves until `stop` fires, then lets open requests finish within
/// `grace`.
pub async fn serve(
    listener: HttpListener,
    node: Arc<Node>,
    gpu: Option<Arc<crate::gpu::GpuMonitor>>,
    cfg: HttpConfig,
    stop: CancellationToken,
    grace: Duration,
) {
    let ctx = Arc::new(Ctx {
        node,
        gpu,
        max_body_bytes: cfg.max_body_bytes,
    });
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let graceful = GracefulShutdown::new();
    let builder = connection_builder(cfg.header_read_timeout, MAX_HEAD_BYTES);
    let refused = || ctx.node.metrics().http_refused.inc();
    while let Some((stream, _peer, permit)) =
        accept_bounded(&listener.listener, &slots, &stop, "http", refused).await
    {
        let ctx = ctx.clone();
        let service = hyper::service::service_fn(move |req| {
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(route(&ctx, req)) }
        });
        let conn = serve_connection(
            builder.clone(),
            graceful.watcher(),
            stream,
            None,
            Duration::ZERO,
            cfg.write_timeout,
            service,
            "http",
        );
        tokio::spawn(async move {
            conn.await;
            drop(permit);
        });
    }
    shut_down(graceful, grace, "http").await;
}

/// An HTTP/1.1 connection builder with the bounds every endpoint keeps: a
/// deadline for the request head, a cap on its size.
pub(crate) fn connection_builder(head_timeout: Duration, max_head: usize) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_buf_size(max_head)
        .keep_alive(true);
    builder
}

/// The next connection that gets one of `slots`, or `None` once `stop`
/// fires. A failed accept (out of file descriptors, say) is logged and
/// retried after 100 ms; a connection past the slots is closed at once and
/// `refused` counts it.
pub(crate) async fn accept_bounded(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    stop: &CancellationToken,
    endpoint: &'static str,
    refused: impl Fn(),
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!(error = %err, endpoint, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refused();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        return Some((stream, peer, permit));
    }
}

/// A stream whose writes must make progress: a write, flush or shutdown
/// that stays pending (the peer's window full: it does not read) for
/// `limit` fails with `TimedOut`, which ends the connection. Progress, not
/// a total: a client reading a long stream slowly keeps it. TLS writes go
/// through it too, when it is under the TLS stream.
#[derive(Debug)]
pub(crate) struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    pub(crate) fn new(inner: S, limit: Duration) -> Self {
        WriteDeadline {
            inner,
            limit,
            stalled: None,
        }
    }

    /// `r` as it is when ready (progress: the deadline is reset); when
    /// pending, pending until the deadline, then `TimedOut`.
    fn progress<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.stalled = None;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer took nothing of a write in time",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progress(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progress(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.progress(cx, r)
    }
}

/// Serves one connection to its end, through TLS when `tls` is given (the
/// handshake bounded by `handshake_timeout`; one that fails or runs out of
/// time ends the connection), watched by `watcher` for graceful shutdown.
/// A write that makes no progress for `write_timeout` ends it too.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_connection<S, B>(
    builder: http1::Builder,
    watcher: Watcher,
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    handshake_timeout: Duration,
    write_timeout: Duration,
    service: S,
    endpoint: &'static str,
) where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = WriteDeadline::new(stream, write_timeout);
    let served = match tls {
        None => {
            watcher
                .watch(builder.serve_connection(TokioIo::new(stream), service))
                .await
        }
        Some(tls) => match tokio::time::timeout(handshake_timeout, tls.accept(stream)).await {
            Ok(Ok(s)) => {
                watcher
                    .watch(builder.serve_connection(TokioIo::new(s), service))
                    .await
            }
            Ok(Err(err)) => {
                tracing::debug!(error = %err, endpoint, "TLS handshake failed");
                Ok(())
            }
            Err(_) => {
                tracing::debug!(endpoint, "TLS handshake timed out");
                Ok(())
            }
        },
    };
    if let Err(err) = served {
        tracing::debug!(error = %err, endpoint, "connection ended with an error");
    }
}

/// Waits for the watched connections to finish, at most `grace`, and
/// logs when some are still open then (the caller closes them).
pub(crate) async fn shut_down(graceful: GracefulShutdown, grace: Duration, endpoint: &'static str) {
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(endpoint, "connections still open after the grace period; closing them");
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn route(ctx: &Ctx, req: Request<Incoming>) -> Resp {
    let (handler, resp) = route_inner(ctx, &req);
    ctx.node
        .metrics()
        .http_requests
        .with_label_values(&[handler, resp.status().as_str()])
        .inc();
    resp
}

fn route_inner(ctx: &Ctx, req: &Request<Incoming>) -> (&'static str, Resp) {
    let handler = match req.uri().path() {
        "/metrics" => "metrics",
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        _ => {
            return (
                "other",
                json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
            )
        }
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "only GET and HEAD are allowed",
        );
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return (handler, resp);
    }
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    // A chunked body has no declared size: these endpoints take no body,
    // so it is refused like an oversize one rather than left unread.
    let chunked = req.headers().contains_key(hyper::header::TRANSFER_ENCODING);
    if declared > ctx.max_body_bytes || chunked {
        return (
            handler,
            json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "request body too large",
            ),
        );
    }
    let resp = match handler {
        "metrics" => {
            let (mut body, content_type) = ctx.node.metrics().render();
            if let Some(gpu) = &ctx.gpu {
                gpu.render_into(&mut body);
            }
            plain(StatusCode::OK, content_type, body)
        }
        "healthz" => plain(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            b"ok\n".to_vec(),
        ),
        _ => {
            let state = ctx.node.snapshot().state;
            if state.accepts_work() {
                plain(
                    StatusCode::OK,
                    "text/plain; charset=utf-8",
                    b"ready\n".to_vec(),
                )
            } else {
                plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    format!("not ready: node is {state}\n").into_bytes(),
                )
            }
        }
    };
    (handler, resp)
}

fn plain(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json_error(status: StatusCode, code: &str, message: &str) -> Resp {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    plain(
        status,
        "application/json",
        serde_json::to_vec(&body).expect("serialises"),
    )
}
