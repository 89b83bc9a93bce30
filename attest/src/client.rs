//! A minimal blocking HTTP/1.1 client for `ccnode-verify attest`: one POST
//! of `{"nonce": base64}` to the node's attestation endpoint, over plain
//! HTTP or HTTPS (rustls, trusting the roots the caller gives), with a
//! connect/read/write timeout and a cap on the response size. Chunked and
//! Content-Length responses are read. Over HTTPS, [`Fetched`] carries the
//! sha256 of the server's SubjectPublicKeyInfo, which the verifier compares
//! with the `tls_spki_sha256` claim ([`crate::verify::check_tls_binding`]):
//! the connection is then pinned to the attested node.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use base64::Engine as _;

/// Largest response accepted (evidence plus headers).
pub const MAX_RESPONSE: usize = crate::evidence::MAX_EVIDENCE + 64 * 1024;
/// Largest response header block.
const MAX_HEADERS: usize = 64 * 1024;

/// Why the evidence could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("invalid url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot reach {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("request to {addr} failed")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the node's response exceeds {MAX_RESPONSE} bytes")]
    TooLarge,
    #[error("malformed http response: {0}")]
    Malformed(String),
    #[error("the node answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("tls: {0}")]
    Tls(String),
}

struct Url {
    host: String,
    port: u16,
    path: String,
    tls: bool,
}

/// A response body and, over HTTPS, the server key it came through.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub body: Vec<u8>,
    /// sha256 of the server certificate's SubjectPublicKeyInfo, hex.
    pub tls_spki_sha256: Option<String>,
}

/// Largest CA file read.
const MAX_CA_FILE: u64 = 1024 * 1024;

/// Reads trusted root certificates (PEM) for HTTPS.
pub fn load_roots(path: &std::path::Path) -> Result<rustls::RootCertStore, FetchError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let bad = |m: String| FetchError::Tls(format!("{}: {m}", path.display()));
    let f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut bytes = Vec::new();
    f.take(MAX_CA_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(e.to_string()))?;
    if bytes.len() as u64 > MAX_CA_FILE {
        return Err(bad(format!("larger than {MAX_CA_FILE} bytes")));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate".into()));
    }
    Ok(roots)
}

/// sha256 of a DER certificate's SubjectPublicKeyInfo, hex.
pub fn spki_sha256_of_cert(der_cert: &[u8]) -> Result<String, String> {
    use der::{Decode, Encode};
    use sha2::Digest;
    let c = x509_cert::Certificate::from_der(der_cert).map_err(|e| e.to_string())?;
    let spki = c
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| e.to_string())?;
    Ok(hex::encode(sha2::Sha256::digest(spki)))
}

fn parse_url(url: &str) -> Result<Url, FetchError> {
    let bad = |reason: &str| FetchError::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    if url.len() > 2048 {
        return Err(bad("longer than 2048 bytes"));
    }
    let (rest, tls) = if let Some(r) = url.strip_prefix("http://") {
        (r, false)
    } else if let Some(r) = url.strip_prefix("https://") {
        (r, true)
    } else {
        return Err(bad("only http:// and https:// URLs are supported"));
    };
    let default_port = if tls { 443 } else { 80 };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("no host, or user info"));
    }
    if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(bad("the path holds spaces or control characters"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
        let port = match p.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None if p.is_empty() => default_port,
            None => return Err(bad("junk after ]")),
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
            None => (authority.to_string(), default_port),
        }
    };
    Ok(Url {
        host,
        port,
        path: path.to_string(),
        tls,
    })
}

/// POSTs `{"nonce": base64(nonce)}` to a plain `http://` `url` and returns
/// the 200 response body (see [`fetch`]).
pub fn fetch_evidence(url: &str, nonce: &[u8], timeout: Duration) -> Result<Vec<u8>, FetchError> {
    Ok(fetch(url, nonce, timeout, None)?.body)
}

/// POSTs `{"nonce": base64(nonce)}` to `url` and returns the 200 response
/// body. `https://` URLs need `roots`: the server's certificate must chain
/// to one of them and name the URL's host. Every step (connect, handshake,
/// write, each read) is bounded by `timeout`, and the whole exchange by
/// twice that.
pub fn fetch(
    url: &str,
    nonce: &[u8],
    timeout: Duration,
    roots: Option<&rustls::RootCertStore>,
) -> Result<Fetched, FetchError> {
    let u = parse_url(url)?;
    if u.tls && roots.is_none() {
        return Err(FetchError::Url {
            url: url.to_string(),
            reason: "https needs trusted roots (ccnode-verify attest --ca FILE)".into(),
        });
    }
    let addr_text = format!("{}:{}", u.host, u.port);
    let addrs: Vec<_> = (u.host.as_str(), u.port)
        .to_socket_addrs()
        .map_err(|source| FetchError::Connect {
            addr: addr_text.clone(),
            source,
        })?
        .collect();
    let mut last = None;
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let tcp = stream.ok_or_else(|| FetchError::Connect {
        addr: addr_text.clone(),
        source: last.unwrap_or_else(|| std::io::Error::other("no address")),
    })?;
    let io = |source| FetchError::Io {
        addr: addr_text.clone(),
        source,
    };
    tcp.set_read_timeout(Some(timeout)).map_err(io)?;
    tcp.set_write_timeout(Some(timeout)).map_err(io)?;
    let (mut s, tls_conn): (Box<dyn ReadWrite>, _) = match roots {
        Some(roots) if u.tls => {
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| FetchError::Tls(e.to_string()))?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = rustls::pki_types::ServerName::try_from(u.host.clone())
                .map_err(|e| FetchError::Tls(format!("server name {:?}: {e}", u.host)))?;
            let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
                .map_err(|e| FetchError::Tls(e.to_string()))?;
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            while tls.conn.is_handshaking() {
                tls.conn
                    .complete_io(&mut tls.sock)
                    .map_err(|e| FetchError::Tls(format!("handshake with {addr_text}: {e}")))?;
            }
            let spki = tls
                .conn
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or_else(|| FetchError::Tls("the server sent no certificate".into()))
                .and_then(|c| spki_sha256_of_cert(c).map_err(FetchError::Tls))?;
            (Box::new(tls), Some(spki))
        }
        _ => (Box::new(tcp), None),
    };
    let body = serde_json::json!({
        "nonce": base64::engine::general_purpose::STANDARD.encode(nonce)
    })
    .to_string();
    let host_header = if u.host.contains(':') {
        format!("[{}]:{}", u.host, u.port)
    } else {
        addr_text.clone()
    };
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: {host_header}\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        u.path,
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(io)?;

    let deadline = Instant::now() + timeout * 2;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        if Instant::now() > deadline {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the response took too long",
            )));
        }
        let n = match s.read(&mut chunk) {
            Ok(n) => n,
            // A TLS peer that closes without close_notify: the body's
            // length is checked against Content-Length (or the last
            // chunk) below, so truncation is still caught.
            Err(e) if tls_conn.is_some() && e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(io(e)),
        };
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
        if raw.len() > MAX_RESPONSE {
            return Err(FetchError::TooLarge);
        }
    }
    Ok(Fetched {
        body: parse_response(&raw)?,
        tls_spki_sha256: tls_conn,
    })
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn parse_response(raw: &[u8]) -> Result<Vec<u8>, FetchError> {
    let bad = |m: &str| FetchError::Malformed(m.to_string());
    let end = raw
        .windows(4)
        .take(MAX_HEADERS)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(bad("not an HTTP/1.x response"));
    }
    let status: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad("header without ':'"))?;
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            content_length = Some(v.parse::<usize>().map_err(|_| bad("bad Content-Length"))?);
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.eq_ignore_ascii_case("chunked");
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = content_length {
        if rest.len() < n {
            return Err(bad("body shorter than Content-Length"));
        }
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    if status != 200 {
        let text = String::from_utf8_lossy(&body[..body.len().min(1024)]).into_owned();
        return Err(FetchError::Status { status, body: text });
    }
    Ok(body)
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, FetchError> {
    let bad = |m: &str| FetchError::Malformed(m.to_string());
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .take(64)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("bad chunk size line"))?;
        let line = std::str::from_utf8(&rest[..eol]).map_err(|_| bad("bad chunk size"))?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad("bad chunk size"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if size > MAX_RESPONSE || rest.len() < size + 2 {
            return Err(bad("truncated chunk"));
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("http://127.0.0.1:9100/v1/attestation").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 9100, "/v1/attestation")
        );
        let u = parse_url("http://[::1]:8/x").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 8));
        assert_eq!(parse_url("http://node").unwrap().port, 80);
        let u = parse_url("https://node/v1/attestation").unwrap();
        assert!(u.tls && !parse_url("http://node/").unwrap().tls);
        assert_eq!(u.port, 443);
        for bad in [
            "ftp://x",
            "https://",
            "http://",
            "http://a@b/",
            "http://x:y/",
            "http://x/a b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_response(ok).unwrap(), b"{}");
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n1\r\n \r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), b"{} ");
        let err =
            b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 17\r\n\r\n{\"code\":\"limit\"}\n";
        assert!(matches!(
            parse_response(err),
            Err(FetchError::Status { status: 429, .. })
        ));
        for bad in [
            &b"garbage"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            assert!(parse_response(bad).is_err());
        }
    }
}
