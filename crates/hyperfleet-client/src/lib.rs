//! Rust SDK for the Hyperfleet REST API: one method per endpoint, errors carrying the API's `code` and
//! `message`. The CLI and the end-to-end tests use it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), hyperfleet_client::Error> {
//! let hf = hyperfleet_client::Client::new("http://127.0.0.1:3000", Some("hf_...".into()));
//! let m = hf.create_machine(&hyperfleet_client::types::CreateMachine {
//!     name: Some("web".into()), vcpu_count: Some(1), mem_size_mib: Some(128), ..Default::default()
//! }).await?;
//! hf.start_machine(&m.id).await?;
//! let out = hf.exec(&m.id, &["uname", "-a"]).await?;
//! println!("{}", out.stdout);
//! # Ok(()) }
//! ```

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;

pub use hyperfleet_types as types;
use hyperfleet_types::*;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API answered with its error envelope.
    #[error("{status} {code}: {message}")]
    Api { status: u16, code: String, message: String },
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("unexpected response: {0}")]
    Decode(String),
}

impl Error {
    /// The API error code (`NOT_FOUND`, `TIMEOUT`, …), if the server sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } => Some(code),
            _ => None,
        }
    }
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Filter and page for [`Client::list_machines`].
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    pub status: Option<MachineStatus>,
    pub limit: Option<u32>,
    pub offset: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
}

impl Client {
    #[allow(
        clippy::expect_used,
        reason = "reqwest is built without TLS and without a custom resolver, the only settings whose set-up can fail"
    )]
    pub fn new(base_url: &str, api_key: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("a client without TLS always builds");
        Self { http, base: base_url.trim_end_matches('/').to_string(), api_key }
    }

    /// From `HYPERFLEET_URL` (default `http://127.0.0.1:3000`) and `HYPERFLEET_API_KEY`.
    pub fn from_env() -> Self {
        let url = std::env::var("HYPERFLEET_URL").unwrap_or_else(|_| "http://127.0.0.1:3000".into());
        Self::new(&url, std::env::var("HYPERFLEET_API_KEY").ok())
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn req(&self, method: Method, path: &str) -> RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    async fn check(resp: Response) -> Result<Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => Err(Error::Api { status: status.as_u16(), code: body.error.code, message: body.error.message }),
            Err(_) => Err(Error::Api { status: status.as_u16(), code: "HTTP_ERROR".into(), message: text }),
        }
    }

    async fn json<T: DeserializeOwned>(rb: RequestBuilder) -> Result<T> {
        let resp = Self::check(rb.send().await?).await?;
        let bytes = resp.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode(format!("{e}: {}", String::from_utf8_lossy(&bytes))))
    }

    async fn empty(rb: RequestBuilder) -> Result<()> {
        Self::check(rb.send().await?).await.map(|_| ())
    }

    pub async fn health(&self) -> Result<Health> {
        Self::json(self.req(Method::GET, "/health")).await
    }

    pub async fn create_machine(&self, req: &CreateMachine) -> Result<Machine> {
        Self::json(self.req(Method::POST, "/machines").json(req)).await
    }

    pub async fn list_machines(&self, opts: &ListOptions) -> Result<MachineList> {
        let mut q: Vec<(&str, String)> = Vec::new();
        if let Some(s) = opts.status {
            q.push(("status", s.as_str().to_string()));
        }
        if let Some(l) = opts.limit {
            q.push(("limit", l.to_string()));
        }
        if let Some(o) = opts.offset {
            q.push(("offset", o.to_string()));
        }
        Self::json(self.req(Method::GET, "/machines").query(&q)).await
    }

    pub async fn get_machine(&self, id: &str) -> Result<Machine> {
        Self::json(self.req(Method::GET, &format!("/machines/{id}"))).await
    }

    pub async fn update_machine(&self, id: &str, req: &UpdateMachine) -> Result<Machine> {
        Self::json(self.req(Method::PATCH, &format!("/machines/{id}")).json(req)).await
    }

    pub async fn delete_machine(&self, id: &str, force: bool) -> Result<()> {
        let q: &[(&str, &str)] = if force { &[("force", "true")] } else { &[] };
        Self::empty(self.req(Method::DELETE, &format!("/machines/{id}")).query(q)).await
    }

    pub async fn start_machine(&self, id: &str) -> Result<Machine> {
        Self::json(self.req(Method::POST, &format!("/machines/{id}/start"))).await
    }

    pub async fn stop_machine(&self, id: &str) -> Result<Machine> {
        Self::json(self.req(Method::POST, &format!("/machines/{id}/stop"))).await
    }

    pub async fn restart_machine(&self, id: &str) -> Result<Machine> {
        Self::json(self.req(Method::POST, &format!("/machines/{id}/restart"))).await
    }

    pub async fn pause_machine(&self, id: &str) -> Result<Machine> {
        Self::json(self.req(Method::POST, &format!("/machines/{id}/pause"))).await
    }

    pub async fn resume_machine(&self, id: &str) -> Result<Machine> {
        Self::json(self.req(Method::POST, &format!("/machines/{id}/resume"))).await
    }

    /// Long-polls until the machine reaches `status` (server caps `timeout_secs` at 30).
    pub async fn wait_machine(&self, id: &str, status: MachineStatus, timeout_secs: u64) -> Result<Machine> {
        let q = [("status", status.as_str().to_string()), ("timeout", timeout_secs.to_string())];
        Self::json(self.req(Method::GET, &format!("/machines/{id}/wait")).query(&q)).await
    }

    pub async fn machine_logs(&self, id: &str, lines: usize) -> Result<MachineLogs> {
        Self::json(self.req(Method::GET, &format!("/machines/{id}/logs")).query(&[("lines", lines)])).await
    }

    pub async fn machine_network(&self, id: &str) -> Result<NetworkReport> {
        Self::json(self.req(Method::GET, &format!("/machines/{id}/network"))).await
    }

    /// Runs `command` with the default timeout.
    pub async fn exec(&self, id: &str, command: &[&str]) -> Result<ExecResult> {
        let req = ExecRequest {
            command: CommandArgs(command.iter().map(|s| s.to_string()).collect()),
            timeout: None,
            env: None,
            cwd: None,
            stdin: None,
        };
        self.exec_with(id, &req).await
    }

    pub async fn exec_with(&self, id: &str, req: &ExecRequest) -> Result<ExecResult> {
        Self::json(self.req(Method::POST, &format!("/machines/{id}/exec")).json(req)).await
    }

    /// Streams a command's output as it comes (NDJSON events), ending with `Exit` or `Error`.
    pub async fn exec_stream(
        &self,
        id: &str,
        req: &ExecRequest,
    ) -> Result<impl Stream<Item = Result<ExecEvent>> + use<>> {
        let resp =
            Self::check(self.req(Method::POST, &format!("/machines/{id}/exec/stream")).json(req).send().await?).await?;
        let bytes = resp.bytes_stream().map_err(Error::from);
        Ok(ndjson_lines(bytes))
    }

    pub async fn upload_file(&self, id: &str, path: &str, content: &[u8], mode: Option<u32>) -> Result<FileWritten> {
        use base64::Engine;
        let body = FileUpload {
            path: path.to_string(),
            content: base64::engine::general_purpose::STANDARD.encode(content),
            mode,
        };
        Self::json(self.req(Method::POST, &format!("/machines/{id}/files")).json(&body)).await
    }

    /// Uploads a raw body (streamed: any `reqwest::Body`, e.g. from a file stream).
    pub async fn upload_stream(
        &self,
        id: &str,
        path: &str,
        body: impl Into<reqwest::Body>,
        mode: Option<u32>,
    ) -> Result<FileWritten> {
        let mut q = vec![("path", path.to_string())];
        if let Some(m) = mode {
            q.push(("mode", format!("{m:o}")));
        }
        let rb = self
            .req(Method::POST, &format!("/machines/{id}/files"))
            .query(&q)
            .header("content-type", "application/octet-stream")
            .body(body);
        Self::json(rb).await
    }

    pub async fn download_file(&self, id: &str, path: &str) -> Result<Bytes> {
        let resp =
            Self::check(self.req(Method::GET, &format!("/machines/{id}/files")).query(&[("path", path)]).send().await?)
                .await?;
        Ok(resp.bytes().await?)
    }

    pub async fn download_stream(&self, id: &str, path: &str) -> Result<impl Stream<Item = Result<Bytes>> + use<>> {
        let resp =
            Self::check(self.req(Method::GET, &format!("/machines/{id}/files")).query(&[("path", path)]).send().await?)
                .await?;
        Ok(resp.bytes_stream().map_err(Error::from))
    }

    pub async fn stat_file(&self, id: &str, path: &str) -> Result<FileStat> {
        Self::json(self.req(Method::GET, &format!("/machines/{id}/files/stat")).query(&[("path", path)])).await
    }

    /// One page of a directory; pass the listing's `next_after` as `after` for the next one.
    pub async fn list_dir(&self, id: &str, path: &str, after: Option<&str>, limit: Option<u32>) -> Result<DirListing> {
        let mut q = vec![("path", path.to_string())];
        if let Some(a) = after {
            q.push(("after", a.to_string()));
        }
        if let Some(l) = limit {
            q.push(("limit", l.to_string()));
        }
        Self::json(self.req(Method::GET, &format!("/machines/{id}/files/list")).query(&q)).await
    }

    pub async fn make_dir(&self, id: &str, req: &MakeDir) -> Result<FileStat> {
        Self::json(self.req(Method::POST, &format!("/machines/{id}/files/mkdir")).json(req)).await
    }

    pub async fn delete_file(&self, id: &str, path: &str, recursive: bool) -> Result<()> {
        let q = [("path", path.to_string()), ("recursive", recursive.to_string())];
        Self::empty(self.req(Method::DELETE, &format!("/machines/{id}/files")).query(&q)).await
    }

    pub async fn list_images(&self) -> Result<hyperfleet_types::ImageList> {
        Self::json(self.req(Method::GET, "/images")).await
    }

    /// Pulls an image into the daemon's cache; returns once it is there.
    pub async fn pull_image(&self, req: &hyperfleet_types::PullImage) -> Result<hyperfleet_types::ImageInfo> {
        Self::json(self.req(Method::POST, "/images/pull").json(req)).await
    }

    pub async fn delete_image(&self, digest: &str) -> Result<()> {
        Self::empty(self.req(Method::DELETE, &format!("/images/{digest}"))).await
    }

    pub async fn create_api_key(&self, req: &CreateApiKey) -> Result<CreatedApiKey> {
        Self::json(self.req(Method::POST, "/api-keys").json(req)).await
    }

    pub async fn list_api_keys(&self) -> Result<ApiKeyList> {
        Self::json(self.req(Method::GET, "/api-keys")).await
    }

    pub async fn revoke_api_key(&self, id: &str) -> Result<()> {
        Self::empty(self.req(Method::DELETE, &format!("/api-keys/{id}"))).await
    }

    /// A request to any path, for what the typed methods do not cover (tests of raw status codes).
    pub fn raw(&self, method: Method, path: &str) -> RequestBuilder {
        self.req(method, path)
    }
}

/// Splits a byte stream into NDJSON events.
fn ndjson_lines(bytes: impl Stream<Item = Result<Bytes>> + Unpin) -> impl Stream<Item = Result<ExecEvent>> {
    futures::stream::unfold((bytes, Vec::<u8>::new(), false), |(mut bytes, mut buf, done)| async move {
        loop {
            if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let ev = serde_json::from_slice::<ExecEvent>(&line[..line.len() - 1])
                    .map_err(|e| Error::Decode(format!("{e}: {}", String::from_utf8_lossy(&line))));
                return Some((ev, (bytes, buf, done)));
            }
            if done {
                return None;
            }
            match bytes.next().await {
                Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                Some(Err(e)) => return Some((Err(e), (bytes, buf, true))),
                None => {
                    if buf.is_empty() {
                        return None;
                    }
                    buf.push(b'\n');
                    return Some((Err(Error::Decode("stream ended mid-line".into())), (bytes, Vec::new(), true)));
                }
            }
        }
    })
}

/// Re-exported for [`Client::raw`] users.
pub use reqwest::{Method as HttpMethod, StatusCode as HttpStatus};
