//! What runs a machine: Firecracker (the product) or runc (hosts without hardware virtualization). Both are
//! driven through [`Runtimes`], the one place that dispatches on the machine's runtime kind, with the same
//! life cycle: prepare (disk, container root and namespace) → boot → stop → release. A runtime is given what
//! it needs ([`BootSpec`], [`Instance`]), never a database row.

pub(crate) mod assets;
pub mod cgroups;
pub(crate) mod console;
pub(crate) mod container;
pub(crate) mod disk;
pub(crate) mod firecracker;
pub(crate) mod host;
pub(crate) mod idmap;
pub mod process;
pub(crate) mod stats;
pub(crate) mod volume;

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyperfleet_agent_proto::client::AgentClient;
use hyperfleet_types::RuntimeKind;
use tracing::warn;

pub(crate) use container::Container;
pub(crate) use firecracker::Firecracker;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The runtime cannot run here (binary missing, no KVM).
    #[error("{0}")]
    Unavailable(String),
    /// Firecracker refused a configuration request.
    #[error("firecracker rejected {action}: {message}")]
    Firecracker { action: String, status: u16, message: String },
    /// Firecracker's API could not be reached or answered something unreadable.
    #[error("firecracker API {request}: {message}")]
    FirecrackerApi { request: String, message: String },
    /// A file or directory operation on the host failed.
    #[error("{what} {}: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    /// A host command (runc, mount) failed.
    #[error("{command}: {message}")]
    Command { command: String, message: String },
    /// The machine's process ended while it was being started.
    #[error("{process} exited at start: {console}")]
    ExitedAtStart { process: &'static str, console: String },
    #[error("{0} did not happen in time")]
    Timeout(&'static str),
    /// The container's OCI configuration could not be built.
    #[error("OCI spec: {0}")]
    Spec(#[from] oci_spec::OciSpecError),
    #[error("network namespace: {0}")]
    Namespace(#[from] hyperfleet_net::NetError),
    #[error("background task: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The request cannot be carried out as asked (a disk grown past what its file system allows): the
    /// caller's to change, answered with 400.
    #[error("{0}")]
    Refused(String),
    /// A kernel or image is no longer what it was when the machine was created.
    #[error("{}: {message}", path.display())]
    Asset { path: PathBuf, message: String },
}

/// Creates `dir` (and its parents) with mode 0700 for the directory itself: machine data is the daemon's alone.
pub(crate) fn private_dir(dir: &Path) -> Result<(), RuntimeError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(RuntimeError::io("create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(RuntimeError::io("chmod", dir))
}

impl RuntimeError {
    pub fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io { what, path, source }
    }
}

/// Every host path that belongs to one machine.
#[derive(Debug, Clone)]
pub struct MachineFiles {
    /// Per-machine directory: disk, console log, container bundle.
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub console_log: PathBuf,
    /// A Firecracker machine's jail while it runs, `{jails dir}/{id}`: its `root/` is the chroot.
    pub jail: PathBuf,
    /// Host paths of the API and vsock sockets firecracker makes in its chroot.
    pub api_socket: PathBuf,
    pub vsock_socket: PathBuf,
    pub bundle: PathBuf,
    /// A container's agent socket: made by the daemon in the machine's (0700) directory, outside the
    /// container's root, and handed to the
    /// agent as an open descriptor, so the guest never sees, renames or replaces it.
    pub agent_socket: PathBuf,
    /// A container's root: the mount point of its disk, under [`ROOTS_DIR`].
    pub root: PathBuf,
    /// A container machine from an image: its own disk, an ext4 holding the upper layer of its overlay root
    /// (`upper/`, with overlayfs's `work/`), sized as the machine's disk.
    pub upper_disk: PathBuf,
}

/// Where container roots are mounted: a root-owned directory others may pass through but not list (0711),
/// because a container in its own user namespace (an unprivileged uid on the host) must reach its root by
/// path, which a 0700 data directory (or its parents) would refuse.
pub const ROOTS_DIR: &str = "/run/hyperfleet-roots";

impl MachineFiles {
    /// `jails_dir`: where the jailer makes the machines' jails ([`Firecracker::jails_dir`]).
    pub fn new(data_dir: &Path, jails_dir: &Path, id: &str) -> Self {
        let dir = data_dir.join(id);
        let jail = jails_dir.join(id);
        let chroot = jail.join("root");
        Self {
            disk: dir.join("rootfs.ext4"),
            upper_disk: dir.join("upper.ext4"),
            console_log: dir.join("console.log"),
            bundle: dir.join("bundle"),
            agent_socket: dir.join("agent.sock"),
            root: Path::new(ROOTS_DIR).join(id),
            api_socket: chroot.join(firecracker::jail::API_SOCKET),
            vsock_socket: chroot.join(firecracker::jail::VSOCK_SOCKET),
            jail,
            dir,
        }
    }

    /// Where a container machine's volume `i` is mounted on the host (then bound into the container): under
    /// [`ROOTS_DIR`], which a container in its own user namespace can reach.
    pub fn volume_mount(&self, i: usize) -> PathBuf {
        self.volume_mounts().join(i.to_string())
    }

    /// The directory of a container machine's volume mounts.
    pub fn volume_mounts(&self) -> PathBuf {
        self.root.with_extension("volumes")
    }

    /// A container machine's user namespace (an nsfs bind mount) while it runs in one.
    pub fn userns(&self) -> PathBuf {
        self.bundle.join("userns")
    }

    /// The console log, opened for appending by the machine's process.
    pub fn open_console_log(&self) -> Result<File, RuntimeError> {
        use std::os::unix::fs::OpenOptionsExt;
        private_dir(&self.dir)?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.console_log)
            .map_err(RuntimeError::io("open", &self.console_log))
    }
}

/// The network a guest boots with.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GuestNetwork {
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

/// Everything a runtime needs to boot one machine, decided by the orchestration.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BootSpec {
    pub id: String,
    pub runtime: RuntimeKind,
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    pub kernel_image_path: PathBuf,
    pub kernel_args: String,
    pub rootfs_path: PathBuf,
    /// Kernels are opened beneath it, never through a symlink.
    pub assets_dir: PathBuf,
    /// The root filesystem is opened beneath it: the assets directory, or the image cache for an image.
    pub rootfs_dir: PathBuf,
    /// The guest's init when not `/sbin/init` (an image machine: the agent injected into the image).
    pub init: Option<String>,
    /// The main process spec (JSON) written into the machine's disk at each start.
    pub main_spec: Option<Vec<u8>>,
    /// A container machine from an image: the image's cached root tree, the read-only lower layer of the
    /// machine's overlay root (its own disk, [`MachineFiles::upper_disk`], holds the upper layer).
    pub image_tree: Option<PathBuf>,
    pub net: GuestNetwork,
    /// The machine's address block: unique among existing machines, so it also numbers the machine's own
    /// host identity (its jailed firecracker's uid and gid).
    pub block: u32,
    /// The machine's own disk is grown to this size (never shrunk) before it boots.
    pub disk_size_mib: u32,
    pub volumes: Vec<volume::VolumeDisk>,
}

/// A machine that may have a process: enough to find, pause, stop or clean it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Instance {
    pub id: String,
    pub runtime: RuntimeKind,
    pub pid: Option<u32>,
}

#[derive(Debug, Clone)]
pub(crate) struct Booted {
    pub pid: u32,
    pub socket_path: Option<String>,
}

pub(crate) struct Runtimes {
    pub firecracker: Firecracker,
    pub container: Container,
    pub stop_grace: Duration,
}

impl Runtimes {
    pub(crate) fn unavailable(&self, kind: RuntimeKind) -> Option<String> {
        match kind {
            RuntimeKind::Firecracker => self.firecracker.unavailable(),
            RuntimeKind::Container => self.container.unavailable(),
        }
    }

    /// Makes the machine's own disk (first start only) and, for containers, mounts it and creates the
    /// network namespace. Returns the namespace name the network layer must attach to, if any.
    pub(crate) async fn prepare(&self, spec: &BootSpec, files: &MachineFiles) -> Result<Option<String>, RuntimeError> {
        if let Some(why) = self.unavailable(spec.runtime) {
            return Err(RuntimeError::Unavailable(why));
        }
        for v in &spec.volumes {
            if !tokio::fs::try_exists(&v.path).await.unwrap_or(false) {
                return Err(RuntimeError::Asset {
                    path: v.path.clone(),
                    message: "the volume's file is missing".into(),
                });
            }
        }
        // A container machine from an image runs from the image's tree under an overlay, its own disk
        // holding only what it changes; one made before (with a full copy of the image as its disk) keeps it.
        let overlay =
            spec.image_tree.clone().filter(|_| spec.runtime == RuntimeKind::Container && !files.disk.exists());
        if let Some(tree) = overlay {
            let (upper, dir, size) = (files.upper_disk.clone(), files.dir.clone(), spec.disk_size_mib);
            // Empty file systems to copy, per size: kept with the images (rootfs_dir), made on first use.
            let templates = spec.rootfs_dir.join("uppers");
            let disk = async {
                tokio::task::spawn_blocking(move || {
                    private_dir(&dir)?;
                    if !upper.exists() {
                        Container::make_upper_disk(&upper, size, &templates)?;
                    }
                    Ok::<_, RuntimeError>(())
                })
                .await??;
                volume::grow_image(&files.upper_disk, spec.disk_size_mib).await
            };
            // The disk and the namespaces at once: neither needs the other.
            let (disk, netns) = tokio::join!(disk, self.make_namespaces(spec, files));
            let netns = match (disk, netns) {
                (Ok(()), Ok(ns)) => ns,
                (Err(e), netns) => {
                    if let Ok(Some(_)) = netns {
                        idmap::release_user_namespace(&files.userns());
                        remove_netns(&spec.id).await;
                    }
                    return Err(e);
                }
                (Ok(()), Err(e)) => return Err(e),
            };
            return self.prepare_container(spec, files, Some(&tree), netns).await;
        }
        let (src, dst, dir) = (spec.rootfs_path.clone(), files.disk.clone(), files.dir.clone());
        let assets = spec.rootfs_dir.clone();
        let main = spec.main_spec.clone();
        tokio::task::spawn_blocking(move || {
            private_dir(&dir)?;
            if !dst.exists() {
                // Opened again beneath the assets directory: the path was checked at create, but what it
                // names may have changed since.
                let image = assets::open_beneath(&assets, &src)
                    .map_err(|e| RuntimeError::Asset { path: src.clone(), message: e.to_string() })?;
                disk::sparse_copy_from(&image, &dst).map_err(RuntimeError::io("copy the machine's disk from", &src))?;
            }
            if let Some(json) = main {
                crate::oci::rootfs::write_main_spec(&dst, &json, &dir.join("main.json")).map_err(|e| {
                    RuntimeError::Command { command: "write the main process spec".into(), message: e.to_string() }
                })?;
            }
            Ok::<_, RuntimeError>(())
        })
        .await??;
        volume::grow_image(&files.disk, spec.disk_size_mib).await?;
        let netns = self.make_namespaces(spec, files).await?;
        self.prepare_container(spec, files, None, netns).await
    }

    /// A container machine's namespaces (its user namespace, when it has one, and its network namespace,
    /// replacing any a crash left); `None` for Firecracker.
    async fn make_namespaces(&self, spec: &BootSpec, files: &MachineFiles) -> Result<Option<String>, RuntimeError> {
        if spec.runtime != RuntimeKind::Container {
            return Ok(None);
        }
        let ids = self.container.host_ids(spec.block)?;
        let ns = container::netns_name(&spec.id);
        // A namespace left by a crash is replaced.
        if let Err(e) = hyperfleet_net::netns::delete(&ns).await {
            warn!(netns = %ns, error = %e, "could not remove a leftover namespace");
        }
        match ids {
            Some(ids) => Container::create_namespaces(files, ids, &ns).await?,
            None => hyperfleet_net::netns::create(&ns).await.map(|_| ())?,
        }
        Ok(Some(ns))
    }

    /// The rest of [`Self::prepare`] for a container (`netns`: its namespaces are made): the root (its disk,
    /// or an overlay on `tree`) and the volumes mounted; on failure, everything undone.
    async fn prepare_container(
        &self,
        spec: &BootSpec,
        files: &MachineFiles,
        tree: Option<&Path>,
        netns: Option<String>,
    ) -> Result<Option<String>, RuntimeError> {
        let Some(ns) = netns else { return Ok(None) };
        let ids = self.container.host_ids(spec.block)?;
        let root = match tree {
            Some(tree) => Container::mount_overlay_root(files, tree, ids, spec.main_spec.clone()).await,
            None => Container::mount_root(files, ids.is_some()).await,
        };
        let mounted = match root {
            Ok(()) => Container::mount_volumes(spec, files, ids.is_some()).await,
            Err(e) => Err(e),
        };
        if let Err(e) = mounted {
            Container::unmount_root(files).await;
            remove_netns(&spec.id).await;
            return Err(e);
        }
        Ok(Some(ns))
    }

    pub(crate) async fn boot(
        &self,
        spec: &BootSpec,
        files: &MachineFiles,
        netns: Option<&str>,
    ) -> Result<Booted, RuntimeError> {
        match (spec.runtime, netns) {
            (RuntimeKind::Firecracker, _) => self.firecracker.boot(spec, files).await,
            (RuntimeKind::Container, Some(ns)) => {
                self.container.boot(spec, files, &hyperfleet_net::netns::path_of(ns)).await
            }
            (RuntimeKind::Container, None) => {
                Err(RuntimeError::Unavailable("container has no network namespace".into()))
            }
        }
    }

    /// Stops the machine's process (gracefully first) and releases everything but its disk.
    pub(crate) async fn stop(&self, m: &Instance, files: &MachineFiles) {
        match m.runtime {
            RuntimeKind::Firecracker => {
                if let Some(pid) = m.pid {
                    self.firecracker.stop(pid, files, self.stop_grace).await;
                }
                Firecracker::release(&m.id, files).await;
            }
            RuntimeKind::Container => {
                self.container.stop(&m.id, m.pid, files, self.stop_grace).await;
                Container::unmount_root(files).await;
                remove_netns(&m.id).await;
            }
        }
    }

    /// Pauses or resumes a running machine: Firecracker's `PATCH /vm`, or runc's freezer.
    pub(crate) async fn set_paused(&self, m: &Instance, files: &MachineFiles, pause: bool) -> Result<(), RuntimeError> {
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
    pub(crate) async fn live_pid(&self, m: &Instance, files: &MachineFiles) -> Option<u32> {
        match m.runtime {
            RuntimeKind::Firecracker => {
                let (pid, files) = (m.pid, files.clone());
                // /proc reads and scans: off the async workers.
                let fc = self.firecracker.clone();
                tokio::task::spawn_blocking(move || {
                    pid.filter(|pid| Firecracker::owns(*pid, &files)).or_else(|| fc.find(&files))
                })
                .await
                .ok()
                .flatten()
            }
            RuntimeKind::Container => self.container.running_pid(&m.id).await,
        }
    }

    pub(crate) fn agent(&self, m: &Instance, files: &MachineFiles) -> AgentClient {
        match m.runtime {
            RuntimeKind::Firecracker => Firecracker::agent(files),
            RuntimeKind::Container => Container::agent(files),
        }
    }

    /// Removes what a machine of any runtime may have left on the host when it has no process: a container's
    /// mount, namespace and agent socket, firecracker's chroot (with its sockets) and cgroups. Idempotent.
    pub(crate) async fn remove_leftovers(&self, id: &str, files: &MachineFiles) {
        Container::unmount_root(files).await;
        remove_netns(id).await;
        process::remove_file_logged(&files.agent_socket);
        Firecracker::release(id, files).await;
    }

    /// Removes the machine's directory (disk, logs, bundle) at delete.
    pub(crate) async fn destroy(&self, m: &Instance, files: &MachineFiles) -> Result<(), RuntimeError> {
        match m.runtime {
            RuntimeKind::Container => Container::unmount_root(files).await,
            RuntimeKind::Firecracker => Firecracker::release(&m.id, files).await,
        }
        match tokio::fs::remove_dir_all(&files.dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(RuntimeError::io("remove", &files.dir)(e)),
            _ => Ok(()),
        }
    }
}

/// Deletes a container machine's network namespace if it exists, logging a failure.
async fn remove_netns(machine_id: &str) {
    let ns = container::netns_name(machine_id);
    if hyperfleet_net::netns::exists(&ns).await
        && let Err(e) = hyperfleet_net::netns::delete(&ns).await
    {
        warn!(netns = %ns, error = %e, "could not remove the namespace");
    }
}

/// How long each step of an operation took, for its log line (a start's host steps, a boot's own): `claim=0.4ms prepare=0.1ms …`.
pub(crate) struct StepTimes {
    last: std::time::Instant,
    laps: Vec<(&'static str, Duration)>,
}

impl StepTimes {
    pub(crate) fn new() -> Self {
        Self { last: std::time::Instant::now(), laps: Vec::new() }
    }

    /// Ends the step `name` now; the next one starts.
    pub(crate) fn lap(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.laps.push((name, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for StepTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, d)) in self.laps.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{name}={:.1}ms", d.as_secs_f64() * 1000.0)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod step_times_tests {
    use super::StepTimes;

    #[test]
    fn step_times_name_each_step_in_order() {
        let mut t = StepTimes::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        t.lap("first");
        t.lap("second");
        let shown = t.to_string();
        let (first, second) = shown.split_once(' ').unwrap();
        assert!(first.starts_with("first=") && first.ends_with("ms"), "{shown}");
        let ms: f64 = first["first=".len()..first.len() - 2].parse().unwrap();
        assert!(ms >= 2.0, "{shown}");
        assert!(second.starts_with("second="), "{shown}");
    }
}
