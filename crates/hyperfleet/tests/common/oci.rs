//! A real registry on loopback for tests and benchmarks (Debian's `docker-registry`, plain HTTP, optionally
//! with htpasswd basic auth), and images built by the test's own code and pushed through the registry's
//! HTTP API: tar layers (gzip, zstd), OCI or Docker manifests, multi-arch indexes.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

pub struct Registry {
    pub dir: tempfile::TempDir,
    pub addr: String,
    /// How the test itself pushes (the registry's own credentials).
    pub auth: Option<Push>,
    child: Child,
    http: reqwest::Client,
}

pub enum Push {
    Basic(String, String),
    /// A push token minted for each repository pushed to.
    Tokens(Signer),
}

/// The `service` and `issuer` a token-auth registry and its token server agree on.
pub const SERVICE: &str = "hyperfleet-test-registry";
pub const ISSUER: &str = "hyperfleet-test-issuer";

/// A registry token server on loopback (the Docker token protocol: `GET /token?service=…&scope=…`, basic
/// auth for a known user, an anonymous token with no access otherwise), signing RS256 JWTs with a key made by
/// `openssl` for this test; the JWT's `x5c` header carries its self-signed certificate, which the registry
/// trusts through its `rootcertbundle`.
pub struct TokenServer {
    pub addr: String,
    pub cert: PathBuf,
    dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TokenServer {
    pub async fn start(user: &str, password: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
        let out = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=hyperfleet-test-tokens",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl (Debian package openssl)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let der = Command::new("openssl").args(["x509", "-outform", "DER", "-in"]).arg(&cert).output().unwrap();
        assert!(der.status.success());
        std::fs::write(dir.path().join("cert.der"), &der.stdout).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let signer = Signer { dir: dir.path().to_path_buf() };
        let (user, password) = (user.to_string(), password.to_string());
        let app = axum::Router::new().route(
            "/token",
            axum::routing::get(
                move |headers: axum::http::HeaderMap,
                      q: axum::extract::Query<std::collections::HashMap<String, String>>| {
                    let (signer, user, password) = (signer.clone(), user.clone(), password.clone());
                    async move { token_endpoint(&signer, &user, &password, &headers, &q) }
                },
            ),
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, cert, dir, task }
    }

    /// A token for `sub` granting `actions` on each repository named (`*` for all).
    pub fn mint(&self, sub: &str, access: &[(&str, &str)]) -> String {
        Signer { dir: self.dir.path().to_path_buf() }.mint(sub, access)
    }
}

#[derive(Clone)]
pub struct Signer {
    dir: PathBuf,
}

impl Signer {
    fn mint(&self, sub: &str, access: &[(&str, &str)]) -> String {
        use base64::Engine;
        let (url, std) = (base64::engine::general_purpose::URL_SAFE_NO_PAD, base64::engine::general_purpose::STANDARD);
        let der = std::fs::read(self.dir.join("cert.der")).unwrap();
        let header = json!({"typ": "JWT", "alg": "RS256", "x5c": [std.encode(der)]});
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let access: Vec<Value> = access
            .iter()
            .map(|(name, actions)| json!({"type": "repository", "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
            .collect();
        let claims = json!({
            "iss": ISSUER, "sub": sub, "aud": SERVICE, "exp": now + 600, "nbf": now - 10, "iat": now,
            "jti": format!("{sub}-{now}-{}", access.len()), "access": access,
        });
        let input = format!("{}.{}", url.encode(header.to_string()), url.encode(claims.to_string()));
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(self.dir.join("key.pem"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        format!("{input}.{}", url.encode(out.stdout))
    }
}

/// `GET /token?service=…&scope=repository:NAME:ACTIONS`: 401 for wrong credentials, a token with the asked
/// access for the known user, an anonymous token with none for no credentials at all.
fn token_endpoint(
    signer: &Signer,
    user: &str,
    password: &str,
    headers: &axum::http::HeaderMap,
    q: &std::collections::HashMap<String, String>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use base64::Engine;
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let sub = match given {
        None => "",
        Some(pair) if pair == format!("{user}:{password}") => user,
        Some(_) => {
            return (axum::http::StatusCode::UNAUTHORIZED, axum::Json(json!({"details": "bad credentials"})))
                .into_response();
        }
    };
    let mut access = Vec::new();
    if !sub.is_empty()
        && let Some(scope) = q.get("scope")
        && let Some(rest) = scope.strip_prefix("repository:")
        && let Some((name, actions)) = rest.rsplit_once(':')
    {
        access.push((name.to_string(), actions.to_string()));
    }
    let access: Vec<(&str, &str)> = access.iter().map(|(n, a)| (n.as_str(), a.as_str())).collect();
    let token = signer.mint(sub, &access);
    axum::Json(json!({"token": token, "access_token": token, "expires_in": 600})).into_response()
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Our own child, by its PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Starts `docker-registry` on a free loopback port; with `auth`, htpasswd (bcrypt) basic auth.
    pub async fn start(auth: Option<(&str, &str)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut auth_block = String::new();
        if let Some((u, p)) = auth {
            let out = Command::new("htpasswd").args(["-Bbn", u, p]).output().expect("htpasswd (apache2-utils)");
            assert!(out.status.success());
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, &out.stdout).unwrap();
            auth_block = format!("auth:\n  htpasswd:\n    realm: hyperfleet-test\n    path: {}\n", file.display());
        }
        let push = auth.map(|(u, p)| Push::Basic(u.to_string(), p.to_string()));
        Self::start_with(dir, auth_block, push).await
    }

    /// Starts `docker-registry` as a pull-through cache of `upstream` (a mirror, as for docker.io).
    pub async fn start_mirror(upstream: &Registry) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let block = format!("proxy:\n  remoteurl: http://{}\n", upstream.addr);
        Self::start_with(dir, block, None).await
    }

    /// Starts `docker-registry` with token auth: it trusts the JWTs `tokens` signs (its certificate is the
    /// registry's `rootcertbundle`) and sends clients to `tokens` for them.
    pub async fn start_with_tokens(tokens: &TokenServer) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let auth_block = format!(
            "auth:\n  token:\n    realm: http://{}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            tokens.addr,
            tokens.cert.display()
        );
        let push = Push::Tokens(Signer { dir: tokens.dir.path().to_path_buf() });
        Self::start_with(dir, auth_block, Some(push)).await
    }

    async fn start_with(dir: tempfile::TempDir, auth_block: String, push: Option<Push>) -> Self {
        let bin = ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("docker-registry is missing: apt-get install docker-registry (scripts/setup.sh installs it)");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{auth_block}",
            dir.path().join("data").display()
        );
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let http = reqwest::Client::new();
        let reg = Self { dir, addr, auth: push, child, http };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(r) = reg.http.get(format!("http://{}/v2/", reg.addr)).send().await
                && (r.status().is_success() || r.status().as_u16() == 401)
            {
                break;
            }
            assert!(Instant::now() < deadline, "registry did not come up: {}", reg.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        reg
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many times the registry answered a GET of this blob (its access log).
    pub fn blob_gets(&self, digest: &str) -> usize {
        self.log().lines().filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest} "))).count()
    }

    /// Like [`Self::blob_gets`], counting only the log after byte `mark` (`self.log().len()` earlier).
    pub fn blob_gets_since(&self, mark: usize, digest: &str) -> usize {
        let log = self.log();
        let tail = log.get(mark..).unwrap_or("");
        tail.lines().filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest} "))).count()
    }

    fn req(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url);
        match &self.auth {
            Some(Push::Basic(u, p)) => r.basic_auth(u, Some(p)),
            Some(Push::Tokens(signer)) => {
                let repo = url.split("/v2/").nth(1).unwrap_or("");
                let repo = repo.split("/blobs/").next().unwrap_or(repo);
                let repo = repo.split("/manifests/").next().unwrap_or(repo);
                r.bearer_auth(signer.mint("pusher", &[(repo, "pull,push")]))
            }
            None => r,
        }
    }

    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256(data);
        let r = self
            .req(reqwest::Method::POST, &format!("http://{}/v2/{repo}/blobs/uploads/", self.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202, "start upload: {}", r.text().await.unwrap());
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let loc = if loc.starts_with("http") { loc } else { format!("http://{}{loc}", self.addr) };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = self
            .req(reqwest::Method::PUT, &format!("{loc}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "put blob: {}", r.text().await.unwrap());
        digest
    }

    pub async fn push_manifest(&self, repo: &str, tag: &str, media_type: &str, body: &[u8]) -> String {
        let r = self
            .req(reqwest::Method::PUT, &format!("http://{}/v2/{repo}/manifests/{tag}", self.addr))
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "put manifest: {}", r.text().await.unwrap());
        sha256(body)
    }

    /// Pushes an image; returns (manifest digest, manifest size).
    pub async fn push(&self, repo: &str, tag: &str, image: &Image) -> (String, usize) {
        let docker = image.docker;
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for l in &image.layers {
            let d = self.push_blob(repo, &l.bytes).await;
            let mt = match (docker, l.compression) {
                (true, _) => "application/vnd.docker.image.rootfs.diff.tar.gzip",
                (false, Compression::Gzip) => "application/vnd.oci.image.layer.v1.tar+gzip",
                (false, Compression::Zstd) => "application/vnd.oci.image.layer.v1.tar+zstd",
                (false, Compression::None) => "application/vnd.oci.image.layer.v1.tar",
            };
            layers.push(json!({"mediaType": mt, "digest": d, "size": l.bytes.len()}));
            diff_ids.push(l.diff_id.clone());
        }
        let config = json!({
            "architecture": "amd64", "os": "linux",
            "config": image.config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = serde_json::to_vec(&config).unwrap();
        let config_digest = self.push_blob(repo, &config).await;
        let (mt, cmt) = if docker {
            ("application/vnd.docker.distribution.manifest.v2+json", "application/vnd.docker.container.image.v1+json")
        } else {
            ("application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.config.v1+json")
        };
        let manifest = json!({
            "schemaVersion": 2, "mediaType": mt,
            "config": {"mediaType": cmt, "digest": config_digest, "size": config.len()},
            "layers": layers,
        });
        let body = serde_json::to_vec(&manifest).unwrap();
        (self.push_manifest(repo, tag, mt, &body).await, body.len())
    }

    /// Pushes an OCI index of already pushed manifests: (digest, size, architecture).
    pub async fn push_index(&self, repo: &str, tag: &str, entries: &[(String, usize, &str)]) -> String {
        let manifests: Vec<Value> = entries
            .iter()
            .map(|(d, s, arch)| {
                json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": s,
                    "platform": {"architecture": arch, "os": "linux"},
                })
            })
            .collect();
        let body = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests,
        }))
        .unwrap();
        self.push_manifest(repo, tag, "application/vnd.oci.image.index.v1+json", &body).await
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

pub struct Layer {
    pub bytes: Vec<u8>,
    pub diff_id: String,
    pub compression: Compression,
}

pub struct Image {
    pub layers: Vec<Layer>,
    /// The config's `config` object (Entrypoint, Cmd, Env, WorkingDir, User).
    pub config: Value,
    /// A Docker v2 schema 2 manifest instead of an OCI one.
    pub docker: bool,
}

pub enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, Vec<u8>, u32),
    Owned(&'a str, Vec<u8>, u32, u64),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
}

/// A tar of `entries`, names written as given (a hostile `../` included).
pub fn tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        let (path, data): (&str, &[u8]) = match e {
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                (p, b"")
            }
            Entry::File(p, d, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                (p, d)
            }
            Entry::Owned(p, d, mode, uid) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*uid);
                (p, d)
            }
            Entry::Symlink(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_link_name(t).unwrap();
                (p, b"")
            }
            Entry::Hardlink(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_link_name(t).unwrap();
                (p, b"")
            }
        };
        h.set_size(data.len() as u64);
        let name = path.as_bytes();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

pub fn layer(tar: Vec<u8>, compression: Compression) -> Layer {
    let diff_id = sha256(&tar);
    let bytes = match compression {
        Compression::None => tar,
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&tar).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(&tar[..], 3).unwrap(),
    };
    Layer { bytes, diff_id, compression }
}

/// A busybox userland (Debian's static busybox): /bin/busybox, its applets as symlinks, /etc/passwd with
/// an `app` user (1000), /www/index.html.
pub fn busybox_layer(compression: Compression) -> Layer {
    let bb = std::fs::read("/bin/busybox").expect("busybox-static is installed");
    let mut entries = vec![
        Entry::Dir("bin/"),
        Entry::File("bin/busybox", bb, 0o755),
        Entry::Dir("etc/"),
        Entry::File(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n".to_vec(),
            0o644,
        ),
        Entry::File("etc/group", b"root:x:0:\napp:x:1000:\n".to_vec(), 0o644),
        Entry::Dir("www/"),
        Entry::File("www/index.html", b"<h1>hello from an image</h1>\n".to_vec(), 0o644),
        Entry::Dir("tmp/"),
    ];
    let applets = [
        "sh", "ls", "cat", "echo", "id", "httpd", "true", "false", "sleep", "ps", "pwd", "env", "stat", "readlink",
        "ip", "hostname", "nc", "kill",
    ];
    let links: Vec<String> = applets.iter().map(|a| format!("bin/{a}")).collect();
    for l in &links {
        entries.push(Entry::Symlink(l, "/bin/busybox"));
    }
    layer(tar(&entries), compression)
}

/// A free path under `dir` for files the tests compare against.
pub fn scratch(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// A plain-HTTP forward proxy on loopback that sends every request, whatever host it names, to `upstream`: a
/// test reaches a registry there by a name that is not loopback (and resolves nowhere) through `HTTP_PROXY`.
/// `CONNECT` (HTTPS through `HTTPS_PROXY`) is refused. Records the hosts it was asked for.
pub struct NameProxy {
    pub addr: String,
    hosts: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl NameProxy {
    pub async fn start(upstream: &str) -> Self {
        use axum::response::IntoResponse;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let hosts = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (upstream, seen) = (upstream.to_string(), hosts.clone());
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let (upstream, seen, client) = (upstream.clone(), seen.clone(), client.clone());
            async move {
                let host = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
                seen.lock().unwrap().push(format!("{} {host}", req.method()));
                if req.method() == axum::http::Method::CONNECT {
                    return (axum::http::StatusCode::FORBIDDEN, "no HTTPS here").into_response();
                }
                let pq = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
                let mut fwd = client.request(req.method().clone(), format!("http://{upstream}{pq}"));
                for (k, v) in req.headers() {
                    if k != axum::http::header::HOST {
                        fwd = fwd.header(k, v);
                    }
                }
                let body = axum::body::to_bytes(req.into_body(), usize::MAX).await.unwrap();
                let resp = fwd.body(body).send().await.unwrap();
                let mut out = axum::response::Response::builder().status(resp.status());
                for (k, v) in resp.headers() {
                    out = out.header(k, v);
                }
                out.body(axum::body::Body::from(resp.bytes().await.unwrap())).unwrap()
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, hosts, task }
    }

    /// What it was asked for: `METHOD host[:port]` per request.
    pub fn asked(&self) -> Vec<String> {
        self.hosts.lock().unwrap().clone()
    }
}

impl Drop for NameProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
