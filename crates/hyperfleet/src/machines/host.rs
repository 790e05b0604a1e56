//! Everything the machine flows do to the host — disks, processes, interfaces, the firewall — behind one
//! trait, [`Host`]. The daemon uses [`LinuxHost`] (runc/firecracker and netlink/nftables); the flows'
//! unit tests use a fake that records what exists, so rollback and reconcile are tested without root.

use std::collections::HashSet;
use std::path::PathBuf;

use hyperfleet_agent_proto::client::AgentClient;
use hyperfleet_types::RuntimeKind;
use tracing::info;

use super::network::HostNetwork;
use super::{Error, Result};
use crate::runtime::stats::Usage;
use crate::runtime::volume::{VolumeDir, VolumeDisk};
use crate::runtime::{BootSpec, Booted, Instance, MachineFiles, RuntimeError, Runtimes, process};
use crate::store::machines::MachineRecord;

/// The host side of machines. Every method is idempotent where it removes something: flows and reconcile
/// may call it for state that is already gone.
pub(crate) trait Host: Send + Sync + 'static {
    /// Why machines of `runtime` cannot run here, if they cannot.
    fn unavailable(&self, runtime: RuntimeKind) -> Option<String>;
    /// The machine's own disk and, for a container, its root mount and network namespace (returned).
    fn prepare(&self, m: &MachineRecord) -> impl Future<Output = Result<Option<String>>> + Send;
    /// Creates the machine's host interface (into `netns` for a container).
    fn attach(&self, m: &MachineRecord, netns: Option<&str>) -> impl Future<Output = Result<()>> + Send;
    /// Starts the machine's process; on error no process is left.
    fn boot(&self, m: &MachineRecord, netns: Option<&str>) -> impl Future<Output = Result<Booted>> + Send;
    /// Ends the machine's process (gracefully first, if it has one) and releases what `prepare` made,
    /// except the disk. Failures are logged; the next reconcile retries what is left.
    fn stop(&self, m: &Instance) -> impl Future<Output = ()> + Send;
    /// Removes the machine's host interface.
    fn detach(&self, m: &MachineRecord) -> impl Future<Output = Result<()>> + Send;
    /// Adds (`true`) or removes the machine's firewall entries, incrementally; an error means the table
    /// is not as expected and must be rebuilt.
    fn firewall_edit(&self, m: &MachineRecord, add: bool) -> impl Future<Output = Result<()>> + Send;
    /// Replaces the firewall table with one for exactly these machines.
    fn firewall_rebuild(&self, active: &[MachineRecord]) -> impl Future<Output = Result<()>> + Send;
    /// Makes `hosts` (the rest of the fleet) unreachable from every machine; `false` if they already were.
    fn fence(&self, hosts: Vec<std::net::Ipv4Addr>) -> impl Future<Output = Result<bool>> + Send;
    fn set_paused(&self, m: &Instance, pause: bool) -> impl Future<Output = Result<()>> + Send;
    /// The machine's process if it still runs and is really this machine's.
    fn live_pid(&self, m: &Instance) -> impl Future<Output = Option<u32>> + Send;
    /// Resolves when process `pid` has ended.
    fn exited(&self, pid: u32) -> impl Future<Output = ()> + Send;
    /// The last `lines` of the machine's console (firecracker) or init output (container).
    fn console_tail(&self, id: &str, lines: usize) -> impl Future<Output = Vec<String>> + Send;
    fn agent(&self, m: &Instance) -> AgentClient;
    /// Removes the machine's directory (disk, logs) at delete.
    fn destroy(&self, m: &Instance) -> impl Future<Output = Result<()>> + Send;
    /// Removes interfaces, namespaces, mounts and sockets of machines not in `live`, and the data
    /// directories of machines not in `known`. Returns a line per thing removed.
    fn remove_strays(
        &self,
        live: &HashSet<String>,
        known: &HashSet<String>,
    ) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// Moves the machine's console log aside once it passes `max` bytes (see `runtime::console`).
    fn cap_console(&self, id: &str, max: u64) -> impl Future<Output = Result<()>> + Send;
    /// Removes the host-wide state: the firewall table and the subnet's route.
    fn remove_host_wide(&self) -> impl Future<Output = Result<()>> + Send;
    /// Makes volume `id`: an empty ext4 file system of `size_mib`.
    fn volume_create(&self, id: &str, size_mib: u32) -> impl Future<Output = Result<()>> + Send;
    /// Grows volume `id` (not in use) and its file system to `size_mib`.
    fn volume_grow(&self, id: &str, size_mib: u32) -> impl Future<Output = Result<()>> + Send;
    /// Copies volume `from` to a new volume `to` (reflink where the file system can, else sparse).
    fn volume_clone(&self, from: &str, to: &str) -> impl Future<Output = Result<()>> + Send;
    /// Removes volume `id`'s file (idempotent).
    fn volume_remove(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    /// What the machine uses now: CPU, memory, disk, its interface's counters (see `runtime::stats`).
    fn usage(&self, m: &MachineRecord) -> impl Future<Output = Usage> + Send;
}

/// The real host: runc or firecracker processes, netlink interfaces, an nftables table, files under the
/// data and socket directories.
pub(crate) struct LinuxHost {
    pub runtimes: Runtimes,
    pub net: HostNetwork,
    pub data_dir: PathBuf,
    pub assets_dir: PathBuf,
    /// Where firecracker machines' jails are ([`crate::runtime::Firecracker::jails_dir`]).
    pub jails_dir: PathBuf,
    /// The image cache, where image machines' root images are.
    pub images: std::sync::Arc<super::images::Images>,
    pub volumes: VolumeDir,
}

impl LinuxHost {
    fn files(&self, id: &str) -> MachineFiles {
        MachineFiles::new(&self.data_dir, &self.jails_dir, id)
    }

    fn boot_spec(&self, m: &MachineRecord) -> BootSpec {
        let image = m.spec.image.is_some();
        BootSpec {
            id: m.id.clone(),
            runtime: m.spec.runtime,
            vcpu_count: m.spec.vcpu_count,
            mem_size_mib: m.spec.mem_size_mib,
            kernel_image_path: PathBuf::from(&m.spec.kernel_image_path),
            kernel_args: m.spec.kernel_args.clone(),
            rootfs_path: PathBuf::from(&m.spec.rootfs_path),
            assets_dir: self.assets_dir.clone(),
            rootfs_dir: if image { self.images.dir().to_path_buf() } else { self.assets_dir.clone() },
            init: image.then(|| crate::oci::rootfs::AGENT_INIT.to_string()),
            image_tree: m
                .spec
                .image_digest
                .as_deref()
                .filter(|_| m.spec.runtime == RuntimeKind::Container)
                .map(|d| self.images.tree_path(d)),
            main_spec: super::images::main_process(
                &m.spec,
                m.spec.image_digest.as_deref().and_then(|d| self.images.config(d)).as_ref(),
            )
            .and_then(|p| serde_json::to_vec(&p).ok()),
            net: self.net.addressing.guest(m),
            block: m.block,
            // An image machine's `image_size_mib` is its disk size too (0: the converted image's own size; a
            // container machine's own disk, the upper layer of its root, is made that size).
            disk_size_mib: m.spec.disk_size_mib.max(m.spec.image_size_mib.unwrap_or(0)).max(
                m.spec
                    .image_digest
                    .as_deref()
                    .filter(|_| m.spec.runtime == RuntimeKind::Container)
                    .and_then(|d| self.images.default_size_mib(d))
                    .and_then(|s| u32::try_from(s).ok())
                    .unwrap_or(0),
            ),
            volumes: m
                .spec
                .volumes
                .iter()
                .map(|v| VolumeDisk {
                    path: self.volumes.path(&v.volume),
                    mount_path: v.mount_path.clone(),
                    read_only: v.read_only,
                })
                .collect(),
        }
    }
}

impl Host for LinuxHost {
    fn unavailable(&self, runtime: RuntimeKind) -> Option<String> {
        self.runtimes.unavailable(runtime)
    }

    async fn prepare(&self, m: &MachineRecord) -> Result<Option<String>> {
        Ok(self.runtimes.prepare(&self.boot_spec(m), &self.files(&m.id)).await?)
    }

    async fn attach(&self, m: &MachineRecord, netns: Option<&str>) -> Result<()> {
        Ok(self.net.attach(m, netns).await?)
    }

    async fn boot(&self, m: &MachineRecord, netns: Option<&str>) -> Result<Booted> {
        Ok(self.runtimes.boot(&self.boot_spec(m), &self.files(&m.id), netns).await?)
    }

    async fn stop(&self, m: &Instance) {
        self.runtimes.stop(m, &self.files(&m.id)).await
    }

    async fn detach(&self, m: &MachineRecord) -> Result<()> {
        Ok(self.net.detach(m).await?)
    }

    async fn firewall_edit(&self, m: &MachineRecord, add: bool) -> Result<()> {
        let entry = self.net.addressing.firewall_entry(m);
        let done = if add { self.net.firewall.add(&entry).await } else { self.net.firewall.delete(&entry).await };
        Ok(done?)
    }

    async fn firewall_rebuild(&self, active: &[MachineRecord]) -> Result<()> {
        Ok(self.net.apply_firewall(active).await?)
    }

    async fn fence(&self, hosts: Vec<std::net::Ipv4Addr>) -> Result<bool> {
        Ok(self.net.firewall.fence(hosts).await?)
    }

    async fn set_paused(&self, m: &Instance, pause: bool) -> Result<()> {
        Ok(self.runtimes.set_paused(m, &self.files(&m.id), pause).await?)
    }

    async fn live_pid(&self, m: &Instance) -> Option<u32> {
        self.runtimes.live_pid(m, &self.files(&m.id)).await
    }

    async fn exited(&self, pid: u32) {
        process::exited(pid).await
    }

    async fn console_tail(&self, id: &str, lines: usize) -> Vec<String> {
        let path = self.files(id).console_log;
        tokio::task::spawn_blocking(move || {
            // The older part first, when the current one (just rotated) is short.
            let mut all = process::tail(&crate::runtime::console::previous(&path), lines);
            all.extend(process::tail(&path, lines));
            all.split_off(all.len().saturating_sub(lines))
        })
        .await
        .unwrap_or_default()
    }

    fn agent(&self, m: &Instance) -> AgentClient {
        self.runtimes.agent(m, &self.files(&m.id))
    }

    async fn destroy(&self, m: &Instance) -> Result<()> {
        Ok(self.runtimes.destroy(m, &self.files(&m.id)).await?)
    }

    async fn remove_strays(&self, live: &HashSet<String>, known: &HashSet<String>) -> Result<Vec<String>> {
        let mut removed: Vec<String> =
            self.net.remove_stray_links(live).await?.into_iter().map(|l| format!("interface {l}")).collect();
        let (data_dir, jails_dir) = (self.data_dir.clone(), self.jails_dir.clone());
        let volumes_dir = self.volumes.dir().to_path_buf();
        let on_disk: Vec<String> = tokio::task::spawn_blocking(move || {
            let names = |dir: &std::path::Path| {
                std::fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect::<Vec<_>>()
            };
            // The data directory also holds the chroot and volumes directories by default: nobody's machine data.
            let mut ids: Vec<String> = names(&data_dir)
                .into_iter()
                .filter(|n| !jails_dir.starts_with(data_dir.join(n)) && !volumes_dir.starts_with(data_dir.join(n)))
                .collect();
            ids.extend(names(&jails_dir));
            ids.sort();
            ids.dedup();
            ids
        })
        .await
        .map_err(|e| Error::Task { what: "list the data directory", message: e.to_string() })?;
        // Only this daemon's machines: its database, its data and chroot directories. (Other daemons on the host use
        // the same namespace prefix, so namespaces alone say nothing about whose they are.)
        let candidates: HashSet<&String> = known.iter().chain(on_disk.iter()).collect();
        for id in candidates.into_iter().filter(|id| !live.contains(*id)) {
            let files = self.files(id);
            self.runtimes.remove_leftovers(id, &files).await;
            if !known.contains(id) && files.dir.exists() {
                info!(dir = %files.dir.display(), "removing the data of a machine that no longer exists");
                tokio::fs::remove_dir_all(&files.dir).await.map_err(RuntimeError::io("remove", &files.dir))?;
                removed.push(format!("directory {}", files.dir.display()));
            }
        }
        Ok(removed)
    }

    async fn cap_console(&self, id: &str, max: u64) -> Result<()> {
        let path = self.files(id).console_log;
        tokio::task::spawn_blocking(move || {
            crate::runtime::console::rotate_if_larger(&path, max).map_err(RuntimeError::io("rotate", &path))
        })
        .await
        .map_err(RuntimeError::from)??;
        Ok(())
    }

    async fn remove_host_wide(&self) -> Result<()> {
        self.net.firewall.remove().await?;
        self.net.remove_route().await?;
        Ok(())
    }

    async fn volume_create(&self, id: &str, size_mib: u32) -> Result<()> {
        Ok(self.volumes.create(id, size_mib).await?)
    }

    async fn volume_grow(&self, id: &str, size_mib: u32) -> Result<()> {
        Ok(self.volumes.grow(id, size_mib).await?)
    }

    async fn volume_clone(&self, from: &str, to: &str) -> Result<()> {
        Ok(self.volumes.clone_volume(from, to).await?)
    }

    async fn volume_remove(&self, id: &str) -> Result<()> {
        Ok(self.volumes.remove(id).await?)
    }

    async fn usage(&self, m: &MachineRecord) -> Usage {
        let files = self.files(&m.id);
        // A container machine from an image has the upper layer of its root as its own disk.
        let disk = if !files.disk.exists() && files.upper_disk.exists() { files.upper_disk } else { files.disk };
        let (id, pid, iface) = (m.id.clone(), m.pid, self.net.addressing.iface(m));
        tokio::task::spawn_blocking(move || crate::runtime::stats::read(&id, pid, &disk, &iface))
            .await
            .unwrap_or_default()
    }
}
