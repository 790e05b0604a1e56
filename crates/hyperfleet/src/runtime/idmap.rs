//! Idmapped mounts for container roots: a container's root runs as an unprivileged host uid in its own user
//! namespace, and its disk (whose files belong to uid 0..65535 on disk) is shown to it through a mount that
//! maps those ids to the machine's host range (open_tree + mount_setattr(MOUNT_ATTR_IDMAP) + move_mount).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Container ids 0..SIZE map to host ids `base..base+SIZE`: the usual 16-bit range of a Linux userland.
pub(crate) const RANGE_SIZE: u32 = 65_536;

// From <linux/mount.h> (not in the libc crate for glibc targets).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const OPEN_TREE_CLOEXEC: libc::c_uint = 0o2_000_000;
const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
const MOUNT_ATTR_NOSUID: u64 = 0x0000_0002;
const MOUNT_ATTR_NODEV: u64 = 0x0000_0004;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x0000_0004;

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Whether this kernel has mount_setattr(2) (Linux 5.12+, where ext4 also supports idmapped mounts).
pub(crate) fn supported() -> bool {
    // SAFETY: mount_setattr with an invalid descriptor and a null attribute reads and writes no memory; it
    // only answers EBADF/EINVAL where the call exists and ENOSYS where it does not.
    let r = unsafe { libc::syscall(libc::SYS_mount_setattr, -1, std::ptr::null::<libc::c_char>(), 0, 0, 0) };
    !(r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS))
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Makes a container machine's user namespace (ids 0..RANGE_SIZE are host ids `base..`) and a network
/// namespace that belongs to it, so the guest's root holds its (few) network capabilities over its own
/// network, and nothing over the host's. A forked child makes both (a multi-threaded process cannot enter
/// a user namespace) and waits while the daemon writes the maps and binds them: the user namespace to
/// `userns_file` (for runc to join and for the idmapped root), the network one as `netns` in /run/netns.
pub(crate) fn create_namespaces(base: u32, userns_file: &Path, netns: &str) -> io::Result<()> {
    // Close-on-exec: a process the daemon spawns meanwhile (runc, mount) must not hold copies of these ends.
    let (to_child_r, to_child_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (to_parent_r, to_parent_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the child only makes raw system calls (unshare, read, write, _exit), which are
    // async-signal-safe, so forking a multi-threaded process is sound here; it never returns into Rust code.
    let child = match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => {
            let mut byte = 0u8;
            let buf = std::ptr::addr_of_mut!(byte).cast::<libc::c_void>();
            // SAFETY: raw system calls on descriptors this child owns and a one-byte stack buffer. Each step
            // is reported with one byte; the parent treats a closed pipe as failure.
            unsafe {
                // Keep only this helper's two ends. Helpers forked at the same time for other machines would
                // otherwise hold copies of each other's pipes, and each would wait on the others forever.
                let (a, b) = (to_child_r.as_raw_fd(), to_parent_w.as_raw_fd());
                let (lo, hi) = (a.min(b).unsigned_abs(), a.max(b).unsigned_abs());
                for (first, last) in [(3, lo.saturating_sub(1)), (lo + 1, hi.saturating_sub(1)), (hi + 1, u32::MAX)] {
                    if first <= last {
                        libc::syscall(libc::SYS_close_range, first, last, 0);
                    }
                }
                if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                    libc::_exit(1);
                }
                libc::write(to_parent_w.as_raw_fd(), buf, 1);
                // The parent writes the maps, then asks for the network namespace.
                if libc::read(to_child_r.as_raw_fd(), buf, 1) != 1 || libc::unshare(libc::CLONE_NEWNET) != 0 {
                    libc::_exit(1);
                }
                libc::write(to_parent_w.as_raw_fd(), buf, 1);
                libc::read(to_child_r.as_raw_fd(), buf, 1);
                libc::_exit(0)
            }
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop((to_child_r, to_parent_w));
    let step = |what: &str| -> io::Result<()> {
        let mut byte = [0u8; 1];
        match nix::unistd::read(to_parent_r.as_raw_fd(), &mut byte) {
            Ok(1) => Ok(()),
            _ => Err(io::Error::other(format!("the namespace helper failed to {what}"))),
        }
    };
    let made = (|| {
        step("make a user namespace")?;
        let map = format!("0 {base} {RANGE_SIZE}\n");
        std::fs::write(format!("/proc/{child}/uid_map"), &map)?;
        std::fs::write(format!("/proc/{child}/gid_map"), &map)?;
        nix::unistd::write(&to_child_w, b"n")?;
        step("make a network namespace")?;
        std::fs::File::create(userns_file)?;
        let flags = nix::mount::MsFlags::MS_BIND;
        nix::mount::mount(
            Some(format!("/proc/{child}/ns/user").as_str()),
            userns_file,
            None::<&str>,
            flags,
            None::<&str>,
        )?;
        hyperfleet_net::netns::name_existing(netns, Path::new(&format!("/proc/{child}/ns/net")))
            .map_err(io::Error::other)?;
        Ok(())
    })();
    // The helper's last read ends with these bytes (or at the pipe's end): it exits at once, and waiting
    // reaps it. Two, in case it still waits for the network step after a failure above.
    let _ = nix::unistd::write(&to_child_w, b"xx");
    drop(to_child_w);
    let _ = nix::sys::wait::waitpid(child, None);
    if made.is_err() {
        release_user_namespace(userns_file);
    }
    made
}

/// Unmounts and removes a machine's user namespace file (idempotent); the namespace goes with its last user.
pub(crate) fn release_user_namespace(userns_file: &Path) {
    match nix::mount::umount2(userns_file, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
        Err(e) => tracing::warn!(path = %userns_file.display(), error = %e, "could not unmount the user namespace"),
    }
    match std::fs::remove_file(userns_file) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            tracing::warn!(path = %userns_file.display(), error = %e, "could not remove the user namespace file");
        }
        _ => {}
    }
}

/// Replaces the mount at `path` by a copy of itself (same flags, same filesystem) idmapped through the user
/// namespace at `userns_file`: files owned by id N on disk appear as `base + N` on the host and as N inside,
/// and what the container writes as N is stored as N.
pub(crate) fn idmap_in_place(path: &Path, userns_file: &Path) -> io::Result<()> {
    let userns = std::fs::File::open(userns_file)?;
    let target = cpath(path)?;
    // SAFETY: `target` is a valid NUL-terminated path; the returned descriptor is checked and owned below.
    let tree = unsafe {
        libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, target.as_ptr(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
    };
    let tree = i32::try_from(tree).ok().filter(|fd| *fd >= 0).ok_or_else(io::Error::last_os_error)?;
    // SAFETY: open_tree returned a fresh descriptor that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(tree) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: u64::try_from(userns.as_raw_fd()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
    };
    let empty = c"";
    // SAFETY: `attr` is a live, correctly laid out mount_attr of the size passed; `empty` is a valid string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            std::ptr::addr_of!(attr),
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // The detached copy keeps the filesystem alive while the original mount goes.
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH)?;
    // SAFETY: both strings are valid and NUL-terminated; the descriptor is the detached idmapped tree.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mounts a read-only copy of the directory `src` at `dst` (open_tree clone + mount_setattr + move_mount),
/// idmapped through the user namespace at `userns_file` when one is given: an image's tree, shown to one
/// machine as the lower layer of its overlay root.
pub(crate) fn attach_read_only(src: &Path, dst: &Path, userns_file: Option<&Path>) -> io::Result<()> {
    let userns = userns_file.map(std::fs::File::open).transpose()?;
    let (source, target) = (cpath(src)?, cpath(dst)?);
    // SAFETY: `source` is a valid NUL-terminated path; the returned descriptor is checked and owned below.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            source.as_ptr(),
            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
        )
    };
    let tree = i32::try_from(tree).ok().filter(|fd| *fd >= 0).ok_or_else(io::Error::last_os_error)?;
    // SAFETY: open_tree returned a fresh descriptor that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(tree) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY
            | MOUNT_ATTR_NOSUID
            | MOUNT_ATTR_NODEV
            | userns.as_ref().map_or(0, |_| MOUNT_ATTR_IDMAP),
        attr_clr: 0,
        propagation: 0,
        userns_fd: match &userns {
            Some(f) => u64::try_from(f.as_raw_fd()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
            None => 0,
        },
    };
    let empty = c"";
    // SAFETY: `attr` is a live, correctly laid out mount_attr of the size passed; `empty` is a valid string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            std::ptr::addr_of!(attr),
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both strings are valid and NUL-terminated; the descriptor is the detached read-only tree.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the mount at `path` is idmapped (its options in /proc/self/mountinfo say `idmapped`).
pub(crate) fn is_idmapped(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = path.to_string_lossy().replace(' ', "\\040");
    info.lines().rev().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.get(4) == Some(&want.as_str()) && f.get(5).is_some_and(|o| o.split(',').any(|o| o == "idmapped"))
    })
}
