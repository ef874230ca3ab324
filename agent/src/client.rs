//! A small HTTP/1.1 client for the control plane API (plain HTTP, bearer token).

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response};
use std::time::Duration;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("server address {0:?} must look like http://HOST:PORT")]
    BadServer(String),
    #[error("cannot reach the control plane at {server}: {source}")]
    Connect {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with {server} failed: {source}")]
    Http {
        server: String,
        #[source]
        source: hyper::Error,
    },
    #[error("request to {server} timed out after {secs}s")]
    Timeout { server: String, secs: u64 },
    #[error("{method} {path}: HTTP {code}: {message}")]
    Status {
        method: String,
        path: String,
        code: u16,
        message: String,
    },
    #[error("stream from {server} sent a malformed frame: {source}")]
    Frame {
        server: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Where the control plane is and how to authenticate.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `host:port`
    pub authority: String,
    pub token: String,
}

impl Endpoint {
    pub fn parse(server: &str, token: &str) -> Result<Endpoint, ClientError> {
        let authority = server
            .strip_prefix("http://")
            .ok_or_else(|| ClientError::BadServer(server.into()))?
            .trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(ClientError::BadServer(server.into()));
        }
        Ok(Endpoint {
            authority: authority.to_string(),
            token: token.to_string(),
        })
    }

    fn server(&self) -> String {
        format!("http://{}", self.authority)
    }

    /// Send one request on a fresh connection; the response body is left to the caller.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Response<Incoming>, ClientError> {
        let stream = TcpStream::connect(&self.authority)
            .await
            .map_err(|source| ClientError::Connect {
                server: self.server(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|source| ClientError::Http {
                    server: self.server(),
                    source,
                })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.authority)
            .header(AUTHORIZATION, format!("Bearer {}", self.token));
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| ClientError::BadServer(e.to_string()))?;
        sender
            .send_request(req)
            .await
            .map_err(|source| ClientError::Http {
                server: self.server(),
                source,
            })
    }

    /// A request whose whole response body is read, with a timeout; non-2xx is an error.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(u16, Bytes), ClientError> {
        let secs = 30;
        let m = method.to_string();
        let fut = async {
            let resp = self.send(method, path, body).await?;
            let code = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|source| ClientError::Http {
                    server: self.server(),
                    source,
                })?
                .to_bytes();
            Ok::<_, ClientError>((code, bytes))
        };
        let (code, bytes) = tokio::time::timeout(Duration::from_secs(secs), fut)
            .await
            .map_err(|_| ClientError::Timeout {
                server: self.server(),
                secs,
            })??;
        if !(200..300).contains(&code) {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| {
                    v.get("message")
                        .and_then(|m| m.as_str())
                        .map(str::to_string)
                })
                .unwrap_or_else(|| {
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned()
                });
            return Err(ClientError::Status {
                method: m,
                path: path.to_string(),
                code,
                message,
            });
        }
        Ok((code, bytes))
    }
}

/// Splits a streamed body into lines.
pub struct LineReader {
    body: Incoming,
    buf: BytesMut,
    /// Bytes of `buf` already searched for a newline (a long line arrives in many chunks).
    scanned: usize,
    done: bool,
}

/// After a line this large, the buffer is given back rather than kept for the next one.
const KEEP_BUFFER: usize = 1 << 20;

impl LineReader {
    pub fn new(body: Incoming) -> Self {
        LineReader {
            body,
            buf: BytesMut::new(),
            scanned: 0,
            done: false,
        }
    }

    /// The next complete line (without `\n`), or `None` at the end of the body.
    pub async fn next_line(&mut self) -> Result<Option<Bytes>, hyper::Error> {
        loop {
            if let Some(off) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
                let pos = self.scanned + off;
                let line = self.buf.split_to(pos + 1).freeze().slice(..pos);
                self.scanned = 0;
                if line.len() > KEEP_BUFFER {
                    // `split_to` leaves the rest sharing the big allocation; copy it out so
                    // the line's memory is freed when the caller drops it.
                    self.buf = BytesMut::from(&self.buf[..]);
                }
                return Ok(Some(line));
            }
            self.scanned = self.buf.len();
            if self.done {
                return Ok(None);
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(e),
                None => self.done = true,
            }
        }
    }
}
