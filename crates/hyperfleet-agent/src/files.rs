//! File operations of the agent: streamed writes (to a temporary name, then renamed into place), streamed
//! reads, stat and delete. Paths must be absolute.

use std::io::ErrorKind as IoKind;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use hyperfleet_agent_proto::{self as proto, ErrorKind, FileStat, FrameKind, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub type OpResult<T> = Result<T, Response>;

pub fn fail(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error { kind, message: message.into() }
}

pub fn io_fail(what: &str, path: &Path, e: std::io::Error) -> Response {
    use nix::errno::Errno;
    // What the request's path ran into (a file where a directory should be, a mount point, a symlink loop, a
    // device without a terminal) is the caller's to fix, not a failure of the guest. ELOOP has no stable kind.
    let errno = e.raw_os_error().map(Errno::from_raw);
    let caused_by_path = errno.is_some_and(|errno| {
        matches!(errno, Errno::EEXIST | Errno::EBUSY | Errno::ENXIO | Errno::ELOOP | Errno::ENOTEMPTY | Errno::ENODEV)
    });
    let no_space = errno.is_some_and(|errno| matches!(errno, Errno::ENOSPC | Errno::EDQUOT | Errno::EFBIG));
    let kind = match e.kind() {
        _ if caused_by_path => ErrorKind::InvalidPath,
        _ if no_space => ErrorKind::NoSpace,
        IoKind::NotFound => ErrorKind::NotFound,
        IoKind::PermissionDenied | IoKind::ReadOnlyFilesystem => ErrorKind::PermissionDenied,
        IoKind::IsADirectory | IoKind::NotADirectory | IoKind::InvalidInput | IoKind::InvalidFilename => {
            ErrorKind::InvalidPath
        }
        _ => ErrorKind::Io,
    };
    fail(kind, format!("{what} {}: {e}", path.display()))
}

pub fn checked_path(path: &str) -> OpResult<PathBuf> {
    if !path.starts_with('/') {
        return Err(fail(ErrorKind::InvalidPath, format!("path must be absolute, got '{path}'")));
    }
    if path.contains('\0') {
        return Err(fail(ErrorKind::InvalidPath, "path must not contain NUL bytes"));
    }
    Ok(PathBuf::from(path))
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Receives `Data` frames until `End` into `path`. On any error the rest of the stream is still drained so
/// the host gets the error as a response, not as a broken connection.
pub async fn write<R: AsyncRead + Unpin>(r: &mut R, path: &str, mode: Option<u32>, max: Option<u64>) -> Response {
    let target = checked_path(path);
    let mut state: OpResult<(tokio::fs::File, PathBuf, PathBuf)> = match target {
        Err(e) => Err(e),
        Ok(p) => open_tmp(&p, mode.unwrap_or(0o644)).await.map(|(f, tmp)| (f, tmp, p)),
    };
    let mut size = 0u64;
    loop {
        let frame = match proto::read_frame(r).await {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => {
                if let Ok((_, tmp, _)) = &state {
                    remove_tmp(tmp).await;
                }
                return fail(ErrorKind::Io, "connection closed before the end of the file");
            }
        };
        match frame.kind {
            FrameKind::Data => {
                size = size.saturating_add(u64::try_from(frame.payload.len()).unwrap_or(u64::MAX));
                if let Ok((file, tmp, _)) = &mut state {
                    let res = if max.is_some_and(|m| size > m) {
                        Err(fail(ErrorKind::TooLarge, format!("file is larger than {} bytes", max.unwrap_or(0))))
                    } else {
                        file.write_all(&frame.payload).await.map_err(|e| io_fail("write", tmp, e))
                    };
                    if let Err(e) = res {
                        remove_tmp(tmp).await;
                        state = Err(e);
                    }
                }
            }
            FrameKind::End => break,
            other => {
                return fail(ErrorKind::BadRequest, format!("unexpected {other:?} frame in a file upload"));
            }
        }
    }
    let (mut file, tmp, target) = match state {
        Ok(s) => s,
        Err(e) => return e,
    };
    let done = async {
        file.flush().await.map_err(|e| io_fail("write", &tmp, e))?;
        file.sync_all().await.map_err(|e| io_fail("sync", &tmp, e))?;
        // The umask may have narrowed the mode given at open.
        if let Some(m) = mode {
            tokio::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(m & 0o7777))
                .await
                .map_err(|e| io_fail("chmod", &tmp, e))?;
        }
        tokio::fs::rename(&tmp, &target).await.map_err(|e| io_fail("rename into", &target, e))
    }
    .await;
    match done {
        Ok(()) => Response::Written { size },
        Err(e) => {
            remove_tmp(&tmp).await;
            e
        }
    }
}

/// Removes an upload's temporary file; a failure leaves a stray dot-file, worth a line on the console.
async fn remove_tmp(tmp: &Path) {
    if let Err(e) = tokio::fs::remove_file(tmp).await
        && e.kind() != IoKind::NotFound
    {
        eprintln!("hyperfleet-agent: remove {}: {e}", tmp.display());
    }
}

async fn open_tmp(target: &Path, mode: u32) -> OpResult<(tokio::fs::File, PathBuf)> {
    if tokio::fs::metadata(target).await.is_ok_and(|m| m.is_dir()) {
        return Err(fail(ErrorKind::InvalidPath, format!("{} is a directory", target.display())));
    }
    let parent = target.parent().unwrap_or(Path::new("/"));
    if target.file_name().is_none() {
        return Err(fail(ErrorKind::InvalidPath, format!("{} names no file", target.display())));
    }
    tokio::fs::create_dir_all(parent).await.map_err(|e| io_fail("create directory", parent, e))?;
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    // A short name of its own, so that a target's name of up to NAME_MAX bytes still has a temporary one.
    let tmp = parent.join(format!(".hf-upload-{}-{n}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & 0o7777)
        .open(&tmp)
        .map_err(|e| io_fail("create", &tmp, e))?;
    Ok((tokio::fs::File::from_std(file), tmp))
}

/// Sends `File`, the content as `Data` frames, `End`, then `Ok`.
pub async fn read<W: AsyncWrite + Unpin>(w: &mut W, path: &str, max: Option<u64>) -> Result<(), proto::ProtoError> {
    let opened = async {
        let p = checked_path(path)?;
        // Non-blocking, so that opening a FIFO nobody writes does not hang; only regular files are read.
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&p)
            .await
            .map_err(|e| io_fail("open", &p, e))?;
        let meta = file.metadata().await.map_err(|e| io_fail("stat", &p, e))?;
        if meta.is_dir() {
            return Err(fail(ErrorKind::InvalidPath, format!("{path} is a directory")));
        }
        if !meta.is_file() {
            return Err(fail(
                ErrorKind::InvalidPath,
                format!("{path} is not a regular file (a device, FIFO or socket)"),
            ));
        }
        if let Some(m) = max.filter(|m| meta.len() > *m) {
            return Err(fail(ErrorKind::TooLarge, format!("{path} is {} bytes, over the {m}-byte limit", meta.len())));
        }
        Ok((file, meta))
    }
    .await;
    let (mut file, meta) = match opened {
        Ok(x) => x,
        Err(resp) => return proto::write_json(w, &resp).await,
    };
    proto::write_json(w, &Response::File { size: meta.len(), mode: meta.mode() & 0o7777 }).await?;
    let mut buf = vec![0u8; proto::CHUNK];
    loop {
        let n = match file.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                // The host sees the data stream end without `End`, then the error.
                return proto::write_json(w, &io_fail("read", Path::new(path), e)).await;
            }
        };
        proto::write_frame(w, FrameKind::Data, &buf[..n]).await?;
    }
    proto::write_frame(w, FrameKind::End, b"").await?;
    proto::write_json(w, &Response::Ok).await
}

pub async fn stat(path: &str) -> Response {
    let p = match checked_path(path) {
        Ok(p) => p,
        Err(e) => return e,
    };
    match tokio::fs::metadata(&p).await {
        Ok(m) => Response::Stat(file_stat(&m)),
        Err(e) => io_fail("stat", &p, e),
    }
}

fn file_stat(m: &std::fs::Metadata) -> FileStat {
    FileStat { size: m.len(), mode: m.mode() & 0o7777, is_dir: m.is_dir(), modified_unix: m.mtime() }
}

/// A page of a directory: the `limit` smallest names after `after`. Only those names are kept while the
/// directory is read (a bounded max-heap), so a huge directory costs one pass, not its size in memory.
pub async fn list(path: String, after: Option<String>, limit: u32) -> Response {
    let p = match checked_path(&path) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let limit = usize::try_from(limit.clamp(1, proto::MAX_LIST_PAGE)).unwrap_or(1);
    let work = tokio::task::spawn_blocking(move || -> OpResult<Response> {
        let dir = std::fs::read_dir(&p).map_err(|e| io_fail("list", &p, e))?;
        // Keeps limit + 1 names: the extra one says whether there is more.
        let mut page = std::collections::BinaryHeap::with_capacity(limit + 1);
        for entry in dir {
            let entry = entry.map_err(|e| io_fail("list", &p, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if after.as_ref().is_some_and(|a| name <= *a) {
                continue;
            }
            if page.len() <= limit {
                page.push(name);
            } else if page.peek().is_some_and(|top| name < *top) {
                page.pop();
                page.push(name);
            }
        }
        let mut names = page.into_sorted_vec();
        let more = names.len() > limit;
        names.truncate(limit);
        let entries = names
            .into_iter()
            .map(|name| {
                let full = p.join(&name);
                // An entry removed since the directory was read is shown as it was seen: with no metadata.
                let meta = std::fs::symlink_metadata(&full).ok();
                let ft = meta.as_ref().map(std::fs::Metadata::file_type);
                let kind = match ft {
                    Some(t) if t.is_dir() => proto::EntryKind::Dir,
                    Some(t) if t.is_file() => proto::EntryKind::File,
                    Some(t) if t.is_symlink() => proto::EntryKind::Symlink,
                    _ => proto::EntryKind::Other,
                };
                proto::DirEntry {
                    name,
                    kind,
                    size: meta.as_ref().map_or(0, std::fs::Metadata::len),
                    mode: meta.as_ref().map_or(0, |m| m.mode() & 0o7777),
                    modified_unix: meta.as_ref().map_or(0, MetadataExt::mtime),
                }
            })
            .collect();
        Ok(Response::Entries { entries, more })
    });
    match work.await {
        Ok(Ok(r) | Err(r)) => r,
        Err(e) => fail(ErrorKind::Io, format!("list {path}: {e}")),
    }
}

/// Makes a directory; with `parents`, like `mkdir -p` (an existing directory is fine, a file in the way is
/// not). Answers with the directory's stat.
pub async fn mkdir(path: &str, parents: bool, mode: Option<u32>) -> Response {
    let p = match checked_path(path) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let mut builder = tokio::fs::DirBuilder::new();
    builder.recursive(parents).mode(mode.unwrap_or(0o755) & 0o7777);
    if let Err(e) = builder.create(&p).await {
        return match e.kind() {
            IoKind::AlreadyExists if tokio::fs::metadata(&p).await.is_ok_and(|m| m.is_dir()) => {
                fail(ErrorKind::InvalidPath, format!("{path} already exists"))
            }
            IoKind::AlreadyExists => fail(ErrorKind::InvalidPath, format!("{path} exists and is not a directory")),
            _ => io_fail("mkdir", &p, e),
        };
    }
    match tokio::fs::metadata(&p).await {
        Ok(m) if m.is_dir() => {
            // The umask may have narrowed the mode.
            if let Some(mode) = mode
                && let Err(e) = tokio::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode & 0o7777)).await
            {
                return io_fail("chmod", &p, e);
            }
            match tokio::fs::metadata(&p).await {
                Ok(m) => Response::Stat(file_stat(&m)),
                Err(e) => io_fail("stat", &p, e),
            }
        }
        Ok(_) => fail(ErrorKind::InvalidPath, format!("{path} exists and is not a directory")),
        Err(e) => io_fail("stat", &p, e),
    }
}

/// Whether `p` (absolute) is `/` once `.` and `..` are resolved by name (`/..`, `/tmp/..`, `/./`).
fn names_the_root(p: &Path) -> bool {
    use std::path::Component;
    let mut depth = 0usize;
    for c in p.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth = depth.saturating_sub(1),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    depth == 0
}

pub async fn delete(path: &str, recursive: bool) -> Response {
    let p = match checked_path(path) {
        Ok(p) => p,
        Err(e) => return e,
    };
    if names_the_root(&p) {
        return fail(ErrorKind::InvalidPath, format!("refusing to delete / (named as '{path}')"));
    }
    let meta = match tokio::fs::symlink_metadata(&p).await {
        Ok(m) => m,
        Err(e) => return io_fail("stat", &p, e),
    };
    let res = if !meta.is_dir() {
        tokio::fs::remove_file(&p).await
    } else if recursive {
        tokio::fs::remove_dir_all(&p).await
    } else {
        tokio::fs::remove_dir(&p).await
    };
    match res {
        Ok(()) => Response::Ok,
        Err(e) if e.kind() == IoKind::DirectoryNotEmpty => {
            fail(ErrorKind::InvalidPath, format!("{path} is a non-empty directory; delete it recursively"))
        }
        Err(e) => io_fail("delete", &p, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Checked as a function: the agent's tests run on the host, where a delete of `/` must never be tried.
    #[test]
    fn the_root_is_recognised_however_it_is_named() {
        for root in ["/", "/..", "/tmp/..", "/./", "/a/b/../..", "/a/../../.."] {
            assert!(names_the_root(Path::new(root)), "{root}");
        }
        for other in ["/tmp", "/tmp/.", "/a/../b"] {
            assert!(!names_the_root(Path::new(other)), "{other}");
        }
    }
}
