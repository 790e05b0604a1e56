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

/// The largest disk or volume (1 TiB): every file system made here can grow in place to it.
pub(crate) const MAX_FS_MIB: u32 = 1 << 20;

/// `mkfs.ext4` options for a file system that can grow in place to [`MAX_FS_MIB`]: 4 KiB blocks and group
/// descriptor room reserved for that size (`-E resize=`, joined to the caller's other `-E` options). Without
/// them a small file system gets 1 KiB blocks and room for 1024 times its size, and resize2fs past that fails,
/// or on some layouts aborts half-way and leaves the file system corrupt.
pub(crate) fn growable(extended: &[&str]) -> [String; 4] {
    let resize = format!("resize={}", u64::from(MAX_FS_MIB) * MIB / 4096);
    let extended = extended.iter().copied().chain([resize.as_str()]).collect::<Vec<_>>().join(",");
    ["-b".into(), "4096".into(), "-E".into(), extended]
}

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
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.args(["-q", "-F", "-m", "0", "-L", "hf-volume"]).args(growable(&[])).arg(&tmp);
        let made = run(&mut mkfs).await;
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

/// Grows an ext4 image file to `size_mib` (never shrinks) and its file system with it. A size past what the
/// file system reserved room for (one made before [`growable`]) is refused before anything is touched.
pub(crate) async fn grow_image(path: &Path, size_mib: u32) -> Result<(), RuntimeError> {
    let want = u64::from(size_mib) * MIB;
    let len = tokio::fs::metadata(path).await.map_err(RuntimeError::io("stat", path))?.len();
    if want <= len {
        return Ok(());
    }
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(path)
        .output()
        .await
        .map_err(|e| RuntimeError::Command { command: "dumpe2fs".into(), message: e.to_string() })?;
    let header = String::from_utf8_lossy(&out.stdout);
    let max = Ext4Header::parse(&header).map(|h| h.max_growth()).ok_or_else(|| RuntimeError::Command {
        command: format!("dumpe2fs -h {}", path.display()),
        message: format!("no ext4 superblock: {}", String::from_utf8_lossy(&out.stderr).trim()),
    })?;
    if want > max {
        return Err(RuntimeError::Refused(format!(
            "this file system can grow in place to at most {} MiB (it was made with room for no more)",
            max / MIB
        )));
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

/// What `dumpe2fs -h` says of a file system that bounds how far it can grow in place.
#[derive(Debug, PartialEq, Eq)]
struct Ext4Header {
    block_count: u64,
    first_block: u64,
    block_size: u64,
    blocks_per_group: u64,
    desc_size: u64,
    reserved_gdt: u64,
    meta_bg: bool,
}

impl Ext4Header {
    fn parse(text: &str) -> Option<Self> {
        let field =
            |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse::<u64>().ok());
        let features = text.lines().find_map(|l| l.strip_prefix("Filesystem features:"))?;
        Some(Self {
            block_count: field("Block count")?,
            first_block: field("First block").unwrap_or(0),
            block_size: field("Block size")?,
            blocks_per_group: field("Blocks per group")?,
            // 32 bytes unless the file system is `64bit`, which names its size.
            desc_size: field("Group descriptor size").unwrap_or(32),
            // Absent without the resize_inode feature: no room reserved.
            reserved_gdt: field("Reserved GDT blocks").unwrap_or(0),
            meta_bg: features.split_whitespace().any(|f| f == "meta_bg"),
        })
    }

    /// The largest size in bytes the group descriptor table can describe once it takes its reserved blocks
    /// (with meta_bg descriptors live in their groups: no limit here but the largest disk).
    fn max_growth(&self) -> u64 {
        if self.meta_bg {
            return u64::from(MAX_FS_MIB) * MIB;
        }
        let per_block = self.block_size / self.desc_size.max(1);
        let groups = self.block_count.saturating_sub(self.first_block).div_ceil(self.blocks_per_group.max(1));
        let gdt_blocks = groups.div_ceil(per_block.max(1));
        let max_groups = (gdt_blocks + self.reserved_gdt) * per_block;
        (max_groups * self.blocks_per_group + self.first_block) * self.block_size
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `e2fsck -fn`: whether the file system is clean, without changing it.
    fn clean(path: &Path) -> bool {
        std::process::Command::new("e2fsck").arg("-fn").arg(path).output().unwrap().status.success()
    }

    #[tokio::test]
    async fn a_volume_grows_in_place_to_the_largest_size() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = VolumeDir::new(dir.path().join("volumes"));
        volumes.create("v", 8).await.unwrap();
        volumes.grow("v", MAX_FS_MIB).await.unwrap();
        let path = volumes.path("v");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), u64::from(MAX_FS_MIB) * MIB);
        assert!(clean(&path), "the grown file system checks clean");
    }

    #[tokio::test]
    async fn growing_past_a_file_systems_room_is_refused_before_it_is_touched() {
        // mkfs.ext4's defaults for a small file system (as volumes were made before `growable`): 1 KiB blocks,
        // room for about 1024 times its size. resize2fs to 1 TiB fails on it; on other layouts it corrupts.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.ext4");
        std::fs::File::create(&path).unwrap().set_len(16 * MIB).unwrap();
        let mkfs = std::process::Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&path).status().unwrap();
        assert!(mkfs.success());
        let e = grow_image(&path, MAX_FS_MIB).await.unwrap_err();
        assert!(matches!(&e, RuntimeError::Refused(m) if m.contains("at most")), "{e}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 * MIB, "the file was not touched");
        assert!(clean(&path));
        grow_image(&path, 64).await.unwrap();
        assert!(clean(&path), "a growth within its room works");
    }

    #[test]
    fn the_room_to_grow_comes_from_the_superblock() {
        let header = "Filesystem features:      has_journal resize_inode 64bit flex_bg\n\
                      Block count:              65536\nFirst block:              1\nBlock size:               1024\n\
                      Group descriptor size:    64\nReserved GDT blocks:      256\nBlocks per group:         8192\n";
        let h = Ext4Header::parse(header).unwrap();
        // 8 groups in 1 descriptor block (16 per block), plus 256 reserved: 257 * 16 groups of 8 MiB.
        assert_eq!(h.max_growth(), (257 * 16 * 8192 + 1) * 1024);
        let with_meta_bg = header.replace("Reserved GDT blocks:      256\n", "").replace("64bit", "64bit meta_bg");
        assert_eq!(Ext4Header::parse(&with_meta_bg).unwrap().max_growth(), u64::from(MAX_FS_MIB) * MIB);
        assert_eq!(Ext4Header::parse("dumpe2fs: Bad magic number"), None);
    }
}
