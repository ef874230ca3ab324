//! Running commands the way a developer would read them: each command is
//! echoed before it runs, and a failure names the command and how it ended.

use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

/// The workspace root (the parent of this crate).
pub fn root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                root().join(d)
            }
        }
        _ => root().join("target"),
    }
}

/// The cargo that runs us (so the pinned toolchain is used), else `cargo`.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// A command line as a shell user would type it (quoted where needed).
pub fn display(cmd: &Command) -> String {
    let program = cmd.get_program();
    // `$CARGO` is the pinned toolchain's cargo; show it the way it is typed.
    let is_cargo = std::env::var_os("CARGO").is_some_and(|c| c == program);
    let mut parts = vec![if is_cargo {
        "cargo".to_string()
    } else {
        quote(program)
    }];
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Print the command about to run (on stderr, so captured stdout stays clean).
pub fn echo(cmd: &Command) {
    eprintln!("$ {}", display(cmd));
}

fn failure(cmd: &Command, status: ExitStatus) -> anyhow::Error {
    let how = match status.code() {
        Some(code) => format!("exit status {code}"),
        None => {
            use std::os::unix::process::ExitStatusExt;
            match status.signal() {
                Some(sig) => format!("signal {sig}"),
                None => status.to_string(),
            }
        }
    };
    anyhow::anyhow!("command `{}` failed with {how}", display(cmd))
}

/// Echo and run `cmd` with inherited stdio; fail unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    echo(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", display(cmd)))?;
    if !status.success() {
        return Err(failure(cmd, status));
    }
    Ok(())
}

/// Echo and run `cmd`, returning its stdout; on failure the error carries stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    echo(cmd);
    capture(cmd)
}

/// Like [`output`] without echoing (for polling loops).
pub fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", display(cmd)))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim();
        let err = failure(cmd, out.status);
        if stderr.is_empty() {
            return Err(err);
        }
        return Err(anyhow::anyhow!("{err}:\n{stderr}"));
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", display(cmd)))
}

/// Echo and run `cmd`, streaming its stdout through to ours while keeping a
/// copy. Returns the exit status and everything it printed on stdout.
pub fn run_tee(cmd: &mut Command) -> Result<(ExitStatus, String)> {
    run_tee_to(cmd, &mut std::io::stdout())
}

/// [`run_tee`] writing the streamed copy to `out`.
pub fn run_tee_to(cmd: &mut Command, out: &mut dyn Write) -> Result<(ExitStatus, String)> {
    echo(cmd);
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{}`", display(cmd)))?;
    let mut captured = String::new();
    if let Some(stdout) = child.stdout.take() {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .with_context(|| format!("reading the output of `{}`", display(cmd)))?;
            if n == 0 {
                break;
            }
            let _ = out.write_all(&line);
            let _ = out.flush();
            captured.push_str(&String::from_utf8_lossy(&line));
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{}`", display(cmd)))?;
    Ok((status, captured))
}

/// Whether a command named `prog` is on PATH.
pub fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            let p = dir.join(prog);
            p.metadata().is_ok_and(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
        })
    })
}

/// Whether we run as root (effective uid 0).
pub fn is_root() -> bool {
    // /proc/self/status: "Uid:\treal\teffective\tsaved\tfs"
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|rest| rest.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> Result<String> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The last `n` lines of a file (for error reports), indented.
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = strip_ansi(&String::from_utf8_lossy(&bytes));
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            lines[start..]
                .iter()
                .map(|l| format!("    {l}\n"))
                .collect()
        }
        Err(e) => format!("    (cannot read {}: {e})\n", path.display()),
    }
}

/// Remove ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

extern "C" {
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    fn kill(pid: i32, sig: i32) -> i32;
}

/// SIGKILL one process by its id (for processes we did not spawn in this run).
pub fn kill_pid(pid: u32) -> Result<()> {
    const SIGKILL: i32 = 9;
    let pid = i32::try_from(pid).context("pid out of range")?;
    if pid <= 1 {
        bail!("refusing to signal pid {pid}");
    }
    // SAFETY: kill(2) with a positive pid signals exactly that process.
    if unsafe { kill(pid, SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("kill -9 {pid}"));
    }
    Ok(())
}

/// Catch SIGINT and SIGTERM so long-running tasks can stop and clean up
/// (see [`check_interrupted`]) instead of dying with resources left behind.
/// Child processes still get the default behaviour (a handler does not survive exec).
pub fn trap_interrupts() {
    const SIGINT: i32 = 2;
    const SIGTERM: i32 = 15;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        signal(SIGINT, on_signal);
        signal(SIGTERM, on_signal);
    }
}

/// Fail if SIGINT/SIGTERM arrived since [`trap_interrupts`].
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleep in small steps, failing early when interrupted.
pub fn sleep(d: std::time::Duration) -> Result<()> {
    let step = std::time::Duration::from_millis(100);
    let end = std::time::Instant::now() + d;
    loop {
        check_interrupted()?;
        let now = std::time::Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep(step.min(end - now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_commands_quoted() {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", "wd1-cp", "curl", "-H", "Content-Type: x"]);
        assert_eq!(
            display(&c),
            "ip netns exec wd1-cp curl -H 'Content-Type: x'"
        );
        let mut c = Command::new("sh");
        c.args(["-c", "it's"]);
        assert_eq!(display(&c), r"sh -c 'it'\''s'");
    }

    #[test]
    fn failure_names_the_command() {
        let err = run(Command::new("false").arg("--flag")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "command `false --flag` failed with exit status 1"
        );
        let err = output(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("oops"), "{msg}");
        assert!(msg.contains("exit status 3"), "{msg}");
    }

    #[test]
    fn tee_captures_and_status() {
        let mut copy = Vec::new();
        let (st, out) = run_tee_to(
            Command::new("sh").args(["-c", "echo a; echo b; exit 2"]),
            &mut copy,
        )
        .unwrap();
        assert_eq!(out, "a\nb\n");
        assert_eq!(copy, b"a\nb\n");
        assert_eq!(st.code(), Some(2));
    }

    #[test]
    fn strips_ansi() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2025\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x=1"),
            "2025  INFO x=1"
        );
    }
}
