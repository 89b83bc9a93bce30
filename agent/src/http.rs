//! The HTTP endpoint: `/metrics` for Prometheus, `/healthz` (the process
//! is alive and serving) and `/readyz` (the node takes work).
//!
//! Bounded: a connection cap (more are closed on accept and counted), a
//! deadline for request headers, a cap on header size, and a cap on the
//! declared body size. The endpoints take no body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
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
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!(error = %err, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            ctx.node.metrics().http_refused.inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let service = hyper::service::service_fn(move |req| {
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(route(&ctx, req)) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, "http connection ended with an error");
            }
            drop(permit);
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!("http connections still open after the grace period; closing them");
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
