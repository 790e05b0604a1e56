//! The image cache: layers and unpacked image roots, content-addressed under the images directory and
//! shared by every machine made from the same manifest digest. A container machine runs from the root tree
//! itself (the read-only lower layer of its own overlay); the ext4 image a Firecracker machine boots (its own
//! sparse copy of it) is made from the tree the first time one needs it, once per digest.
//! Pulls of one digest are single-flight; progress is kept per pull and shown on the machines waiting for
//! it; the cache is kept under its size cap by evicting the least recently used images no machine uses.
//! Registry credentials live in memory for the pull only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use hyperfleet_types::{ImageInfo, ImagePhase, ImageStatus, MachineSpec};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use tracing::{info, warn};

use crate::oci::pull::{Progress, Puller, blob_path};
use crate::oci::{Credentials, ImageConfig, OciError, Registries, rootfs};

/// One cached image, as kept in `index.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    references: Vec<String>,
    layers: Vec<String>,
    config: ImageConfig,
    size_bytes: u64,
    /// The unpacked root's bytes (0 in an index written before it was kept).
    #[serde(default)]
    unpacked_bytes: u64,
    #[serde(with = "hyperfleet_types::timestamp")]
    last_used: time::OffsetDateTime,
}

/// An image ready to run from.
#[derive(Debug, Clone)]
pub(crate) struct Ready {
    /// The unpacked root tree (inside [`Images::dir`]).
    pub tree: PathBuf,
}

/// How long after a pull its root tree is synced to disk (see [`Images::pull`]).
const SYNC_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// Layer downloads of one pull running at once.
const PARALLEL_LAYERS: usize = 4;

type Flight = Arc<OnceCell<Result<Ready, ImageError>>>;
type Ext4Flight = Arc<OnceCell<Result<PathBuf, ImageError>>>;

struct PullState {
    progress: Arc<Progress>,
    phase: ImagePhase,
    error: Option<String>,
}

#[derive(Default)]
struct State {
    index: BTreeMap<String, Entry>,
    flights: HashMap<String, (Flight, Arc<Progress>)>,
    /// ext4 images being made (for Firecracker machines), one per digest.
    ext4: HashMap<String, Ext4Flight>,
    /// Per machine: the pull it waits for (or the last one's outcome).
    machines: HashMap<String, Arc<Mutex<PullState>>>,
    /// Per machine: credentials until its image is cached.
    creds: HashMap<String, Credentials>,
    /// Root trees not yet synced to disk: left out of `index.json` until they are.
    unsynced: HashSet<String>,
    /// Layers of pulls under way, and how many pulls use each.
    pulling: HashMap<String, usize>,
    /// Manifests and configs resolved at create, so the pull that follows does not fetch them again.
    resolved: HashMap<String, (oci_client::manifest::OciImageManifest, ImageConfig)>,
}

pub(crate) struct Images {
    dir: PathBuf,
    agent: PathBuf,
    cap_bytes: u64,
    puller: Puller,
    state: Mutex<State>,
    /// Held while `index.json` is written.
    saving: Mutex<()>,
}

/// Why an image could not be had; the API maps each kind to its status.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ImageError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    Registry(String),
    #[error("{0}")]
    Failed(String),
    /// The images directory's filesystem is full: nothing of the pull is kept.
    #[error("{0}")]
    NoSpace(String),
    #[error("image {digest} is used by machines {}", machines.join(", "))]
    InUse { digest: String, machines: Vec<String> },
}

impl From<OciError> for ImageError {
    fn from(e: OciError) -> Self {
        match e {
            OciError::Reference(m) => Self::Invalid(m),
            OciError::NotFound(m) => Self::NotFound(m),
            OciError::Auth(m) => Self::Auth(m),
            OciError::Unreachable(m) | OciError::Registry(m) => Self::Registry(m),
            e if e.is_no_space() => Self::NoSpace(format!(
                "no space left for the image in the images directory (HYPERFLEET_DATA_DIR): {e}; nothing of \
                 the pull was kept"
            )),
            OciError::Layer(l) => Self::Failed(format!("the image's layers cannot be applied: {l}")),
            other => Self::Failed(other.to_string()),
        }
    }
}

pub(crate) fn credentials(auth: Option<&hyperfleet_types::RegistryAuth>) -> Result<Option<Credentials>, String> {
    let Some(a) = auth else { return Ok(None) };
    match (&a.username, &a.password, &a.token) {
        (Some(u), Some(p), None) if !u.is_empty() => {
            Ok(Some(Credentials::Basic { username: u.clone(), password: p.clone() }))
        }
        (None, None, Some(t)) if !t.is_empty() => Ok(Some(Credentials::Token(t.clone()))),
        _ => Err("registry_auth must be {\"username\", \"password\"} or {\"token\"}".into()),
    }
}

fn hex(digest: &str) -> String {
    digest.replace(':', "-")
}

impl Images {
    pub(crate) fn new(dir: PathBuf, agent: PathBuf, cap_bytes: u64, registries: Registries) -> std::io::Result<Self> {
        crate::runtime::private_dir(&dir).map_err(std::io::Error::other)?;
        for sub in ["blobs", "roots", "tmp"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        // Whatever a crash left half done.
        for e in std::fs::read_dir(dir.join("tmp"))?.flatten() {
            let _ = std::fs::remove_dir_all(e.path());
        }
        // Empty upper disks per size (see runtime/container.rs), and what a crash left of one being made.
        std::fs::create_dir_all(dir.join("uppers"))?;
        for sub in ["blobs", "uppers"] {
            for e in std::fs::read_dir(dir.join(sub))?.flatten() {
                if e.file_name().to_string_lossy().contains(".partial") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let index: BTreeMap<String, Entry> = std::fs::read(dir.join("index.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let index: BTreeMap<String, Entry> =
            index.into_iter().filter(|(d, _)| dir.join("roots").join(hex(d)).is_dir()).collect();
        // Roots the index does not name: unpacked just before a crash, never synced (or from an older cache,
        // which kept only ext4 images). An image's ext4 is only ever renamed into place once synced.
        let named: HashSet<String> = index.keys().flat_map(|d| [hex(d), format!("{}.ext4", hex(d))]).collect();
        for e in std::fs::read_dir(dir.join("roots"))?.flatten() {
            if !named.contains(&*e.file_name().to_string_lossy()) {
                let p = e.path();
                if p.is_dir() && !p.is_symlink() {
                    rootfs::remove_scratch(&p);
                } else {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        Ok(Self {
            dir,
            agent,
            cap_bytes,
            puller: Puller::new(registries),
            state: Mutex::new(State { index, ..State::default() }),
            saving: Mutex::new(()),
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The image's ext4 image (for Firecracker machines; made by [`Self::ensure_ext4`]).
    pub(crate) fn root_path(&self, digest: &str) -> PathBuf {
        self.dir.join("roots").join(format!("{}.ext4", hex(digest)))
    }

    /// The image's unpacked root tree (container machines run from it).
    pub(crate) fn tree_path(&self, digest: &str) -> PathBuf {
        self.dir.join("roots").join(hex(digest))
    }

    /// The default disk size of a machine from a cached image (see [`rootfs::default_size_mib`]).
    pub(crate) fn default_size_mib(&self, digest: &str) -> Option<u64> {
        self.lock().index.get(digest).map(|e| rootfs::default_size_mib(e.unpacked_bytes))
    }

    /// Writes `index.json` from the index in memory, leaving out the roots not yet on disk for sure (see
    /// [`Self::pull`]). One save at a time, each of the state at its own time.
    fn save_index(&self) {
        let _one = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let index: BTreeMap<String, Entry> = {
            let s = self.lock();
            s.index.iter().filter(|(d, _)| !s.unsynced.contains(*d)).map(|(d, e)| (d.clone(), e.clone())).collect()
        };
        let path = self.dir.join("index.json");
        let tmp = self.dir.join("index.json.tmp");
        let res = serde_json::to_vec_pretty(&index)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = res {
            warn!(error = %e, "could not save the image index");
        }
    }

    /// Records `creds` for a machine's later pull (memory only).
    pub(crate) fn remember_credentials(&self, machine: &str, creds: Option<Credentials>) {
        if let Some(c) = creds {
            self.lock().creds.insert(machine.to_string(), c);
        }
    }

    pub(crate) fn forget_machine(&self, machine: &str) {
        let mut s = self.lock();
        s.creds.remove(machine);
        s.machines.remove(machine);
    }

    /// The machine's pull as the API shows it.
    /// A machine this daemon has not pulled for (made before a restart) shows `ready` if its image is cached.
    pub(crate) fn status(&self, machine: &str, digest: Option<&str>) -> Option<ImageStatus> {
        let st = {
            let s = self.lock();
            match s.machines.get(machine) {
                Some(st) => st.clone(),
                None => {
                    let e = s.index.get(digest?)?;
                    let size = e.size_bytes;
                    return Some(ImageStatus {
                        phase: ImagePhase::Ready,
                        bytes_done: size,
                        bytes_total: size,
                        error: None,
                    });
                }
            }
        };
        let st = st.lock().unwrap_or_else(|e| e.into_inner());
        Some(ImageStatus {
            phase: st.phase,
            bytes_done: st.progress.done.load(Ordering::Relaxed),
            bytes_total: st.progress.total.load(Ordering::Relaxed),
            error: st.error.clone(),
        })
    }

    /// Resolves `image` to its digest: from the cache for a `@digest` reference already held, else from the
    /// registry (a small request, so bad names and credentials are refused at once); when the registry
    /// cannot be reached, a reference pulled before is answered from the cache.
    pub(crate) async fn resolve(&self, image: &str, creds: Option<&Credentials>) -> Result<String, ImageError> {
        let r = self.puller.reference(image)?;
        if let Some(d) = r.digest()
            && self.lock().index.contains_key(d)
        {
            return Ok(d.to_string());
        }
        match self.puller.session(&r, creds).resolve(&r, creds).await {
            Ok((digest, manifest, config)) => {
                let mut s = self.lock();
                if !s.index.contains_key(&digest) && s.resolved.len() < 256 {
                    s.resolved.insert(digest.clone(), (manifest, config));
                }
                Ok(digest)
            }
            Err(OciError::Unreachable(m)) => {
                let whole = r.whole();
                self.lock()
                    .index
                    .iter()
                    .filter(|(_, e)| e.references.contains(&whole))
                    .max_by_key(|(_, e)| e.last_used)
                    .map(|(d, _)| d.clone())
                    .ok_or(ImageError::Registry(m))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The image `image` (resolved to `digest`), pulled and converted if it is not cached: one pull per
    /// digest however many callers ask at once. `machine` (if any) shows the pull's progress.
    /// Shows the pull of `digest` on `machine` (ready at once when cached); returns the pull to wait for,
    /// if there is one. Synchronous, so a create's answer already carries the machine's image status.
    pub(crate) fn watch(&self, digest: &str, machine: Option<&str>) -> Option<(Flight, Arc<Progress>)> {
        let mut s = self.lock();
        if let Some(e) = s.index.get_mut(digest) {
            e.last_used = time::OffsetDateTime::now_utc();
            let total = e.size_bytes;
            if let Some(m) = machine {
                let progress = Arc::new(Progress::default());
                progress.done.store(total, Ordering::Relaxed);
                progress.total.store(total, Ordering::Relaxed);
                s.machines.insert(
                    m.to_string(),
                    Arc::new(Mutex::new(PullState { progress, phase: ImagePhase::Ready, error: None })),
                );
            }
            return None;
        }
        let (flight, progress) = s
            .flights
            .entry(digest.to_string())
            .or_insert_with(|| (Arc::new(OnceCell::new()), Arc::new(Progress::default())))
            .clone();
        if let Some(m) = machine {
            s.machines.insert(
                m.to_string(),
                Arc::new(Mutex::new(PullState { progress: progress.clone(), phase: ImagePhase::Pulling, error: None })),
            );
        }
        Some((flight, progress))
    }

    /// The image `image` (resolved to `digest`), pulled and converted if it is not cached: one pull per
    /// digest however many callers ask at once. `machine` (if any) shows the pull's progress.
    pub(crate) async fn ensure(
        self: &Arc<Self>,
        image: &str,
        digest: &str,
        creds: Option<Credentials>,
        machine: Option<&str>,
    ) -> Result<Ready, ImageError> {
        let Some((flight, progress)) = self.watch(digest, machine) else {
            return Ok(Ready { tree: self.tree_path(digest) });
        };
        let result = flight.get_or_init(|| self.pull(image, digest, creds, progress.clone())).await.clone();
        {
            let mut s = self.lock();
            s.flights.remove(digest);
            if let Some(m) = machine
                && let Some(st) = s.machines.get(m)
            {
                let mut st = st.lock().unwrap_or_else(|e| e.into_inner());
                match &result {
                    Ok(_) => st.phase = ImagePhase::Ready,
                    Err(e) => {
                        st.phase = ImagePhase::Failed;
                        st.error = Some(e.to_string());
                    }
                }
            }
            if result.is_ok()
                && let Some(m) = machine
            {
                s.creds.remove(m);
            }
        }
        result
    }

    /// A machine's credentials, if it was created with some and its image is not cached yet.
    pub(crate) fn credentials_of(&self, machine: &str) -> Option<Credentials> {
        self.lock().creds.get(machine).cloned()
    }

    async fn pull(
        self: &Arc<Self>,
        image: &str,
        digest: &str,
        creds: Option<Credentials>,
        progress: Arc<Progress>,
    ) -> Result<Ready, ImageError> {
        let started = std::time::Instant::now();
        let r = self.puller.reference(image)?;
        // Pull by digest: the tag may have moved since it was resolved.
        let by_digest = oci_client::Reference::with_digest(
            r.registry().to_string(),
            r.repository().to_string(),
            digest.to_string(),
        );
        let by_digest = self.puller.reference(&by_digest.whole()).unwrap_or(by_digest);
        let session = self.puller.session(&by_digest, creds.as_ref());
        let known = self.lock().resolved.remove(digest);
        let (manifest, config) = match known {
            Some(k) => k,
            None => {
                let (got, manifest, config) = session.resolve(&by_digest, creds.as_ref()).await?;
                if got != digest {
                    return Err(ImageError::Registry(format!(
                        "registry error: asked for {digest}, the registry sent {got}"
                    )));
                }
                (manifest, config)
            }
        };
        let resolved_ms = started.elapsed().as_millis();
        let layer_digests: Vec<String> = manifest.layers.iter().map(|l| l.digest.clone()).collect();
        self.hold_layers(&layer_digests, true);
        let built = self.fetch_and_build(&session, &by_digest, digest, &manifest, &progress, creds.as_ref()).await;
        self.hold_layers(&layer_digests, false);
        if built.is_err() {
            self.drop_unused_layers(&layer_digests);
        }
        let (unpacked, downloaded_ms, out) = built?;
        let downloaded_ms = resolved_ms + downloaded_ms;
        let layer_bytes: u64 = manifest.layers.iter().map(|l| u64::try_from(l.size).unwrap_or(0)).sum();
        let entry = Entry {
            references: vec![r.whole()],
            layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
            config: config.clone(),
            size_bytes: layer_bytes + unpacked,
            unpacked_bytes: unpacked,
            last_used: time::OffsetDateTime::now_utc(),
        };
        {
            let mut s = self.lock();
            let e = s.index.entry(digest.to_string()).or_insert(entry);
            if !e.references.contains(&r.whole()) {
                e.references.push(r.whole());
            }
            s.unsynced.insert(digest.to_string());
        }
        // The tree was not synced: it goes to disk off the pull's path, and only then does index.json name
        // it, so after a power loss the cache never holds a torn image. A little later, so this writeback
        // does not compete with the start that is usually waiting for the image right now.
        let (this, root, d) = (self.clone(), out.clone(), digest.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(SYNC_DELAY).await;
            let _ = tokio::task::spawn_blocking(move || this.sync_root(&root, &d)).await;
        });
        info!(
            image,
            digest,
            unpacked,
            resolved_ms,
            downloaded_ms,
            ms = started.elapsed().as_millis(),
            "image pulled and converted"
        );
        Ok(Ready { tree: out })
    }

    /// Syncs an unpacked root tree to disk (its filesystem's, with syncfs), then lets `index.json` name it.
    fn sync_root(&self, root: &Path, digest: &str) {
        if !self.lock().index.contains_key(digest) {
            // Removed (or evicted) before its turn came: nothing to keep.
            self.lock().unsynced.remove(digest);
            return;
        }
        let synced = std::fs::File::open(root).and_then(|f| {
            use std::os::fd::AsRawFd;
            // SAFETY: syncfs on a descriptor this function owns.
            if unsafe { libc::syncfs(f.as_raw_fd()) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
        });
        if let Err(e) = synced {
            warn!(path = %root.display(), error = %e, "could not sync an image's root");
        }
        self.lock().unsynced.remove(digest);
        self.save_index();
    }

    /// The ext4 image of a cached image (for a Firecracker machine), made from its root tree the first time
    /// it is asked for: one build per digest however many ask at once.
    pub(crate) async fn ensure_ext4(self: &Arc<Self>, digest: &str) -> Result<PathBuf, ImageError> {
        let out = self.root_path(digest);
        if out.exists() {
            return Ok(out);
        }
        let flight = self.lock().ext4.entry(digest.to_string()).or_default().clone();
        let result = flight
            .get_or_init(|| async {
                if out.exists() {
                    return Ok(out.clone());
                }
                let Some(bytes) = self.lock().index.get(digest).map(|e| e.unpacked_bytes) else {
                    return Err(ImageError::NotFound(format!("image {digest} is not in the cache")));
                };
                let (tree, partial, o) =
                    (self.tree_path(digest), self.dir.join("tmp").join(format!("{}.ext4", hex(digest))), out.clone());
                let built = tokio::task::spawn_blocking(move || rootfs::build_ext4(&tree, bytes, &partial, &o)).await;
                built.map_err(|e| ImageError::Failed(format!("making the image's ext4: {e}")))??;
                if let Some(e) = self.lock().index.get_mut(digest) {
                    e.size_bytes += allocated(&out);
                }
                self.save_index();
                Ok(out.clone())
            })
            .await
            .clone();
        self.lock().ext4.remove(digest);
        result
    }

    /// Counts `layers` as in use by a running pull (`hold`) or no longer.
    fn hold_layers(&self, layers: &[String], hold: bool) {
        let mut s = self.lock();
        for l in layers {
            let n = s.pulling.entry(l.clone()).or_insert(0);
            if hold {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    s.pulling.remove(l);
                }
            }
        }
    }

    /// After a failed pull: removes the layers it downloaded that no cached image and no other pull uses,
    /// so a failure (a full disk above all) leaves nothing behind.
    fn drop_unused_layers(&self, layers: &[String]) {
        let s = self.lock();
        let kept: HashSet<&String> = s.index.values().flat_map(|e| e.layers.iter()).collect();
        for l in layers.iter().filter(|l| !kept.contains(l) && !s.pulling.contains_key(*l)) {
            if let Ok(p) = blob_path(&self.dir.join("blobs"), l) {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    /// Downloads the layers (a few at a time) and applies them; returns the unpacked size, when the last
    /// download ended (ms since `started`), and the root tree.
    async fn fetch_and_build(
        &self,
        session: &crate::oci::pull::Session,
        by_digest: &oci_client::Reference,
        digest: &str,
        manifest: &oci_client::manifest::OciImageManifest,
        progress: &Arc<Progress>,
        creds: Option<&Credentials>,
    ) -> Result<(u64, u128, PathBuf), ImageError> {
        let started = std::time::Instant::now();
        let blobs = self.dir.join("blobs");
        session.prepare(by_digest, manifest, progress, creds).await;
        // Layers download a few at a time while a blocking task applies each one, in order, once it and
        // every layer before it are there.
        let work = self.dir.join("tmp").join(hex(digest));
        let out = self.tree_path(digest);
        let (arrived, arrivals) = std::sync::mpsc::channel();
        let count = manifest.layers.len();
        let (agent, w2, o2) = (self.agent.clone(), work.clone(), out.clone());
        let builder = tokio::task::spawn_blocking(move || rootfs::build_tree(count, arrivals, &agent, &w2, &o2));
        // Owned futures: borrowing closures here trip the compiler's higher-ranked lifetime checks where
        // the pull is spawned.
        let fetches: Vec<_> = manifest
            .layers
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, l)| {
                let (session, r, blobs, progress) =
                    (session.clone(), by_digest.clone(), blobs.clone(), progress.clone());
                async move { session.layer(&r, &l, &blobs, &progress).await.map(|p| (i, p)) }
            })
            .collect();
        let mut downloads = futures::stream::iter(fetches).buffer_unordered(PARALLEL_LAYERS);
        let mut failed = None;
        while let Some(got) = downloads.next().await {
            match got {
                Ok(arrival) => {
                    // A send fails only once the build has failed: its error is the one to report.
                    if arrived.send(arrival).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(downloads);
        drop(arrived);
        let downloaded_ms = started.elapsed().as_millis();
        if failed.is_none() {
            self.set_phase(digest, ImagePhase::Converting);
        }
        let built = builder.await.map_err(|e| ImageError::Failed(format!("converting the image: {e}")))?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        Ok((built?, downloaded_ms, out))
    }

    fn set_phase(&self, digest: &str, phase: ImagePhase) {
        let s = self.lock();
        let Some((_, progress)) = s.flights.get(digest) else { return };
        for st in s.machines.values() {
            let mut st = st.lock().unwrap_or_else(|e| e.into_inner());
            if Arc::ptr_eq(&st.progress, progress) {
                st.phase = phase;
            }
        }
    }

    /// The cached images, each with the machines (from `specs`) made from it.
    pub(crate) fn list(&self, specs: &[(String, MachineSpec)]) -> Vec<ImageInfo> {
        let s = self.lock();
        s.index
            .iter()
            .map(|(d, e)| ImageInfo {
                digest: d.clone(),
                references: e.references.clone(),
                size_bytes: e.size_bytes,
                last_used: e.last_used,
                machines: specs
                    .iter()
                    .filter(|(_, sp)| sp.image_digest.as_deref() == Some(d.as_str()))
                    .map(|(id, _)| id.clone())
                    .collect(),
            })
            .collect()
    }

    /// The image config of a cached digest.
    pub(crate) fn config(&self, digest: &str) -> Option<ImageConfig> {
        self.lock().index.get(digest).map(|e| e.config.clone())
    }

    /// Removes a cached image and the layers no other image shares; refused while a machine uses it.
    pub(crate) fn remove(&self, digest: &str, used_by: Vec<String>) -> Result<bool, ImageError> {
        if !used_by.is_empty() {
            return Err(ImageError::InUse { digest: digest.to_string(), machines: used_by });
        }
        let mut s = self.lock();
        let Some(entry) = s.index.remove(digest) else { return Ok(false) };
        let still: HashSet<&String> = s.index.values().flat_map(|e| e.layers.iter()).collect();
        for l in entry.layers.iter().filter(|l| !still.contains(l)) {
            if let Ok(p) = blob_path(&self.dir.join("blobs"), l) {
                let _ = std::fs::remove_file(p);
            }
        }
        let _ = std::fs::remove_file(self.root_path(digest));
        // Out of the way at once (a pull of the same digest may follow), removed in the background.
        let tree = self.tree_path(digest);
        let trash = self.dir.join("tmp").join(format!("{}.removed-{}", hex(digest), rand_suffix()));
        if std::fs::rename(&tree, &trash).is_ok() {
            std::thread::spawn(move || rootfs::remove_scratch(&trash));
        } else {
            rootfs::remove_scratch(&tree);
        }
        drop(s);
        self.save_index();
        Ok(true)
    }

    /// Evicts least recently used images no machine uses until the cache fits its cap.
    pub(crate) fn evict(&self, in_use: &HashSet<String>) {
        loop {
            let (total, victim) = {
                let s = self.lock();
                let total: u64 = s.index.values().map(|e| e.size_bytes).sum();
                let victim = s
                    .index
                    .iter()
                    .filter(|(d, _)| !in_use.contains(*d))
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(d, _)| d.clone());
                (total, victim)
            };
            if total <= self.cap_bytes {
                return;
            }
            let Some(v) = victim else { return };
            info!(digest = %v, "evicting a cached image (HYPERFLEET_IMAGE_CACHE_MIB)");
            if let Err(e) = self.remove(&v, Vec::new()) {
                warn!(digest = %v, error = %e, "could not evict an image");
                return;
            }
        }
    }
}

/// A suffix that makes a scratch name unique.
fn rand_suffix() -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Bytes a (sparse) file really takes.
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// The main process of a machine from its image's config and its own overrides (Docker's rules: an
/// `entrypoint` given at create drops the image's Cmd), or `None` when there is nothing to run.
pub(crate) fn main_process(
    spec: &MachineSpec,
    image: Option<&ImageConfig>,
) -> Option<hyperfleet_agent_proto::main_process::MainProcess> {
    use hyperfleet_agent_proto::main_process::{MainProcess, Restart};
    use hyperfleet_types::RestartPolicy;
    let empty = ImageConfig::default();
    let img = image.unwrap_or(&empty);
    let entrypoint = spec.entrypoint.clone().unwrap_or_else(|| img.entrypoint.clone());
    let cmd = match (&spec.cmd, &spec.entrypoint) {
        (Some(c), _) => c.clone(),
        (None, Some(_)) => Vec::new(),
        (None, None) => img.cmd.clone(),
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return None;
    }
    let mut env: Vec<String> = img
        .env
        .iter()
        .filter(|kv| kv.split_once('=').is_none_or(|(k, _)| !spec.env.contains_key(k)))
        .cloned()
        .collect();
    env.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
    Some(MainProcess {
        argv,
        env,
        cwd: img.working_dir.clone(),
        user: img.user.clone(),
        restart: match spec.restart_policy {
            RestartPolicy::No => Restart::No,
            RestartPolicy::OnFailure => Restart::OnFailure,
            RestartPolicy::Always => Restart::Always,
        },
    })
}

impl<H: super::Host> super::Service<H> {
    /// For an image machine: checks its credentials' shape and resolves the image's digest (refusing an
    /// unknown image or bad credentials at once); the machine's root image is the cache's for that digest.
    pub(super) async fn resolve_image(
        &self,
        spec: &mut MachineSpec,
        auth: Option<&hyperfleet_types::RegistryAuth>,
    ) -> super::Result<Option<Credentials>> {
        let Some(image) = spec.image.clone() else { return Ok(None) };
        let creds = credentials(auth).map_err(super::Error::Invalid)?;
        let digest = self.images.resolve(&image, creds.as_ref()).await?;
        spec.rootfs_path = self.images.root_path(&digest).display().to_string();
        spec.image_digest = Some(digest);
        Ok(creds)
    }

    /// Starts the pull of a new image machine's image (shared with any other pull of the digest); its
    /// progress shows on the machine, and a start waits for it.
    pub(super) fn pull_in_background(
        self: &Arc<Self>,
        rec: &crate::store::machines::MachineRecord,
        creds: Option<Credentials>,
    ) {
        let (Some(image), Some(digest)) = (rec.spec.image.clone(), rec.spec.image_digest.clone()) else { return };
        self.images.remember_credentials(&rec.id, creds.clone());
        self.images.watch(&digest, Some(&rec.id));
        let (this, id) = (self.clone(), rec.id.clone());
        tokio::spawn(async move {
            match this.images.ensure(&image, &digest, creds, Some(&id)).await {
                Ok(_) => this.evict_images().await,
                Err(e) => {
                    warn!(machine = %id, image, error = %e, "image pull failed");
                    this.record_pull_failure(&id, &e).await;
                }
            }
        });
    }

    /// Keeps a failed background pull on the (still pending) machine, in its `error_message`, so it shows
    /// after a daemon restart too; the next start pulls again and a successful start clears it.
    async fn record_pull_failure(&self, id: &str, e: &ImageError) {
        use hyperfleet_types::MachineStatus::Pending;
        let changes = crate::store::machines::Changes {
            error_message: Some(Some(format!("the image pull failed: {e}"))),
            ..Default::default()
        };
        let stored = async {
            let mut tx = self.store.write().await?;
            crate::store::machines::transition(&mut tx, id, &[Pending], Pending, &changes).await?;
            tx.commit().await
        };
        if let Err(e) = stored.await {
            warn!(machine = %id, error = %e, "could not record the failed pull");
        }
    }

    /// After a daemon restart: every machine still `pending` whose image is not cached pulls it again (the
    /// pull a crash or restart cut short). Credentials are never stored, so these pulls are anonymous: an
    /// image that needed them shows a failed pull (`image_status`, `error_message`) until it is pulled with
    /// them (`POST /images/pull`) or the machine is created anew.
    pub(crate) async fn resume_pulls(self: &Arc<Self>) -> super::Result<()> {
        use hyperfleet_types::MachineStatus::Pending;
        let pending =
            crate::store::machines::with_status(&mut *self.store.read().await?, self.node(), &[Pending]).await?;
        for rec in pending {
            let Some(digest) = &rec.spec.image_digest else { continue };
            if self.images.config(digest).is_some() {
                self.images.watch(digest, Some(&rec.id));
                continue;
            }
            info!(machine = %rec.id, digest, "pulling the image of a pending machine again after a restart");
            self.pull_in_background(&rec, None);
        }
        Ok(())
    }

    /// Waits for an image machine's image (pulling it again if it was evicted since).
    pub(super) async fn image_ready(&self, rec: &crate::store::machines::MachineRecord) -> super::Result<()> {
        let (Some(image), Some(digest)) = (&rec.spec.image, &rec.spec.image_digest) else { return Ok(()) };
        let creds = self.images.credentials_of(&rec.id);
        let ready = match self.images.ensure(image, digest, creds, Some(&rec.id)).await {
            Ok(r) => r,
            Err(e) => {
                self.record_pull_failure(&rec.id, &e).await;
                return Err(e.into());
            }
        };
        tracing::debug!(machine = %rec.id, root = %ready.tree.display(), "image ready");
        // A Firecracker machine boots its own copy of the image's ext4 (made now if no machine needed it yet);
        // a container machine runs from the tree, and one made before the tree was kept has its own disk.
        if rec.spec.runtime == hyperfleet_types::RuntimeKind::Firecracker
            && let Err(e) = self.images.ensure_ext4(digest).await
        {
            self.record_pull_failure(&rec.id, &e).await;
            return Err(e.into());
        }
        Ok(())
    }

    async fn machine_specs(&self) -> super::Result<Vec<(String, MachineSpec)>> {
        let all = crate::store::machines::with_status(
            &mut *self.store.read().await?,
            self.node(),
            &hyperfleet_types::MachineStatus::ALL,
        )
        .await?;
        Ok(all.into_iter().map(|m| (m.id, m.spec)).collect())
    }

    async fn evict_images(&self) {
        match self.machine_specs().await {
            Ok(specs) => {
                let used: HashSet<String> = specs.into_iter().filter_map(|(_, s)| s.image_digest).collect();
                self.images.evict(&used);
            }
            Err(e) => warn!(error = %e, "image cache: could not list the machines"),
        }
    }

    pub(crate) async fn list_images(&self) -> super::Result<Vec<ImageInfo>> {
        Ok(self.images.list(&self.machine_specs().await?))
    }

    /// Pulls an image into the cache (returns once it is there).
    pub(crate) async fn pull_image(&self, req: hyperfleet_types::PullImage) -> super::Result<ImageInfo> {
        let creds = credentials(req.registry_auth.as_ref()).map_err(super::Error::Invalid)?;
        if req.image.is_empty()
            || req.image.len() > 512
            || req.image.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(super::Error::Invalid("image must be an image reference without spaces".into()));
        }
        let digest = self.images.resolve(&req.image, creds.as_ref()).await?;
        self.images.ensure(&req.image, &digest, creds, None).await?;
        self.evict_images().await;
        self.list_images().await?.into_iter().find(|i| i.digest == digest).ok_or_else(|| {
            super::Error::Image(ImageError::Failed(
                "the image was evicted at once: raise HYPERFLEET_IMAGE_CACHE_MIB".into(),
            ))
        })
    }

    pub(crate) async fn delete_image(&self, digest: &str) -> super::Result<()> {
        let specs = self.machine_specs().await?;
        let used: Vec<String> =
            specs.into_iter().filter(|(_, s)| s.image_digest.as_deref() == Some(digest)).map(|(id, _)| id).collect();
        if self.images.remove(digest, used)? {
            Ok(())
        } else {
            Err(super::Error::Image(ImageError::NotFound(format!("image {digest} is not in the cache"))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyperfleet_agent_proto::main_process::Restart;
    use hyperfleet_types::RestartPolicy;

    fn spec() -> MachineSpec {
        serde_json::from_value(serde_json::json!({
            "name": "m", "runtime": "container", "vcpu_count": 1, "mem_size_mib": 64, "kernel_image_path": "k",
            "kernel_args": "", "rootfs_path": "r", "exposed_ports": [], "network": {"dns": [], "egress": "allow"},
            "env": {"B": "machine", "C": "3"}, "image": "busybox",
        }))
        .unwrap()
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/bin/app".into()],
            cmd: vec!["--serve".into()],
            env: vec!["A=1".into(), "B=image".into()],
            working_dir: "/srv".into(),
            user: "app".into(),
        }
    }

    #[test]
    fn main_process_follows_docker_rules() {
        let p = main_process(&spec(), Some(&image())).unwrap();
        assert_eq!(p.argv, ["/bin/app", "--serve"]);
        assert_eq!(p.env, ["A=1", "B=machine", "C=3"], "the machine's env wins over the image's");
        assert_eq!((p.cwd.as_str(), p.user.as_str(), p.restart), ("/srv", "app", Restart::No));
        // cmd replaces Cmd only; entrypoint replaces Entrypoint and drops Cmd.
        let s = MachineSpec { cmd: Some(vec!["--once".into()]), ..spec() };
        assert_eq!(main_process(&s, Some(&image())).unwrap().argv, ["/bin/app", "--once"]);
        let s = MachineSpec { entrypoint: Some(vec!["sh".into()]), restart_policy: RestartPolicy::Always, ..spec() };
        let p = main_process(&s, Some(&image())).unwrap();
        assert_eq!((p.argv, p.restart), (vec!["sh".to_string()], Restart::Always));
        // Nothing to run: a sandbox.
        assert!(main_process(&spec(), Some(&ImageConfig::default())).is_none());
    }

    #[test]
    fn credentials_have_one_of_two_shapes() {
        use hyperfleet_types::RegistryAuth as A;
        let basic = A { username: Some("u".into()), password: Some("p".into()), token: None };
        assert!(matches!(credentials(Some(&basic)), Ok(Some(Credentials::Basic { .. }))));
        let token = A { token: Some("t".into()), ..A::default() };
        assert!(matches!(credentials(Some(&token)), Ok(Some(Credentials::Token(_)))));
        for bad in [A::default(), A { token: Some("t".into()), ..basic.clone() }, A { password: None, ..basic }] {
            assert!(credentials(Some(&bad)).is_err());
        }
        assert!(!format!("{:?}", Credentials::Token("secret".into())).contains("secret"));
    }
}
