//! Talking to the weft-agent on this node over its local socket: the
//! commands that show what one node does (`overlay`, `services`, `trace`, `ebpf`).

use anyhow::{Context as _, Result};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// Where the agent is, and the output format.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The agent's local socket on this node.
    #[arg(
        long,
        env = "WEFT_AGENT_SOCKET",
        default_value = "/run/weft/agent.sock"
    )]
    pub socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_parser = ["json"])]
    pub output: Option<String>,
}

/// Ask the agent (`request` carries `op` and its arguments); the answer is its JSON.
pub async fn query(socket: &PathBuf, request: &serde_json::Value) -> Result<serde_json::Value> {
    let ask = async {
        let mut s = tokio::net::UnixStream::connect(socket)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the agent at {} (is weft-agent running on this node?)",
                    socket.display()
                )
            })?;
        let mut req = serde_json::to_vec(request)?;
        req.push(b'\n');
        s.write_all(&req).await?;
        let mut line = String::new();
        tokio::io::BufReader::new(s).read_line(&mut line).await?;
        serde_json::from_str::<serde_json::Value>(&line).context("the agent's answer is not JSON")
    };
    tokio::time::timeout(Duration::from_secs(15), ask)
        .await
        .with_context(|| {
            format!(
                "the agent at {} did not answer within 15s",
                socket.display()
            )
        })?
}

/// Ask, then print the answer as JSON (`-o json`) or with `render`. False
/// when the agent answered with an error.
pub async fn show(
    args: &AgentArgs,
    request: &serde_json::Value,
    render: fn(&serde_json::Value) -> String,
    out: &mut impl Write,
) -> Result<bool> {
    let v = query(&args.socket, request).await?;
    match args.output.as_deref() {
        Some("json") => writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?,
        _ => write!(out, "{}", render(&v))?,
    }
    Ok(v.get("error").is_none())
}

/// A JSON value as text for tables (`<none>` for null).
pub fn s(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "<none>".into(),
        other => other.to_string(),
    }
}
