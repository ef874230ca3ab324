//! Network namespaces: open one by path and run code inside it on a
//! dedicated thread, so the calling thread never leaves its namespace.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Open a netns file (e.g. `/run/netns/<name>`).
pub fn open(path: &Path) -> io::Result<File> {
    File::open(path)
}

/// Run `f` on a fresh thread that has entered the namespace `ns`. The thread
/// ends afterwards, so no other code ever runs in the wrong namespace.
pub fn run_in<T, F>(ns: &File, f: F) -> io::Result<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let ns = ns.try_clone()?;
    std::thread::Builder::new()
        .name("weft-netns".into())
        .spawn(move || {
            // SAFETY: setns on an owned, open descriptor; affects only this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })?
        .join()
        .map_err(|_| io::Error::other("netns worker thread panicked"))?
}
