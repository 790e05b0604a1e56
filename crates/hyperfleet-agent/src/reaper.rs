//! Child reaping for an agent that may be PID 1: every exited child is collected with `waitpid(-1)`; the
//! ones we spawned get their exit status delivered, orphans re-parented to us are simply reaped.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

#[derive(Default)]
pub struct Reaper {
    waiting: Mutex<HashMap<i32, oneshot::Sender<i32>>>,
}

impl Reaper {
    /// Starts the reaping task; must run inside the runtime.
    pub fn start() -> io::Result<Arc<Self>> {
        let reaper = Arc::new(Self::default());
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(reaper)
    }

    /// Spawns `cmd` and returns a receiver for its exit code (128+N when killed by signal N). The lock is
    /// held across spawn and registration so the child cannot be reaped before we know its PID.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, oneshot::Receiver<i32>)> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        // pid_t is an i32 that std hands out as u32: reinterpreting the bits gives it back exactly.
        waiting.insert(child.id().cast_signed(), tx);
        Ok((child, rx))
    }

    fn reap(&self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let (pid, code) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + sig as i32),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            if let Some(tx) = waiting.remove(&pid.as_raw()) {
                // Fails only when the exec that waited for it is gone (its host hung up): nobody to tell.
                let _ = tx.send(code);
            }
        }
    }
}
