//! `weft-dns`: the cluster DNS server alone, serving a view from a file
//! (benchmarks, trying the zone out). The agent embeds the same server and
//! feeds it from the control plane's stream.

use anyhow::{Context, Result};
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use weft_dns::forward::{ForwardConfig, Forwarder};
use weft_dns::server::{Limits, Server};
use weft_dns::{ClusterDns, PodRecords, ZoneConfig};
use weft_model::{NodeView, StreamFrame};

#[derive(Parser, Debug)]
#[command(
    name = "weft-dns",
    about = "weft cluster DNS, serving a view from a file"
)]
struct Args {
    /// The view: JSON of a stream Reset's data, `{"rev":N,"services":[…],"nodes":[…],"pods":[…]}`.
    #[arg(long)]
    view: PathBuf,
    /// Address to serve UDP and TCP on (repeatable).
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    /// The cluster domain.
    #[arg(long, default_value = "cluster.local")]
    zone: String,
    /// TTL of cluster records, seconds.
    #[arg(long, default_value_t = 5)]
    ttl: u32,
    /// Pod records (`a-b-c-d.<ns>.pod.<zone>`).
    #[arg(long, value_enum, default_value_t = PodRecords::Disabled)]
    pods: PodRecords,
    /// Where upstream servers come from (loopback ones are rejected).
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// Answer cluster names only (everything else: REFUSED).
    #[arg(long)]
    no_forward: bool,
}

/// The data of a stream Reset frame.
#[derive(serde::Deserialize)]
struct ResetData {
    #[serde(default)]
    rev: u64,
    #[serde(default)]
    services: Vec<weft_model::view::ServiceEntry>,
    #[serde(default)]
    nodes: Vec<weft_model::view::NodeEntry>,
    #[serde(default)]
    pods: Vec<weft_model::view::PodEntry>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("weft-dns: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let config = ZoneConfig::new(
        &args.zone,
        args.ttl,
        args.pods,
        args.listen.iter().map(|a| a.ip()).collect(),
    )?;
    // Parsed, compiled, and dropped before serving: only the snapshot stays.
    let snap = {
        let text = std::fs::read(&args.view)
            .with_context(|| format!("reading {}", args.view.display()))?;
        let data: ResetData = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a view (Reset data)", args.view.display()))?;
        drop(text);
        let mut view = NodeView::default();
        weft_model::view::apply(
            &mut view,
            StreamFrame::Reset {
                rev: data.rev,
                services: data.services,
                nodes: data.nodes,
                pods: data.pods,
            },
        )
        .context("applying the view")?;
        weft_dns::feed::snapshot_of(config, &view)
    };
    // Hand the parse's freed memory back (glibc keeps it otherwise): what
    // stays resident is the snapshot.
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    let (forwarder, search) = if args.no_forward {
        (None, Vec::new())
    } else {
        // Never forward to ourselves.
        let own: Vec<std::net::IpAddr> = args.listen.iter().map(|a| a.ip()).collect();
        let rc = weft_dns::resolv_conf::load_excluding(&args.resolv_conf, &own)?;
        for (ip, why) in &rc.rejected {
            tracing::warn!(%ip, why, "upstream rejected");
        }
        let search = weft_dns::handler::host_search(&rc.search, &snap.config.zone);
        let fwd = (!rc.upstreams.is_empty()).then(|| {
            Arc::new(Forwarder::new(ForwardConfig {
                upstreams: rc.upstreams.clone(),
                ..Default::default()
            }))
        });
        (fwd, search)
    };
    tracing::info!(
        services = snap.services.len(),
        pods = snap.pods.len(),
        forwarding = forwarder.is_some(),
        "view loaded"
    );
    let dns = Arc::new(ClusterDns::new(snap, forwarder, search));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let mut server = Server::bind(dns, &args.listen, Limits::default()).await?;
        tracing::info!(udp = ?server.udp, tcp = ?server.tcp, "serving");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = server.wait() => anyhow::bail!("every listener ended"),
            _ = term.recv() => Ok(()),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}
