//! The attestation endpoint: `POST /v1/attestation` with a verifier's
//! nonce returns evidence (docs/attestation.md): claims about this node, a
//! TPM quote bound to them and the nonce, the event logs, and the TEE slot.
//!
//! Its own listener, so /metrics can stay on loopback while verifiers reach
//! this one. Bounded: a body of at most [`MAX_BODY`] bytes, a deadline for
//! the request and for the TPM, a cap on attestations in progress (503 past
//! it), and token-bucket rate limits per client address and overall (429
//! with `Retry-After`). Errors are JSON with a stable `code`.
//!
//! The TPM is slow and serial: each request's quote runs on a blocking
//! thread, one at a time inside [`ccnode_attest::tpm::TpmService`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use ccnode_attest::eventlog::ccnode::{event_type, LogStatus};
use ccnode_attest::tee::{SimulatedTee, Tee};
use ccnode_attest::tpm::{TpmError, TpmService};
use ccnode_attest::{AttestError, Attester, Claims, Evidence};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::{AttestationConfig, Config, SnpInterface, TeeChoice};
use crate::gpu::GpuMonitor;
use crate::node::Node;

/// Largest request body, in bytes.
pub const MAX_BODY: usize = 4096;
/// Largest request head, in bytes.
const MAX_HEAD: usize = 16 * 1024;
/// Connections served at once (each may wait for the TPM).
const MAX_CONNECTIONS: usize = 1024;
/// Client addresses whose rate is tracked; past it, idle ones are forgotten
/// and, if none is idle, new clients are refused (429).
const MAX_TRACKED_CLIENTS: usize = 4096;

/// Why the attestation service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot open the TPM")]
    Tpm(#[source] TpmError),
    #[error("cannot measure the node policy into the TPM")]
    Measure(#[source] TpmError),
    #[error("attestation TLS: {0}")]
    Tls(String),
    #[error("the configured TEE ({kind}) cannot give a report: {detail}")]
    Tee { kind: &'static str, detail: String },
}

/// Largest certificate or key file read.
const MAX_PEM_FILE: u64 = 1024 * 1024;

/// The endpoint's TLS: the acceptor and the digest verifiers pin.
#[derive(Clone)]
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    /// sha256 of the leaf certificate's SubjectPublicKeyInfo, hex.
    pub spki_sha256: String,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("spki_sha256", &self.spki_sha256)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// The acceptor, for the other endpoints serving TLS the same way.
    pub(crate) fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }
}

/// Loads `tls_cert` and `tls_key` when configured. TLS 1.2 and 1.3 with
/// rustls's safe defaults (ring), HTTP/1.1 by ALPN.
pub fn load_tls(cfg: &AttestationConfig) -> Result<Option<Tls>, StartError> {
    match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => load_tls_files(cert, key).map(Some),
        _ => Ok(None),
    }
}

/// Loads a certificate chain (PEM, leaf first, at most 1 MiB) and its key
/// (PEM: PKCS#8, SEC1 or PKCS#1): TLS 1.2 and 1.3 with rustls's safe
/// defaults (ring), HTTP/1.1 by ALPN.
pub fn load_tls_files(cert: &std::path::Path, key: &std::path::Path) -> Result<Tls, StartError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bounded = |p: &std::path::Path| -> Result<Vec<u8>, StartError> {
        use std::io::Read;
        let f = std::fs::File::open(p)
            .map_err(|e| StartError::Tls(format!("cannot open {}: {e}", p.display())))?;
        let mut bytes = Vec::new();
        f.take(MAX_PEM_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| StartError::Tls(format!("cannot read {}: {e}", p.display())))?;
        if bytes.len() as u64 > MAX_PEM_FILE {
            return Err(StartError::Tls(format!(
                "{} is larger than {MAX_PEM_FILE} bytes",
                p.display()
            )));
        }
        Ok(bytes)
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bounded(cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| StartError::Tls(format!("{}: {e}", cert.display())))?;
    let leaf = chain
        .first()
        .ok_or_else(|| StartError::Tls(format!("{} holds no certificate", cert.display())))?;
    let spki = {
        use der::{Decode, Encode};
        let c = x509_cert::Certificate::from_der(leaf)
            .map_err(|e| StartError::Tls(format!("{}: {e}", cert.display())))?;
        c.tbs_certificate
            .subject_public_key_info
            .to_der()
            .map_err(|e| StartError::Tls(format!("{}: {e}", cert.display())))?
    };
    let spki_sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&spki))
    };
    let key_der = PrivateKeyDer::from_pem_slice(&bounded(key)?)
        .map_err(|e| StartError::Tls(format!("{}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| StartError::Tls(format!("certificate and key: {e}")))?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Tls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        spki_sha256,
    })
}

/// The digest of the node policy: the parts of the configuration that decide
/// what this node enforces (sandbox profile, GPU health and drift policy),
/// canonicalised (RFC 8785) and hashed. `sha256:<hex>`.
pub fn policy_digest(config: &Config) -> String {
    use sha2::Digest;
    let policy = json!({
        "sandbox": config.sandbox,
        "gpu": {
            "health": config.gpu.health,
            "baseline": config.gpu.baseline,
            "drift_action": config.gpu.drift_action,
        },
    });
    let canon = ccnode_attest::jcs::canonicalize(&policy)
        .expect("the policy holds no floats or integers beyond 2^53");
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(canon)))
}

/// Opens the TPM, reconciles ccnode's event log, and measures this start
/// and the policy into the ccnode PCR. Blocking: call before the runtime
/// starts or on a blocking thread.
pub fn open(
    config: &Config,
    gpus: Option<&Arc<dyn ccnode_gpu::GpuBackend>>,
) -> Result<Arc<Attester>, StartError> {
    let at = &config.attestation;
    let tpm_config = at.tpm_config(&config.node.state_dir)?;
    let tpm = TpmService::open(tpm_config).map_err(StartError::Tpm)?;
    match tpm.log_status() {
        LogStatus::Consistent => {}
        LogStatus::Reset { discarded } => {
            tracing::info!(
                discarded,
                "the TPM was reset since the last start: ccnode event log begun again"
            )
        }
        LogStatus::DroppedUnextended => {
            tracing::warn!(
                "the last ccnode event was never extended into the PCR (a crash): dropped"
            )
        }
        LogStatus::Mismatch { expected, found } => tracing::error!(
            expected = %expected,
            found = %found,
            pcr = at.ccnode_pcr,
            "ccnode's event log does not replay to its PCR: something else extends it, or the log was lost; \
             verifiers will refuse this node's evidence until the TPM is reset"
        ),
    }
    tpm.measure(
        event_type::AGENT_START,
        json!({ "version": crate::VERSION }),
    )
    .map_err(StartError::Measure)?;
    tpm.measure(
        event_type::POLICY_LOAD,
        json!({
            "config_digest": config.source_digest,
            "policy_digest": policy_digest(config),
        }),
    )
    .map_err(StartError::Measure)?;
    let tee = open_tee(at)?;
    let mut attester = Attester::new(Arc::new(tpm), tee);
    // Real GPUs only: a simulated inventory says so in the claims, and
    // verifiers refuse it unless told otherwise.
    if let Some(backend) = gpus.filter(|b| b.kind() == ccnode_gpu::BackendKind::Nvml) {
        attester = attester.with_gpus(Arc::new(GpuEvidence(backend.clone())));
    }
    Ok(Arc::new(attester))
}

/// The configured TEE, checked with one report over an all-zero binding
/// so that a node that cannot attest does not start.
fn open_tee(at: &AttestationConfig) -> Result<Tee, StartError> {
    use ccnode_attest::tee::{tsm::Tsm, SnpSource};
    let tee = match at.tee {
        TeeChoice::None => return Ok(Tee::None),
        TeeChoice::Simulated => {
            tracing::warn!(
                "attestation TEE evidence is SIMULATED: verifiers refuse it unless told otherwise"
            );
            return Ok(Tee::Simulated(SimulatedTee::measuring(
                std::path::Path::new("/proc/self/exe"),
            )));
        }
        TeeChoice::SevSnp => {
            let tsm = || SnpSource::Tsm {
                tsm: Tsm::new(&at.tsm_root),
                vmpl: at.snp_vmpl,
            };
            let sev_guest = || SnpSource::SevGuest {
                device: at.sev_guest_device.clone(),
                vmpl: at.snp_vmpl.unwrap_or(0),
            };
            Tee::SevSnp(match at.snp_interface {
                SnpInterface::ConfigfsTsm => tsm(),
                SnpInterface::SevGuest => sev_guest(),
                SnpInterface::Auto if at.tsm_root.is_dir() => tsm(),
                SnpInterface::Auto if at.sev_guest_device.exists() => sev_guest(),
                SnpInterface::Auto => {
                    return Err(StartError::Tee {
                        kind: "sev-snp",
                        detail: format!(
                            "neither configfs-tsm ({}) nor {} exists",
                            at.tsm_root.display(),
                            at.sev_guest_device.display()
                        ),
                    })
                }
            })
        }
        TeeChoice::Tdx => Tee::Tdx(Tsm::new(&at.tsm_root)),
    };
    let kind = tee.kind();
    tee.evidence(&[0; 32])
        .map_err(|detail| StartError::Tee { kind, detail })?;
    tracing::info!(tee = kind, "TEE reports available");
    Ok(tee)
}

/// GPU evidence from the NVML backend.
#[derive(Debug)]
struct GpuEvidence(Arc<dyn ccnode_gpu::GpuBackend>);

impl ccnode_attest::GpuAttestation for GpuEvidence {
    fn cc_gpus(&self) -> Vec<(String, u32)> {
        // The inventory now, not the last poll's: a GPU whose CC mode
        // changed must not be left out.
        match self.0.inventory() {
            Ok(inv) => inv
                .gpus
                .iter()
                .filter(|g| g.cc_mode == ccnode_gpu::CcMode::On)
                .map(|g| (g.uuid.clone(), g.index))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "GPU inventory for attestation");
                Vec::new()
            }
        }
    }

    fn report(&self, index: u32, nonce: &[u8; 32]) -> Result<(Vec<u8>, Vec<u8>), String> {
        let a = self
            .0
            .cc_attestation(index, nonce)
            .map_err(|e| crate::error_chain(&e))?;
        Ok((a.report, a.cert_chain))
    }
}

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    /// Takes a token, or says in how many seconds one will be there.
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), u64> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - self.tokens) / rate).ceil().max(1.0) as u64)
        }
    }

    fn is_full(&self, rate: f64, burst: f64, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * rate >= burst
    }
}

/// Per-client and global rate limits.
#[derive(Debug)]
struct Limiter {
    per_client: (f64, f64),
    global: (f64, f64),
    state: Mutex<(Bucket, HashMap<IpAddr, Bucket>)>,
}

impl Limiter {
    fn new(cfg: &AttestationConfig) -> Limiter {
        let now = Instant::now();
        let global = (cfg.global_rate, f64::from(cfg.global_burst));
        Limiter {
            per_client: (cfg.per_client_rate, f64::from(cfg.per_client_burst)),
            global,
            state: Mutex::new((Bucket::full(global.1, now), HashMap::new())),
        }
    }

    /// `Err(seconds)` when `client` must wait.
    fn check(&self, client: IpAddr) -> Result<(), u64> {
        let now = Instant::now();
        let (rate, burst) = self.per_client;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (global, clients) = &mut *st;
        if !clients.contains_key(&client) && clients.len() >= MAX_TRACKED_CLIENTS {
            clients.retain(|_, b| !b.is_full(rate, burst, now));
            if clients.len() >= MAX_TRACKED_CLIENTS {
                return Err(1);
            }
        }
        let bucket = clients
            .entry(client)
            .or_insert_with(|| Bucket::full(burst, now));
        // Per client first: a client over its own limit does not use up
        // the global budget.
        let mut probe = *bucket;
        probe.take(rate, burst, now)?;
        global.take(self.global.0, self.global.1, now)?;
        *bucket = probe;
        Ok(())
    }
}

/// What claims are made of, and who makes evidence of them.
#[derive(Debug)]
struct Source {
    attester: Arc<Attester>,
    node: Arc<Node>,
    gpu: Option<Arc<GpuMonitor>>,
    config_digest: String,
    policy_digest: String,
    tls_spki_sha256: Option<String>,
    models: Option<Arc<crate::inference::Manager>>,
}

#[derive(Debug)]
struct Ctx {
    node: Arc<Node>,
    timeout: Duration,
    slots: Arc<Semaphore>,
    limiter: Limiter,
    batcher: mpsc::Sender<Job>,
}

/// Why a request got no evidence.
#[derive(Debug)]
struct Failure {
    code: &'static str,
    message: String,
}

/// One verifier waiting for evidence.
#[derive(Debug)]
struct Job {
    nonce: Vec<u8>,
    reply: oneshot::Sender<Result<Evidence, Failure>>,
}

/// The one task that talks to the attester. It takes the first request
/// waiting, and with it every other request queued by then (up to `max`):
/// one quote answers them all ([`Attester::attest_batch`]), each with its
/// own inclusion proof. A lone verifier gets a quote of its own at once;
/// while the TPM works, the next batch gathers.
async fn run_batcher(source: Arc<Source>, mut rx: mpsc::Receiver<Job>, max: usize) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < max {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        // Verifiers that gave up (timeout, disconnect) get no share.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let nonces: Vec<Vec<u8>> = jobs.iter().map(|j| j.nonce.clone()).collect();
        let claims = claims(&source);
        let attester = source.attester.clone();
        let started = Instant::now();
        let produced = produce(move || attester.attest_batch(&nonces, claims)).await;
        let metrics = source.node.metrics();
        metrics
            .attestation_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.attestation_batch_size.observe(jobs.len() as f64);
        match produced {
            Ok(answers) => {
                for (job, evidence) in jobs.into_iter().zip(answers) {
                    let _ = job.reply.send(Ok(evidence));
                }
            }
            Err(failure) => {
                for job in jobs {
                    let _ = job.reply.send(Err(Failure {
                        code: failure.code,
                        message: failure.message.clone(),
                    }));
                }
            }
        }
    }
}

/// Runs one attestation off the runtime. A failure gets its code; one that
/// panicked (a bug in a TPM, TEE or GPU path) is `internal` and logged, and
/// the batcher goes on: later verifiers are not left without an answer.
async fn produce(
    f: impl FnOnce() -> Result<Vec<Evidence>, AttestError> + Send + 'static,
) -> Result<Vec<Evidence>, Failure> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(answers)) => Ok(answers),
        Ok(Err(err)) => {
            let code = match &err {
                AttestError::Nonce(_) => "bad_nonce",
                other => other.code(),
            };
            let message = crate::error_chain(&err);
            if code != "bad_nonce" {
                tracing::error!(error = %message, code, "attestation failed");
            }
            Err(Failure { code, message })
        }
        Err(join) => {
            tracing::error!(error = %join, "attestation panicked");
            Err(Failure {
                code: "internal",
                message: "evidence could not be produced (internal error)".into(),
            })
        }
    }
}

/// The bound attestation listener.
#[derive(Debug)]
pub struct AttestationListener {
    listener: TcpListener,
}

impl AttestationListener {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<AttestationListener> {
        Ok(AttestationListener {
            listener: TcpListener::bind(addr).await?,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Serves attestations until `stop` fires; open requests get `grace`.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: AttestationListener,
    attester: Arc<Attester>,
    node: Arc<Node>,
    gpu: Option<Arc<GpuMonitor>>,
    models: Option<Arc<crate::inference::Manager>>,
    tls: Option<Tls>,
    config: &Config,
    stop: CancellationToken,
    grace: Duration,
) {
    let cfg = &config.attestation;
    let source = Arc::new(Source {
        models,
        tls_spki_sha256: tls.as_ref().map(|t| t.spki_sha256.clone()),
        attester,
        node: node.clone(),
        gpu,
        config_digest: config.source_digest.clone().unwrap_or_default(),
        policy_digest: policy_digest(config),
    });
    // One place per slot. A request that timed out gave its slot back
    // but its job stays queued until the batcher takes it (a TPM that
    // hangs never does), so the queue can be full with every slot free:
    // a hand-off is `try_send`, a full queue is answered 503 busy, and a
    // send never waits.
    let (batcher, queue) = mpsc::channel(cfg.max_concurrent);
    tokio::spawn(run_batcher(source, queue, cfg.batch_max));
    let ctx = Arc::new(Ctx {
        node,
        timeout: cfg.request_timeout,
        slots: Arc::new(Semaphore::new(cfg.max_concurrent)),
        limiter: Limiter::new(cfg),
        batcher,
    });
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let builder = crate::http::connection_builder(cfg.request_timeout, MAX_HEAD);
    let refused = || {
        ctx.node
            .metrics()
            .attestations
            .with_label_values(&["too_many_connections"])
            .inc()
    };
    while let Some((stream, peer, permit)) = crate::http::accept_bounded(
        &listener.listener,
        &connections,
        &stop,
        "attestation",
        refused,
    )
    .await
    {
        let ctx = ctx.clone();
        let service = hyper::service::service_fn(move |req| {
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(handle(&ctx, peer.ip(), req).await) }
        });
        let conn = crate::http::serve_connection(
            builder.clone(),
            graceful.watcher(),
            stream,
            tls.as_ref().map(|t| t.acceptor.clone()),
            cfg.request_timeout,
            cfg.request_timeout,
            service,
            "attestation",
        );
        tokio::spawn(async move {
            conn.await;
            drop(permit);
        });
    }
    crate::http::shut_down(graceful, grace, "attestation").await;
}

type Resp = Response<Full<Bytes>>;

fn error(status: StatusCode, code: &str, message: &str) -> Resp {
    let body = json!({ "error": { "code": code, "message": message } });
    let mut resp = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(&body).expect("serialises"),
    )));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn retry_after(mut resp: Resp, secs: u64) -> Resp {
    resp.headers_mut().insert(
        RETRY_AFTER,
        HeaderValue::from_str(&secs.to_string()).expect("digits are a valid header value"),
    );
    resp
}

async fn handle(ctx: &Ctx, client: IpAddr, req: Request<Incoming>) -> Resp {
    let (result, resp) = handle_inner(ctx, client, req).await;
    ctx.node
        .metrics()
        .attestations
        .with_label_values(&[result])
        .inc();
    resp
}

/// The request body: `{"nonce": "<base64, 16 to 64 bytes>"}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AttestRequest {
    nonce: String,
}

async fn handle_inner(ctx: &Ctx, client: IpAddr, req: Request<Incoming>) -> (&'static str, Resp) {
    if req.uri().path() != "/v1/attestation" {
        return (
            "not_found",
            error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
        );
    }
    if req.method() != Method::POST {
        let mut resp = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "only POST is allowed",
        );
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return ("method_not_allowed", resp);
    }
    if let Err(secs) = ctx.limiter.check(client) {
        return (
            "rate_limited",
            retry_after(
                error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "too many attestation requests; retry later",
                ),
                secs,
            ),
        );
    }
    let body = Limited::new(req.into_body(), MAX_BODY);
    let bytes = match tokio::time::timeout(ctx.timeout, body.collect()).await {
        Err(_) => {
            return (
                "timeout",
                error(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    "the request body did not arrive in time",
                ),
            )
        }
        Ok(Err(_)) => {
            return (
                "body_too_large",
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    &format!("the request body is larger than {MAX_BODY} bytes"),
                ),
            )
        }
        Ok(Ok(b)) => b.to_bytes(),
    };
    let parsed: AttestRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return (
                "bad_request",
                error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("expected {{\"nonce\": \"<base64>\"}}: {e}"),
                ),
            )
        }
    };
    let nonce = match base64::engine::general_purpose::STANDARD.decode(parsed.nonce.trim()) {
        Ok(n) => n,
        Err(e) => {
            return (
                "bad_nonce",
                error(
                    StatusCode::BAD_REQUEST,
                    "bad_nonce",
                    &format!("nonce is not base64: {e}"),
                ),
            )
        }
    };
    if let Err(why) = ccnode_attest::evidence::check_nonce(&nonce) {
        return (
            "bad_nonce",
            error(StatusCode::BAD_REQUEST, "bad_nonce", &why),
        );
    }
    let busy = || {
        (
            "busy",
            retry_after(
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    "as many attestations as allowed are in progress; retry later",
                ),
                1,
            ),
        )
    };
    let Ok(slot) = ctx.slots.clone().try_acquire_owned() else {
        return busy();
    };
    let (reply, answer) = oneshot::channel();
    let queued = ctx.batcher.try_send(Job { nonce, reply });
    let produced = match queued {
        // Jobs of requests that timed out fill the queue: the TPM is
        // stuck or far behind.
        Err(mpsc::error::TrySendError::Full(_)) => return busy(),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(Failure {
            code: "shutting_down",
            message: "ccnoded is shutting down".into(),
        }),
        Ok(()) => match tokio::time::timeout(ctx.timeout, answer).await {
            Err(_) => {
                return (
                    "timeout",
                    error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "timeout",
                        "the TPM did not answer in time",
                    ),
                )
            }
            Ok(Err(_)) => Err(Failure {
                code: "shutting_down",
                message: "ccnoded is shutting down".into(),
            }),
            Ok(Ok(r)) => r,
        },
    };
    drop(slot);
    match produced {
        Ok(evidence) => {
            let mut resp = Response::new(Full::new(Bytes::from(evidence.to_json())));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            ("ok", resp)
        }
        Err(Failure {
            code: "bad_nonce",
            message,
        }) => (
            "bad_nonce",
            error(StatusCode::BAD_REQUEST, "bad_nonce", &message),
        ),
        Err(f) => (
            "error",
            error(StatusCode::INTERNAL_SERVER_ERROR, f.code, &f.message),
        ),
    }
}

/// What this node says about itself now.
fn claims(ctx: &Source) -> Claims {
    let record = ctx.node.snapshot();
    let (gpu, drift) = match &ctx.gpu {
        None => (None, None),
        Some(g) => {
            let view = g.view();
            let gpu = json!({
                "backend": g.kind().as_str(),
                "simulated": g.is_simulated(),
                "inventory": view.inventory,
                "health": g.health(),
                // How fresh the inventory and health are: a failed poll
                // leaves the last good ones in place.
                "last_poll": view.last_poll.map(crate::timefmt::format),
                "last_error": view.last_error,
            });
            let drift = view
                .drift
                .iter()
                .map(|d| serde_json::to_value(d).expect("drift serialises"))
                .collect();
            (Some(gpu), Some(drift))
        }
    };
    Claims {
        node_id: ctx.node.id().to_owned(),
        agent_version: crate::VERSION.to_owned(),
        config_digest: ctx.config_digest.clone(),
        policy_digest: ctx.policy_digest.clone(),
        node_state: record.state.as_str().to_owned(),
        node_state_reason: Some(record.reason),
        gpu,
        drift,
        models: ctx.models.as_ref().map(|m| m.claims()).unwrap_or_default(),
        vram_scrub: ctx
            .models
            .as_ref()
            .and_then(|m| m.scrubber())
            .map(|s| s.claims()),
        tls_spki_sha256: ctx.tls_spki_sha256.clone(),
        tee_kind: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_attestation_is_an_internal_failure_not_the_end() {
        let f = produce(|| panic!("a bug in a TPM path")).await.unwrap_err();
        assert_eq!(f.code, "internal");
        assert!(!f.message.contains("TPM path"), "{}", f.message);
        let f = produce(|| Err(AttestError::Nonce("short".into())))
            .await
            .unwrap_err();
        assert_eq!(f.code, "bad_nonce");
        // The same batcher's next attestation is served.
        assert!(produce(|| Ok(Vec::new())).await.unwrap().is_empty());
    }

    #[test]
    fn buckets_allow_a_burst_then_say_when_to_retry() {
        let now = Instant::now();
        let mut b = Bucket::full(3.0, now);
        for _ in 0..3 {
            assert_eq!(b.take(0.5, 3.0, now), Ok(()));
        }
        assert_eq!(b.take(0.5, 3.0, now), Err(2), "one token per 2 s");
        assert_eq!(b.take(0.5, 3.0, now + Duration::from_secs(2)), Ok(()));
    }

    #[test]
    fn one_client_over_its_limit_leaves_the_others_alone() {
        let cfg = AttestationConfig {
            per_client_rate: 0.001,
            per_client_burst: 2,
            global_rate: 0.001,
            global_burst: 5,
            ..AttestationConfig::default()
        };
        let l = Limiter::new(&cfg);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        assert!(l.check(a).is_ok() && l.check(a).is_ok());
        for _ in 0..10 {
            assert!(l.check(a).is_err(), "a is over its own limit");
        }
        // a's refusals used no global budget: 3 of 5 are left.
        assert!(l.check(b).is_ok() && l.check(b).is_ok());
        let c: IpAddr = [10, 0, 0, 3].into();
        assert!(l.check(c).is_ok());
        assert!(l.check(c).is_err(), "the global budget is spent");
    }
}
