//! `weft-cni`: the binary a container runtime executes. Logs go to stderr or
//! to the file named by `WEFT_CNI_LOG`; stdout carries only the protocol.

use std::fs::OpenOptions;
use std::io;
use std::sync::Mutex;

use tracing_subscriber::filter::LevelFilter;

fn init_logging() {
    let level = |default| {
        std::env::var("WEFT_CNI_LOG_LEVEL")
            .ok()
            .and_then(|l| l.parse::<LevelFilter>().ok())
            .unwrap_or(default)
    };
    let builder = tracing_subscriber::fmt().with_target(false);
    if let Some(path) = std::env::var_os("WEFT_CNI_LOG") {
        if let Ok(file) = OpenOptions::new().create(true).append(true).open(&path) {
            builder
                .with_ansi(false)
                .with_max_level(level(LevelFilter::INFO))
                .with_writer(Mutex::new(file))
                .init();
            return;
        }
    }
    builder
        .with_ansi(false)
        .with_max_level(level(LevelFilter::WARN))
        .with_writer(io::stderr)
        .init();
}

fn main() {
    init_logging();
    let code = weft_cni::run(
        &|k| std::env::var(k).ok(),
        &mut io::stdin().lock(),
        &mut io::stdout().lock(),
    );
    std::process::exit(code);
}
