//! Running the control plane: open the store, load state, start the publisher
//! and the graceful-deletion timer, and serve the API.

use crate::auth::Tokens;
use crate::http::{serve, ApiServer};
use crate::state::{Control, Settings};
use crate::store::{EmbeddedOptions, EmbeddedStore, Store};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tokens: Tokens,
    pub settings: Settings,
    pub max_body_bytes: usize,
}

/// A running control plane.
pub struct Running {
    pub control: Arc<Control>,
    pub addr: SocketAddr,
}

/// Open the store and state, then start serving in the background on the current runtime.
pub async fn start(cfg: ServerConfig) -> anyhow::Result<Running> {
    let store = EmbeddedStore::open(&cfg.data_dir, EmbeddedOptions::default())?;
    start_with_store(cfg, Box::new(store)).await
}

pub async fn start_with_store(cfg: ServerConfig, store: Box<dyn Store>) -> anyhow::Result<Running> {
    let control = Control::open(cfg.settings, store)?;
    spawn_publisher(control.clone());
    if let Some(rev) = control
        .bootstrap()
        .map_err(|e| anyhow::anyhow!("creating default namespaces: {e}"))?
    {
        let mut d = control.durable();
        crate::store::wait_durable(&mut d, rev).await?;
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding the API to {}: {e}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let api = Arc::new(ApiServer {
        control: control.clone(),
        tokens: cfg.tokens,
        max_body_bytes: cfg.max_body_bytes,
    });
    tokio::spawn(serve(listener, api));
    let c = control.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            c.expire_terminating();
        }
    });
    tracing::info!(%addr, "serving the API");
    Ok(Running { control, addr })
}

/// Publish transactions to watchers and streams as the store makes them durable.
fn spawn_publisher(control: Arc<Control>) {
    let mut durable = control.durable();
    tokio::spawn(async move {
        loop {
            let d = durable.borrow_and_update().clone();
            control.publish_durable(d.rev);
            if let Some(f) = d.failed {
                tracing::error!(error = %f, "store failed; writes are refused until restart");
                control.fail(f);
            }
            if durable.changed().await.is_err() {
                return;
            }
        }
    });
}
