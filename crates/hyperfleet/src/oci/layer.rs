//! Applies an image layer (a tar, plain, gzip or zstd) onto a root directory without ever leaving it: every
//! path is resolved from the root's descriptor with openat2 `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, and each
//! entry is made with the `*at` calls on its parent's descriptor, so neither a `..` nor a symlink made by an
//! earlier entry (or layer) can point a write at the host. Whiteouts, opaque directories, hard links,
//! ownership, modes and xattrs follow the OCI layer spec; device nodes are skipped.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{Mode, SFlag, mkdirat, mknodat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, linkat, symlinkat, unlinkat};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

#[derive(Debug, thiserror::Error)]
pub(crate) enum LayerError {
    /// The layer tries to write outside the root (a `..` or a path through a symlink): the image is refused.
    #[error("refused: the layer's entry '{0}' leads outside the image root (through '..' or a symbolic link)")]
    Escape(String),
    #[error("the layer is not a readable tar archive: {0}")]
    Archive(String),
    #[error("{what} '{path}': {source}")]
    Io { what: &'static str, path: String, source: io::Error },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(Errno) -> LayerError {
    let path = path.display().to_string();
    move |e| {
        if matches!(e, Errno::ELOOP | Errno::EXDEV) {
            LayerError::Escape(path)
        } else {
            LayerError::Io { what, path, source: io::Error::from(e) }
        }
    }
}

/// What a layer's bytes are compressed with, from their first bytes (media types lie often enough).
fn decompressed<'a>(mut input: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < magic.len() {
        let got = input.read(&mut magic[n..])?;
        if got == 0 {
            break;
        }
        n += got;
    }
    let head = io::Cursor::new(magic[..n].to_vec()).chain(input);
    Ok(match magic {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(head)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(zstd::stream::read::Decoder::new(head)?),
        _ => Box::new(head),
    })
}

/// A root directory being filled, held open so every path is resolved beneath it.
pub(crate) struct Root {
    fd: OwnedFd,
}

impl Root {
    pub(crate) fn open(dir: &Path) -> io::Result<Self> {
        let fd = File::open(dir)?;
        Ok(Self { fd: fd.into() })
    }

    /// Opens the directory `rel` (relative, normalized) beneath the root, never through a symlink.
    fn dir(&self, rel: &Path) -> Result<OwnedFd, LayerError> {
        let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
        let how = OpenHow::new().flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC).resolve(
            ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
        let fd = openat2(self.fd.as_raw_fd(), rel, how).map_err(io_err("open directory", rel))?;
        // SAFETY: openat2 returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The parent directory of `rel` (made, with its own parents, when missing) and the entry's name.
    fn parent(&self, rel: &Path) -> Result<(OwnedFd, PathBuf), LayerError> {
        let name = rel.file_name().ok_or_else(|| LayerError::Escape(rel.display().to_string()))?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        match self.dir(parent) {
            Ok(fd) => Ok((fd, PathBuf::from(name))),
            Err(LayerError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                let mut at = PathBuf::new();
                for c in parent.components() {
                    let fd = self.dir(&at)?;
                    match mkdirat(Some(fd.as_raw_fd()), c.as_os_str(), Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(io_err("create directory", &at.join(c))(e)),
                    }
                    at.push(c);
                }
                Ok((self.dir(parent)?, PathBuf::from(name)))
            }
            Err(e) => Err(e),
        }
    }

    /// Applies one layer. `kept` collects the paths this layer wrote, so an opaque marker met later in the
    /// same layer does not remove them.
    pub(crate) fn apply(&self, layer: impl Read) -> Result<u64, LayerError> {
        let mut archive = tar::Archive::new(decompressed(layer).map_err(|e| LayerError::Archive(e.to_string()))?);
        let mut written: HashSet<PathBuf> = HashSet::new();
        let mut bytes = 0u64;
        for entry in archive.entries().map_err(|e| LayerError::Archive(e.to_string()))? {
            let mut entry = entry.map_err(|e| LayerError::Archive(e.to_string()))?;
            let raw = entry.path().map_err(|e| LayerError::Archive(e.to_string()))?.into_owned();
            let rel = normalize(&raw)?;
            let Some(rel) = rel else { continue }; // the root itself
            let name = rel.file_name().map(OsStr::to_os_string).unwrap_or_default();
            let name_bytes = name.as_bytes();
            if name_bytes == OPAQUE.as_bytes() {
                let dir = rel.parent().unwrap_or(Path::new("")).to_path_buf();
                let fd = match self.dir(&dir) {
                    Ok(fd) => fd,
                    Err(LayerError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => continue,
                    Err(e) => return Err(e),
                };
                clear_dir(&fd, &dir, &written)?;
                continue;
            }
            if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT.as_bytes()) {
                let (fd, _) = self.parent(&rel)?;
                remove_tree(&fd, OsStr::from_bytes(hidden), &rel)?;
                continue;
            }
            bytes += self.entry(&mut entry, &rel)?;
            written.insert(rel);
        }
        Ok(bytes)
    }

    fn entry<R: Read>(&self, entry: &mut tar::Entry<R>, rel: &Path) -> Result<u64, LayerError> {
        let header = entry.header();
        let kind = header.entry_type();
        // Links carry no mode of their own; some writers leave the field empty.
        let mode = Mode::from_bits_truncate(header.mode().unwrap_or(0o644) & 0o7777);
        let uid = header.uid().ok().and_then(|u| u32::try_from(u).ok()).unwrap_or(0);
        let gid = header.gid().ok().and_then(|g| u32::try_from(g).ok()).unwrap_or(0);
        let (parent, name) = self.parent(rel)?;
        let pfd = parent.as_raw_fd();
        let existing = nix::sys::stat::fstatat(Some(pfd), &name, AtFlags::AT_SYMLINK_NOFOLLOW).ok();
        let existing_dir =
            existing.is_some_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR);
        if existing.is_some() && !(kind.is_dir() && existing_dir) {
            remove_tree(&parent, name.as_os_str(), rel)?;
        }
        let owner = |flags: AtFlags| {
            fchownat(Some(pfd), &name, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)), flags)
                .map_err(io_err("chown", rel))
        };
        let mut size = 0;
        match kind {
            tar::EntryType::Directory => {
                if !existing_dir {
                    mkdirat(Some(pfd), &name, mode).map_err(io_err("create directory", rel))?;
                }
                owner(AtFlags::AT_SYMLINK_NOFOLLOW)?;
                let fd = openat(
                    Some(pfd),
                    &name,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(io_err("open directory", rel))?;
                // SAFETY: openat returned a new descriptor that nothing else owns.
                let dir = unsafe { OwnedFd::from_raw_fd(fd) };
                nix::sys::stat::fchmod(dir.as_raw_fd(), mode).map_err(io_err("chmod", rel))?;
                set_xattrs(&dir, entry, rel)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let fd = openat(
                    Some(pfd),
                    &name,
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(io_err("create", rel))?;
                // SAFETY: openat returned a new descriptor that nothing else owns.
                let mut file = unsafe { File::from_raw_fd(fd) };
                size = io::copy(entry, &mut file).map_err(|source| LayerError::Io {
                    what: "write",
                    path: rel.display().to_string(),
                    source,
                })?;
                let file = OwnedFd::from(file);
                // chown first: it clears set-id bits, which the chmod after it then sets as the layer says.
                nix::unistd::fchown(file.as_raw_fd(), Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                    .map_err(io_err("chown", rel))?;
                nix::sys::stat::fchmod(file.as_raw_fd(), mode).map_err(io_err("chmod", rel))?;
                set_xattrs(&file, entry, rel)?;
                if let Ok(mtime) = entry.header().mtime() {
                    let t = nix::sys::time::TimeSpec::new(i64::try_from(mtime).unwrap_or(0), 0);
                    // The times are cosmetic: a failure is not worth refusing the image for.
                    let _ = nix::sys::stat::futimens(file.as_raw_fd(), &t, &t);
                }
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| LayerError::Archive(e.to_string()))?
                    .ok_or_else(|| LayerError::Archive(format!("symlink '{}' has no target", rel.display())))?;
                // The target is stored as it is and never followed while unpacking.
                symlinkat(target.as_ref(), Some(pfd), &name).map_err(io_err("symlink", rel))?;
                owner(AtFlags::AT_SYMLINK_NOFOLLOW)?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| LayerError::Archive(e.to_string()))?
                    .ok_or_else(|| LayerError::Archive(format!("hard link '{}' has no target", rel.display())))?;
                let target = normalize(&target)?.ok_or_else(|| LayerError::Escape(rel.display().to_string()))?;
                let (tparent, tname) = self.parent(&target)?;
                // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
                linkat(Some(tparent.as_raw_fd()), &tname, Some(pfd), &name, AtFlags::empty())
                    .map_err(io_err("hard link", rel))?;
            }
            tar::EntryType::Fifo => {
                mknodat(Some(pfd), &name, SFlag::S_IFIFO, mode, 0).map_err(io_err("mkfifo", rel))?;
                owner(AtFlags::AT_SYMLINK_NOFOLLOW)?;
            }
            // Device nodes mean nothing in a machine's root (the guest gets devtmpfs); other kinds carry no file.
            _ => {}
        }
        Ok(size)
    }
}

/// A tar path as a relative path of normal components, `None` for the root itself; `..` is refused.
fn normalize(raw: &Path) -> Result<Option<PathBuf>, LayerError> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return Err(LayerError::Escape(raw.display().to_string())),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// xattrs from the entry's PAX records (`SCHILY.xattr.NAME`), set on the open file.
fn set_xattrs<R: Read>(fd: &OwnedFd, entry: &mut tar::Entry<R>, rel: &Path) -> Result<(), LayerError> {
    let Ok(Some(exts)) = entry.pax_extensions() else { return Ok(()) };
    for ext in exts.flatten() {
        let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else { continue };
        // overlayfs's own attributes mean nothing in an image, and the tree is an overlay's lower layer.
        if name.starts_with(b"trusted.overlay.") {
            continue;
        }
        let Ok(cname) = CString::new(name) else { continue };
        let value = ext.value_bytes();
        // SAFETY: `fd` is open; `cname` is NUL-terminated and `value` a live slice of the given length.
        let r = unsafe { libc::fsetxattr(fd.as_raw_fd(), cname.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        if r != 0 {
            let e = io::Error::last_os_error();
            // A filesystem without that namespace (e.g. no security.* support) is not a broken image.
            tracing::debug!(path = %rel.display(), error = %e, "xattr not kept");
        }
    }
    Ok(())
}

/// Removes `name` in `dir` and, for a directory, everything under it; nothing there is fine.
fn remove_tree(dir: &OwnedFd, name: &OsStr, rel: &Path) -> Result<(), LayerError> {
    match unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR | Errno::EPERM) => {}
        Err(e) => return Err(io_err("remove", rel)(e)),
    }
    let fd = match openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(io_err("open directory", rel)(e)),
    };
    // SAFETY: openat returned a new descriptor that nothing else owns.
    let sub = unsafe { OwnedFd::from_raw_fd(fd) };
    clear_dir(&sub, rel, &HashSet::new())?;
    unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::RemoveDir).map_err(io_err("remove directory", rel))
}

/// Removes every entry of the open directory `dir` (at `rel`) except those in `keep`.
fn clear_dir(dir: &OwnedFd, rel: &Path, keep: &HashSet<PathBuf>) -> Result<(), LayerError> {
    let dup = nix::unistd::dup(dir.as_raw_fd()).map_err(io_err("open directory", rel))?;
    let mut listing = nix::dir::Dir::from_fd(dup).map_err(io_err("list", rel))?;
    let names: Vec<std::ffi::OsString> = listing
        .iter()
        .filter_map(Result::ok)
        .map(|e| OsStr::from_bytes(e.file_name().to_bytes()).to_os_string())
        .filter(|n| n != "." && n != "..")
        .collect();
    for n in names {
        let child = rel.join(&n);
        if !keep.contains(&child) {
            remove_tree(dir, n.as_os_str(), &child)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    enum E<'a> {
        Dir(&'a str),
        File(&'a str, &'a [u8], u32, u64),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
        Dev(&'a str),
    }

    fn tar_of(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            let (path, data): (&str, &[u8]) = match e {
                E::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    (p, b"")
                }
                E::File(p, d, mode, uid) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_uid(*uid);
                    h.set_gid(*uid);
                    (p, d)
                }
                E::Sym(p, t) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_link_name(t).unwrap();
                    (p, b"")
                }
                E::Hard(p, t) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_link_name(t).unwrap();
                    (p, b"")
                }
                E::Dev(p) => {
                    h.set_entry_type(tar::EntryType::Char);
                    h.set_device_major(1).unwrap();
                    h.set_device_minor(3).unwrap();
                    (p, b"")
                }
            };
            h.set_size(data.len() as u64);
            // Bypass the builder's own path checks: a hostile layer is exactly what is being tested.
            let name = path.as_bytes();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn layers_stack_with_whiteouts_opaque_dirs_links_and_owners() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        let base = tar_of(&[
            E::Dir("etc/"),
            E::File("etc/keep", b"keep", 0o644, 0),
            E::File("etc/gone", b"gone", 0o644, 0),
            E::Dir("opq/"),
            E::File("opq/old", b"old", 0o644, 0),
            E::File("bin/tool", b"#!tool", 0o4755, 1234),
            E::Hard("bin/tool-link", "bin/tool"),
            E::Sym("bin/sh", "/bin/tool"),
            E::Dev("dev/null"),
        ]);
        root.apply(&gz(&base)[..]).unwrap();
        let top = tar_of(&[
            E::File("etc/.wh.gone", b"", 0o644, 0),
            E::Dir("opq/"),
            E::File("opq/.wh..wh..opq", b"", 0o644, 0),
            E::File("opq/new", b"new", 0o600, 0),
            E::File("etc/keep", b"replaced", 0o640, 7),
        ]);
        let zst = zstd::encode_all(&top[..], 1).unwrap();
        root.apply(&zst[..]).unwrap();
        let p = dir.path();
        assert_eq!(std::fs::read(p.join("etc/keep")).unwrap(), b"replaced");
        assert_eq!(std::fs::metadata(p.join("etc/keep")).unwrap().uid(), 7);
        assert!(!p.join("etc/gone").exists(), "whiteout removes the file");
        assert!(!p.join("opq/old").exists(), "opaque dir hides the lower layer's content");
        assert_eq!(std::fs::read(p.join("opq/new")).unwrap(), b"new");
        let tool = std::fs::metadata(p.join("bin/tool")).unwrap();
        assert_eq!(tool.mode() & 0o7777, 0o4755, "set-uid bit kept after chown");
        assert_eq!(tool.uid(), 1234);
        assert_eq!(std::fs::metadata(p.join("bin/tool-link")).unwrap().ino(), tool.ino(), "hard link");
        assert_eq!(std::fs::read_link(p.join("bin/sh")).unwrap(), Path::new("/bin/tool"));
        assert!(!p.join("dev/null").exists(), "device nodes are skipped");
    }

    #[test]
    fn xattrs_from_pax_records_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([
            ("SCHILY.xattr.user.hyperfleet", &b"kept"[..]),
            ("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..]),
        ])
        .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(4);
        h.set_cksum();
        b.append_data(&mut h, "with-xattr", &b"data"[..]).unwrap();
        root.apply(&b.into_inner().unwrap()[..]).unwrap();
        let path = CString::new(dir.path().join("with-xattr").as_os_str().as_bytes()).unwrap();
        let name = CString::new("user.hyperfleet").unwrap();
        let mut buf = [0u8; 16];
        // SAFETY: NUL-terminated strings and a live buffer of the given length.
        let n = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(usize::try_from(n).ok().map(|n| &buf[..n]), Some(&b"kept"[..]));
        // overlayfs's own attributes are not: the tree becomes an overlay's lower layer.
        let name = CString::new("trusted.overlay.opaque").unwrap();
        // SAFETY: as above.
        let n = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(n, -1, "trusted.overlay.* is dropped");
    }

    #[test]
    fn a_layer_cannot_write_outside_the_root() {
        let outer = tempfile::tempdir().unwrap();
        let rootdir = outer.path().join("a/b");
        std::fs::create_dir_all(&rootdir).unwrap();
        let root = Root::open(&rootdir).unwrap();
        let dotdot = tar_of(&[E::File("../../etc/x", b"pwned", 0o644, 0)]);
        assert!(matches!(root.apply(&dotdot[..]), Err(LayerError::Escape(_))));
        assert!(!outer.path().join("etc/x").exists());

        // A symlink pointing out, then a file through it (in one layer, or across two).
        let target = outer.path().join("victim");
        std::fs::create_dir(&target).unwrap();
        let link = tar_of(&[E::Sym("evil", target.to_str().unwrap()), E::File("evil/x", b"pwned", 0o644, 0)]);
        let r = root.apply(&link[..]);
        assert!(matches!(r, Err(LayerError::Escape(_))), "{r:?}");
        let rel = tar_of(&[E::Sym("up", "../.."), E::File("up/y", b"pwned", 0o644, 0)]);
        assert!(matches!(root.apply(&rel[..]), Err(LayerError::Escape(_))));
        let hard = tar_of(&[E::Hard("h", "evil/../../../victim")]);
        assert!(root.apply(&hard[..]).is_err());
        let hard_through = tar_of(&[E::Hard("h2", "up/y")]);
        assert!(matches!(root.apply(&hard_through[..]), Err(LayerError::Escape(_))));
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0, "nothing written through the symlink");
        assert!(!outer.path().join("y").exists());
        // A whiteout through a symlink must not delete outside either.
        std::fs::write(target.join("precious"), b"1").unwrap();
        let wh = tar_of(&[E::File("evil/.wh.precious", b"", 0o644, 0)]);
        assert!(matches!(root.apply(&wh[..]), Err(LayerError::Escape(_))));
        assert!(target.join("precious").exists());
    }
}
