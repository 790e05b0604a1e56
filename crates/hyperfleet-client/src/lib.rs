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
    #[error("terminal connection: {0}")]
    WebSocket(String),
}

/// What [`Client::pty`] opens.
#[derive(Debug, Clone)]
pub struct PtyOptions {
    /// Empty: the image's shell.
    pub command: Vec<String>,
    pub cols: u16,
    pub rows: u16,
    pub cwd: Option<String>,
}

impl Default for PtyOptions {
    fn default() -> Self {
        Self { command: vec![], cols: 80, rows: 24, cwd: None }
    }
}

/// A terminal's WebSocket.
pub type PtyStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
/// The messages of a [`PtyStream`].
pub use tokio_tungstenite::tungstenite::Message as PtyMessage;

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
    /// Label selector: `team=ml,env!=prod,gpu,!spot`.
    pub label: Option<String>,
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
        if let Some(l) = &opts.label {
            q.push(("label", l.clone()));
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

    /// The machines `id` created from inside (`GET /machines/{id}/children`), oldest first.
    pub async fn machine_children(&self, id: &str) -> Result<MachineList> {
        Self::json(self.req(Method::GET, &format!("/machines/{id}/children"))).await
    }

    pub async fn update_machine(&self, id: &str, req: &UpdateMachine) -> Result<Machine> {
        Self::json(self.req(Method::PATCH, &format!("/machines/{id}")).json(req)).await
    }

    pub async fn delete_machine(&self, id: &str, force: bool) -> Result<()> {
        let q: &[(&str, &str)] = if force { &[("force", "true")] } else { &[] };
        Self::empty(self.req(Method::DELETE, &format!("/machines/{id}")).query(q)).await
    }

    /// Activity now: the idle clock starts again, and a machine with `ttl_seconds` expires that long from now.
    pub async fn keepalive(&self, id: &str) -> Result<Machine> {
        Self::json(self.req(Method::POST, &format!("/machines/{id}/keepalive"))).await
    }

    /// Opens a terminal in the machine (`GET /machines/{id}/pty`): send keystrokes as binary messages and
    /// `{"type":"resize","cols","rows"}` as text; output arrives as binary messages, the end as
    /// `{"type":"exit","exit_code"}`.
    pub async fn pty(&self, id: &str, opts: &PtyOptions) -> Result<PtyStream> {
        let mut q: Vec<(&str, String)> = opts.command.iter().map(|a| ("command", a.clone())).collect();
        q.push(("cols", opts.cols.to_string()));
        q.push(("rows", opts.rows.to_string()));
        if let Some(c) = &opts.cwd {
            q.push(("cwd", c.clone()));
        }
        let base = self.base.replacen("http://", "ws://", 1).replacen("https://", "wss://", 1);
        let mut url = reqwest::Url::parse(&format!("{base}/machines/{id}/pty"))
            .map_err(|e| Error::Decode(format!("terminal URL: {e}")))?;
        url.query_pairs_mut().extend_pairs(q.iter().map(|(k, v)| (*k, v.as_str())));
        let url = url.to_string();
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = url.into_client_request().map_err(|e| Error::Decode(format!("terminal URL: {e}")))?;
        if let Some(k) = &self.api_key {
            let v =
                format!("Bearer {k}").parse().map_err(|_| Error::Decode("the API key is not a header value".into()))?;
            request.headers_mut().insert("authorization", v);
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let text = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
                Err(match serde_json::from_str::<ErrorBody>(&text) {
                    Ok(b) => Error::Api { status, code: b.error.code, message: b.error.message },
                    Err(_) => Error::Api { status, code: "HTTP_ERROR".into(), message: text },
                })
            }
            Err(e) => Err(Error::WebSocket(e.to_string())),
        }
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

    /// What the machine uses now (CPU, memory, disk, network, uptime).
    pub async fn machine_stats(&self, id: &str) -> Result<MachineStats> {
        Self::json(self.req(Method::GET, &format!("/machines/{id}/stats"))).await
    }

    /// Machine events as they happen (`GET /events`, Server-Sent Events): only `machine`'s (id or name) and
    /// only `types` when given; after `last_event_id` when given (the stored events since come first).
    pub async fn events(
        &self,
        machine: Option<&str>,
        types: &[EventKind],
        last_event_id: Option<u64>,
    ) -> Result<impl Stream<Item = Result<Event>> + use<>> {
        use eventsource_stream::Eventsource;
        let mut q = vec![];
        if let Some(m) = machine {
            q.push(("machine", m.to_string()));
        }
        if !types.is_empty() {
            q.push(("type", types.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(",")));
        }
        let mut rb = self.req(Method::GET, "/events").query(&q);
        if let Some(id) = last_event_id {
            rb = rb.header("last-event-id", id.to_string());
        }
        let resp = Self::check(rb.send().await?).await?;
        Ok(resp.bytes_stream().eventsource().filter_map(|e| async move {
            match e {
                Ok(e) if e.event == "error" => Some(Err(Error::Decode(format!("event stream: {}", e.data)))),
                Ok(e) => Some(
                    serde_json::from_str::<Event>(&e.data).map_err(|err| Error::Decode(format!("{err}: {}", e.data))),
                ),
                Err(e) => Some(Err(Error::Decode(format!("event stream: {e}")))),
            }
        }))
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

    pub async fn create_volume(&self, req: &CreateVolume) -> Result<Volume> {
        Self::json(self.req(Method::POST, "/volumes").json(req)).await
    }

    pub async fn list_volumes(&self) -> Result<VolumeList> {
        Self::json(self.req(Method::GET, "/volumes")).await
    }

    pub async fn get_volume(&self, id: &str) -> Result<Volume> {
        Self::json(self.req(Method::GET, &format!("/volumes/{id}"))).await
    }

    pub async fn resize_volume(&self, id: &str, req: &ResizeVolume) -> Result<Volume> {
        Self::json(self.req(Method::POST, &format!("/volumes/{id}/resize")).json(req)).await
    }

    pub async fn clone_volume(&self, id: &str, req: &CloneVolume) -> Result<Volume> {
        Self::json(self.req(Method::POST, &format!("/volumes/{id}/clone")).json(req)).await
    }

    pub async fn delete_volume(&self, id: &str) -> Result<()> {
        Self::empty(self.req(Method::DELETE, &format!("/volumes/{id}"))).await
    }

    pub async fn create_webhook(&self, req: &CreateWebhook) -> Result<Webhook> {
        Self::json(self.req(Method::POST, "/webhooks").json(req)).await
    }

    /// The fleet's nodes, by name.
    pub async fn list_nodes(&self) -> Result<NodeList> {
        Self::json(self.req(Method::GET, "/nodes")).await
    }

    pub async fn get_node(&self, name: &str) -> Result<Node> {
        Self::json(self.req(Method::GET, &format!("/nodes/{name}"))).await
    }

    /// Gives node `name` no new machines (scope `nodes:admin`); its machines keep running.
    pub async fn drain_node(&self, name: &str) -> Result<Node> {
        Self::json(self.req(Method::POST, &format!("/nodes/{name}/drain"))).await
    }

    pub async fn undrain_node(&self, name: &str) -> Result<Node> {
        Self::json(self.req(Method::POST, &format!("/nodes/{name}/undrain"))).await
    }

    pub async fn list_webhooks(&self) -> Result<WebhookList> {
        Self::json(self.req(Method::GET, "/webhooks")).await
    }

    pub async fn get_webhook(&self, id: &str) -> Result<Webhook> {
        Self::json(self.req(Method::GET, &format!("/webhooks/{id}"))).await
    }

    pub async fn delete_webhook(&self, id: &str) -> Result<()> {
        Self::empty(self.req(Method::DELETE, &format!("/webhooks/{id}"))).await
    }

    /// One page of a webhook's deliveries, most recent first; pass the page's `next_before` as `before`.
    pub async fn webhook_deliveries(
        &self,
        id: &str,
        before: Option<u64>,
        limit: Option<u32>,
    ) -> Result<WebhookDeliveryList> {
        let mut q = vec![];
        if let Some(b) = before {
            q.push(("before", b.to_string()));
        }
        if let Some(l) = limit {
            q.push(("limit", l.to_string()));
        }
        Self::json(self.req(Method::GET, &format!("/webhooks/{id}/deliveries")).query(&q)).await
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
