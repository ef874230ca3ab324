//! `cargo xtask test`: setup, then format check, clippy, build, tests, and a
//! short fuzz run; ends with one line `xtask: N passed, M failed, K skipped`.

use crate::{setup, util};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Totals over every `test result:` line of `cargo test`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
}

impl Totals {
    /// Sum the `test result: ok. N passed; M failed; I ignored; ...` lines of `output`.
    pub fn parse(output: &str) -> Totals {
        let mut t = Totals::default();
        for line in output.lines() {
            let Some(rest) = line.trim().strip_prefix("test result:") else {
                continue;
            };
            // rest: " ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s"
            let rest = rest.split_once('.').map_or(rest, |(_, r)| r);
            for part in rest.split(';') {
                let mut words = part.split_whitespace();
                let (Some(n), Some(what)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(n) = n.parse::<u64>() else { continue };
                match what {
                    "passed" => t.passed += n,
                    "failed" => t.failed += n,
                    "ignored" => t.skipped += n,
                    _ => {}
                }
            }
        }
        // A test that cannot run here prints `skipped: why` and returns: cargo
        // counts it as passed, we count it as skipped (output shown with
        // `--show-output`).
        let skipped = output
            .lines()
            .filter(|l| l.trim_start().starts_with("skipped: "))
            .count() as u64;
        let skipped = skipped.min(t.passed);
        t.passed -= skipped;
        t.skipped += skipped;
        t
    }

    pub fn line(&self) -> String {
        format!(
            "xtask: {} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }
}

pub fn run(no_setup: bool) -> Result<()> {
    if !no_setup {
        println!("== setup");
        if let Err(e) = setup::run(false) {
            eprintln!("xtask: step `setup` failed: {e:#}");
            println!("{}", Totals::default().line());
            bail!("step `setup` failed");
        }
    }

    let steps: [(&str, &[&str]); 3] = [
        ("fmt", &["fmt", "--all", "--", "--check"]),
        (
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        ("build", &["build", "--workspace", "--bins"]),
    ];
    println!("== ebpf lint");
    // The kernel crate lives outside the workspace (see the root Cargo.toml):
    // format-check and lint it on its own target.
    let ebpf = util::root().join("ebpf");
    let mut fmt = Command::new("rustfmt");
    fmt.args(["--edition", "2021", "--check"])
        .arg(ebpf.join("src/main.rs"));
    let mut clippy = util::cargo();
    clippy
        .current_dir(&ebpf)
        .env("RUSTC_BOOTSTRAP", "1")
        .args([
            "clippy",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(util::target_dir().join("ebpf-clippy"))
        .args(["--", "-D", "warnings"]);
    for (name, cmd) in [("ebpf fmt", &mut fmt), ("ebpf clippy", &mut clippy)] {
        if let Err(e) = util::run(cmd) {
            eprintln!("xtask: step `{name}` failed: {e:#}");
            println!("{}", Totals::default().line());
            bail!("step `{name}` failed");
        }
    }

    for (name, args) in steps {
        println!("== {name}");
        let mut cmd = util::cargo();
        cmd.args(args);
        if let Err(e) = util::run(&mut cmd) {
            eprintln!("xtask: step `{name}` failed: {e:#}");
            println!("{}", Totals::default().line());
            bail!("step `{name}` failed");
        }
    }

    println!("== test");
    // --no-fail-fast: run every test binary so the totals cover the whole workspace.
    let mut cmd = util::cargo();
    cmd.args([
        "test",
        "--workspace",
        "--no-fail-fast",
        "--",
        "--show-output",
    ]);
    let (status, out) = match util::run_tee(&mut cmd) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("xtask: step `test` failed: {e:#}");
            println!("{}", Totals::default().line());
            bail!("step `test` failed");
        }
    };
    let mut totals = Totals::parse(&out);
    if !status.success() || totals.failed > 0 {
        eprintln!(
            "xtask: step `test` failed: `{}` exited with {status}",
            util::display(&cmd)
        );
        println!("{}", totals.line());
        bail!("step `test` failed");
    }

    println!("== fuzz");
    match fuzz_smoke() {
        Ok(Fuzzed::Clean) => totals.passed += 1,
        Ok(Fuzzed::Skipped(why)) => {
            println!("skipped: fuzz: {why}");
            totals.skipped += 1;
        }
        Err(e) => {
            eprintln!("xtask: step `fuzz` failed: {e:#}");
            totals.failed += 1;
            println!("{}", totals.line());
            bail!("step `fuzz` failed");
        }
    }
    println!("{}", totals.line());
    Ok(())
}

/// How long the smoke run fuzzes, after a cold build of about two minutes of
/// CPU (libFuzzer's C++ and k8s-openapi through weft-model dominate).
const FUZZ_SECONDS: u32 = 30;

enum Fuzzed {
    /// Ran for [`FUZZ_SECONDS`] without a failing input.
    Clean,
    /// Could not run here (why).
    Skipped(String),
}

/// Drive arbitrary bytes through weft-dns's request path (the `request`
/// target of dns/fuzz) for [`FUZZ_SECONDS`], from the checked-in seeds; the
/// other targets are built, not run. The pinned stable toolchain runs
/// cargo-fuzz without a sanitizer (`-s none`; sanitizers need nightly): the
/// code under test is safe Rust, what we look for are panics and broken
/// replies. New inputs go to a corpus under the target directory, so the
/// checked-in seeds stay as they are. A failing input is an error naming its
/// file and how to replay it.
fn fuzz_smoke() -> Result<Fuzzed> {
    let fuzz_dir = util::root().join("dns/fuzz");
    // A workspace of its own: `cargo fmt --all` does not reach it.
    let mut sources: Vec<PathBuf> = ["src", "fuzz_targets"]
        .iter()
        .flat_map(|d| list_dir(&fuzz_dir.join(d)))
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    sources.sort();
    util::run(
        Command::new("rustfmt")
            .args(["--edition", "2021", "--check"])
            .args(&sources),
    )?;
    if !util::on_path("cargo-fuzz") {
        return Ok(Fuzzed::Skipped(
            "cargo-fuzz is not installed (`cargo xtask setup` installs it)".into(),
        ));
    }
    let work = util::target_dir().join("fuzz");
    let corpus = work.join("corpus/request");
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let cargo_fuzz = |sub: &str| {
        let mut cmd = util::cargo();
        cmd.args(["fuzz", sub, "--fuzz-dir"])
            .arg(&fuzz_dir)
            .args(["--sanitizer", "none", "--target-dir"])
            .arg(&work);
        cmd
    };

    // Every target, so that one not run here still has to compile.
    let started = Instant::now();
    util::run(&mut cargo_fuzz("build"))?;
    println!("fuzz: built in {} s", started.elapsed().as_secs());

    // cargo-fuzz writes failing inputs here (its default).
    let artifacts = fuzz_dir.join("artifacts/request");
    let before = list_dir(&artifacts);
    let log = work.join("request.log");
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut run = cargo_fuzz("run");
    run.arg("request")
        .arg(&corpus)
        .arg(fuzz_dir.join("corpus/request"))
        .arg("--")
        .arg(format!("-max_total_time={FUZZ_SECONDS}"))
        .arg(format!("-dict={}", fuzz_dir.join("request.dict").display()))
        .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().context("duplicating the log file")?)
        .stderr(log_file);
    util::echo(&run);
    println!("fuzz: libFuzzer's output goes to {}", log.display());
    let status = run
        .status()
        .with_context(|| format!("could not start `{}`", util::display(&run)))?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if status.success() {
        println!("fuzz: request: {}", summary(&text));
        return Ok(Fuzzed::Clean);
    }
    eprint!("{}", failure_report(&text));
    let found: Vec<PathBuf> = list_dir(&artifacts)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    if found.is_empty() {
        bail!(
            "`{}` failed with {status} without a failing input (see {})",
            util::display(&run),
            log.display()
        );
    }
    let shown = |p: &Path| {
        p.strip_prefix(util::root())
            .unwrap_or(p)
            .display()
            .to_string()
    };
    for input in &found {
        eprintln!(
            "xtask: fuzz: failing input {}; reproduce with: cargo fuzz run \
             --fuzz-dir dns/fuzz -s none --target-dir {} request {}",
            shown(input),
            shown(&work),
            shown(input)
        );
    }
    bail!("libFuzzer found {} failing input(s)", found.len())
}

/// The part of a failed run's log worth reading: from the panic (or
/// libFuzzer's error) on, else the last lines.
fn failure_report(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.contains(" panicked at ") || l.contains("ERROR: libFuzzer"))
        .unwrap_or(lines.len().saturating_sub(60));
    lines[start..]
        .iter()
        .take(100)
        .map(|l| format!("    {l}\n"))
        .collect()
}

fn list_dir(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// `N runs (E exec/s), cov C, corpus K` from libFuzzer's final stats and
/// its last status line.
fn summary(log: &str) -> String {
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or("?", |v| v.trim_start_matches(':').trim())
    };
    let last = log
        .lines()
        .rev()
        .find(|l| l.starts_with('#') && l.contains(" cov: "));
    let field = |name: &str| {
        last.and_then(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == name)?;
            words.next()
        })
        .unwrap_or("?")
    };
    format!(
        "{} runs ({} exec/s), cov {}, corpus {}, no failing input",
        stat("stat::number_of_executed_units"),
        stat("stat::average_exec_per_sec"),
        field("cov:"),
        field("corp:")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_test_result_lines() {
        let out = "\
running 3 tests
test a ... ok
test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s

running 2 tests
test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.20s
   Doc-tests weft_model
test result: ok. 0 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.00s
not a test result: 9 passed
skipped: not root
";
        let t = Totals::parse(out);
        assert_eq!(
            t,
            Totals {
                passed: 3,
                failed: 1,
                skipped: 4
            }
        );
        assert_eq!(t.line(), "xtask: 3 passed, 1 failed, 4 skipped");
    }

    #[test]
    fn a_failed_fuzz_run_is_reported_from_the_panic_on() {
        let log = "#1\tINITED cov: 1\n#2\tNEW cov: 2\n\
thread '<unnamed>' (1) panicked at dns/src/zone.rs:1:1:\nboom\n\
Test unit written to dns/fuzz/artifacts/request/crash-1\n";
        assert_eq!(
            failure_report(log),
            "    thread '<unnamed>' (1) panicked at dns/src/zone.rs:1:1:\n    boom\n    \
             Test unit written to dns/fuzz/artifacts/request/crash-1\n"
        );
    }

    #[test]
    fn summarises_a_fuzz_run() {
        let log = "\
#575762\tNEW    cov: 2499 ft: 4921 corp: 817/79Kb lim: 1217 exec/s: 19192 rss: 58Mb L: 105/962
#575958\tDONE   cov: 2499 ft: 4924 corp: 818/79Kb lim: 1217 exec/s: 18579 rss: 58Mb
Done 575958 runs in 31 second(s)
stat::number_of_executed_units: 575958
stat::average_exec_per_sec:     18579
stat::new_units_added:          1234
";
        assert_eq!(
            summary(log),
            "575958 runs (18579 exec/s), cov 2499, corpus 818/79Kb, no failing input"
        );
    }
}
