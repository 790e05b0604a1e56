//! Named network namespaces, kept where `ip netns` keeps them (/run/netns/NAME, an nsfs bind mount) so that
//! `ip netns exec` works for debugging, and code that runs inside one on a thread of its own.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use crate::NetError;
use crate::link::Netlink;

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
pub fn create(name: &str) -> Result<PathBuf, NetError> {
    let path = path_of(name);
    prepare_dir()?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| err(format!("create {}", path.display()), e))?;
    let target = path.clone();
    // unshare() changes only the calling thread's namespace: do it on a throwaway thread.
    let made = std::thread::spawn(move || -> Result<(), NetError> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| err("unshare(CLONE_NEWNET)".into(), e))?;
        let tid = nix::unistd::gettid();
        let own = format!("/proc/self/task/{tid}/ns/net");
        nix::mount::mount(Some(own.as_str()), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(|e| err(format!("bind-mount {own} on {}", target.display()), e))
    })
    .join()
    .map_err(|_| NetError::Netns("namespace thread panicked".into()))?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

pub fn exists(name: &str) -> bool {
    path_of(name).exists()
}

/// Removes the namespace `name`; a missing one is not an error. The namespace itself goes away once no
/// process lives in it any more, taking its interfaces (and so a veth pair's host end) with it.
pub fn delete(name: &str) -> Result<(), NetError> {
    let path = path_of(name);
    if !path.exists() {
        return Ok(());
    }
    match nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(err(format!("unmount {}", path.display()), e)),
    }
    std::fs::remove_file(&path).map_err(|e| err(format!("remove {}", path.display()), e))
}

/// Names of the namespaces under /run/netns that start with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

pub fn open(name: &str) -> Result<File, NetError> {
    let path = path_of(name);
    File::open(&path).map_err(|e| err(format!("open {}", path.display()), e))
}

/// Runs `f` with a netlink connection inside the namespace `name`, on a dedicated thread with its own
/// single-threaded runtime (a namespace is a per-thread property; the caller's threads are not touched).
pub async fn run_in<F, Fut, T>(name: &str, f: F) -> Result<T, NetError>
where
    F: FnOnce(Netlink) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetError>>,
    T: Send + 'static,
{
    let ns = open(name)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| {
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| err("setns".into(), e))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| err("runtime".into(), e))?;
            rt.block_on(async move { f(Netlink::connect()?).await })
        })();
        let _ = tx.send(result);
    });
    rx.await.map_err(|_| NetError::Netns("namespace thread panicked".into()))?
}
