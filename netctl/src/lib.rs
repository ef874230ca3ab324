//! netctl: weft's operator CLI. `apply`, `get` and `delete` against the
//! control plane's Kubernetes API, with kubectl's output conventions.

pub mod agent;
pub mod apply;
pub mod client;
pub mod delete;
pub mod dns;
pub mod ebpf;
pub mod get;
pub mod overlay;
pub mod services;
pub mod source;
pub mod table;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use weft_model::Kind;

pub use client::{ApiError, Client, ServerUrl};

/// The namespace used when `-n` is not given.
pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Debug, Parser)]
#[command(
    name = "netctl",
    version,
    about = "weft's operator CLI: apply, get and delete cluster objects"
)]
pub struct Cli {
    /// Control plane URL (plain HTTP only).
    #[arg(
        long,
        global = true,
        env = "WEFT_SERVER",
        hide_env_values = true,
        default_value = "http://127.0.0.1:6443"
    )]
    pub server: String,

    /// Bearer token (takes precedence over --token-file).
    #[arg(long, global = true, env = "WEFT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// File holding the bearer token (surrounding whitespace is ignored).
    #[arg(
        long,
        global = true,
        env = "WEFT_TOKEN_FILE",
        hide_env_values = true,
        value_name = "PATH"
    )]
    pub token_file: Option<PathBuf>,

    /// Namespace for namespaced objects [default: default].
    #[arg(short = 'n', long, global = true, value_name = "NS")]
    pub namespace: Option<String>,

    /// List objects across all namespaces.
    #[arg(short = 'A', long, global = true)]
    pub all_namespaces: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update objects from manifests (YAML or JSON).
    Apply(apply::ApplyArgs),
    /// Show objects as a table, JSON, YAML or names.
    Get(get::GetArgs),
    /// Delete objects by kind and name, or those in manifests.
    Delete(delete::DeleteArgs),
    /// Show this node's VXLAN overlay (asks the local weft-agent).
    Overlay(overlay::OverlayArgs),
    /// Show this node's Services: frontends -> backends with states (asks the local weft-agent).
    Services(services::ServicesArgs),
    /// Explain what this node does with a packet FROM -> TO (asks the local weft-agent).
    Trace(services::TraceArgs),
    /// Show this node's eBPF maps: frontends, backends, affinity and connection entries (asks the local weft-agent).
    Ebpf(ebpf::EbpfArgs),
    /// Resolve NAME as a pod on this node would, showing each step of its search path.
    Dns(dns::DnsArgs),
}

/// What every command needs: the client and the namespace flags.
#[derive(Clone, Debug)]
pub struct Context {
    pub client: Client,
    /// `-n`, when given.
    pub namespace: Option<String>,
    pub all_namespaces: bool,
}

impl Context {
    /// The namespace to work in: `-n`, or `default`.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }
}

/// Parse the command line and run it. `Ok(FAILURE)` when some objects failed
/// (their errors are already printed); `Err` for errors that stop the command.
pub fn run() -> Result<ExitCode> {
    run_cli(Cli::parse())
}

pub fn run_cli(cli: Cli) -> Result<ExitCode> {
    if let Command::Dns(args) = &cli.command {
        // No control plane involved. `--server ADDR` with an address (a
        // control plane URL is always http://...) names the DNS server.
        let server = dns::parse_server(&cli.server).ok();
        let mut out = std::io::stdout().lock();
        let mut err = std::io::stderr().lock();
        let code = dns::run(args, cli.namespace.as_deref(), server, &mut out, &mut err);
        let _ = out.flush();
        return Ok(code);
    }
    let server = ServerUrl::parse(&cli.server)?;
    let token = resolve_token(cli.token.as_deref(), cli.token_file.as_deref())?;
    let ctx = Context {
        client: Client::new(server, token)?,
        namespace: cli.namespace,
        all_namespaces: cli.all_namespaces,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let mut out = stdout.lock();
    let mut err = stderr.lock();
    let result = rt.block_on(async {
        match cli.command {
            Command::Apply(args) => apply::run(&ctx, &args, &mut out, &mut err).await,
            Command::Get(args) => get::run(&ctx, &args, &mut out, &mut err).await,
            Command::Delete(args) => delete::run(&ctx, &args, &mut out, &mut err).await,
            Command::Overlay(args) => overlay::run(&args, &mut out).await,
            Command::Services(args) => services::services(&args, &mut out).await,
            Command::Trace(args) => services::trace(&args, &mut out).await,
            Command::Ebpf(args) => ebpf::run(&args, &mut out).await,
            // Answered above, before any client or runtime.
            Command::Dns(_) => Ok(true),
        }
    });
    let _ = out.flush();
    match result {
        Ok(true) => Ok(ExitCode::SUCCESS),
        Ok(false) => Ok(ExitCode::FAILURE),
        // `netctl get ... | head`: stop quietly.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e),
    }
}

/// The bearer token from `--token` or `--token-file` (trimmed); none if neither.
pub fn resolve_token(token: Option<&str>, token_file: Option<&Path>) -> Result<Option<String>> {
    if let Some(t) = token {
        let t = t.trim();
        return Ok((!t.is_empty()).then(|| t.to_string()));
    }
    let Some(path) = token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let t = text.trim();
    if t.is_empty() {
        anyhow::bail!("the token file {} is empty", path.display());
    }
    Ok(Some(t.to_string()))
}

/// `service`, `endpointslice.discovery.k8s.io`: how kubectl names a kind in
/// `kind/name` output and in "deleted" lines.
pub fn type_name(kind: Kind) -> String {
    if kind.group().is_empty() {
        kind.singular().to_string()
    } else {
        format!("{}.{}", kind.singular(), kind.group())
    }
}

/// `services`, `endpointslices.discovery.k8s.io`: how the API server names a
/// resource in its messages (`services "web" not found`).
pub fn resource_name(kind: Kind) -> String {
    if kind.group().is_empty() {
        kind.plural().to_string()
    } else {
        format!("{}.{}", kind.plural(), kind.group())
    }
}

/// `service/web`.
pub fn object_ref(kind: Kind, name: &str) -> String {
    format!("{}/{name}", type_name(kind))
}

/// The path of the collection: in `namespace` for namespaced kinds, across
/// all namespaces when `namespace` is `None`.
pub fn collection_path(kind: Kind, namespace: Option<&str>) -> String {
    kind.collection_path(namespace.map(encode_component).as_deref())
}

/// The path of one object.
pub fn object_path(kind: Kind, namespace: &str, name: &str) -> String {
    let ns = kind.namespaced().then_some(namespace);
    format!("{}/{}", collection_path(kind, ns), encode_component(name))
}

/// A collection path with an optional `labelSelector` query.
pub fn list_path(kind: Kind, namespace: Option<&str>, selector: Option<&str>) -> String {
    let path = collection_path(kind, namespace);
    match selector {
        Some(sel) if !sel.is_empty() => format!("{path}?labelSelector={}", encode_component(sel)),
        _ => path,
    }
}

/// Percent-encode everything but RFC 3986 unreserved characters.
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Print an API error on stderr the way kubectl does.
pub(crate) fn report(err: &mut dyn Write, e: &ApiError) -> Result<()> {
    writeln!(err, "{e}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_urls() {
        assert_eq!(
            object_path(Kind::Service, "shop", "web"),
            "/api/v1/namespaces/shop/services/web"
        );
        assert_eq!(object_path(Kind::Node, "shop", "n1"), "/api/v1/nodes/n1");
        assert_eq!(
            object_path(Kind::EndpointSlice, "default", "web-abc"),
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/web-abc"
        );
        assert_eq!(list_path(Kind::Service, None, None), "/api/v1/services");
        assert_eq!(
            list_path(Kind::Namespace, Some("x"), None),
            "/api/v1/namespaces"
        );
        assert_eq!(
            list_path(Kind::Pod, Some("default"), Some("app=web,tier in (a, b)")),
            "/api/v1/namespaces/default/pods?labelSelector=app%3Dweb%2Ctier%20in%20%28a%2C%20b%29"
        );
        assert_eq!(
            list_path(Kind::Pod, Some("default"), Some("")),
            "/api/v1/namespaces/default/pods"
        );
        assert_eq!(encode_component("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn names_kinds_like_kubectl() {
        assert_eq!(object_ref(Kind::Service, "web"), "service/web");
        assert_eq!(
            object_ref(Kind::EndpointSlice, "web-1"),
            "endpointslice.discovery.k8s.io/web-1"
        );
        assert_eq!(resource_name(Kind::Node), "nodes");
    }

    #[test]
    fn token_sources() {
        assert_eq!(resolve_token(None, None).unwrap(), None);
        assert_eq!(
            resolve_token(Some(" t0k "), Some(Path::new("/nonexistent"))).unwrap(),
            Some("t0k".into())
        );
        let dir = std::env::temp_dir().join(format!("netctl-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "secret\n").unwrap();
        assert_eq!(
            resolve_token(None, Some(&file)).unwrap(),
            Some("secret".into())
        );
        std::fs::write(&file, "  \n").unwrap();
        assert!(resolve_token(None, Some(&file))
            .unwrap_err()
            .to_string()
            .contains("empty"));
        let err = resolve_token(None, Some(&dir.join("missing"))).unwrap_err();
        assert!(
            format!("{err:#}").contains("reading the token file"),
            "{err:#}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from([
            "netctl",
            "get",
            "svc",
            "web",
            "-n",
            "shop",
            "-o",
            "wide",
            "--server",
            "http://h:1",
        ])
        .unwrap();
        assert_eq!(cli.namespace.as_deref(), Some("shop"));
        assert_eq!(cli.server, "http://h:1");
        let Command::Get(g) = cli.command else {
            panic!("not get")
        };
        assert_eq!(g.kind, "svc");
        assert_eq!(g.names, ["web"]);

        let cli =
            Cli::try_parse_from(["netctl", "-A", "apply", "-f", "a.yaml", "-f", "-"]).unwrap();
        assert!(cli.all_namespaces);
        let Command::Apply(a) = cli.command else {
            panic!("not apply")
        };
        assert_eq!(a.files, ["a.yaml", "-"]);
        assert!(Cli::try_parse_from(["netctl", "apply"]).is_err());
        assert!(Cli::try_parse_from(["netctl", "get", "svc", "-o", "xml"]).is_err());
    }
}
