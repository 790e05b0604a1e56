//! Pulling an image from a registry (the `oci-client` crate: token and basic auth, image indexes resolved to
//! linux/amd64, Docker v2 schema 2 and OCI manifests): its manifest, its config and each layer, every blob
//! checked against its digest before it is kept under its digest's name.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use oci_client::client::{ClientConfig, ClientProtocol, linux_amd64_resolver};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{Credentials, ImageConfig, OciError, Registries};

/// Bytes of a pull so far and in all, shared with whoever shows progress.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

/// Makes one registry client per pull: oci-client keeps the first credentials it is given for a registry,
/// so a shared client would answer a later caller's anonymous pull with an earlier caller's credentials.
pub(crate) struct Puller {
    registries: Registries,
    /// Clients for anonymous pulls, one per registry (they hold no credentials, only anonymous tokens).
    anonymous: std::sync::Mutex<std::collections::HashMap<String, Client>>,
}

/// A client for one pull (its token cache lives as long as the pull; clones share it).
#[derive(Clone)]
pub(crate) struct Session(Client);

fn auth(creds: Option<&Credentials>) -> RegistryAuth {
    match creds {
        None => RegistryAuth::Anonymous,
        Some(Credentials::Basic { username, password }) => RegistryAuth::Basic(username.clone(), password.clone()),
        Some(Credentials::Token(t)) => RegistryAuth::Bearer(t.clone()),
    }
}

impl Puller {
    pub(crate) fn new(registries: Registries) -> Self {
        Self { registries, anonymous: Default::default() }
    }

    /// A client for pulling `r`. Registries on loopback are reached over plain HTTP, as Docker does.
    pub(crate) fn session(&self, r: &Reference, creds: Option<&Credentials>) -> Session {
        if creds.is_some() {
            return self.new_session(r);
        }
        let registry = r.resolve_registry().to_string();
        let mut clients = self.anonymous.lock().unwrap_or_else(|e| e.into_inner());
        let s = clients.entry(registry).or_insert_with(|| self.new_session(r).0);
        Session(s.clone())
    }

    fn new_session(&self, r: &Reference) -> Session {
        let mut insecure = self.registries.insecure.clone();
        let registry = r.resolve_registry().to_string();
        if is_loopback(&registry) {
            insecure.push(registry);
        }
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure),
            platform_resolver: Some(Box::new(linux_amd64_resolver)),
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        };
        Session(Client::new(config))
    }

    /// The registry reference for `image` (docker.io and its `library/` rule by default), through the mirror
    /// when one is set for docker.io.
    pub(crate) fn reference(&self, image: &str) -> Result<Reference, OciError> {
        let mut r: Reference =
            image.parse().map_err(|e| OciError::Reference(format!("'{image}' is not an image reference: {e}")))?;
        if let Some(allowed) = &self.registries.allowed
            && !allowed.iter().any(|a| a == r.registry())
        {
            return Err(OciError::Reference(format!(
                "registry '{}' is not allowed here (HYPERFLEET_ALLOWED_REGISTRIES)",
                r.registry()
            )));
        }
        if let Some(m) = &self.registries.mirror
            && r.registry() == "docker.io"
        {
            r.set_mirror_registry(m.clone());
        }
        Ok(r)
    }
}

impl Session {
    /// The manifest (resolved to linux/amd64) and config of `image`: one or two small requests, so a create
    /// learns at once that an image or a credential is wrong.
    pub(crate) async fn resolve(
        &self,
        r: &Reference,
        creds: Option<&Credentials>,
    ) -> Result<(String, oci_client::manifest::OciImageManifest, ImageConfig), OciError> {
        let (manifest, digest, config) =
            self.0.pull_manifest_and_config(r, &auth(creds)).await.map_err(|e| classify(r, e))?;
        let config = ImageConfig::parse(&config)?;
        Ok((digest, manifest, config))
    }

    /// Gets ready to download `manifest`'s layers: learns the credentials (the manifest may have come from
    /// another session; blob requests then get a token or basic auth the same way) and sets the pull's total.
    pub(crate) async fn prepare(
        &self,
        r: &Reference,
        manifest: &oci_client::manifest::OciImageManifest,
        progress: &Progress,
        creds: Option<&Credentials>,
    ) {
        self.0.store_auth_if_needed(r.resolve_registry(), &auth(creds)).await;
        let total: u64 = manifest.layers.iter().map(|l| u64::try_from(l.size).unwrap_or(0)).sum();
        progress.total.store(total, Ordering::Relaxed);
    }

    /// Downloads one layer into `blobs` (named by its digest) unless it is there already, counting bytes in
    /// `progress`. Several run at once: each writes its own temporary file, renamed only once verified.
    pub(crate) async fn layer(
        &self,
        r: &Reference,
        layer: &oci_client::manifest::OciDescriptor,
        blobs: &Path,
        progress: &Arc<Progress>,
    ) -> Result<PathBuf, OciError> {
        let path = blob_path(blobs, &layer.digest)?;
        if path.exists() {
            progress.done.fetch_add(u64::try_from(layer.size).unwrap_or(0), Ordering::Relaxed);
            return Ok(path);
        }
        // Unique per download: two pulls (or one manifest naming a layer twice) may fetch the same blob at once.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let partial = path.with_extension(format!("partial-{}-{n}", std::process::id()));
        let file = tokio::fs::File::create(&partial).await.map_err(|e| OciError::io("create", &partial, e))?;
        let mut writer = Counting { inner: file, progress: progress.clone() };
        // oci-client checks the bytes against the layer's digest (and the registry's header) at the end. It
        // does not flush: a tokio file may still hold the last write, so flush before the file is renamed
        // and read.
        let pulled = self.0.pull_blob(r, layer, &mut writer).await.map_err(|e| classify(r, e));
        let pulled = match pulled {
            Ok(()) => writer.inner.flush().await.map_err(|e| OciError::io("write", &partial, e)),
            Err(e) => Err(e),
        };
        drop(writer);
        if let Err(e) = pulled {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
        tokio::fs::rename(&partial, &path).await.map_err(|e| OciError::io("rename", &path, e))?;
        Ok(path)
    }
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `blobs/sha256/<hex>` for a digest, refusing anything that is not `algorithm:hex`.
pub(crate) fn blob_path(blobs: &Path, digest: &str) -> Result<PathBuf, OciError> {
    let (alg, hex) = digest.split_once(':').ok_or_else(|| OciError::Registry(format!("bad digest '{digest}'")))?;
    let ok = matches!(alg, "sha256" | "sha512") && !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit());
    if !ok {
        return Err(OciError::Registry(format!("bad digest '{digest}'")));
    }
    Ok(blobs.join(format!("{alg}-{}", hex.to_ascii_lowercase())))
}

fn classify(r: &Reference, e: OciDistributionError) -> OciError {
    let image = r.whole();
    match e {
        OciDistributionError::ImageManifestNotFoundError(m) => {
            OciError::NotFound(format!("image '{image}' not found: {m}"))
        }
        OciDistributionError::AuthenticationFailure(m) => {
            OciError::Auth(format!("the registry refused the credentials for '{image}': {m}"))
        }
        OciDistributionError::UnauthorizedError { .. } => {
            OciError::Auth(format!("the registry refused access to '{image}' (unauthorized)"))
        }
        OciDistributionError::RegistryError { envelope, .. } => {
            let reason: Vec<String> = envelope.errors.iter().map(|e| format!("{:?}: {}", e.code, e.message)).collect();
            let reason = reason.join("; ");
            let first = envelope.errors.first().map(|e| &e.code);
            match first {
                Some(OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::NotFound) => {
                    OciError::NotFound(format!("image '{image}' not found: {reason}"))
                }
                Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => {
                    OciError::Auth(format!("the registry refused access to '{image}': {reason}"))
                }
                _ => OciError::Registry(format!("registry error for '{image}': {reason}")),
            }
        }
        OciDistributionError::ServerError { code: 401 | 403, message, .. } => {
            OciError::Auth(format!("the registry refused access to '{image}': {message}"))
        }
        OciDistributionError::ServerError { code: 404, message, .. } => {
            OciError::NotFound(format!("image '{image}' not found: {message}"))
        }
        OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
            OciError::Unreachable(format!("registry {} unreachable: {e}", r.resolve_registry()))
        }
        OciDistributionError::IoError(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
            OciError::NoSpace(format!("writing a layer of '{image}': {e}"))
        }
        OciDistributionError::DigestError(e) => OciError::Registry(format!("'{image}': {e}")),
        other => OciError::Registry(format!("pulling '{image}': {other}")),
    }
}

/// A file writer that adds what it writes to a pull's progress.
struct Counting {
    inner: tokio::fs::File,
    progress: Arc<Progress>,
}

impl AsyncWrite for Counting {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.progress.done.fetch_add(u64::try_from(*n).unwrap_or(0), Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_recognised() {
        for r in ["localhost", "localhost:5000", "127.0.0.1:5000", "127.9.9.9", "[::1]:5000"] {
            assert!(is_loopback(r), "{r}");
        }
        for r in ["docker.io", "registry.example:5000", "10.0.0.1:5000", "localhost.example.com"] {
            assert!(!is_loopback(r), "{r}");
        }
    }

    #[test]
    fn references_follow_docker_rules_and_the_mirror() {
        let p = Puller::new(Registries { insecure: vec![], mirror: Some("mirror.test:5000".into()), allowed: None });
        let r = p.reference("alpine").unwrap();
        assert_eq!((r.registry(), r.repository(), r.tag()), ("docker.io", "library/alpine", Some("latest")));
        assert_eq!(r.resolve_registry(), "mirror.test:5000");
        let r = p.reference("registry.example:5000/team/app@sha256:0123456789012345678901234567890123456789012345678901234567890123").unwrap();
        assert_eq!(r.resolve_registry(), "registry.example:5000");
        assert!(r.digest().is_some());
        assert!(matches!(p.reference("Bad Ref!"), Err(OciError::Reference(_))));
        let only = Puller::new(Registries { allowed: Some(vec!["127.0.0.1:5000".into()]), ..Registries::default() });
        assert!(only.reference("127.0.0.1:5000/a:1").is_ok());
        assert!(matches!(only.reference("alpine"), Err(OciError::Reference(_))));
    }
}
