//! A small HTTP/1.1 client for weft's control plane (the Kubernetes API over
//! plain HTTP): one connection per request, a bearer token, a deadline on
//! every request, and Kubernetes `Status` bodies turned into kubectl-style
//! errors.

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::fmt;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;
use weft_model::Kind;

/// How long one request (connect, send, read the whole answer) may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The control plane's address, from `--server`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerUrl {
    /// `host` as written (IPv6 without brackets), for connecting.
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written, for the Host header.
    pub authority: String,
    /// A path prefix (no trailing `/`), usually empty.
    pub base_path: String,
}

impl ServerUrl {
    pub fn parse(url: &str) -> Result<ServerUrl> {
        let url = url.trim();
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("https://") {
            bail!(
                "--server {url}: https is not supported; weft's control plane speaks plain HTTP \
                 (use http://{})",
                &url["https://".len()..]
            );
        }
        if !lower.starts_with("http://") {
            bail!("--server {url:?}: expected a URL like http://127.0.0.1:6443");
        }
        let rest = &url["http://".len()..];
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if path.contains(['?', '#']) {
            bail!("--server {url}: a query or fragment is not allowed");
        }
        if authority.contains('@') {
            bail!("--server {url}: user information is not allowed; use --token");
        }
        let (host, port) = if let Some(after) = authority.strip_prefix('[') {
            let Some(end) = after.find(']') else {
                bail!("--server {url}: unterminated IPv6 address");
            };
            let host = &after[..end];
            let port = match &after[end + 1..] {
                "" => None,
                p => match p.strip_prefix(':') {
                    Some(p) => Some(p),
                    None => bail!("--server {url}: unexpected text after the IPv6 address"),
                },
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            bail!("--server {url}: no host");
        }
        let port = match port {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .with_context(|| format!("--server {url}: invalid port {p:?}"))?,
        };
        Ok(ServerUrl {
            host: host.to_string(),
            port,
            authority: authority.to_string(),
            base_path: path.trim_end_matches('/').to_string(),
        })
    }

    /// The request target for an API path (which starts with `/`).
    pub fn request_target(&self, path: &str) -> String {
        format!("{}{path}", self.base_path)
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.base_path)
    }
}

/// What the server answered.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Response {
    pub fn is_success(&self) -> bool {
        self.status.is_success()
    }

    pub fn is_not_found(&self) -> bool {
        self.status == StatusCode::NOT_FOUND
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "the server answered {} with a body that is not JSON: {}",
                self.status,
                body_excerpt(&self.body)
            )
        })
    }

    /// The error this (non-2xx) answer describes.
    pub fn api_error(&self) -> ApiError {
        ApiError::from_response(self.status, &self.body)
    }
}

/// An error the API server reported (a Kubernetes `Status`, or another non-2xx answer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    /// The Status `reason` (`NotFound`, `Invalid`, `Conflict`, ...).
    pub reason: Option<String>,
    pub message: String,
}

impl ApiError {
    pub fn from_response(status: StatusCode, body: &[u8]) -> ApiError {
        let code = status.as_u16();
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
            if v.get("kind").and_then(|k| k.as_str()) == Some("Status") {
                let reason = v
                    .get("reason")
                    .and_then(|r| r.as_str())
                    .filter(|r| !r.is_empty())
                    .map(str::to_string);
                let message = v
                    .get("message")
                    .and_then(|m| m.as_str())
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .or_else(|| reason.clone())
                    .unwrap_or_else(|| format!("the server responded with status {status}"));
                let code = v
                    .get("code")
                    .and_then(|c| c.as_u64())
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(code);
                return ApiError {
                    code,
                    reason,
                    message,
                };
            }
        }
        let message = if body.iter().all(u8::is_ascii_whitespace) {
            format!("the server responded with status {status} and an empty body")
        } else {
            format!(
                "the server responded with status {status}: {}",
                body_excerpt(body)
            )
        };
        ApiError {
            code,
            reason: None,
            message,
        }
    }

    /// The NotFound error kubectl shows, for servers that answer 404 without a Status.
    pub fn not_found(kind: Kind, name: &str) -> ApiError {
        ApiError {
            code: 404,
            reason: Some("NotFound".into()),
            message: format!("{} \"{name}\" not found", crate::resource_name(kind)),
        }
    }

    /// Normalize a 404 for `kind`/`name` to kubectl's NotFound wording when
    /// the server gave no Status.
    pub fn or_not_found(self, kind: Kind, name: &str) -> ApiError {
        if self.code == 404 && self.reason.is_none() {
            ApiError::not_found(kind, name)
        } else {
            self
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            Some(reason) => write!(f, "Error from server ({reason}): {}", self.message),
            None => write!(f, "Error from server: {}", self.message),
        }
    }
}

impl std::error::Error for ApiError {}

/// The first 200 bytes of a body, for error messages.
pub fn body_excerpt(body: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    let text = text.trim();
    if body.len() > MAX {
        format!("{text}...")
    } else {
        text.to_string()
    }
}

/// How an I/O error reads in a one-line message.
fn io_reason(err: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match err.kind() {
        ConnectionRefused => "connection refused".into(),
        ConnectionReset => "connection reset by peer".into(),
        TimedOut => "connection timed out".into(),
        HostUnreachable => "host unreachable".into(),
        NetworkUnreachable => "network unreachable".into(),
        AddrNotAvailable => "address not available".into(),
        _ => err.to_string(),
    }
}

/// A client of one control plane.
#[derive(Clone, Debug)]
pub struct Client {
    server: ServerUrl,
    token: Option<String>,
    timeout: Duration,
}

impl Client {
    pub fn new(server: ServerUrl, token: Option<String>) -> Result<Client> {
        if let Some(t) = &token {
            HeaderValue::from_str(&format!("Bearer {t}"))
                .context("the token contains characters not allowed in an HTTP header")?;
        }
        Ok(Client {
            server,
            token,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    pub fn server(&self) -> &ServerUrl {
        &self.server
    }

    pub async fn get(&self, path: &str) -> Result<Response> {
        self.send(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Result<Response> {
        self.send(Method::POST, path, Some(serde_json::to_vec(body)?))
            .await
    }

    pub async fn put(&self, path: &str, body: &serde_json::Value) -> Result<Response> {
        self.send(Method::PUT, path, Some(serde_json::to_vec(body)?))
            .await
    }

    pub async fn delete(&self, path: &str) -> Result<Response> {
        self.send(Method::DELETE, path, None).await
    }

    /// Send one request. `Err` only for transport failures (cannot connect,
    /// timed out, connection broken); any HTTP answer is `Ok`.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response> {
        let deadline = Instant::now() + self.timeout;
        let server = &self.server;
        let secs = self.timeout.as_secs_f64();

        let stream = match tokio::time::timeout_at(
            deadline,
            TcpStream::connect((server.host.as_str(), server.port)),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => bail!(
                "cannot reach the control plane at {server}: {}",
                io_reason(&e)
            ),
            Err(_) => {
                bail!("cannot reach the control plane at {server}: no connection within {secs}s")
            }
        };
        let _ = stream.set_nodelay(true);

        let exchange = async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .with_context(|| format!("HTTP handshake with {server} failed"))?;
            let driver = tokio::spawn(async move {
                // Errors surface through the request below.
                let _ = conn.await;
            });

            let mut req = Request::builder()
                .method(method.clone())
                .uri(server.request_target(path))
                .header(HOST, &server.authority)
                .header(ACCEPT, "application/json")
                .header(USER_AGENT, concat!("netctl/", env!("CARGO_PKG_VERSION")));
            if body.is_some() {
                req = req.header(CONTENT_TYPE, "application/json");
            }
            if let Some(t) = &self.token {
                req = req.header(AUTHORIZATION, format!("Bearer {t}"));
            }
            let req = req
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .with_context(|| format!("building the request {method} {path}"))?;

            let resp = sender
                .send_request(req)
                .await
                .with_context(|| format!("{method} {server}{path} failed"))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .with_context(|| format!("reading the answer to {method} {server}{path}"))?
                .to_bytes();
            driver.abort();
            anyhow::Ok(Response { status, body })
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(r) => r,
            Err(_) => {
                bail!("the control plane at {server} did not answer {method} {path} within {secs}s")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_server_urls() {
        let s = ServerUrl::parse("http://127.0.0.1:6443").unwrap();
        assert_eq!((s.host.as_str(), s.port), ("127.0.0.1", 6443));
        assert_eq!(s.authority, "127.0.0.1:6443");
        assert_eq!(s.request_target("/api/v1/nodes"), "/api/v1/nodes");
        assert_eq!(s.to_string(), "http://127.0.0.1:6443");

        let s = ServerUrl::parse("http://control.example/weft/").unwrap();
        assert_eq!((s.host.as_str(), s.port), ("control.example", 80));
        assert_eq!(s.request_target("/api/v1/nodes"), "/weft/api/v1/nodes");
        assert_eq!(s.to_string(), "http://control.example/weft");

        let s = ServerUrl::parse("http://[::1]:8080").unwrap();
        assert_eq!((s.host.as_str(), s.port), ("::1", 8080));
        assert_eq!(s.authority, "[::1]:8080");

        let err = ServerUrl::parse("https://10.0.0.1:6443")
            .unwrap_err()
            .to_string();
        assert!(err.contains("https is not supported"), "{err}");
        assert!(err.contains("http://10.0.0.1:6443"), "{err}");
        assert!(ServerUrl::parse("10.0.0.1:6443").is_err());
        assert!(ServerUrl::parse("http://h:99999").is_err());
        assert!(ServerUrl::parse("http://:80").is_err());
    }

    #[test]
    fn renders_status_errors_like_kubectl() {
        let body = br#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"Service \"x\" is invalid: spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive","reason":"Invalid","details":{"name":"x","kind":"Service"},"code":422}"#;
        let e = ApiError::from_response(StatusCode::UNPROCESSABLE_ENTITY, body);
        assert_eq!(e.code, 422);
        assert_eq!(
            e.to_string(),
            "Error from server (Invalid): Service \"x\" is invalid: spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive"
        );

        let body = br#"{"kind":"Status","status":"Failure","message":"no token","code":401}"#;
        let e = ApiError::from_response(StatusCode::UNAUTHORIZED, body);
        assert_eq!(e.to_string(), "Error from server: no token");

        let body = br#"{"kind":"Status","status":"Failure","reason":"Forbidden","code":403}"#;
        let e = ApiError::from_response(StatusCode::FORBIDDEN, body);
        assert_eq!(e.to_string(), "Error from server (Forbidden): Forbidden");
    }

    #[test]
    fn renders_other_errors_with_status_and_excerpt() {
        let e = ApiError::from_response(StatusCode::BAD_GATEWAY, b"upstream down\n");
        assert_eq!(
            e.to_string(),
            "Error from server: the server responded with status 502 Bad Gateway: upstream down"
        );
        let long = "x".repeat(500);
        let e = ApiError::from_response(StatusCode::INTERNAL_SERVER_ERROR, long.as_bytes());
        assert!(e.message.ends_with(&format!("{}...", "x".repeat(200))));
        assert!(!e.message.contains(&"x".repeat(201)));
        let e = ApiError::from_response(StatusCode::NOT_FOUND, b"");
        assert_eq!(
            e.to_string(),
            "Error from server: the server responded with status 404 Not Found and an empty body"
        );
        assert_eq!(
            e.or_not_found(Kind::EndpointSlice, "web-1").to_string(),
            "Error from server (NotFound): endpointslices.discovery.k8s.io \"web-1\" not found"
        );
        // A body that is JSON but not a Status is shown as is.
        let e = ApiError::from_response(StatusCode::CONFLICT, br#"{"error":"busy"}"#);
        assert!(
            e.message.ends_with(r#"409 Conflict: {"error":"busy"}"#),
            "{e}"
        );
    }

    #[test]
    fn rejects_tokens_that_cannot_be_headers() {
        let s = ServerUrl::parse("http://127.0.0.1:1").unwrap();
        assert!(Client::new(s.clone(), Some("abc\ndef".into())).is_err());
        assert!(Client::new(s, Some("abc.def-_=".into())).is_ok());
    }
}
