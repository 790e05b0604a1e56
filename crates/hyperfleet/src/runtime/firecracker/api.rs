//! A client for Firecracker's REST API on its unix socket (HTTP/1.1 over hyper, one connection per call).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

use crate::runtime::RuntimeError;

#[derive(Debug, Clone)]
pub struct FirecrackerApi {
    socket: PathBuf,
}

impl FirecrackerApi {
    pub fn new(socket: &Path) -> Self {
        Self { socket: socket.to_path_buf() }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Bytes), RuntimeError> {
        let io_err = |e: &dyn std::fmt::Display| RuntimeError::FirecrackerApi {
            request: format!("{} {path}", method.as_str()),
            message: e.to_string(),
        };
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| io_err(&e))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| io_err(&e))?;
        tokio::spawn(conn);
        let body = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
        let req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("host", "localhost")
            .header("accept", "application/json")
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| io_err(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| io_err(&e))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| io_err(&e))?.to_bytes();
        Ok((status, bytes))
    }

    async fn expect_ok(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Bytes, RuntimeError> {
        let (status, bytes) = self.call(method.clone(), path, body).await?;
        if status.is_success() {
            return Ok(bytes);
        }
        // Firecracker explains refusals as {"fault_message": "..."}.
        let message = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("fault_message").and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        Err(RuntimeError::Firecracker {
            action: format!("{} {path}", method.as_str()),
            status: status.as_u16(),
            message,
        })
    }

    pub async fn put(&self, path: &str, body: &Value) -> Result<(), RuntimeError> {
        self.expect_ok(Method::PUT, path, Some(body)).await.map(|_| ())
    }

    pub async fn patch(&self, path: &str, body: &Value) -> Result<(), RuntimeError> {
        self.expect_ok(Method::PATCH, path, Some(body)).await.map(|_| ())
    }

    pub async fn get(&self, path: &str) -> Result<Value, RuntimeError> {
        let bytes = self.expect_ok(Method::GET, path, None).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| RuntimeError::FirecrackerApi { request: format!("GET {path}"), message: e.to_string() })
    }
}
