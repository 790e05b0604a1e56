//! An image's root: the layers applied in order to a fresh directory and the Hyperfleet agent added as
//! `/.hyperfleet/agent` (nothing else of the image is changed). That tree is what the cache keeps: container
//! machines run from it directly (the read-only lower layer of an overlay, see `runtime/container.rs`), and
//! the ext4 image Firecracker machines need is made from it (`mkfs.ext4 -d`) the first time one asks for it.
//! Work happens under temporary names; only a finished tree or image is renamed into place.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::Mode;

use super::OciError;
use super::layer::Root;

/// Where the agent goes in an image's root, and the init the runtimes start for an image machine.
pub(crate) const AGENT_DIR: &str = ".hyperfleet";
pub(crate) const AGENT_INIT: &str = "/.hyperfleet/agent";
/// The main process spec the daemon writes into a machine's disk (read by the agent at boot).
pub(crate) const MAIN_SPEC: &str = "/.hyperfleet/main.json";
/// Headroom over the unpacked size: ext4 metadata, and room for the machine to write.
const HEADROOM_MIB: u64 = 64;
pub(crate) const MIN_SIZE_MIB: u64 = 64;
/// Debian's `eatmydata`: runs a command with fsync turned into a no-op.
const EATMYDATA: &str = "/usr/bin/eatmydata";

/// Layers as their downloads finish, in any order: (index in the manifest, blob file).
pub(crate) type Arrivals = std::sync::mpsc::Receiver<(usize, PathBuf)>;

/// The default disk size of a machine from an image of `unpacked` bytes: the unpacked size and a quarter,
/// plus headroom, at least [`MIN_SIZE_MIB`].
pub(crate) fn default_size_mib(unpacked: u64) -> u64 {
    (unpacked / (1 << 20) * 5 / 4 + HEADROOM_MIB).max(MIN_SIZE_MIB)
}

/// Builds the tree `out` from the manifest's `count` layers, applying each as soon as it and every layer
/// before it have arrived (so applying overlaps the downloads still running); returns the unpacked size in
/// bytes. `work` is a scratch directory on the same filesystem, gone when this returns (after a failure with
/// everything applied so far: a failed pull leaves nothing).
pub(crate) fn build_tree(
    count: usize,
    layers: Arrivals,
    agent: &Path,
    work: &Path,
    out: &Path,
) -> Result<u64, OciError> {
    let result = build_in(count, layers, agent, work, out);
    remove_scratch(work);
    result
}

/// Removes a directory tree, logging a failure (nothing there is fine).
pub(crate) fn remove_scratch(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %dir.display(), error = %e, "could not remove an image's scratch directory");
    }
}

fn build_in(count: usize, layers: Arrivals, agent: &Path, work: &Path, out: &Path) -> Result<u64, OciError> {
    let tree = work.join("root");
    std::fs::create_dir_all(&tree).map_err(|e| OciError::io("create", &tree, e))?;
    let root = Root::open(&tree).map_err(|e| OciError::io("open", &tree, e))?;
    let started = std::time::Instant::now();
    let mut waited = std::time::Duration::ZERO;
    let mut bytes = 0u64;
    let mut early = std::collections::BTreeMap::new();
    for next in 0..count {
        let l = loop {
            if let Some(p) = early.remove(&next) {
                break p;
            }
            let t = std::time::Instant::now();
            let (i, p) = layers.recv().map_err(|_| OciError::Interrupted)?;
            waited += t.elapsed();
            early.insert(i, p);
        };
        let f = std::fs::File::open(&l).map_err(|e| OciError::io("open", &l, e))?;
        bytes += root.apply(std::io::BufReader::with_capacity(1 << 16, f))?;
    }
    inject_agent(&tree, agent)?;
    bytes += std::fs::metadata(agent).map(|m| m.len()).unwrap_or(0);
    // The tree's root is the image's `/`: 0755 root, whatever the layers said (as `mkfs -E root_owner=0:0`).
    std::os::unix::fs::chown(&tree, Some(0), Some(0)).map_err(|e| OciError::io("chown", &tree, e))?;
    std::fs::rename(&tree, out).map_err(|e| OciError::io("rename", out, e))?;
    tracing::info!(
        waited_for_downloads_ms = waited.as_millis(),
        applied_ms = started.elapsed().as_millis(),
        "image root built"
    );
    Ok(bytes)
}

/// Makes the ext4 image `out` of the tree `tree` (whose files take `bytes`) with `mkfs.ext4 -d`, for the
/// Firecracker machines of an image: built as `partial`, synced, and only then renamed into place.
pub(crate) fn build_ext4(tree: &Path, bytes: u64, partial: &Path, out: &Path) -> Result<(), OciError> {
    let started = std::time::Instant::now();
    let size_mib = default_size_mib(bytes);
    let _ = std::fs::remove_file(partial);
    // The file is new, so every block already reads as zeros: mkfs need not write the journal's or the inode
    // tables' zeros (they stay holes, in the cache and in every machine's sparse copy). mkfs's own fsync of
    // the whole image is skipped under eatmydata (when installed): one fsync of the file follows.
    let mut mkfs = if Path::new(EATMYDATA).exists() {
        let mut c = Command::new(EATMYDATA);
        c.arg("mkfs.ext4");
        c
    } else {
        Command::new("mkfs.ext4")
    };
    let o = mkfs
        .args(["-q", "-F", "-L", "hyperfleet-root"])
        .args(crate::runtime::volume::growable(&["root_owner=0:0", "assume_storage_prezeroed=1", "nodiscard"]))
        .arg("-d")
        .arg(tree)
        .arg(partial)
        .arg(format!("{size_mib}M"))
        .output()
        .map_err(|e| OciError::Mkfs(format!("cannot run mkfs.ext4 (install e2fsprogs): {e}")));
    let made = o.and_then(|o| {
        if o.status.success() {
            Ok(())
        } else {
            Err(OciError::Mkfs(String::from_utf8_lossy(&o.stderr).trim().to_string()))
        }
    });
    let synced = made.and_then(|()| {
        std::fs::File::open(partial).and_then(|f| f.sync_all()).map_err(|e| OciError::io("sync", partial, e))
    });
    if let Err(e) = synced.and_then(|()| std::fs::rename(partial, out).map_err(|e| OciError::io("rename", out, e))) {
        let _ = std::fs::remove_file(partial);
        return Err(e);
    }
    tracing::info!(mkfs_ms = started.elapsed().as_millis(), "image ext4 built");
    Ok(())
}

/// Adds `/.hyperfleet/agent` (0755, root). A layer that made `/.hyperfleet` itself is replaced: that name is
/// Hyperfleet's.
fn inject_agent(tree: &Path, agent: &Path) -> Result<(), OciError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tree.join(AGENT_DIR);
    if std::fs::symlink_metadata(&dir).is_ok() {
        if dir.is_symlink() || !dir.is_dir() {
            std::fs::remove_file(&dir).map_err(|e| OciError::io("remove", &dir, e))?;
        } else {
            std::fs::remove_dir_all(&dir).map_err(|e| OciError::io("remove", &dir, e))?;
        }
    }
    std::fs::create_dir(&dir).map_err(|e| OciError::io("create", &dir, e))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| OciError::io("chmod", &dir, e))?;
    let dst = dir.join("agent");
    std::fs::copy(agent, &dst).map_err(|e| OciError::io("copy the agent to", &dst, e))?;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).map_err(|e| OciError::io("chmod", &dst, e))
}

/// Writes `contents` as `MAIN_SPEC` into the ext4 image `disk` without mounting it (debugfs works on the
/// image's own tree: nothing it does reaches the host's files but the one it copies in).
pub(crate) fn write_main_spec(disk: &Path, contents: &[u8], scratch: &Path) -> Result<(), OciError> {
    std::fs::write(scratch, contents).map_err(|e| OciError::io("write", scratch, e))?;
    let script = scratch.with_extension("debugfs");
    let text = format!("rm {MAIN_SPEC}\nwrite {} {MAIN_SPEC}\n", scratch.display());
    std::fs::write(&script, text).map_err(|e| OciError::io("write", &script, e))?;
    let o = Command::new("debugfs").arg("-w").arg("-f").arg(&script).arg(disk).output();
    let _ = std::fs::remove_file(&script);
    let _ = std::fs::remove_file(scratch);
    let o = o.map_err(|e| OciError::Mkfs(format!("cannot run debugfs (install e2fsprogs): {e}")))?;
    let err = String::from_utf8_lossy(&o.stderr);
    // `rm` of a file not there yet is expected; any other complaint is a failure.
    let bad: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("File not found") && !l.starts_with("debugfs "))
        .collect();
    if !o.status.success() || !bad.is_empty() {
        return Err(OciError::Mkfs(format!("debugfs: {}", bad.join("; "))));
    }
    Ok(())
}

/// Writes `contents` as `MAIN_SPEC` into `upper`, the upper directory of a container machine's overlay root
/// (not mounted at that moment), as `owner` (the host ids of the machine's root). What is in `upper` is the
/// guest's: nothing there is followed, `/.hyperfleet` is made a real directory again if the guest replaced
/// it (by a symlink, a file or a whiteout), and the file is made anew, never opened through a link.
pub(crate) fn write_main_spec_beneath(upper: &Path, contents: &[u8], owner: (u32, u32)) -> Result<(), OciError> {
    use nix::sys::stat::{SFlag, fstatat, mkdirat};
    use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, unlinkat};
    use std::io::Write;
    let err = |what: &'static str| move |e: Errno| OciError::io(what, upper, std::io::Error::from(e));
    let beneath = |dir: &OwnedFd, name: &str, flags: OFlag, mode: Mode| -> Result<OwnedFd, Errno> {
        let how = OpenHow::new().flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW).mode(mode).resolve(
            ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
        // SAFETY: openat2 returned a new descriptor that nothing else owns.
        openat2(dir.as_raw_fd(), name, how).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let top: OwnedFd = std::fs::File::open(upper).map_err(|e| OciError::io("open", upper, e))?.into();
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
    let (uid, gid) = (Some(Uid::from_raw(owner.0)), Some(Gid::from_raw(owner.1)));
    match fstatat(Some(top.as_raw_fd()), AGENT_DIR, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {}
        Ok(_) => {
            unlinkat(Some(top.as_raw_fd()), AGENT_DIR, UnlinkatFlags::NoRemoveDir).map_err(err("remove"))?;
            mkdirat(Some(top.as_raw_fd()), AGENT_DIR, Mode::from_bits_truncate(0o755)).map_err(err("create"))?;
        }
        Err(Errno::ENOENT) => {
            mkdirat(Some(top.as_raw_fd()), AGENT_DIR, Mode::from_bits_truncate(0o755)).map_err(err("create"))?;
        }
        Err(e) => return Err(err("stat")(e)),
    }
    let dir = beneath(&top, AGENT_DIR, dir_flags, Mode::empty()).map_err(err("open"))?;
    fchown(dir.as_raw_fd(), uid, gid).map_err(err("chown"))?;
    let name = MAIN_SPEC.rsplit('/').next().unwrap_or("main.json");
    match unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(Errno::EISDIR) => {
            unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::RemoveDir).map_err(err("remove"))?;
        }
        Err(e) => return Err(err("remove")(e)),
    }
    let file = beneath(&dir, name, OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL, Mode::from_bits_truncate(0o644))
        .map_err(err("create"))?;
    fchown(file.as_raw_fd(), uid, gid).map_err(err("chown"))?;
    std::fs::File::from(file).write_all(contents).map_err(|e| OciError::io("write", upper, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_main_spec_is_written_beneath_the_upper_layer_never_through_the_guests_links() {
        let dir = tempfile::tempdir().unwrap();
        let (upper, outside) = (dir.path().join("upper"), dir.path().join("outside"));
        std::fs::create_dir_all(&upper).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let me = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
        // The guest replaced /.hyperfleet by a link out of its root.
        std::os::unix::fs::symlink(&outside, upper.join(AGENT_DIR)).unwrap();
        write_main_spec_beneath(&upper, b"{\"argv\":[]}", me).unwrap();
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none(), "nothing written outside");
        let spec = upper.join(AGENT_DIR).join("main.json");
        assert!(!upper.join(AGENT_DIR).is_symlink());
        assert_eq!(std::fs::read(&spec).unwrap(), b"{\"argv\":[]}");
        // … or main.json by a link to a host file.
        let victim = outside.join("victim");
        std::fs::write(&victim, b"host").unwrap();
        std::fs::remove_file(&spec).unwrap();
        std::os::unix::fs::symlink(&victim, &spec).unwrap();
        write_main_spec_beneath(&upper, b"{}", me).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"host");
        assert!(!spec.is_symlink());
        assert_eq!(std::fs::read(&spec).unwrap(), b"{}");
    }
}
