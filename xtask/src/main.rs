//! weft's developer task runner: `cargo xtask <setup|test|demo|bench>`.

mod bench;
mod demo;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "weft developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what the project needs (apt packages, rustup components); idempotent.
    Setup {
        /// Only report what is missing (the doctor); exit non-zero if anything is.
        #[arg(long)]
        check: bool,
    },
    /// setup, then cargo fmt --check, clippy -D warnings, build, test.
    Test {
        /// Skip `setup`.
        #[arg(long)]
        no_setup: bool,
    },
    /// Bring up a 3-node cluster in network namespaces, apply examples/demo.yaml, check it (root).
    Demo {
        /// Leave the cluster running (remove it later with `--down`).
        #[arg(long, conflicts_with = "down")]
        keep: bool,
        /// Remove what earlier `--keep` (or interrupted) runs left behind.
        #[arg(long)]
        down: bool,
        /// Skip `setup`.
        #[arg(long)]
        no_setup: bool,
    },
    /// Build in release and run a benchmark: `bench push [ARGS...]` (`bench --help` lists them).
    #[command(disable_help_flag = true)]
    Bench {
        /// Benchmark name.
        #[arg(allow_hyphen_values = true)]
        name: Option<String>,
        /// Arguments passed to the benchmark binary.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup { check } => setup::run(check),
        Task::Test { no_setup } => test::run(no_setup),
        Task::Demo {
            keep,
            down,
            no_setup,
        } => demo::run(demo::Options {
            keep,
            down,
            no_setup,
        }),
        Task::Bench { name, args } => match name.as_deref() {
            Some("-h" | "--help" | "help") => {
                println!(
                    "Usage: cargo xtask bench <NAME> [ARGS]...\n\nBuilds in release and runs the benchmark with ARGS.\n\nBenchmarks:\n{}",
                    bench::list()
                );
                Ok(())
            }
            Some(name) => bench::run(name, &args),
            None => Err(anyhow::anyhow!(
                "which benchmark? available:\n{}",
                bench::list()
            )),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
