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

/// `struct loop_info64` of <linux/loop.h>.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config` of <linux/loop.h> (LOOP_CONFIGURE, Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// Mounts the ext4 image `file` at `target` with `flags` through a loop device of its own, set up with one
/// LOOP_CONFIGURE (what `mount -o loop` does, without its process): the device clears itself when the file
/// system is unmounted (autoclear), so nothing but the mount is left to undo.
pub(crate) fn loop_mount(file: &Path, target: &Path, flags: nix::mount::MsFlags) -> io::Result<()> {
    let backing = std::fs::OpenOptions::new().read(true).write(true).open(file)?;
    let control = std::fs::OpenOptions::new().read(true).write(true).open("/dev/loop-control")?;
    // Another process may take the free device between asking and configuring it: ask again.
    for _ in 0..16 {
        // SAFETY: an ioctl without arguments on a descriptor this function owns.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let dev = format!("/dev/loop{n}");
        let device = match std::fs::OpenOptions::new().read(true).write(true).open(&dev) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut config = LoopConfig {
            fd: u32::try_from(backing.as_raw_fd()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
            block_size: 0,
            info: LoopInfo64 {
                device: 0,
                inode: 0,
                rdevice: 0,
                offset: 0,
                sizelimit: 0,
                number: 0,
                encrypt_type: 0,
                encrypt_key_size: 0,
                flags: LO_FLAGS_AUTOCLEAR,
                file_name: [0; 64],
                crypt_name: [0; 64],
                encrypt_key: [0; 32],
                init: [0; 2],
            },
            reserved: [0; 8],
        };
        let name = file.as_os_str().as_encoded_bytes();
        let len = name.len().min(63);
        config.info.file_name[..len].copy_from_slice(&name[..len]);
        // SAFETY: `config` is a live, correctly laid out loop_config; the kernel only reads it.
        let r = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, std::ptr::addr_of!(config)) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EBUSY) {
                continue;
            }
            return Err(e);
        }
        // The mount holds the device from now on; when it goes, autoclear detaches the device. If the mount
        // fails, closing `device` (the only holder) detaches it.
        return nix::mount::mount(Some(dev.as_str()), target, Some("ext4"), flags, None::<&str>)
            .map_err(io::Error::from);
    }
    Err(io::Error::other("no free loop device"))
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
