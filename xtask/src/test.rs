//! `cargo xtask test`: setup, then format check, clippy, build, tests; ends
//! with one line `xtask: N passed, M failed, K skipped`.

use crate::{setup, util};
use anyhow::{bail, Result};
use std::process::Command;

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
    let totals = Totals::parse(&out);
    if !status.success() || totals.failed > 0 {
        eprintln!(
            "xtask: step `test` failed: `{}` exited with {status}",
            util::display(&cmd)
        );
        println!("{}", totals.line());
        bail!("step `test` failed");
    }
    println!("{}", totals.line());
    Ok(())
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
}
