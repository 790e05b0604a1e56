//! The container runtime, for hosts without hardware virtualization: the same image and the same agent (as
//! PID 1) under runc, driven by an OCI `config.json`. The machine's own copy of the image is loop-mounted as
//! the root; its network namespace is made by Hyperfleet and joined to the host by a veth pair whose host end
//! has the machine's TAP name and address, so IPAM, firewall and proxy work exactly as for Firecracker.
//! Isolation is a container's (shared host kernel), not a VM's.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hyperfleet_agent_proto::client::{AgentClient, Endpoint};
use std::os::fd::AsRawFd;

use oci_spec::runtime::{
    Arch, Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxIdMappingBuilder,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder,
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder, LinuxSeccompOperator,
    LinuxSyscallBuilder, Mount, MountBuilder, ProcessBuilder, RootBuilder, Spec,
};
use tokio::process::Command;

use super::{BootSpec, Booted, MachineFiles, RuntimeError, idmap, process};

/// The descriptor the agent's listening socket has inside the container (socket activation: `LISTEN_FDS=1`).
const AGENT_FD: i32 = 3;
/// runc's state directory for our containers, apart from anyone else's.
const RUNC_ROOT: &str = "/run/hyperfleet/runc";

#[derive(Debug, Clone)]
pub(crate) struct Container {
    runc: Option<PathBuf>,
    /// `Some(base)`: each container runs in its own user namespace, its ids 0..65535 being host ids
    /// `base + block * 65536 ..`, its root an idmapped mount of its disk. `None`: containers share the host's
    /// user namespace (root in a container is root on the host, confined by capabilities and seccomp).
    userns_base: Option<u32>,
}

/// A container's user namespace: its ids 0..[`idmap::RANGE_SIZE`] are host ids `base..`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HostIds {
    pub base: u32,
}

/// Container and network namespace names of a machine.
pub(crate) fn container_id(machine_id: &str) -> String {
    format!("hf-{machine_id}")
}

pub(crate) fn netns_name(machine_id: &str) -> String {
    format!("hf-{machine_id}")
}

impl Container {
    pub(crate) fn new(runc: Option<PathBuf>, userns_base: Option<u32>) -> Self {
        Self { runc, userns_base }
    }

    /// The host ids of the machine with address block `block`: `base + block * 65536`, 65,536 of them,
    /// unique per machine; refused when they would pass 2^31 (ids above are unusable to much software).
    pub(crate) fn host_ids(&self, block: u32) -> Result<Option<HostIds>, RuntimeError> {
        let Some(base) = self.userns_base else { return Ok(None) };
        let first = block.checked_mul(idmap::RANGE_SIZE).and_then(|o| o.checked_add(base));
        match first.filter(|f| f.checked_add(idmap::RANGE_SIZE).is_some_and(|end| end <= 1 << 31)) {
            Some(base) => Ok(Some(HostIds { base })),
            None => Err(RuntimeError::Unavailable(format!(
                "the user namespace of address block {block} would pass uid 2^31: lower \
                 HYPERFLEET_CONTAINER_UID_BASE or the subnet's size, or set HYPERFLEET_CONTAINER_USERNS=false"
            ))),
        }
    }

    pub(crate) fn unavailable(&self) -> Option<String> {
        self.runc
            .is_none()
            .then(|| "runc not found: install it (apt-get install runc) or set HYPERFLEET_RUNC_BIN".into())
    }

    pub(crate) fn agent(files: &MachineFiles) -> AgentClient {
        AgentClient::new(Endpoint::Unix(files.agent_socket.clone()))
    }

    fn runc(&self) -> Result<Command, RuntimeError> {
        let bin =
            self.runc.as_ref().ok_or_else(|| RuntimeError::Unavailable(self.unavailable().unwrap_or_default()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--root").arg(RUNC_ROOT);
        Ok(cmd)
    }

    async fn runc_ok(&self, args: &[&str]) -> Result<String, RuntimeError> {
        let out = self.runc()?.args(args).stdin(Stdio::null()).output().await.map_err(|e| RuntimeError::Command {
            command: format!("runc {}", args.join(" ")),
            message: e.to_string(),
        })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(RuntimeError::Command {
                command: format!("runc {}", args.first().unwrap_or(&"")),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// Runs runc for a clean-up step whose refusal is expected (nothing to act on); the reason is kept at debug.
    async fn runc_quiet(&self, args: &[&str]) {
        if let Err(e) = self.runc_ok(args).await {
            tracing::debug!(error = %e, "runc {} refused", args.join(" "));
        }
    }

    /// Runs runc for a step that should work; a failure is logged.
    async fn runc_logged(&self, args: &[&str]) {
        if let Err(e) = self.runc_ok(args).await {
            tracing::warn!(error = %e, "runc {} failed", args.join(" "));
        }
    }

    /// Mounts the machine's disk as the bundle's root (idempotent), idmapped through the machine's user
    /// namespace when it has one.
    pub(crate) async fn mount_root(files: &MachineFiles, userns: bool) -> Result<(), RuntimeError> {
        let root = files.root.clone();
        roots_dir()?;
        std::fs::create_dir_all(&root).map_err(RuntimeError::io("create", &root))?;
        if !is_mountpoint(&root) {
            Self::mount_disk(files, &root).await?;
        }
        if !userns || idmap::is_idmapped(&root) {
            return Ok(());
        }
        let (at, ns) = (root.clone(), files.userns());
        let mapped = tokio::task::spawn_blocking(move || idmap::idmap_in_place(&at, &ns)).await?;
        if let Err(e) = mapped {
            Self::unmount_root(files).await;
            return Err(RuntimeError::Command {
                command: format!(
                    "idmapped mount of {} (HYPERFLEET_CONTAINER_USERNS=false turns it off)",
                    root.display()
                ),
                message: e.to_string(),
            });
        }
        Ok(())
    }

    /// Mounts a container machine from an image as the bundle's root (idempotent): an overlay of the image's
    /// cached tree (read-only, nosuid, nodev; idmapped through the machine's user namespace when it has one,
    /// so files the image gives to N are the machine's N) under an upper directory on the machine's own disk
    /// ([`MachineFiles::upper_disk`]), where everything the machine writes goes: the cached tree, shared by
    /// every machine of the image, is never written. `main_spec` is written into the upper layer first. The
    /// layers' own mounts are only there while the overlay is made (the overlay keeps private copies): one
    /// mount per machine remains, and unmounting it releases the disk's loop device.
    pub(crate) async fn mount_overlay_root(
        files: &MachineFiles,
        tree: &Path,
        ids: Option<HostIds>,
        main_spec: Option<Vec<u8>>,
    ) -> Result<(), RuntimeError> {
        let root = files.root.clone();
        roots_dir()?;
        std::fs::create_dir_all(&root).map_err(RuntimeError::io("create", &root))?;
        if is_mountpoint(&root) {
            return Ok(());
        }
        let (lower, upper) = (files.root.with_extension("lower"), files.root.with_extension("upper"));
        Self::unmount_layers(files).await;
        let made = Self::mount_overlay_steps(files, tree, ids, main_spec, &lower, &upper).await;
        // Whatever happened, the layers' own mounts go (a made overlay holds its own copies).
        Self::unmount_layers(files).await;
        if let Err(e) = made {
            Self::unmount_root(files).await;
            return Err(e);
        }
        Ok(())
    }

    async fn mount_overlay_steps(
        files: &MachineFiles,
        tree: &Path,
        ids: Option<HostIds>,
        main_spec: Option<Vec<u8>>,
        lower: &Path,
        upper: &Path,
    ) -> Result<(), RuntimeError> {
        for d in [lower, upper] {
            std::fs::create_dir_all(d).map_err(RuntimeError::io("create", d))?;
        }
        let (userns, tree, root) = (ids.map(|_| files.userns()), tree.to_path_buf(), files.root.clone());
        let (lower, upper, disk) = (lower.to_path_buf(), upper.to_path_buf(), files.upper_disk.clone());
        tokio::task::spawn_blocking(move || {
            // nodev and nosuid: a device node or setuid file the guest makes on its disk means nothing on the host.
            let flags = nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV;
            super::disk::loop_mount(&disk, &upper, flags).map_err(|e| RuntimeError::Command {
                command: format!("mount {}", disk.display()),
                message: e.to_string(),
            })?;
            // The machine's root user as the host sees it: owner of its `/` and of what the daemon writes.
            let owner = ids.map_or((0, 0), |i| (i.base, i.base));
            let (up, work) = (upper.join("upper"), upper.join("work"));
            if !up.exists() {
                use std::os::unix::fs::PermissionsExt;
                std::fs::create_dir(&up).map_err(RuntimeError::io("create", &up))?;
                std::os::unix::fs::chown(&up, Some(owner.0), Some(owner.1)).map_err(RuntimeError::io("chown", &up))?;
                std::fs::set_permissions(&up, std::fs::Permissions::from_mode(0o755))
                    .map_err(RuntimeError::io("chmod", &up))?;
            }
            std::fs::create_dir_all(&work).map_err(RuntimeError::io("create", &work))?;
            if let Some(json) = main_spec {
                crate::oci::rootfs::write_main_spec_beneath(&up, &json, owner).map_err(|e| RuntimeError::Command {
                    command: "write the main process spec".into(),
                    message: e.to_string(),
                })?;
            }
            idmap::attach_read_only(&tree, &lower, userns.as_deref()).map_err(|e| RuntimeError::Command {
                command: format!(
                    "mount the image's root {} read-only{}",
                    tree.display(),
                    if userns.is_some() { ", idmapped (HYPERFLEET_CONTAINER_USERNS=false turns it off)" } else { "" }
                ),
                message: e.to_string(),
            })?;
            // No redirects, metacopy or index: nothing in the image's tree or the upper layer can make the
            // overlay look anywhere else. All paths are the daemon's own (under ROOTS_DIR).
            let options = format!(
                "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off,index=off,xino=off",
                lower.display(),
                up.display(),
                work.display()
            );
            nix::mount::mount(Some("overlay"), &root, Some("overlay"), flags, Some(options.as_str())).map_err(|e| {
                RuntimeError::Command {
                    command: format!("mount the overlay root {}", root.display()),
                    message: e.to_string(),
                }
            })
        })
        .await?
    }

    /// Detaches the layers' own mounts of an overlay root (made while it is mounted, or left by a crash) and
    /// removes their mount points (idempotent). The upper disk's loop device clears itself once the overlay
    /// holding that file system goes too.
    async fn unmount_layers(files: &MachineFiles) {
        for d in [files.root.with_extension("lower"), files.root.with_extension("upper")] {
            loop {
                match nix::mount::umount2(&d, nix::mount::MntFlags::MNT_DETACH) {
                    // Stacked mounts (a crash between two attempts) go one by one.
                    Ok(()) => continue,
                    Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => break,
                    Err(e) => {
                        tracing::warn!(path = %d.display(), error = %e, "could not unmount a layer");
                        break;
                    }
                }
            }
            match std::fs::remove_dir(&d) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(path = %d.display(), error = %e, "could not remove a layer's mount point");
                }
                _ => {}
            }
        }
    }

    /// Makes a container machine's own disk for an overlay root: an empty ext4 of `size_mib` (at least 16),
    /// a sparse copy (synced) of the empty file system of that size kept in `templates`, which the first
    /// machine of each size makes (mkfs, synced, renamed into place). Written under a temporary name first.
    pub(crate) fn make_upper_disk(path: &Path, size_mib: u32, templates: &Path) -> Result<(), RuntimeError> {
        let size_mib = size_mib.max(16);
        let template = templates.join(format!("{size_mib}M.ext4"));
        if !template.exists() {
            std::fs::create_dir_all(templates).map_err(RuntimeError::io("create", templates))?;
            // Machines of one size may start at once: each makes its own, the last rename wins.
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let partial = templates.join(format!("{size_mib}M.{}-{n}.partial", std::process::id()));
            Self::mkfs_empty(&partial, size_mib)?;
            std::fs::rename(&partial, &template).map_err(RuntimeError::io("rename", &template))?;
        }
        let partial = path.with_extension("partial");
        let copied = std::fs::File::open(&template)
            .and_then(|t| super::disk::sparse_copy_from(&t, &partial))
            .map_err(RuntimeError::io("copy the empty disk to", &partial));
        if let Err(e) = copied.and_then(|()| std::fs::rename(&partial, path).map_err(RuntimeError::io("rename", path)))
        {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        Ok(())
    }

    /// An empty ext4 of `size_mib` at `path` (a new file, synced by mkfs); nothing is left on failure.
    fn mkfs_empty(path: &Path, size_mib: u32) -> Result<(), RuntimeError> {
        let _ = std::fs::remove_file(path);
        {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(RuntimeError::io("create", path))?;
            f.set_len(u64::from(size_mib) << 20).map_err(RuntimeError::io("size", path))?;
        }
        // A new file reads as zeros: mkfs need not write the inode tables' or the journal's zeros.
        let out = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "hyperfleet-upper"])
            .args(super::volume::growable(&["root_owner=0:0", "assume_storage_prezeroed=1", "nodiscard"]))
            .arg(path)
            .output();
        let failed = match out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(String::from_utf8_lossy(&o.stderr).trim().to_string()),
            Err(e) => Some(format!("cannot run mkfs.ext4 (install e2fsprogs): {e}")),
        };
        if let Some(message) = failed {
            let _ = std::fs::remove_file(path);
            return Err(RuntimeError::Command { command: format!("mkfs.ext4 {}", path.display()), message });
        }
        Ok(())
    }

    /// Makes the machine's user namespace and its network namespace `netns` (owned by it).
    pub(crate) async fn create_namespaces(files: &MachineFiles, ids: HostIds, netns: &str) -> Result<(), RuntimeError> {
        let (file, name) = (files.userns(), netns.to_string());
        std::fs::create_dir_all(&files.bundle).map_err(RuntimeError::io("create", &files.bundle))?;
        idmap::release_user_namespace(&file);
        let made = tokio::task::spawn_blocking(move || idmap::create_namespaces(ids.base, &file, &name)).await?;
        made.map_err(|e| RuntimeError::Command {
            command: "create the machine's user and network namespaces".into(),
            message: e.to_string(),
        })
    }

    async fn mount_disk(files: &MachineFiles, root: &Path) -> Result<(), RuntimeError> {
        let out = Command::new("mount")
            // nodev and nosuid: a device node or setuid file the guest makes on its disk means nothing on the host.
            .args(["-o", "loop,nosuid,nodev"])
            .arg(&files.disk)
            .arg(root)
            .output()
            .await
            .map_err(|e| RuntimeError::Command { command: "mount".into(), message: e.to_string() })?;
        if !out.status.success() {
            return Err(RuntimeError::Command {
                command: format!("mount {}", files.disk.display()),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// Mounts each volume's file system on the host (loop, nosuid, nodev; read-only if asked), for
    /// [`Self::spec`] to bind into the container. On error, what was mounted is unmounted again.
    pub(crate) async fn mount_volumes(m: &BootSpec, files: &MachineFiles, userns: bool) -> Result<(), RuntimeError> {
        for (i, v) in m.volumes.iter().enumerate() {
            let target = files.volume_mount(i);
            std::fs::create_dir_all(&target).map_err(RuntimeError::io("create", &target))?;
            if is_mountpoint(&target) {
                continue;
            }
            let opts = if v.read_only { "loop,nosuid,nodev,noexec,ro" } else { "loop,nosuid,nodev" };
            let out = Command::new("mount")
                .args(["-t", "ext4", "-o", opts])
                .arg(&v.path)
                .arg(&target)
                .output()
                .await
                .map_err(|e| RuntimeError::Command { command: "mount".into(), message: e.to_string() })?;
            if !out.status.success() {
                Self::unmount_volumes(files).await;
                return Err(RuntimeError::Command {
                    command: format!("mount volume {}", v.path.display()),
                    message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
            // In its own user namespace, the guest sees the volume's files with the ids it gave them.
            if userns && !idmap::is_idmapped(&target) {
                let (at, ns) = (target.clone(), files.userns());
                if let Err(e) = tokio::task::spawn_blocking(move || idmap::idmap_in_place(&at, &ns)).await? {
                    Self::unmount_volumes(files).await;
                    return Err(RuntimeError::Command {
                        command: format!("idmapped mount of volume {}", v.path.display()),
                        message: e.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Unmounts every volume of the machine and frees their loop devices (idempotent).
    async fn unmount_volumes(files: &MachineFiles) {
        let dir = files.volume_mounts();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            unmount(&e.path()).await;
            if let Err(err) = std::fs::remove_dir(e.path()) {
                tracing::warn!(path = %e.path().display(), error = %err, "could not remove a volume's mount point");
            }
        }
        if let Err(e) = std::fs::remove_dir(&dir) {
            tracing::warn!(path = %dir.display(), error = %e, "could not remove the volumes' mount points");
        }
    }

    /// Unmounts the root (freeing its loop device) and the user namespace's file (idempotent).
    pub(crate) async fn unmount_root(files: &MachineFiles) {
        Self::unmount_volumes(files).await;
        Self::unmount_layers(files).await;
        idmap::release_user_namespace(&files.userns());
        let root = files.root.clone();
        if is_mountpoint(&root) {
            // -d releases the loop device too; a busy mount is detached lazily instead.
            if let Err(e) = Command::new("umount").arg("-d").arg(&root).output().await {
                tracing::warn!(error = %e, "umount {}", root.display());
            }
            if is_mountpoint(&root)
                && let Err(e) = Command::new("umount").args(["-l", "-d"]).arg(&root).output().await
            {
                tracing::warn!(error = %e, "umount -l {}", root.display());
            }
            if is_mountpoint(&root) {
                tracing::warn!(path = %root.display(), "the machine's root is still mounted");
                return;
            }
        }
        match std::fs::remove_dir(&root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %root.display(), error = %e, "could not remove the root's mount point");
            }
            _ => {}
        }
    }

    /// The OCI `config.json` of a machine: its init (the agent) with its listening socket as descriptor 3 and
    /// DNS in its environment, cgroup limits from the machine's vCPUs and memory, the namespace made for it,
    /// a minimal capability set, no new privileges and a seccomp filter. Nothing of the host is mounted in.
    pub(crate) fn spec(
        m: &BootSpec,
        files: &MachineFiles,
        netns: &Path,
        userns: Option<(HostIds, &Path)>,
    ) -> Result<Spec, RuntimeError> {
        let root = files.root.as_path();
        let net = &m.net;
        let e = RuntimeError::Spec;
        // What root in a sandbox needs for ordinary work (file ownership, users, low ports, ping), and no more:
        // no device nodes (MKNOD), no file capabilities (SETFCAP), no audit, nothing of CAP_SYS_*/NET_ADMIN.
        let caps: HashSet<Capability> = [
            Capability::Chown,
            Capability::DacOverride,
            Capability::Fowner,
            Capability::Fsetid,
            Capability::Kill,
            Capability::NetBindService,
            Capability::NetRaw,
            Capability::Setgid,
            Capability::Setpcap,
            Capability::Setuid,
            Capability::SysChroot,
        ]
        .into_iter()
        .collect();
        let dns: Vec<String> = net.dns.iter().map(|d| d.to_string()).collect();
        let process = ProcessBuilder::default()
            .terminal(false)
            .args(vec![m.init.clone().unwrap_or_else(|| "/sbin/init".to_string())])
            .env(vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
                "LISTEN_FDS=1".to_string(),
                format!("HYPERFLEET_DNS={}", dns.join(",")),
            ])
            .cwd("/")
            .no_new_privileges(true)
            .capabilities(
                LinuxCapabilitiesBuilder::default()
                    .bounding(caps.clone())
                    .effective(caps.clone())
                    .permitted(caps)
                    // Explicitly empty: the builder's defaults name capabilities outside the bounding set.
                    .inheritable(HashSet::new())
                    .ambient(HashSet::new())
                    .build()
                    .map_err(e)?,
            )
            .build()
            .map_err(e)?;
        let mut mounts: Vec<Mount> = oci_spec::runtime::get_default_mounts();
        let tmpfs = |dest: &str, mode: &str| {
            MountBuilder::default()
                .destination(dest)
                .typ("tmpfs")
                .source("tmpfs")
                .options(vec!["nosuid".into(), "nodev".into(), format!("mode={mode}")])
                .build()
        };
        mounts.push(tmpfs("/run", "755").map_err(e)?);
        mounts.push(tmpfs("/tmp", "1777").map_err(e)?);
        // Volumes, mounted on the host by `mount_volumes`, bound in at their paths (runc creates the directory
        // inside the root, resolving it within the root).
        for (i, v) in m.volumes.iter().enumerate() {
            let mut options = vec!["rbind".to_string(), "nosuid".into(), "nodev".into()];
            if v.read_only {
                options.extend(["ro".into(), "noexec".into()]);
            }
            mounts.push(
                MountBuilder::default()
                    .destination(&v.mount_path)
                    .typ("bind")
                    .source(files.volume_mount(i))
                    .options(options)
                    .build()
                    .map_err(e)?,
            );
        }
        let ns = |typ: LinuxNamespaceType| LinuxNamespaceBuilder::default().typ(typ).build();
        let mut namespaces = vec![
            ns(LinuxNamespaceType::Pid).map_err(e)?,
            ns(LinuxNamespaceType::Ipc).map_err(e)?,
            ns(LinuxNamespaceType::Uts).map_err(e)?,
            ns(LinuxNamespaceType::Mount).map_err(e)?,
            LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network).path(netns).build().map_err(e)?,
        ];
        let mut id_mappings = Vec::new();
        if let Some((ids, file)) = userns {
            // Joined, not made: the network namespace belongs to this user namespace (see `create_namespaces`).
            namespaces
                .push(LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::User).path(file).build().map_err(e)?);
            id_mappings.push(
                LinuxIdMappingBuilder::default()
                    .container_id(0u32)
                    .host_id(ids.base)
                    .size(idmap::RANGE_SIZE)
                    .build()
                    .map_err(e)?,
            );
        }
        const PERIOD: i64 = 100_000;
        let resources = LinuxResourcesBuilder::default()
            .memory(LinuxMemoryBuilder::default().limit(i64::from(m.mem_size_mib) * 1024 * 1024).build().map_err(e)?)
            .cpu(
                LinuxCpuBuilder::default()
                    .period(PERIOD.unsigned_abs())
                    .quota(i64::from(m.vcpu_count) * PERIOD)
                    .build()
                    .map_err(e)?,
            )
            .pids(LinuxPidsBuilder::default().limit(4096i64).build().map_err(e)?)
            .build()
            .map_err(e)?;
        let linux = LinuxBuilder::default()
            .namespaces(namespaces)
            .uid_mappings(id_mappings.clone())
            .gid_mappings(id_mappings)
            .resources(resources)
            .cgroups_path(PathBuf::from(format!("/hyperfleet/{}", m.id)))
            .masked_paths(oci_spec::runtime::get_default_maskedpaths())
            .readonly_paths(oci_spec::runtime::get_default_readonly_paths())
            .seccomp(seccomp()?)
            .build()
            .map_err(e)?;
        let mut spec = Spec::default();
        spec.set_process(Some(process))
            .set_root(Some(RootBuilder::default().path(root).readonly(false).build().map_err(e)?))
            .set_hostname(Some(net.hostname.clone()))
            .set_mounts(Some(mounts))
            .set_linux(Some(linux));
        Ok(spec)
    }

    /// Writes the bundle and starts the container (`runc run --detach`), its init's output going to the
    /// machine's console log. Expects the root mounted and the network namespace ready.
    pub(crate) async fn boot(&self, m: &BootSpec, files: &MachineFiles, netns: &Path) -> Result<Booted, RuntimeError> {
        if let Some(why) = self.unavailable() {
            return Err(RuntimeError::Unavailable(why));
        }
        std::fs::create_dir_all(&files.bundle).map_err(RuntimeError::io("create", &files.bundle))?;
        let userns = files.userns();
        let ids = self.host_ids(m.block)?;
        Self::spec(m, files, netns, ids.map(|i| (i, userns.as_path())))?.save(files.bundle.join("config.json"))?;
        // The agent's socket: made here, in a directory only the daemon can enter, and passed in open.
        let agent = agent_listener(&files.agent_socket)?;
        let cid = container_id(&m.id);
        // A container of that name left by a crash would make `run` fail; usually there is none to delete.
        self.runc_quiet(&["delete", "--force", &cid]).await;
        let pid_file = files.dir.join("container.pid");
        process::remove_file_logged(&pid_file);
        let console = files.open_console_log()?;
        let console_err = console.try_clone().map_err(RuntimeError::io("open", &files.console_log))?;
        let mut run = self.runc()?;
        run.arg("run")
            .arg("--detach")
            .arg("--bundle")
            .arg(&files.bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg("--preserve-fds")
            .arg("1")
            .arg(&cid)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_err);
        let listener_fd = agent.as_raw_fd();
        // SAFETY: runs in the forked child before exec and only calls dup2/fcntl, which are async-signal-safe;
        // it touches no memory shared with the parent. It puts the agent's listening socket at descriptor 3
        // without close-on-exec, which `--preserve-fds 1` hands on to the container's init.
        unsafe {
            run.pre_exec(move || {
                if listener_fd == AGENT_FD {
                    nix::fcntl::fcntl(AGENT_FD, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
                } else {
                    nix::unistd::dup2(listener_fd, AGENT_FD)?;
                }
                Ok(())
            });
        }
        let status = run
            .status()
            .await
            .map_err(|e| RuntimeError::Command { command: "runc run".into(), message: e.to_string() })?;
        if !status.success() {
            self.runc_quiet(&["delete", "--force", &cid]).await;
            return Err(RuntimeError::Command {
                command: "runc run".into(),
                message: process::tail(&files.console_log, 3).join(" | "),
            });
        }
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| RuntimeError::Command { command: "runc run".into(), message: "wrote no pid file".into() })?;
        Ok(Booted { pid, socket_path: None })
    }

    /// The PID of the container's init if runc says it runs.
    pub(crate) async fn running_pid(&self, machine_id: &str) -> Option<u32> {
        let out = self.runc_ok(&["state", &container_id(machine_id)]).await.ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (v.get("status")?.as_str()? == "running").then_some(())?;
        let pid = u32::try_from(v.get("pid")?.as_u64()?).ok()?;
        process::alive(pid).then_some(pid)
    }

    /// Freezes (`runc pause`) or thaws (`runc resume`) every process of the container.
    pub(crate) async fn set_paused(&self, machine_id: &str, pause: bool) -> Result<(), RuntimeError> {
        let verb = if pause { "pause" } else { "resume" };
        self.runc_ok(&[verb, &container_id(machine_id)]).await.map(|_| ())
    }

    /// Asks the agent to shut down, then `runc kill` TERM and KILL; finally removes the container.
    pub(crate) async fn stop(&self, machine_id: &str, pid: Option<u32>, files: &MachineFiles, grace: Duration) {
        let cid = container_id(machine_id);
        // A frozen container cannot act on a signal, not even SIGKILL: thaw it first (refused if not frozen).
        self.runc_quiet(&["resume", &cid]).await;
        if let Some(pid) = pid.filter(|p| process::alive(*p)) {
            let asked = tokio::time::timeout(Duration::from_millis(1500), Self::agent(files).shutdown()).await;
            let graceful = matches!(asked, Ok(Ok(()))) && process::wait_exit(pid, grace).await;
            if !graceful {
                self.runc_logged(&["kill", &cid, "TERM"]).await;
                if !process::wait_exit(pid, Duration::from_secs(3)).await {
                    self.runc_logged(&["kill", "--all", &cid, "KILL"]).await;
                    process::wait_exit(pid, Duration::from_secs(5)).await;
                }
            }
        }
        // Refused when the container is already gone, which is the usual case after a clean shutdown.
        self.runc_quiet(&["delete", "--force", &cid]).await;
        process::remove_file_logged(&files.agent_socket);
    }
}

/// Makes [`super::ROOTS_DIR`] (root's, 0711).
fn roots_dir() -> Result<(), RuntimeError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = Path::new(super::ROOTS_DIR);
    std::fs::create_dir_all(dir).map_err(RuntimeError::io("create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(RuntimeError::io("chmod", dir))
}

/// A fresh listening socket at `path` (replacing a stale one), readable by the daemon only.
fn agent_listener(path: &Path) -> Result<std::os::unix::net::UnixListener, RuntimeError> {
    use std::os::unix::fs::PermissionsExt;
    process::remove_file_logged(path);
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(RuntimeError::io("listen on", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(RuntimeError::io("chmod", path))?;
    Ok(listener)
}

/// System calls a guest may not make (EPERM), on top of what its capabilities already refuse: the kernel
/// surface container engines close by default — new user (and other) namespaces, mounts, keyrings, BPF,
/// perf, module and kexec loading, clock and swap changes, reboot, tracing other processes' memory.
const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "sysfs",
    "_sysctl",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

/// clone() flags that make new namespaces: refused like `unshare`.
const NAMESPACE_FLAGS: &[u64] = &[
    0x0002_0000, // CLONE_NEWNS
    0x0200_0000, // CLONE_NEWCGROUP
    0x0400_0000, // CLONE_NEWUTS
    0x0800_0000, // CLONE_NEWIPC
    0x1000_0000, // CLONE_NEWUSER
    0x2000_0000, // CLONE_NEWPID
    0x4000_0000, // CLONE_NEWNET
];

fn seccomp() -> Result<LinuxSeccomp, RuntimeError> {
    let eperm = u32::try_from(libc::EPERM).unwrap_or(1);
    let mut rules = vec![
        LinuxSyscallBuilder::default()
            .names(DENIED_SYSCALLS.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(eperm)
            .build()?,
        // clone3 passes its flags in memory, where a filter cannot look: make it unavailable, so the C
        // library falls back to clone, whose flags are checked below.
        LinuxSyscallBuilder::default()
            .names(vec!["clone3".to_string()])
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(u32::try_from(libc::ENOSYS).unwrap_or(38))
            .build()?,
    ];
    for flag in NAMESPACE_FLAGS {
        rules.push(
            LinuxSyscallBuilder::default()
                .names(vec!["clone".to_string()])
                .action(LinuxSeccompAction::ScmpActErrno)
                .errno_ret(eperm)
                .args(vec![
                    LinuxSeccompArgBuilder::default()
                        .index(0usize)
                        .value(*flag)
                        .value_two(*flag)
                        .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                        .build()?,
                ])
                .build()?,
        );
    }
    Ok(LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32])
        .syscalls(rules)
        .build()?)
}

/// Unmounts `root` and frees its loop device (idempotent); a busy mount is detached lazily.
async fn unmount(root: &Path) {
    if is_mountpoint(root) {
        // -d releases the loop device too; a busy mount is detached lazily instead.
        if let Err(e) = Command::new("umount").arg("-d").arg(root).output().await {
            tracing::warn!(error = %e, "umount {}", root.display());
        }
        if is_mountpoint(root)
            && let Err(e) = Command::new("umount").args(["-l", "-d"]).arg(root).output().await
        {
            tracing::warn!(error = %e, "umount -l {}", root.display());
        }
        if is_mountpoint(root) {
            tracing::warn!(path = %root.display(), "a machine's mount is still there");
        }
    }
}

fn is_mountpoint(path: &Path) -> bool {
    let Ok(canon) = path.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .any(|mp| Path::new(&unescape_mount(mp)) == canon)
}

/// /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::GuestNetwork;
    use hyperfleet_types::RuntimeKind;

    fn boot_spec() -> BootSpec {
        BootSpec {
            id: "m1".into(),
            block: 0,
            runtime: RuntimeKind::Container,
            vcpu_count: 2,
            mem_size_mib: 256,
            kernel_image_path: PathBuf::from("/a/vmlinux"),
            kernel_args: String::new(),
            rootfs_path: PathBuf::from("/a/rootfs.ext4"),
            assets_dir: PathBuf::from("/a"),
            rootfs_dir: PathBuf::from("/a"),
            init: None,
            main_spec: None,
            image_tree: None,
            net: GuestNetwork {
                iface: "tap0".into(),
                tap_ip: "172.16.0.1".parse().unwrap(),
                guest_ip: "172.16.0.2".parse().unwrap(),
                netmask: "255.255.255.252".parse().unwrap(),
                prefix_len: 30,
                mac: "AA:FC:00:00:00:01".into(),
                dns: vec!["10.0.0.53".parse().unwrap()],
                hostname: "web".into(),
            },
            disk_size_mib: 0,
            volumes: vec![],
        }
    }

    #[test]
    fn the_config_confines_the_guest() {
        let files = MachineFiles::new(Path::new("/data"), Path::new("/jails"), "m1");
        let spec = Container::spec(&boot_spec(), &files, Path::new("/run/netns/hf-m1"), None).unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        let process = &json["process"];
        assert_eq!(process["args"], serde_json::json!(["/sbin/init"]));
        assert_eq!(process["noNewPrivileges"], true);
        let env: Vec<&str> = process["env"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
        assert!(env.contains(&"LISTEN_FDS=1") && env.contains(&"HYPERFLEET_DNS=10.0.0.53"), "{env:?}");
        let caps = process["capabilities"].to_string();
        for absent in ["CAP_SYS_ADMIN", "CAP_MKNOD", "CAP_NET_ADMIN", "CAP_SYS_PTRACE", "CAP_SETFCAP"] {
            assert!(!caps.contains(absent), "{absent} in {caps}");
        }
        // Nothing of the host is bound in.
        let mounts = json["mounts"].as_array().unwrap();
        assert!(mounts.iter().all(|m| m["type"] != "bind"), "{mounts:?}");
        let linux = &json["linux"];
        assert_eq!(linux["resources"]["memory"]["limit"], 256 * 1024 * 1024);
        assert_eq!(linux["resources"]["cpu"]["quota"], 200_000);
        assert_eq!(linux["resources"]["pids"]["limit"], 4096);
        let ns = linux["namespaces"].to_string();
        assert!(ns.contains("/run/netns/hf-m1"), "{ns}");
        let seccomp = &linux["seccomp"];
        assert_eq!(seccomp["defaultAction"], "SCMP_ACT_ALLOW");
        let denied = seccomp["syscalls"][0]["names"].to_string();
        for name in ["unshare", "mount", "keyctl", "bpf", "perf_event_open", "kexec_load", "setns"] {
            assert!(denied.contains(&format!("\"{name}\"")), "{name} is not denied");
        }
        let clone_rules = seccomp["syscalls"].as_array().unwrap().iter().filter(|r| r["names"][0] == "clone").count();
        assert_eq!(clone_rules, NAMESPACE_FLAGS.len(), "every namespace flag of clone is refused");
    }
}
