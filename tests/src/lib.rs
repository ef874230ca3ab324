//! weft's end-to-end harness: starts the real binaries as separate processes
//! on loopback or in a simulated cluster of network namespaces and cgroups
//! ([`cluster`]) and cleans up after itself even when a test fails.

pub mod bench;
pub mod benchnet;
pub mod cluster;

use anyhow::{bail, Context};
use bytes::Bytes;
use hyper::Method;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use weft_agent::client::{ClientError, Endpoint};

/// Path of a workspace binary next to the running test (target/<profile>/NAME).
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("test binary has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("no profile directory")?;
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is not built: run `cargo build --workspace --bins` (cargo xtask test does)",
            path.display()
        );
    }
    Ok(path)
}

pub const ADMIN_TOKEN: &str = "admin-token-e2e";
pub const VIEWER_TOKEN: &str = "viewer-token-e2e";

/// Token of node `name` in the harness's token file.
pub fn node_token(name: &str) -> String {
    format!("node-token-{name}")
}

/// A weft-control process with its own data directory: on loopback, or
/// inside a network namespace ([`ControlProcess::start_in_netns`]).
pub struct ControlProcess {
    child: Option<Child>,
    /// Where the server listens (inside its namespace, if any).
    pub addr: SocketAddr,
    pub dir: PathBuf,
    extra: Vec<String>,
    /// `ip netns exec` target and the listen address to ask for.
    netns: Option<String>,
    listen: String,
    /// A loopback forwarder into the namespace, for this process's clients.
    forward: Option<cluster::Forwarder>,
}

impl ControlProcess {
    /// Start on 127.0.0.1 with the test address plan; `dir` holds data, tokens and the log.
    pub fn start(dir: &Path, extra: &[&str]) -> anyhow::Result<ControlProcess> {
        Self::start_with(dir, None, "127.0.0.1:0", extra)
    }

    /// Start inside network namespace `netns` (`ip netns exec`), listening on
    /// `listen` there. [`ControlProcess::server`] is that address (for agents
    /// in the namespaces); [`ControlProcess::client`] goes through a loopback
    /// forwarder so the test process reaches it too.
    pub fn start_in_netns(
        dir: &Path,
        netns: &str,
        listen: &str,
        extra: &[&str],
    ) -> anyhow::Result<ControlProcess> {
        Self::start_with(dir, Some(netns), listen, extra)
    }

    fn start_with(
        dir: &Path,
        netns: Option<&str>,
        listen: &str,
        extra: &[&str],
    ) -> anyhow::Result<ControlProcess> {
        std::fs::create_dir_all(dir)?;
        let mut tokens =
            format!("{ADMIN_TOKEN},admin,1,\"system:masters\"\n{VIEWER_TOKEN},viewer,2\n");
        for n in [
            "n1", "n2", "n3", "node-1", "node-2", "node-3", "node-4", "node-5", "node-6",
        ] {
            tokens.push_str(&format!(
                "{},system:node:{n},{n},\"system:nodes\"\n",
                node_token(n)
            ));
        }
        std::fs::write(dir.join("tokens"), tokens)?;
        let mut p = ControlProcess {
            child: None,
            addr: "127.0.0.1:0".parse()?,
            dir: dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            netns: netns.map(str::to_string),
            listen: listen.to_string(),
            forward: None,
        };
        p.spawn()?;
        if let Some(ns) = netns {
            p.forward = Some(cluster::Forwarder::start(ns, p.addr)?);
        }
        Ok(p)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("control.log"))?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                // A no-op in the simulated cluster (the control plane's
                // namespace belongs to no node).
                cluster::enter_node_cgroup(&mut c, ns)?;
                c.args(["netns", "exec", ns]).arg(bin("weft-control")?);
                c
            }
            None => Command::new(bin("weft-control")?),
        };
        let mut child = cmd
            .arg("--listen")
            .arg(&self.listen)
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--token-file")
            .arg(self.dir.join("tokens"))
            .args(self.defaults())
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting weft-control")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut log = log;
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("weft-control listening on http://") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.to_string());
                    }
                }
                let _ = writeln!(log, "{line}");
            }
        });
        self.child = Some(child);
        let addr = rx.recv_timeout(Duration::from_secs(30)).with_context(|| {
            format!(
                "weft-control did not start; see {}",
                self.dir.join("control.log").display()
            )
        })?;
        self.addr = addr.parse()?;
        Ok(())
    }

    /// The test address plan, unless a test overrides it.
    fn defaults(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        for (flag, value) in [
            ("--service-cidr", "198.19.0.0/16"),
            ("--cluster-cidr", "198.18.128.0/17"),
        ] {
            if !self.extra.iter().any(|a| a == flag) {
                out.extend([flag, value]);
            }
        }
        out
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same data directory (a new port).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn server(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client for this process (through the forwarder when the server is
    /// inside a namespace).
    pub fn client(&self, token: &str) -> Api {
        let base = match &self.forward {
            Some(f) => format!("http://{}", f.addr),
            None => self.server(),
        };
        Api {
            ep: Endpoint::parse(&base, token).expect("harness builds a valid URL"),
        }
    }

    pub fn admin(&self) -> Api {
        self.client(ADMIN_TOKEN)
    }
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A JSON API client for tests.
#[derive(Clone)]
pub struct Api {
    pub ep: Endpoint,
}

/// A non-2xx answer: status code and the `Status` body.
#[derive(Debug)]
pub struct Failure {
    pub code: u16,
    pub status: serde_json::Value,
}

impl Api {
    /// Any request; Ok for 2xx with the JSON body, Err(Failure) otherwise.
    pub async fn req(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, Failure> {
        let resp = self
            .ep
            .send(method, path, body.map(|b| Bytes::from(b.to_string())))
            .await
            .map_err(|e| Failure {
                code: 0,
                status: serde_json::json!({"message": e.to_string()}),
            })?;
        let code = resp.status().as_u16();
        use http_body_util::BodyExt;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned()),
        );
        if (200..300).contains(&code) {
            Ok(v)
        } else {
            Err(Failure { code, status: v })
        }
    }

    pub async fn get(&self, path: &str) -> Result<serde_json::Value, Failure> {
        self.req(Method::GET, path, None).await
    }
    pub async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, Failure> {
        self.req(Method::POST, path, Some(body)).await
    }
    pub async fn put(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, Failure> {
        self.req(Method::PUT, path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> Result<serde_json::Value, Failure> {
        self.req(Method::DELETE, path, None).await
    }
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(u16, Bytes), ClientError> {
        let resp = self.ep.send(method, path, Some(body)).await?;
        let code = resp.status().as_u16();
        use http_body_util::BodyExt;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Ok((code, bytes))
    }
}

/// A temporary directory removed on drop (kept when WEFT_KEEP_TMP is set).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let base =
            std::env::temp_dir().join(format!("weft-e2e-{tag}-{}-{}", std::process::id(), nanos()));
        let _ = std::fs::create_dir_all(&base);
        TempDir(base)
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("WEFT_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
