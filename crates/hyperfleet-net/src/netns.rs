//! Named network namespaces, kept where `ip netns` keeps them (/run/netns/NAME, an nsfs bind mount) so that
//! `ip netns exec` works for debugging, and code that runs inside one on a thread of its own.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use crate::link::Netlink;
use crate::{NetError, blocking};

pub const NETNS_DIR: &str = "/run/netns";

pub fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn err(what: String, e: impl std::fmt::Display) -> NetError {
    NetError::Netns(format!("{what}: {e}"))
}

/// Makes /run/netns a shared mount point, as `ip netns add` does. Without this, a later `ip netns add`
/// would bind-mount the directory over itself and hide the namespaces already mounted in it.
fn prepare_dir() -> Result<(), NetError> {
    std::fs::create_dir_all(NETNS_DIR).map_err(|e| err(format!("create {NETNS_DIR}"), e))?;
    let shared =
        || nix::mount::mount(None::<&str>, NETNS_DIR, Some("none"), MsFlags::MS_SHARED | MsFlags::MS_REC, None::<&str>);
    match shared() {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            nix::mount::mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| err(format!("bind-mount {NETNS_DIR}"), e))?;
            shared().map_err(|e| err(format!("make {NETNS_DIR} shared"), e))
        }
        Err(e) => Err(err(format!("make {NETNS_DIR} shared"), e)),
    }
}

/// Creates the namespace `name` (fails if it exists) and returns its path.
pub async fn create(name: &str) -> Result<PathBuf, NetError> {
    let path = path_of(name);
    let target = path.clone();
    // unshare() changes only the calling thread's namespace, so it runs on a throwaway thread (never a pooled
    // one, which would stay in the new namespace); the runtime worker only awaits its answer.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let made = (|| {
            prepare_dir()?;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&target)
                .map_err(|e| err(format!("create {}", target.display()), e))?;
            let bound = (|| {
                nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| err("unshare(CLONE_NEWNET)".into(), e))?;
                let own = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
                nix::mount::mount(Some(own.as_str()), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                    .map_err(|e| err(format!("bind-mount {own} on {}", target.display()), e))
            })();
            if bound.is_err()
                && let Err(e) = std::fs::remove_file(&target)
            {
                tracing::warn!(path = %target.display(), error = %e, "could not remove the half-made namespace file");
            }
            bound
        })();
        // The receiver is gone only if the caller was dropped; the namespace is then a stray that reconcile
        // or purge removes.
        let _ = tx.send(made);
    });
    rx.await.map_err(|_| NetError::Netns("namespace thread panicked".into()))??;
    Ok(path)
}

/// Names an existing network namespace (`source`: an nsfs file such as /proc/PID/ns/net) `name`, as
/// [`create`] names a new one: for a namespace made by another process, e.g. inside a user namespace.
/// Blocking; fails if the name is taken.
pub fn name_existing(name: &str, source: &Path) -> Result<PathBuf, NetError> {
    let target = path_of(name);
    prepare_dir()?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&target)
        .map_err(|e| err(format!("create {}", target.display()), e))?;
    let bound = nix::mount::mount(Some(source), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| err(format!("bind-mount {} on {}", source.display(), target.display()), e));
    if let Err(e) = bound {
        if let Err(rm) = std::fs::remove_file(&target) {
            tracing::warn!(path = %target.display(), error = %rm, "could not remove the half-made namespace file");
        }
        return Err(e);
    }
    Ok(target)
}

pub async fn exists(name: &str) -> bool {
    tokio::fs::try_exists(path_of(name)).await.unwrap_or(false)
}

/// Removes the namespace `name`; a missing one is not an error. The namespace itself goes away once no
/// process lives in it any more, taking its interfaces (and so a veth pair's host end) with it.
pub async fn delete(name: &str) -> Result<(), NetError> {
    let path = path_of(name);
    blocking(move || {
        if !path.exists() {
            return Ok(());
        }
        match nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(err(format!("unmount {}", path.display()), e)),
        }
        std::fs::remove_file(&path).map_err(|e| err(format!("remove {}", path.display()), e))
    })
    .await
}

/// Names of the namespaces under /run/netns that start with `prefix`.
pub async fn list(prefix: &str) -> Vec<String> {
    let prefix = prefix.to_string();
    blocking(move || {
        std::fs::read_dir(NETNS_DIR)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(&prefix))
            .collect()
    })
    .await
}

pub async fn open(name: &str) -> Result<File, NetError> {
    let path = path_of(name);
    blocking(move || File::open(&path).map_err(|e| err(format!("open {}", path.display()), e))).await
}

/// Runs `f` with a netlink connection inside the namespace `name`, on a dedicated thread with its own
/// single-threaded runtime (a namespace is a per-thread property; the caller's threads are not touched).
pub async fn run_in<F, Fut, T>(name: &str, f: F) -> Result<T, NetError>
where
    F: FnOnce(Netlink) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetError>>,
    T: Send + 'static,
{
    let path = path_of(name);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| {
            let ns = File::open(&path).map_err(|e| err(format!("open {}", path.display()), e))?;
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| err("setns".into(), e))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| err("runtime".into(), e))?;
            rt.block_on(async move { f(Netlink::connect()?).await })
        })();
        // The receiver is gone only if the caller was dropped; nobody is left to tell.
        let _ = tx.send(result);
    });
    rx.await.map_err(|_| NetError::Netns("namespace thread panicked".into()))?
}
