//! Per-machine disks: each machine boots its own sparse copy of the image, never the shared file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Copies `src` to `dst` keeping holes (SEEK_DATA/SEEK_HOLE + copy_file_range), so a mostly empty 1 GiB
/// image costs only its used blocks. Writes to a temporary name and renames, so a crash never leaves a
/// half-copied disk under the final name.
pub fn sparse_copy(src: &Path, dst: &Path) -> io::Result<()> {
    sparse_copy_from(&File::open(src)?, dst)
}

/// [`sparse_copy`] from a file already open (an asset opened beneath the assets directory). The copy is
/// readable and writable by its owner only (0600).
pub(crate) fn sparse_copy_from(input: &File, dst: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let len = input.metadata()?.len();
    let tmp = dst.with_extension("partial");
    let output = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    output.set_len(len)?;
    let (inf, outf) = (input.as_raw_fd(), output.as_raw_fd());
    let end = i64::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large to copy"))?;
    let mut pos: i64 = 0;
    while pos < end {
        // SAFETY: lseek takes no pointers; `inf` is the open descriptor of `input`, borrowed for this whole call.
        let data = unsafe { libc::lseek(inf, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(inf, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (mut off_in, mut off_out) = (data, data);
        let mut left = usize::try_from(hole - data)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "SEEK_HOLE returned an offset before SEEK_DATA"))?;
        while left > 0 {
            // SAFETY: offsets are valid pointers to local i64s; fds are open.
            let n = unsafe { libc::copy_file_range(inf, &mut off_in, outf, &mut off_out, left, 0) };
            // Negative (-1) is an error; anything else is a byte count that fits usize.
            let Ok(n) = usize::try_from(n) else {
                return Err(io::Error::last_os_error());
            };
            if n == 0 {
                break;
            }
            left -= n;
        }
        pos = hole;
    }
    output.sync_all()?;
    std::fs::rename(&tmp, dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn copy_is_exact_and_stays_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("img");
        let mut f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(b"middle").unwrap();
        drop(f);
        let dst = dir.path().join("copy");
        sparse_copy(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let blocks = std::fs::metadata(&dst).unwrap().blocks();
        assert!(blocks * 512 < 1 << 20, "copy allocated {} bytes for 8 KiB of data", blocks * 512);
    }
}
