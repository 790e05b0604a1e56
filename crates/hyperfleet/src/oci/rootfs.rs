//! An image's root as an ext4 file: the layers applied in order to a fresh directory, the Hyperfleet agent
//! added as `/.hyperfleet/agent` (nothing else of the image is changed), then `mkfs.ext4 -d`. Work happens
//! under temporary names; only a finished image is renamed into place.

use std::path::{Path, PathBuf};
use std::process::Command;

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

/// Builds `out` from the manifest's `count` layers, applying each as soon as it and every layer before it
/// have arrived (so applying overlaps the downloads still running); returns the unpacked size in bytes.
/// `work` is a scratch directory on the same filesystem, gone afterwards whatever happens (after a success
/// its removal runs in the background, off the pull's path; after a failure it is gone when this returns).
pub(crate) fn build(count: usize, layers: Arrivals, agent: &Path, work: &Path, out: &Path) -> Result<u64, OciError> {
    let result = build_in(count, layers, agent, work, out);
    let trash = work.with_extension(format!("trash-{}", std::process::id()));
    if result.is_ok() && std::fs::rename(work, &trash).is_ok() {
        // At once: the tree's data is still only in the page cache, and deleting it spares its writeback.
        std::thread::spawn(move || remove_scratch(&trash));
    } else {
        remove_scratch(work);
    }
    result
}

fn remove_scratch(dir: &Path) {
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
    let applied = started.elapsed();
    bytes += std::fs::metadata(agent).map(|m| m.len()).unwrap_or(0);
    let size_mib = (bytes / (1 << 20) * 5 / 4 + HEADROOM_MIB).max(MIN_SIZE_MIB);
    let partial = work.join("root.ext4");
    let _ = std::fs::remove_file(&partial);
    // The file is new, so every block already reads as zeros: mkfs need not write the journal's or the inode
    // tables' zeros (they stay holes, in the cache and in every machine's sparse copy). mkfs ends with an
    // fsync of the whole image, which is most of its time on a virtual disk; under eatmydata (when installed)
    // it does not, and the caller syncs the image off the pull's path before the cache index names it.
    let mut mkfs = if Path::new(EATMYDATA).exists() {
        let mut c = Command::new(EATMYDATA);
        c.arg("mkfs.ext4");
        c
    } else {
        Command::new("mkfs.ext4")
    };
    let o = mkfs
        .args(["-q", "-F", "-L", "hyperfleet-root", "-E", "root_owner=0:0,assume_storage_prezeroed=1,nodiscard"])
        .arg("-d")
        .arg(&tree)
        .arg(&partial)
        .arg(format!("{size_mib}M"))
        .output()
        .map_err(|e| OciError::Mkfs(format!("cannot run mkfs.ext4 (install e2fsprogs): {e}")))?;
    if !o.status.success() {
        return Err(OciError::Mkfs(String::from_utf8_lossy(&o.stderr).trim().to_string()));
    }
    std::fs::rename(&partial, out).map_err(|e| OciError::io("rename", out, e))?;
    tracing::info!(
        waited_for_downloads_ms = waited.as_millis(),
        applied_ms = applied.as_millis(),
        mkfs_ms = (started.elapsed() - applied).as_millis(),
        "image root built"
    );
    Ok(bytes)
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
