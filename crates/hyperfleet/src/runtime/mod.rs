//! What runs a machine: Firecracker (the product) or runc (hosts without hardware virtualization). Both are
//! driven through [`Runtimes`], the one place that dispatches on the machine's runtime kind, with the same
//! life cycle: prepare (disk, container root and namespace) → boot → stop → release.

pub mod container;
pub mod disk;
pub mod firecracker;
pub mod host;
pub mod process;

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyperfleet_agent_proto::client::AgentClient;
use hyperfleet_types::RuntimeKind;

use crate::store::machines::MachineRecord;
pub use container::Container;
pub use firecracker::Firecracker;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The runtime cannot run here (binary missing, no KVM).
    #[error("{0}")]
    Unavailable(String),
    /// Firecracker refused a configuration request.
    #[error("firecracker rejected {action}: {message}")]
    Firecracker { action: String, status: u16, message: String },
    #[error("{0}")]
    Failed(String),
}

/// Every host path that belongs to one machine.
#[derive(Debug, Clone)]
pub struct MachineFiles {
    /// Per-machine directory: disk, console log, container bundle.
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub console_log: PathBuf,
    pub api_socket: PathBuf,
    pub vsock_socket: PathBuf,
    pub bundle: PathBuf,
    pub agent_dir: PathBuf,
}

impl MachineFiles {
    pub fn new(data_dir: &Path, socket_dir: &Path, id: &str) -> Self {
        let dir = data_dir.join(id);
        Self {
            disk: dir.join("rootfs.ext4"),
            console_log: dir.join("console.log"),
            bundle: dir.join("bundle"),
            agent_dir: dir.join("agent"),
            api_socket: socket_dir.join(format!("hyperfleet-{id}.sock")),
            vsock_socket: socket_dir.join(format!("hyperfleet-{id}.vsock")),
            dir,
        }
    }

    /// The console log, opened for appending by the machine's process.
    pub fn open_console_log(&self) -> Result<File, RuntimeError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| RuntimeError::Failed(format!("create {}: {e}", self.dir.display())))?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.console_log)
            .map_err(|e| RuntimeError::Failed(format!("open {}: {e}", self.console_log.display())))
    }
}

/// The network a guest boots with.
#[derive(Debug, Clone)]
pub struct GuestNetwork {
    /// Host-side interface (TAP, or the veth's host end).
    pub iface: String,
    pub tap_ip: Ipv4Addr,
    pub guest_ip: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub prefix_len: u8,
    pub mac: String,
    pub dns: Vec<Ipv4Addr>,
    pub hostname: String,
}

#[derive(Debug, Clone)]
pub struct Booted {
    pub pid: u32,
    pub socket_path: Option<String>,
}

pub struct Runtimes {
    pub firecracker: Firecracker,
    pub container: Container,
    pub stop_grace: Duration,
}

impl Runtimes {
    pub fn unavailable(&self, kind: RuntimeKind) -> Option<String> {
        match kind {
            RuntimeKind::Firecracker => self.firecracker.unavailable(),
            RuntimeKind::Container => self.container.unavailable(),
        }
    }

    /// Makes the machine's own disk (first start only) and, for containers, mounts it and creates the
    /// network namespace. Returns the namespace name the network layer must attach to, if any.
    pub async fn prepare(&self, m: &MachineRecord, files: &MachineFiles) -> Result<Option<String>, RuntimeError> {
        if let Some(why) = self.unavailable(m.runtime) {
            return Err(RuntimeError::Unavailable(why));
        }
        std::fs::create_dir_all(&files.dir)
            .map_err(|e| RuntimeError::Failed(format!("create {}: {e}", files.dir.display())))?;
        if !files.disk.exists() {
            let (src, dst) = (PathBuf::from(&m.rootfs_path), files.disk.clone());
            tokio::task::spawn_blocking(move || disk::sparse_copy(&src, &dst))
                .await
                .map_err(|e| RuntimeError::Failed(e.to_string()))?
                .map_err(|e| RuntimeError::Failed(format!("copy {} for the machine: {e}", m.rootfs_path)))?;
        }
        match m.runtime {
            RuntimeKind::Firecracker => Ok(None),
            RuntimeKind::Container => {
                Container::mount_root(files).await?;
                let ns = container::netns_name(&m.id);
                // A namespace left by a crash is replaced.
                let _ = hyperfleet_net::netns::delete(&ns).await;
                if let Err(e) = hyperfleet_net::netns::create(&ns).await {
                    Container::unmount_root(files).await;
                    return Err(RuntimeError::Failed(e.to_string()));
                }
                Ok(Some(ns))
            }
        }
    }

    pub async fn boot(
        &self,
        m: &MachineRecord,
        files: &MachineFiles,
        net: &GuestNetwork,
        netns: Option<&str>,
    ) -> Result<Booted, RuntimeError> {
        match (m.runtime, netns) {
            (RuntimeKind::Firecracker, _) => self.firecracker.boot(m, files, net).await,
            (RuntimeKind::Container, Some(ns)) => {
                self.container.boot(m, files, net, &hyperfleet_net::netns::path_of(ns)).await
            }
            (RuntimeKind::Container, None) => Err(RuntimeError::Failed("container has no network namespace".into())),
        }
    }

    /// Stops the machine's process (gracefully first) and releases everything but its disk.
    pub async fn stop(&self, m: &MachineRecord, files: &MachineFiles) {
        match m.runtime {
            RuntimeKind::Firecracker => {
                if let Some(pid) = m.pid {
                    self.firecracker.stop(pid, files, self.stop_grace).await;
                }
                Firecracker::remove_sockets(files);
            }
            RuntimeKind::Container => {
                self.container.stop(&m.id, m.pid, files, self.stop_grace).await;
                Container::unmount_root(files).await;
                let _ = hyperfleet_net::netns::delete(&container::netns_name(&m.id)).await;
            }
        }
    }

    /// Pauses or resumes a running machine: Firecracker's `PATCH /vm`, or runc's freezer.
    pub async fn set_paused(&self, m: &MachineRecord, files: &MachineFiles, pause: bool) -> Result<(), RuntimeError> {
        match m.runtime {
            RuntimeKind::Firecracker => {
                let state = if pause { "Paused" } else { "Resumed" };
                firecracker::FirecrackerApi::new(&files.api_socket)
                    .patch("/vm", &serde_json::json!({ "state": state }))
                    .await
            }
            RuntimeKind::Container => self.container.set_paused(&m.id, pause).await,
        }
    }

    /// The PID of the machine's process if it still runs and is really this machine's.
    pub async fn live_pid(&self, m: &MachineRecord, files: &MachineFiles) -> Option<u32> {
        match m.runtime {
            RuntimeKind::Firecracker => {
                m.pid.filter(|pid| Firecracker::owns(*pid, files)).or_else(|| Firecracker::find(files))
            }
            RuntimeKind::Container => self.container.running_pid(&m.id).await,
        }
    }

    pub fn agent(&self, m: &MachineRecord, files: &MachineFiles) -> AgentClient {
        match m.runtime {
            RuntimeKind::Firecracker => Firecracker::agent(files),
            RuntimeKind::Container => Container::agent(files),
        }
    }

    /// Removes the machine's directory (disk, logs, bundle) at delete.
    pub async fn destroy(&self, m: &MachineRecord, files: &MachineFiles) {
        if m.runtime == RuntimeKind::Container {
            Container::unmount_root(files).await;
        }
        let _ = tokio::fs::remove_dir_all(&files.dir).await;
    }
}
