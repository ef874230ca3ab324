//! Builds the kernel programs (`../ebpf`, package `weft-ebpf`) for
//! bpfel-unknown-none with aya-build; the object lands at
//! `$OUT_DIR/weft-ebpf`, which `src/ebpf.rs` embeds.
//!
//! The kernel crate is built with the toolchain pinned in
//! rust-toolchain.toml (its LLVM must match bpf-linker's) and `-Z
//! build-std=core`, which stable allows only with `RUSTC_BOOTSTRAP=1`. That
//! variable is set here, in this build script's own process, so it reaches
//! the nested cargo and nothing else.

use std::env;
use std::path::{Path, PathBuf};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("agent/ sits in the workspace root");
    let ebpf_dir = root.join("ebpf");
    let toolchain_file = root.join("rust-toolchain.toml");

    // aya-build watches the kernel crate's directory; its ABI crate and the
    // toolchain pin are inputs too.
    println!("cargo:rerun-if-changed={}", root.join("ebpf-abi").display());
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    println!("cargo:rerun-if-env-changed=PATH");

    let toolchain = pinned_toolchain(&toolchain_file)?;
    if env::var_os("AYA_BUILD_SKIP").is_none() && !on_path("bpf-linker") {
        anyhow::bail!(
            "bpf-linker is not on PATH; `cargo xtask setup` installs it \
             (see docs/architecture.md, \"The eBPF build\")"
        );
    }

    // weft-ebpf is outside this workspace (see the root Cargo.toml), and
    // aya-build runs `cargo build --package weft-ebpf` in the current
    // directory: run it from the crate's own.
    env::set_current_dir(&ebpf_dir)?;
    // Edition 2021: set_var is safe. This process is single-threaded here.
    env::set_var("RUSTC_BOOTSTRAP", "1");

    let root_dir = ebpf_dir.to_str().expect("workspace path is UTF-8");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "weft-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}

/// The `channel = "..."` of rust-toolchain.toml.
fn pinned_toolchain(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
        .next()
        .ok_or_else(|| anyhow::anyhow!("{} has no channel", path.display()))
}

fn on_path(program: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|d| d.join(program).is_file()))
}
