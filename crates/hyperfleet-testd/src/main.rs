//! hyperfleet-testd PORT: a small HTTP server the end-to-end tests upload into a guest and start with exec,
//! to check the reverse proxy from the guest's side. Routes:
//! - `GET /headers` → the request's method, path, query and headers as JSON
//! - `POST /echo` → the request body, streamed back
//! - `GET /bytes?n=N` → N bytes of a fixed pattern (byte i is `i * 7 % 251`), streamed
//! - `GET /ws` → WebSocket echo

use std::convert::Infallible;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

type Body = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn status(code: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = code;
    r
}

fn pattern(n: u64) -> Body {
    const CHUNK: u64 = 64 * 1024;
    let stream = futures::stream::unfold(0u64, move |off| async move {
        if off >= n {
            return None;
        }
        let len = CHUNK.min(n - off);
        let chunk: Vec<u8> = (off..off + len).map(|i| (i * 7 % 251) as u8).collect();
        Some((Ok::<_, hyper::Error>(Frame::data(Bytes::from(chunk))), off + len))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let resp = match (req.method().as_str(), path.as_str()) {
        ("GET", "/headers") => {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_str().unwrap_or("").to_string())))
                .collect();
            let body = serde_json::json!({
                "method": req.method().as_str(),
                "path": path,
                "query": req.uri().query().unwrap_or(""),
                "headers": headers,
            });
            Response::new(full(body.to_string()))
        }
        ("POST", "/echo") => Response::new(req.into_body().boxed()),
        ("GET", "/bytes") => {
            let n = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("n=")))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let mut r = Response::new(pattern(n));
            r.headers_mut().insert("content-length", n.into());
            r
        }
        ("GET", "/ws") => match req.headers().get("sec-websocket-key").map(|k| derive_accept_key(k.as_bytes())) {
            Some(accept) => {
                let upgrade = hyper::upgrade::on(req);
                tokio::spawn(async move {
                    let Ok(upgraded) = upgrade.await else { return };
                    let mut ws =
                        tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                            .await;
                    while let Some(Ok(msg)) = ws.next().await {
                        if msg.is_close() || ws.send(msg).await.is_err() {
                            break;
                        }
                    }
                });
                // The accept key is base64, always a valid header value.
                let Ok(accept) = HeaderValue::from_str(&accept) else {
                    return Ok(status(StatusCode::INTERNAL_SERVER_ERROR, "bad accept key"));
                };
                let mut r = status(StatusCode::SWITCHING_PROTOCOLS, "");
                r.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                r.headers_mut().insert(header::SEC_WEBSOCKET_ACCEPT, accept);
                r
            }
            None => status(StatusCode::BAD_REQUEST, "not a websocket request"),
        },
        _ => status(StatusCode::NOT_FOUND, "no such route"),
    };
    Ok(resp)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(8080);
    let listener = match tokio::net::TcpListener::bind(("0.0.0.0", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hyperfleet-testd: bind port {port}: {e}");
            std::process::exit(1);
        }
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(handle);
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
            // A client that hangs up mid-request is routine for the tests; say so on stderr and go on.
            if let Err(e) = served {
                eprintln!("hyperfleet-testd: connection: {e}");
            }
        });
    }
}
