//! Volume files: one sparse ext4 image per volume, `{dir}/{id}.ext4`, 0600 in a 0700 directory. Made with
//! e2fsprogs (`mkfs.ext4`, `e2fsck`, `resize2fs`); copied with a reflink where the file system can, else
//! sparsely.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::{RuntimeError, disk, private_dir};

/// A volume as a machine mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolumeDisk {
    pub path: PathBuf,
    pub mount_path: String,
    pub read_only: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct VolumeDir {
    dir: PathBuf,
}

const MIB: u64 = 1 << 20;

impl VolumeDir {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.ext4"))
    }

    /// An empty ext4 file system of `size_mib`, made under a temporary name and renamed into place.
    pub(crate) async fn create(&self, id: &str, size_mib: u32) -> Result<(), RuntimeError> {
        let (dir, path) = (self.dir.clone(), self.path(id));
        let tmp = path.with_extension("partial");
        let t = tmp.clone();
        tokio::task::spawn_blocking(move || {
            private_dir(&dir)?;
            let f = new_private_file(&t)?;
            f.set_len(u64::from(size_mib) * MIB).map_err(RuntimeError::io("size", &t))
        })
        .await??;
        let made = run(Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0", "-L", "hf-volume"]).arg(&tmp)).await;
        if let Err(e) = made {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        tokio::fs::rename(&tmp, &path).await.map_err(RuntimeError::io("rename", &path))
    }

    /// Grows the file and then its file system (checked first, as resize2fs requires).
    pub(crate) async fn grow(&self, id: &str, size_mib: u32) -> Result<(), RuntimeError> {
        let path = self.path(id);
        grow_image(&path, size_mib).await
    }

    pub(crate) async fn clone_volume(&self, from: &str, to: &str) -> Result<(), RuntimeError> {
        let (src, dst) = (self.path(from), self.path(to));
        tokio::task::spawn_blocking(move || {
            let input = std::fs::File::open(&src).map_err(RuntimeError::io("open", &src))?;
            if reflink(&input, &dst).is_ok() {
                return Ok(());
            }
            disk::sparse_copy_from(&input, &dst).map_err(RuntimeError::io("copy the volume to", &dst))
        })
        .await?
    }

    pub(crate) async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let path = self.path(id);
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(RuntimeError::io("remove", &path)(e)),
            _ => Ok(()),
        }
    }
}

/// Grows an ext4 image file to `size_mib` (never shrinks) and its file system with it.
pub(crate) async fn grow_image(path: &Path, size_mib: u32) -> Result<(), RuntimeError> {
    let want = u64::from(size_mib) * MIB;
    let len = tokio::fs::metadata(path).await.map_err(RuntimeError::io("stat", path))?.len();
    if want <= len {
        return Ok(());
    }
    let f = tokio::fs::OpenOptions::new().write(true).open(path).await.map_err(RuntimeError::io("open", path))?;
    f.set_len(want).await.map_err(RuntimeError::io("grow", path))?;
    // -p repairs what is safe to repair without asking; exit codes 0 and 1 mean the file system is fine.
    let out = Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(path)
        .output()
        .await
        .map_err(|e| RuntimeError::Command { command: "e2fsck".into(), message: e.to_string() })?;
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(RuntimeError::Command {
            command: format!("e2fsck {}", path.display()),
            message: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        });
    }
    run(Command::new("resize2fs").arg(path)).await
}

fn new_private_file(path: &Path) -> Result<std::fs::File, RuntimeError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(RuntimeError::io("create", path))
}

/// A copy-on-write clone (FICLONE) of `input` at `dst`, where the file system supports it (btrfs, xfs).
fn reflink(input: &std::fs::File, dst: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let tmp = dst.with_extension("partial");
    let out = new_private_file(&tmp).map_err(|e| std::io::Error::other(e.to_string()))?;
    // SAFETY: FICLONE takes the source descriptor as its argument, no pointer; both descriptors are open
    // for this whole call.
    let r = unsafe { libc::ioctl(out.as_raw_fd(), libc::FICLONE, input.as_raw_fd()) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dst)
}

async fn run(cmd: &mut Command) -> Result<(), RuntimeError> {
    let name = format!("{:?}", cmd.as_std().get_program());
    let out =
        cmd.output().await.map_err(|e| RuntimeError::Command { command: name.clone(), message: e.to_string() })?;
    if out.status.success() {
        Ok(())
    } else {
        let mut message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if message.is_empty() {
            message = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        Err(RuntimeError::Command { command: name, message })
    }
}
