//! weft-control: the control plane binary. Parses flags, installs logging and
//! wires the embedded store, state and API server from the library.

use anyhow::Context;
use clap::Parser;
use ipnetwork::Ipv4Network;
use std::net::SocketAddr;
use std::path::PathBuf;
use weft_control::auth::Tokens;
use weft_control::server::{start, ServerConfig};
use weft_control::state::Settings;

#[derive(Parser, Debug)]
#[command(
    name = "weft-control",
    version,
    about = "weft control plane: Kubernetes-style API, durable store, controllers, per-node push stream"
)]
struct Args {
    /// Address to serve the API on (any address; agents reach it over the underlay).
    #[arg(long, env = "WEFT_LISTEN", default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Directory of the durable embedded store.
    #[arg(long, env = "WEFT_DATA_DIR", default_value = "/var/lib/weft/control")]
    data_dir: PathBuf,
    /// Kubernetes static token file: `token,user,uid,"group1,group2"` per line.
    /// Without it, an admin token is generated at DATA_DIR/admin.token.
    #[arg(long, env = "WEFT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Service CIDR (IPv4) cluster IPs are allocated from.
    #[arg(long, env = "WEFT_SERVICE_CIDR", default_value = "10.96.0.0/12")]
    service_cidr: Ipv4Network,
    /// Cluster (pod) CIDR node subnets are carved from.
    #[arg(long, env = "WEFT_CLUSTER_CIDR", default_value = "10.244.0.0/16")]
    cluster_cidr: Ipv4Network,
    /// Prefix length of each node's pod subnet.
    #[arg(long, env = "WEFT_NODE_CIDR_MASK", default_value_t = 24)]
    node_cidr_mask: u8,
    /// NodePort range, `LOW-HIGH`.
    #[arg(long, env = "WEFT_NODE_PORT_RANGE", default_value = "30000-32767", value_parser = parse_range)]
    node_port_range: (u16, u16),
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "WEFT_MAX_BODY_BYTES", default_value_t = 3 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Watch events kept for resumption.
    #[arg(long, env = "WEFT_WATCH_HISTORY", default_value_t = 20_000)]
    watch_history: usize,
    /// Stream deltas kept for agents that reconnect.
    #[arg(long, env = "WEFT_STREAM_HISTORY", default_value_t = 20_000)]
    stream_history: usize,
    /// Log format.
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Debug)]
enum LogFormat {
    Text,
    Json,
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected LOW-HIGH"))?;
    let lo: u16 = a
        .trim()
        .parse()
        .map_err(|_| format!("{a:?} is not a port"))?;
    let hi: u16 = b
        .trim()
        .parse()
        .map_err(|_| format!("{b:?} is not a port"))?;
    if lo == 0 || lo > hi {
        return Err(format!("{s:?}: need 1 <= LOW <= HIGH"));
    }
    Ok((lo, hi))
}

fn load_tokens(args: &Args) -> anyhow::Result<Tokens> {
    if let Some(path) = &args.token_file {
        return Ok(Tokens::load(path)?);
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let path = args.data_dir.join("admin.token");
    let token = match std::fs::read_to_string(&path) {
        Ok(t) => t.trim().to_string(),
        Err(_) => {
            let mut b = [0u8; 24];
            getrandom::fill(&mut b)
                .map_err(|e| anyhow::anyhow!("no randomness for a token: {e}"))?;
            let t: String = b.iter().map(|x| format!("{x:02x}")).collect();
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("writing {}", path.display()))?;
            f.write_all(t.as_bytes())?;
            tracing::info!(path = %path.display(), "generated an admin token");
            t
        }
    };
    Tokens::parse(&format!("{token},admin,admin,\"system:masters\"\n"))
        .map_err(|(_, r)| anyhow::anyhow!("admin token at {}: {r}", path.display()))
}

fn main() {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    if let Err(err) = run(args) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let tokens = load_tokens(&args)?;
    let settings = Settings {
        service_cidr: args.service_cidr,
        cluster_cidr: args.cluster_cidr,
        node_cidr_mask: args.node_cidr_mask,
        node_port_range: args.node_port_range.0..=args.node_port_range.1,
        watch_history: args.watch_history,
        stream_history: args.stream_history,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("weft-control")
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let running = start(ServerConfig {
            listen: args.listen,
            data_dir: args.data_dir,
            tokens,
            settings,
            max_body_bytes: args.max_body_bytes,
        })
        .await?;
        eprintln!("weft-control listening on http://{}", running.addr);
        tokio::signal::ctrl_c()
            .await
            .context("waiting for a signal")?;
        tracing::info!("shutting down");
        Ok(())
    })
}
