//! Host processes of machines (firecracker, a container's init): spawning them in their own session so they
//! outlive the daemon, waiting for their exit with a pidfd (which also works for processes adopted after a
//! daemon restart, which are not our children), signalling, and reaping.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

/// Spawns `cmd` as the leader of a new session and returns its PID. The child is not waited for here:
/// [`wait_exit`] notices its end and [`reap`] collects it.
pub fn spawn_detached(cmd: &mut Command) -> io::Result<u32> {
    // SAFETY: setsid() is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(io::Error::from));
    }
    let child = cmd.spawn()?;
    Ok(child.id())
}

/// Whether `pid` runs (a zombie does not).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain spaces.
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// Whether the command line of `pid` contains `needle` (how we recognise our firecracker after a restart,
/// rather than trusting a PID that may have been reused).
pub fn cmdline_contains(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| raw.split(|b| *b == 0).any(|arg| arg == needle.as_bytes()))
        .unwrap_or(false)
}

pub fn signal(pid: u32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), sig);
}

/// Collects the exit status of `pid` if it is our exited child; harmless otherwise.
pub fn reap(pid: u32) {
    let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success it returns a new fd that we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor returned by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until `pid` exits (then reaps it if it is our child). Returns immediately when it is already gone.
pub async fn exited(pid: u32) {
    let fd = match pidfd_open(pid) {
        Ok(fd) => fd,
        Err(_) => return reap(pid),
    };
    // SAFETY: `fd` is an owned pidfd that lives inside the AsyncFd until it is dropped here.
    if let Ok(afd) = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) } {
        let _ = afd.readable().await;
    } else {
        // No reactor support for this fd: fall back to polling.
        while alive(pid) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    reap(pid);
}

/// Waits up to `timeout` for `pid` to exit; true when it did.
pub async fn wait_exit(pid: u32, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, exited(pid)).await.is_ok() || !alive(pid)
}

/// SIGTERM, then SIGKILL if it is still there after `term_grace`. Returns once the process is gone.
pub async fn terminate(pid: u32, term_grace: Duration) {
    if !alive(pid) {
        return reap(pid);
    }
    signal(pid, Signal::SIGTERM);
    if wait_exit(pid, term_grace).await {
        return;
    }
    signal(pid, Signal::SIGKILL);
    wait_exit(pid, Duration::from_secs(5)).await;
}

/// The last `lines` lines of a log file (reads at most its last 64 KiB).
pub fn tail(path: &std::path::Path, lines: usize) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].iter().map(|l| l.trim_end_matches('\r').to_string()).collect()
}

/// Removes a file the daemon made (a socket, a pid file); "already gone" is fine, anything else is logged.
pub fn remove_file_logged(path: &std::path::Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "could not remove");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawned_process_is_waited_for_and_reaped() {
        let pid = spawn_detached(Command::new("sleep").arg("0.2")).unwrap();
        assert!(alive(pid));
        assert!(cmdline_contains(pid, "0.2"));
        assert!(!cmdline_contains(pid, "0.3"));
        assert!(wait_exit(pid, Duration::from_secs(5)).await);
        assert!(!alive(pid), "reaped, not a zombie");
    }

    #[tokio::test]
    async fn terminate_escalates_to_sigkill() {
        // A shell that ignores SIGTERM.
        let pid = spawn_detached(Command::new("sh").args(["-c", "trap '' TERM; sleep 30"])).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = std::time::Instant::now();
        terminate(pid, Duration::from_millis(300)).await;
        assert!(!alive(pid));
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn tail_returns_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "a\nb\r\nc\nd\n").unwrap();
        assert_eq!(tail(&p, 2), vec!["c", "d"]);
        assert_eq!(tail(&p, 10).len(), 4);
        assert!(tail(&dir.path().join("missing"), 3).is_empty());
    }
}
