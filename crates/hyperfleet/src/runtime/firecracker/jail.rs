//! The host side of Firecracker's jailer: every firecracker runs as its machine's own uid/gid, chrooted in
//! `{chroot dir}/{exec name}/{id}/root` within its own mount namespace, in cgroups that cap its memory and
//! CPU, with Firecracker's default seccomp filters. This module fills the chroot (kernel, the machine's
//! disk), builds the jailer's command line, recognises a jailed process, and removes chroot and cgroups.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::super::MachineFiles;
use super::super::volume::VolumeDisk;

/// Paths inside the chroot (relative to its root): what firecracker is told, and where the host finds them.
pub const API_SOCKET: &str = "run/api.sock";
pub const VSOCK_SOCKET: &str = "run/vsock.sock";
pub const KERNEL: &str = "vmlinux";
pub const DISK: &str = "rootfs.ext4";

/// The cgroup every jailed firecracker's own cgroup is made under (`/sys/fs/cgroup/<controller>/firecracker/ID`
/// on cgroup v1, `/sys/fs/cgroup/firecracker/ID` on v2).
pub const CGROUP_PARENT: &str = "firecracker";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Memory firecracker needs beyond the guest's: the VMM and its threads, device emulation, and the page cache
/// of the guest's disk I/O, which the cgroup is charged for (reclaimable, so the cap only bounds it).
const VMM_OVERHEAD_MIB: u64 = 128;
const CPU_PERIOD_US: u64 = 100_000;

/// How firecracker sees a path of its chroot.
pub fn inside(path: &str) -> String {
    format!("/{path}")
}

/// The chroot of a machine's jail.
pub fn root(files: &MachineFiles) -> PathBuf {
    files.jail.join("root")
}

/// The unprivileged identity a machine's firecracker runs as; never root, and no two machines share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

impl Identity {
    /// uid = gid = base + the machine's address block (unique among existing machines).
    pub fn of_block(base: u32, block: u32) -> Self {
        let uid = base.saturating_add(block);
        Self { uid, gid: uid }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl CgroupVersion {
    /// v2 only when /sys/fs/cgroup itself is the unified hierarchy; a hybrid host (v1 controllers, an empty
    /// unified tree beside them) is v1.
    pub fn detect() -> Self {
        use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
        match statfs(CGROUP_ROOT) {
            Ok(fs) if fs.filesystem_type() == CGROUP2_SUPER_MAGIC => Self::V2,
            _ => Self::V1,
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Self::V1 => "1",
            Self::V2 => "2",
        }
    }

    /// The jailer's `--cgroup FILE=VALUE` settings: memory capped at the guest's plus the VMM's overhead, and
    /// on v2 CPU time at one CPU per vCPU. On v1 every controller is its own hierarchy, and moving the process
    /// into each one waits for an RCU grace period (about 10 ms here, measured: the largest part of a jailed
    /// start), so there it is memory only; v2 moves the process once for all controllers.
    pub fn limits(self, vcpu_count: u32, mem_size_mib: u32) -> Vec<String> {
        let mem = (u64::from(mem_size_mib) + VMM_OVERHEAD_MIB) << 20;
        let quota = u64::from(vcpu_count.max(1)) * CPU_PERIOD_US;
        match self {
            Self::V1 => vec![format!("memory.limit_in_bytes={mem}")],
            Self::V2 => vec![format!("memory.max={mem}"), format!("cpu.max={quota} {CPU_PERIOD_US}")],
        }
    }
}

/// What the jailer needs besides the machine's own paths.
pub struct JailerCommand<'a> {
    pub jailer: &'a Path,
    pub firecracker: &'a Path,
    pub chroot_dir: &'a Path,
    pub id: &'a str,
    pub identity: Identity,
    pub cgroup_version: CgroupVersion,
    pub cgroup_limits: Vec<String>,
}

impl JailerCommand<'_> {
    /// Not daemonized: the jailer execs firecracker in place, so the PID is firecracker's and the standard
    /// output and error it inherits (the machine's console log) stay open, which `--daemonize` would replace
    /// with /dev/null.
    pub fn build(&self) -> Command {
        let mut cmd = Command::new(self.jailer);
        cmd.arg("--id")
            .arg(self.id)
            .arg("--exec-file")
            .arg(self.firecracker)
            .arg("--uid")
            .arg(self.identity.uid.to_string())
            .arg("--gid")
            .arg(self.identity.gid.to_string())
            .arg("--chroot-base-dir")
            .arg(self.chroot_dir)
            .arg("--parent-cgroup")
            .arg(CGROUP_PARENT)
            .arg("--cgroup-version")
            .arg(self.cgroup_version.arg());
        for limit in &self.cgroup_limits {
            cmd.arg("--cgroup").arg(limit);
        }
        cmd.arg("--").arg("--api-sock").arg(inside(API_SOCKET));
        cmd
    }
}

/// Makes the chroot directory base root-only (0700), so no unprivileged user reaches into a jail.
pub fn secure_base(chroot_dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(chroot_dir)?;
    std::fs::set_permissions(chroot_dir, std::fs::Permissions::from_mode(0o700))?;
    std::os::unix::fs::chown(chroot_dir, Some(0), Some(0))
}

/// Fills the machine's chroot: its root owned by the machine's identity, the kernel (a hard link when every
/// user may read it, else a private read-only copy), and the machine's disk (a hard link to its file in the
/// data directory, now owned by the identity, mode 0600, so the disk survives the chroot between runs).
pub fn populate(files: &MachineFiles, kernel: &Path, who: Identity) -> io::Result<()> {
    let root = root(files);
    std::fs::create_dir_all(&root)?;
    std::os::unix::fs::chown(&root, Some(who.uid), Some(who.gid))?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;

    let kernel_in = root.join(KERNEL);
    let world_readable = std::fs::metadata(kernel)?.mode() & 0o004 != 0;
    if !(world_readable && std::fs::hard_link(kernel, &kernel_in).is_ok()) {
        std::fs::copy(kernel, &kernel_in)?;
        std::os::unix::fs::chown(&kernel_in, Some(who.uid), Some(who.gid))?;
        std::fs::set_permissions(&kernel_in, std::fs::Permissions::from_mode(0o400))?;
    }

    std::os::unix::fs::chown(&files.disk, Some(who.uid), Some(who.gid))?;
    std::fs::set_permissions(&files.disk, std::fs::Permissions::from_mode(0o600))?;
    std::fs::hard_link(&files.disk, root.join(DISK)).map_err(|e| {
        if e.raw_os_error() == Some(libc::EXDEV) {
            io::Error::other(
                "the machine's disk cannot be hard-linked into its chroot: HYPERFLEET_CHROOT_DIR must be on the \
                 filesystem of HYPERFLEET_DATA_DIR",
            )
        } else {
            e
        }
    })
}

/// Volume `i`'s name inside the chroot.
pub fn volume_file(i: usize) -> String {
    format!("volume{i}.ext4")
}

/// Links the machine's volumes into its chroot, owned by its identity (0600) like its disk. A read-only
/// volume used by several machines is owned by the last one started; the others opened it already.
pub(crate) fn link_volumes(files: &MachineFiles, volumes: &[VolumeDisk], who: Identity) -> io::Result<()> {
    let root = root(files);
    for (i, v) in volumes.iter().enumerate() {
        std::os::unix::fs::chown(&v.path, Some(who.uid), Some(who.gid))?;
        std::fs::set_permissions(&v.path, std::fs::Permissions::from_mode(0o600))?;
        let inside = root.join(volume_file(i));
        match std::fs::hard_link(&v.path, &inside) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            other => other?,
        }
    }
    Ok(())
}

/// Whether `pid` runs in this machine's chroot. The jailer pivots into it inside its own mount namespace,
/// so /proc/PID/root reads "/": the directory it leads to is compared (device and inode) instead.
pub fn runs_in(pid: u32, files: &MachineFiles) -> bool {
    let (Ok(theirs), Ok(ours)) = (std::fs::metadata(format!("/proc/{pid}/root")), std::fs::metadata(root(files)))
    else {
        return false;
    };
    (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino())
}

/// The PID the jailer recorded in the chroot (`{exec name}.pid`), if any.
pub fn recorded_pid(files: &MachineFiles, exec_name: &str) -> Option<u32> {
    std::fs::read_to_string(root(files).join(format!("{exec_name}.pid"))).ok()?.trim().parse().ok()
}

/// The machine's cgroup directories that exist (one per v1 controller it was given, or the v2 one).
pub fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let base = Path::new(CGROUP_ROOT);
    let mut dirs = vec![base.join(CGROUP_PARENT).join(id)];
    let controllers = std::fs::read_dir(base).into_iter().flatten().flatten();
    // Symlinked controllers (cpu -> cpu,cpuacct) are skipped: their real directory is listed too.
    dirs.extend(
        controllers.filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path().join(CGROUP_PARENT).join(id)),
    );
    dirs.retain(|d| d.is_dir());
    dirs
}

/// Removes the machine's chroot and cgroups; idempotent. Call once its process is gone: a cgroup is removable
/// only when empty, so a process that is still exiting gets a few seconds.
pub async fn remove(files: &MachineFiles, id: &str) {
    let (jail, id) = (files.jail.clone(), id.to_string());
    let _alone = PARENT_CGROUPS.write().await;
    // Directory trees and cgroupfs: off the async workers.
    let removed = tokio::task::spawn_blocking(move || {
        remove_blocking(&jail, &id);
        remove_unused_parents();
    });
    if let Err(e) = removed.await {
        tracing::warn!(error = %e, "removing a firecracker jail: the task failed");
    }
}

/// The `firecracker` parent cgroups that exist (v2, or one per v1 controller).
pub fn parent_cgroup_dirs() -> Vec<PathBuf> {
    let base = Path::new(CGROUP_ROOT);
    let mut dirs = vec![base.join(CGROUP_PARENT)];
    let controllers = std::fs::read_dir(base).into_iter().flatten().flatten();
    dirs.extend(controllers.filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path().join(CGROUP_PARENT)));
    dirs.retain(|d| d.is_dir());
    dirs
}

/// Removes the jailer's parent cgroups when no machine's cgroup is left in them (a cgroup directory with
/// children refuses `rmdir` with EBUSY, which is the "still in use" answer here).
fn remove_unused_parents() {
    for dir in parent_cgroup_dirs() {
        match std::fs::remove_dir(&dir) {
            Err(e) if e.raw_os_error() != Some(libc::EBUSY) && e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove the jails' parent cgroup");
            }
            _ => {}
        }
    }
}

/// Starts hold this shared from the jailer's spawn until firecracker's socket is up (by then the jailer has
/// made the machine's cgroup under [`CGROUP_PARENT`]); removing that parent once no machine uses it holds
/// it alone, so a starting jailer never finds its parent gone between its two `mkdir`s.
pub static PARENT_CGROUPS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn remove_blocking(jail: &Path, id: &str) {
    if let Err(e) = std::fs::remove_dir_all(jail)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %jail.display(), error = %e, "could not remove the machine's chroot");
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    for dir in cgroup_dirs(id) {
        loop {
            match std::fs::remove_dir(&dir) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    tracing::warn!(dir = %dir.display(), error = %e, "could not remove the machine's cgroup");
                    break;
                }
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_per_block_and_never_root() {
        assert_eq!(Identity::of_block(900_000, 0), Identity { uid: 900_000, gid: 900_000 });
        assert_ne!(Identity::of_block(900_000, 1), Identity::of_block(900_000, 2));
    }

    #[test]
    fn limits_cap_memory_above_the_guest_and_cpu_per_vcpu() {
        assert_eq!(CgroupVersion::V1.limits(2, 128), vec!["memory.limit_in_bytes=268435456"]);
        assert_eq!(CgroupVersion::V2.limits(1, 256), vec!["memory.max=402653184", "cpu.max=100000 100000"]);
    }

    #[test]
    fn the_jailer_keeps_seccomp_and_stdio() {
        let cmd = JailerCommand {
            jailer: Path::new("/bin/jailer"),
            firecracker: Path::new("/bin/firecracker"),
            chroot_dir: Path::new("/srv/jail"),
            id: "abc",
            identity: Identity::of_block(900_000, 7),
            cgroup_version: CgroupVersion::V1,
            cgroup_limits: vec!["memory.limit_in_bytes=1".into()],
        }
        .build();
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let joined = args.join(" ");
        assert!(joined.contains("--uid 900007 --gid 900007 --chroot-base-dir /srv/jail"), "{joined}");
        assert!(joined.ends_with("--cgroup memory.limit_in_bytes=1 -- --api-sock /run/api.sock"), "{joined}");
        assert!(!args.iter().any(|a| a == "--daemonize" || a == "--no-seccomp"), "{joined}");
    }
}
