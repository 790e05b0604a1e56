//! Kernels and root filesystems named in requests: opened once, beneath the assets directory, without
//! following any symlink (openat2 `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), and then used through that open
//! file, never by path again — so a file swapped for a symlink between a check and a use cannot point a
//! machine at another file of the host.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};

/// Why a requested asset path is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum AssetError {
    #[error("must not contain '..'")]
    ParentDir,
    #[error("must be inside the assets directory {0}")]
    Outside(PathBuf),
    #[error("does not exist")]
    Missing,
    #[error("must not be or pass through a symbolic link")]
    Symlink,
    #[error("must be a regular file")]
    NotAFile,
    #[error("cannot be opened: {0}")]
    Io(String),
}

/// Opens `path` (absolute, or relative to the working directory) for reading if it is a regular file inside
/// `root`, reached without any symlink. Blocking: call it off the async workers.
pub(crate) fn open_beneath(root: &Path, path: &Path) -> Result<File, AssetError> {
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(AssetError::ParentDir);
    }
    let absolute = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { crate::config::absolute(p) };
    let (root, path) = (absolute(root), absolute(path));
    let Ok(rel) = path.strip_prefix(&root) else {
        // The documented answer for a path that names nothing at all is "does not exist".
        return Err(if std::fs::symlink_metadata(&path).is_err() {
            AssetError::Missing
        } else {
            AssetError::Outside(root)
        });
    };
    let dir = File::open(&root).map_err(|e| AssetError::Io(format!("assets directory {}: {e}", root.display())))?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = openat2(dir.as_raw_fd(), rel, how).map_err(|e| match e {
        nix::errno::Errno::ENOENT => AssetError::Missing,
        nix::errno::Errno::ELOOP => AssetError::Symlink,
        nix::errno::Errno::EXDEV => AssetError::Outside(root.clone()),
        other => AssetError::Io(other.to_string()),
    })?;
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    let meta = file.metadata().map_err(|e| AssetError::Io(e.to_string()))?;
    if !meta.is_file() {
        return Err(AssetError::NotAFile);
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_beneath_the_root_without_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("vmlinux"), b"k").unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/disk"), b"d").unwrap();
        assert!(open_beneath(root, &root.join("vmlinux")).is_ok());
        assert!(open_beneath(root, &root.join("sub/disk")).is_ok());
        assert_eq!(open_beneath(root, &root.join("missing")).unwrap_err(), AssetError::Missing);
        assert_eq!(open_beneath(root, &root.join("sub")).unwrap_err(), AssetError::NotAFile);
        assert_eq!(open_beneath(root, &root.join("sub/../vmlinux")).unwrap_err(), AssetError::ParentDir);
        assert!(matches!(open_beneath(root, Path::new("/etc/passwd")).unwrap_err(), AssetError::Outside(_)));
        assert_eq!(open_beneath(root, Path::new("/nonexistent.ext4")).unwrap_err(), AssetError::Missing);
        std::os::unix::fs::symlink("/etc/passwd", root.join("escape")).unwrap();
        assert_eq!(open_beneath(root, &root.join("escape")).unwrap_err(), AssetError::Symlink);
        std::os::unix::fs::symlink(root.join("vmlinux"), root.join("alias")).unwrap();
        assert_eq!(open_beneath(root, &root.join("alias")).unwrap_err(), AssetError::Symlink, "even inside");
        std::os::unix::fs::symlink(root.join("sub"), root.join("subalias")).unwrap();
        assert_eq!(open_beneath(root, &root.join("subalias/disk")).unwrap_err(), AssetError::Symlink);
    }

    #[test]
    fn the_open_file_is_what_was_checked() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("disk"), b"original").unwrap();
        let file = open_beneath(root, &root.join("disk")).unwrap();
        // Swapped for a symlink after the check: the open file still reads the original.
        std::fs::rename(root.join("disk"), root.join("old")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.join("disk")).unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut &file, &mut text).unwrap();
        assert_eq!(text, "original");
    }
}
