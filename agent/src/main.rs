//! weft-agent: joins the cluster (registers or refreshes its Node) and follows
//! the control plane's push stream. The overlay, dataplanes and DNS that act on
//! the view are wired here as they land.

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use hyper::Method;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use weft_agent::client::{ClientError, Endpoint};
use weft_model::NodeView;

#[derive(Parser, Debug)]
#[command(name = "weft-agent", version, about = "weft node agent")]
struct Args {
    /// Control plane URL.
    #[arg(long, env = "WEFT_SERVER", default_value = "http://127.0.0.1:6443")]
    server: String,
    /// File holding this node's bearer token.
    #[arg(long, env = "WEFT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Bearer token (prefer --token-file).
    #[arg(long, env = "WEFT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// This node's name.
    #[arg(long, env = "WEFT_NODE_NAME")]
    node_name: String,
    /// This node's underlay address.
    #[arg(long, env = "WEFT_NODE_IP")]
    node_ip: IpAddr,
}

fn main() {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(err) = run(args) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// Create the Node, or keep the existing one (and its podCIDR), then report it Ready.
async fn register(ep: &Endpoint, name: &str, ip: IpAddr) -> anyhow::Result<()> {
    let path = format!("/api/v1/nodes/{name}");
    let node = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {"weft.dev/vtep-ip": ip.to_string()}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]}
    });
    match ep.call(Method::GET, &path, None).await {
        Ok(_) => {}
        Err(ClientError::Status { code: 404, .. }) => {
            ep.call(
                Method::POST,
                "/api/v1/nodes",
                Some(Bytes::from(node.to_string())),
            )
            .await
            .context("registering the Node")?;
        }
        Err(e) => return Err(e).context("looking up the Node"),
    }
    let (_, cur) = ep.call(Method::GET, &path, None).await?;
    let mut cur: serde_json::Value = serde_json::from_slice(&cur)?;
    cur["status"] = serde_json::json!({
        "addresses": [{"type": "InternalIP", "address": ip.to_string()}],
        "conditions": [{"type": "Ready", "status": "True", "reason": "WeftAgentReady", "message": "weft-agent is following the control plane"}],
    });
    ep.call(
        Method::PUT,
        &format!("{path}/status"),
        Some(Bytes::from(cur.to_string())),
    )
    .await
    .context("reporting the Node ready")?;
    Ok(())
}

fn run(args: Args) -> anyhow::Result<()> {
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) => std::fs::read_to_string(p)
            .with_context(|| format!("reading {}", p.display()))?
            .trim()
            .to_string(),
        (None, None) => anyhow::bail!("a token is required: --token-file or WEFT_TOKEN"),
    };
    let ep = Endpoint::parse(&args.server, &token)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        register(&ep, &args.node_name, args.node_ip).await?;
        tracing::info!(node = %args.node_name, "registered");
        let view: weft_agent::sync::SharedView = Arc::new(RwLock::new(NodeView::default()));
        let (tx, mut rx) = tokio::sync::watch::channel(0u64);
        tokio::spawn(weft_agent::sync::follow(ep.clone(), args.node_name.clone(), view.clone(), tx));
        loop {
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() { break; }
                    rx.borrow_and_update();
                    let v = view.read().unwrap_or_else(|p| p.into_inner());
                    let subnet = v.nodes.get(&args.node_name).map(|n| n.pod_cidrs.join(",")).unwrap_or_default();
                    tracing::info!(rev = v.rev, services = v.services.len(), nodes = v.nodes.len(), subnet, "view updated");
                }
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        Ok(())
    })
}
