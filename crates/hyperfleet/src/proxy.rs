//! The reverse proxy for exposed guest ports (PROXY_PORT, default 4000): `{prefix}/{machine}/{port}/…` or,
//! with PROXY_HOST_SUFFIX, `{machine}-{port}{suffix}` in the Host header. For a machine of this node it
//! forwards only to the machine's own guest address and only to ports in its `exposed_ports`; a machine of
//! another node of the fleet is served through that node's proxy (with the cluster secret, see
//! [`crate::nodes::Caller`]; the guest never sees what the nodes say to each other). Bodies stream both ways,
//! WebSocket upgrades are spliced (and closed after PROXY_WEBSOCKET_IDLE_TIMEOUT without a byte), and
//! connections are kept alive. A request for a stopped or paused machine with `auto_start` wakes it first;
//! every request, and every byte through a tunnel, is activity for the machine's idle timeout. Client
//! connections are capped and timed by [`crate::listener`], as the API's are. Clients are not
//! authenticated (a call claiming to come from a node must prove it).
//! Also here: the poller that records which exposed ports accept connections.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyperfleet_types::{ErrorBody, ErrorDetail, ExposedPortStatus, MachineStatus, NodeStatus};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::config::ProxySettings;
use crate::listener::{self, Activity, Limits, Timeouts};
use crate::machines::{Error as MachineError, Hold, HoldKind, Service};
use crate::nodes::{Caller, FORWARDED_BY_HEADER, SECRET_HEADER};

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
pub(crate) const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Route {
    pub machine: String,
    pub port: u16,
    /// Path and query to request from the guest.
    pub upstream_path: String,
}

struct ProxyError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ProxyError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
    /// The API's error envelope, as every Hyperfleet error is answered.
    fn into_response(self) -> Response<ProxyBody> {
        let body = ErrorBody { error: ErrorDetail { code: self.code.into(), message: self.message } };
        // Serializing two strings cannot fail; an empty body would still carry the status.
        let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        let mut resp = Response::new(Full::new(bytes).map_err(|never| match never {}).boxed());
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    }

    /// A machine lookup that failed, with the status and code the API gives the same error.
    fn from_machine(e: MachineError) -> Self {
        let api = crate::api::error::ApiError::from(e);
        Self { status: api.status, code: api.code, message: api.message }
    }
}

/// Finds the machine and port a request is for.
pub(crate) fn route(uri: &Uri, host: Option<&str>, cfg: &ProxySettings) -> Option<Route> {
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    if let (Some(suffix), Some(host)) = (&cfg.host_suffix, host) {
        let host =
            host.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h);
        if let Some(label) = host.to_ascii_lowercase().strip_suffix(&suffix.to_ascii_lowercase()) {
            let (machine, port) = label.rsplit_once('-')?;
            return Some(Route {
                machine: machine.to_string(),
                port: port.parse().ok()?,
                upstream_path: format!("{}{query}", uri.path()),
            });
        }
    }
    let rest = uri.path().strip_prefix(&cfg.prefix)?.strip_prefix('/')?;
    let mut parts = rest.splitn(3, '/');
    let machine = parts.next().filter(|m| !m.is_empty())?;
    let port = parts.next()?.parse().ok()?;
    let tail = parts.next().unwrap_or("");
    Some(Route { machine: machine.to_string(), port, upstream_path: format!("/{tail}{query}") })
}

/// On a request one node's proxy sends to the owner's: `{machine id}/{port}`. The path is already the
/// guest's, so the owner routes it whatever its own PROXY_PREFIX or PROXY_HOST_SUFFIX.
const ROUTE_HEADER: &str = "x-hyperfleet-proxy-route";

/// The route of a request another node's proxy forwarded (see [`ROUTE_HEADER`]).
fn forwarded_route(uri: &Uri, headers: &HeaderMap) -> Option<Route> {
    let (machine, port) = headers.get(ROUTE_HEADER)?.to_str().ok()?.split_once('/')?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    Some(Route { machine: machine.to_string(), port: port.parse().ok()?, upstream_path: path.to_string() })
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Also drop what the Connection header itself names.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.get(header::UPGRADE).is_some()
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// What the proxy needs to know about a machine.
struct Target {
    id: String,
    status: MachineStatus,
    guest_ip: Ipv4Addr,
    exposed_ports: Vec<u16>,
    auto_start: bool,
    /// The fleet node that runs it: only that node's proxy can reach its guest address.
    node: String,
}

/// Machines by id and by name, so that proxied requests do not each cost a database read. Emptied on every
/// machine event (start, stop, port change, delete); the generation counter keeps a lookup that raced with
/// an event from caching what it read before it.
#[derive(Default)]
struct Targets {
    map: std::sync::RwLock<(u64, std::collections::HashMap<String, Arc<Target>>)>,
}

impl Targets {
    fn invalidate(&self) {
        let mut g = self.map.write().unwrap_or_else(|e| e.into_inner());
        g.0 += 1;
        g.1.clear();
    }

    async fn get(&self, service: &Service, key: &str) -> Result<Arc<Target>, MachineError> {
        let generation = {
            let g = self.map.read().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = g.1.get(key) {
                return Ok(t.clone());
            }
            g.0
        };
        let m = service.get(key).await?;
        let t = Arc::new(Target {
            guest_ip: m.guest_ip,
            id: m.id,
            status: m.status,
            exposed_ports: m.spec.exposed_ports,
            auto_start: m.spec.auto_start,
            node: m.node,
        });
        let mut g = self.map.write().unwrap_or_else(|e| e.into_inner());
        if g.0 == generation {
            g.1.insert(key.to_string(), t.clone());
        }
        Ok(t)
    }
}

/// What the proxy threads share.
struct Shared {
    service: Arc<Service>,
    cfg: ProxySettings,
    targets: Targets,
    limits: Arc<Limits>,
    timeouts: Timeouts,
}

/// One proxy thread: the shared state and its own pool of connections to guests.
struct Proxy {
    shared: Arc<Shared>,
    client: Client<HttpConnector, Incoming>,
}

impl Proxy {
    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        activity: Arc<Activity>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string);
        let nodes = self.shared.service.nodes();
        let caller = nodes.caller(req.headers());
        let route = match &caller {
            Caller::Forged => {
                return Err(ProxyError::new(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "Invalid cluster secret: node-to-node calls need HYPERFLEET_CLUSTER_SECRET",
                ));
            }
            Caller::Node(_) => forwarded_route(req.uri(), req.headers()),
            Caller::Outside => route(req.uri(), host.as_deref(), &self.shared.cfg),
        };
        let route = route.ok_or_else(|| {
            ProxyError::new(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                format!("Use {}/{{machine}}/{{port}}/path to reach an exposed port", self.shared.cfg.prefix),
            )
        })?;
        let mut rec =
            self.shared.targets.get(&self.shared.service, &route.machine).await.map_err(ProxyError::from_machine)?;
        if rec.node != nodes.name() {
            // Its guest address means something only on its own host (it may be another machine's here): the
            // owner's proxy serves it. A forwarded request is never forwarded again.
            if let Caller::Node(from) = &caller {
                return Err(ProxyError::new(
                    StatusCode::CONFLICT,
                    "CONFLICT",
                    format!("Machine {} is owned by node '{}', not this one (forwarded by '{from}')", rec.id, rec.node),
                ));
            }
            let (upstream, extra) = self.owner_of(&rec, &route)?;
            // The owner may wake the machine and then wait for its answer; a margin for the hop on top.
            let patience = self.shared.cfg.upstream_timeout + self.shared.cfg.wake_timeout + Duration::from_secs(5);
            return self.send(req, peer, activity, host, upstream, extra, &rec, None, patience).await;
        }
        if !rec.exposed_ports.contains(&route.port) {
            return Err(ProxyError::new(
                StatusCode::FORBIDDEN,
                "FORBIDDEN",
                format!("Port {} is not exposed on this machine", route.port),
            ));
        }
        if rec.status != MachineStatus::Running {
            if !rec.auto_start {
                return Err(ProxyError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "SERVICE_UNAVAILABLE",
                    format!("Machine {} is not running (it is '{}')", rec.id, rec.status),
                ));
            }
            rec = self.wake(&rec.id, route.port).await?;
        }
        // The request is activity in the machine (its idle timeout); a tunnel below holds it while open.
        self.shared.service.note_activity(&rec.id);
        // Only ever the machine's own guest address, from its lease.
        let guest = rec.guest_ip;
        let upstream: Uri = format!("http://{guest}:{}{}", route.port, route.upstream_path)
            .parse()
            .map_err(|_| ProxyError::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", "invalid request path"))?;
        let extra = vec![(header::HOST, format!("{guest}:{}", route.port))];
        let hold = self.shared.service.hold_activity(&rec.id, HoldKind::Connection);
        let patience = self.shared.cfg.upstream_timeout;
        self.send(req, peer, activity, host, upstream, extra, &rec, Some((hold, route.port)), patience).await
    }

    /// Where node `rec.node`'s proxy serves `route`, and the headers that prove and route the request there.
    fn owner_of(&self, rec: &Target, route: &Route) -> Result<(Uri, Vec<(HeaderName, String)>), ProxyError> {
        let nodes = self.shared.service.nodes();
        let unavailable = |why: String| {
            ProxyError::new(StatusCode::SERVICE_UNAVAILABLE, "NODE_UNAVAILABLE", format!("Machine {} {why}", rec.id))
        };
        let owner = &rec.node;
        let peer =
            nodes.cached_peer(owner).ok_or_else(|| unavailable(format!("is on node '{owner}', not seen yet")))?;
        if peer.status == NodeStatus::Down {
            return Err(unavailable(format!("is on node '{owner}', which is down (no heartbeat)")));
        }
        let base = peer
            .proxy_url
            .ok_or_else(|| unavailable(format!("is on node '{owner}', whose proxy no other node can reach")))?;
        let secret = nodes.cluster_secret().ok_or_else(|| {
            unavailable(format!("is on node '{owner}'; routing to it needs HYPERFLEET_CLUSTER_SECRET on this node"))
        })?;
        let upstream = format!("{base}{}", route.upstream_path)
            .parse()
            .map_err(|_| ProxyError::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", "invalid request path"))?;
        let extra = vec![
            (HeaderName::from_static(SECRET_HEADER), secret.to_string()),
            (HeaderName::from_static(FORWARDED_BY_HEADER), nodes.name().to_string()),
            (HeaderName::from_static(ROUTE_HEADER), format!("{}/{}", rec.id, route.port)),
        ];
        Ok((upstream, extra))
    }

    /// Sends the request on to `upstream` (a guest, with the machine's activity `hold` and its port; or the
    /// owner's proxy) with the forwarding headers and `extra`, and answers with its response; a WebSocket
    /// upgrade is spliced once both sides switch.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        activity: Arc<Activity>,
        host: Option<String>,
        upstream: Uri,
        extra: Vec<(HeaderName, String)>,
        rec: &Target,
        guest: Option<(Hold, u16)>,
        patience: Duration,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let upgrade = is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let upgrade_headers = upgrade
            .then(|| (parts.headers.get(header::UPGRADE).cloned(), parts.headers.get(header::CONNECTION).cloned()));
        strip_hop_by_hop(&mut parts.headers);
        // What nodes say to each other is for them only: a guest never sees the cluster secret.
        for h in [SECRET_HEADER, FORWARDED_BY_HEADER, ROUTE_HEADER] {
            parts.headers.remove(h);
        }
        if let Some((up, _)) = &upgrade_headers {
            if let Some(up) = up {
                parts.headers.insert(header::UPGRADE, up.clone());
            }
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let prior = parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()).map(str::to_string);
        let xff = match prior {
            Some(p) => format!("{p}, {}", peer.ip()),
            None => peer.ip().to_string(),
        };
        let set = |h: &mut HeaderMap, name: HeaderName, v: &str| {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(name, v);
            }
        };
        set(&mut parts.headers, HeaderName::from_static("x-forwarded-for"), &xff);
        // The owner's proxy gets the client's Host as it came, so says the same.
        set(&mut parts.headers, HeaderName::from_static("x-forwarded-host"), host.as_deref().unwrap_or(""));
        set(&mut parts.headers, HeaderName::from_static("x-forwarded-proto"), "http");
        set(&mut parts.headers, HeaderName::from_static("x-machine-id"), &rec.id);
        for (name, value) in extra {
            set(&mut parts.headers, name, &value);
        }
        parts.uri = upstream;
        parts.version = http::Version::HTTP_11;
        let upstream_req = Request::from_parts(parts, body);

        let what = match &guest {
            Some((_, port)) => format!("port {port} on machine {}", rec.id),
            None => format!("node '{}' (the owner of machine {})", rec.node, rec.id),
        };
        let mut resp = tokio::time::timeout(patience, self.client.request(upstream_req))
            .await
            .map_err(|_| {
                let (status, code) = match guest {
                    Some(_) => (StatusCode::BAD_GATEWAY, "BAD_GATEWAY"),
                    None => (StatusCode::SERVICE_UNAVAILABLE, "NODE_UNAVAILABLE"),
                };
                ProxyError::new(status, code, format!("{what} did not answer within {} s", patience.as_secs()))
            })?
            .map_err(|e| match guest {
                Some(_) => {
                    ProxyError::new(StatusCode::BAD_GATEWAY, "BAD_GATEWAY", format!("Could not reach {what}: {e}"))
                }
                None => ProxyError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "NODE_UNAVAILABLE",
                    format!("Could not reach the proxy of {what}: {e}"),
                ),
            })?;

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let idle = self.shared.cfg.websocket_idle_timeout;
            let hold = guest.map(|(hold, _)| hold);
            tokio::spawn(async move {
                match (client_upgrade.await, upstream_upgrade.await) {
                    // The client's socket sees every byte either way, so its activity says when the tunnel
                    // went quiet.
                    (Ok(c), Ok(u)) => {
                        tokio::select! {
                            () = splice(TokioIo::new(c), TokioIo::new(u), hold.as_ref()) => {}
                            () = activity.idle_for(idle) => {
                                debug!(%peer, "closed a tunnel idle for {} s", idle.as_secs());
                            }
                        }
                    }
                    (c, u) => debug!(client = c.is_ok(), upstream = u.is_ok(), "upgrade failed"),
                }
            });
            let (parts, _) = resp.into_parts();
            return Ok(Response::from_parts(
                parts,
                http_body_util::Empty::new().map_err(|never| match never {}).boxed(),
            ));
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body.boxed()))
    }
}

impl Proxy {
    /// Starts or resumes an `auto_start` machine for this request (one start however many requests ask),
    /// then waits until `port` accepts connections; all within PROXY_WAKE_TIMEOUT.
    async fn wake(&self, id: &str, port: u16) -> Result<Arc<Target>, ProxyError> {
        let patience = self.shared.cfg.wake_timeout;
        let deadline = tokio::time::Instant::now() + patience;
        let m = self.shared.service.wake(id, port, patience).await.map_err(ProxyError::from_machine)?;
        let addr = SocketAddr::new(IpAddr::V4(m.guest_ip), port);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Ok(Ok(_)) =
                tokio::time::timeout(left.min(Duration::from_secs(1)), tokio::net::TcpStream::connect(addr)).await
            {
                break;
            }
            if left.is_zero() {
                return Err(ProxyError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "TIMEOUT",
                    format!("Machine {id} started, but port {port} did not answer within {} s", patience.as_secs()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20).min(left)).await;
        }
        Ok(Arc::new(Target {
            id: m.id,
            status: m.status,
            guest_ip: m.guest_ip,
            exposed_ports: m.spec.exposed_ports,
            auto_start: m.spec.auto_start,
            node: m.node,
        }))
    }
}

/// Copies both ways between an upgraded client connection and the guest (or the owner's proxy) until either
/// side ends, touching `hold` (the machine's activity, when it runs here) on every chunk.
async fn splice<C, U>(client: C, upstream: U, hold: Option<&Hold>)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn pump<R: tokio::io::AsyncRead + Unpin, W: tokio::io::AsyncWrite + Unpin>(
        mut r: R,
        mut w: W,
        hold: Option<&Hold>,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Some(hold) = hold {
                        hold.touch();
                    }
                    if w.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        // The other side learns of the end; it may be gone already.
        let _ = w.shutdown().await;
    }
    let (cr, cw) = tokio::io::split(client);
    let (ur, uw) = tokio::io::split(upstream);
    tokio::join!(pump(cr, uw, hold), pump(ur, cw, hold));
}

/// Starts the proxy on `addr`: one thread per CPU, each with its own single-threaded runtime, its own
/// listening socket on the same port (SO_REUSEPORT, the kernel spreads connections) and its own pool of
/// connections to guests, so a request is never handed between threads. The threads share the connection
/// caps (PROXY_MAX_CONNECTIONS in all, `max_per_ip` from one address). Binding errors surface here.
pub(crate) fn start(
    addr: SocketAddr,
    service: Arc<Service>,
    cfg: ProxySettings,
    timeouts: Timeouts,
    max_per_ip: usize,
) -> std::io::Result<Arc<Limits>> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    // Each handed to its thread's runtime below.
    let listeners = (0..threads).map(|_| listener::bind(addr, true)).collect::<std::io::Result<Vec<_>>>()?;
    let limits = Limits::new(cfg.max_connections, max_per_ip);
    let shared = Arc::new(Shared { limits: limits.clone(), timeouts, service, cfg, targets: Targets::default() });
    let mut events = shared.service.subscribe();
    let watcher = Arc::downgrade(&shared);
    tokio::spawn(async move {
        // Lagging behind just means "something changed": invalidate either way.
        while !matches!(events.recv().await, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
            match watcher.upgrade() {
                Some(s) => s.targets.invalidate(),
                None => return,
            }
        }
    });
    for (i, listener) in listeners.into_iter().enumerate() {
        let shared = shared.clone();
        std::thread::Builder::new().name(format!("proxy-{i}")).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return warn!(error = %e, "proxy thread could not start"),
            };
            rt.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => serve(l, shared).await,
                    Err(e) => warn!(error = %e, "proxy listener"),
                }
            });
        })?;
    }
    Ok(limits)
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(shared.cfg.upstream_timeout));
    connector.set_nodelay(true);
    // Idle connections kept per guest or owner node bounded: after a burst, a pool of idle connections to
    // another node would hold its connection cap, which spares nodes only the per-address one.
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build(connector);
    let (limits, timeouts) = (shared.limits.clone(), shared.timeouts);
    let proxy = Arc::new(Proxy { shared, client });
    listener::serve(listener, limits, timeouts, std::future::pending(), move |peer, activity| {
        let proxy = proxy.clone();
        service_fn(move |req| {
            let (proxy, activity) = (proxy.clone(), activity.clone());
            async move {
                let started = std::time::Instant::now();
                let resp = proxy.handle(req, peer, activity).await.unwrap_or_else(ProxyError::into_response);
                proxy.shared.service.metrics().proxy_request(resp.status().as_u16(), started.elapsed());
                Ok::<_, std::convert::Infallible>(resp)
            }
        })
    })
    .await;
}

/// Every `interval`, records which exposed ports of each running machine accept a TCP connection.
pub(crate) async fn poll_exposed_ports(service: Arc<Service>, interval: Duration) {
    loop {
        if let Ok(running) = service.with_status(&[MachineStatus::Running]).await {
            let checks = running.into_iter().filter(|m| !m.spec.exposed_ports.is_empty()).map(|m| {
                let guest = m.guest_ip;
                async move {
                    let mut status = Vec::new();
                    for port in &m.spec.exposed_ports {
                        status.push(ExposedPortStatus {
                            port: *port,
                            listening: probe(guest, *port).await,
                            checked_at: Some(hyperfleet_types::timestamp::now()),
                        });
                    }
                    (m.id, status)
                }
            });
            for (id, status) in futures::future::join_all(checks).await {
                service.set_port_status(&id, status);
            }
        }
        tokio::time::sleep(interval).await;
    }
}

async fn probe(ip: Ipv4Addr, port: u16) -> bool {
    let addr = SocketAddr::new(IpAddr::V4(ip), port);
    matches!(tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await, Ok(Ok(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(suffix: Option<&str>) -> ProxySettings {
        ProxySettings {
            port: Some(4000),
            prefix: "/proxy".into(),
            host_suffix: suffix.map(str::to_string),
            poll_interval: Duration::from_secs(10),
            max_connections: 10,
            upstream_timeout: Duration::from_secs(5),
            websocket_idle_timeout: Duration::from_secs(300),
            wake_timeout: Duration::from_secs(60),
        }
    }

    fn r(machine: &str, port: u16, path: &str) -> Option<Route> {
        Some(Route { machine: machine.into(), port, upstream_path: path.into() })
    }

    #[test]
    fn path_routing() {
        let c = cfg(None);
        assert_eq!(
            route(&"/proxy/abc/8080/api/x?q=1&b=2".parse().unwrap(), None, &c),
            r("abc", 8080, "/api/x?q=1&b=2")
        );
        assert_eq!(route(&"/proxy/web/80".parse().unwrap(), None, &c), r("web", 80, "/"));
        assert_eq!(route(&"/proxy/web/80/".parse().unwrap(), None, &c), r("web", 80, "/"));
        assert_eq!(route(&"/proxy/web/http/".parse().unwrap(), None, &c), None);
        assert_eq!(route(&"/proxy/web/70000/".parse().unwrap(), None, &c), None);
        assert_eq!(route(&"/other/web/80/".parse().unwrap(), None, &c), None);
        assert_eq!(route(&"/proxyx/web/80/".parse().unwrap(), None, &c), None);
    }

    #[test]
    fn host_routing() {
        let c = cfg(Some(".vm.test"));
        assert_eq!(
            route(&"/a?b=c".parse().unwrap(), Some("abc123-8080.vm.test:4000"), &c),
            r("abc123", 8080, "/a?b=c")
        );
        assert_eq!(route(&"/".parse().unwrap(), Some("my-web-80.VM.test"), &c), r("my-web", 80, "/"));
        // A Host that does not match the suffix falls back to path routing.
        assert_eq!(route(&"/proxy/x/81/".parse().unwrap(), Some("localhost:4000"), &c), r("x", 81, "/"));
        assert_eq!(route(&"/".parse().unwrap(), Some("nodash.vm.test"), &c), None);
    }

    #[test]
    fn forwarded_routing() {
        let mut h = HeaderMap::new();
        assert_eq!(forwarded_route(&"/a?b=c".parse().unwrap(), &h), None, "no route header");
        h.insert(ROUTE_HEADER, HeaderValue::from_static("m-1/8080"));
        assert_eq!(forwarded_route(&"/a?b=c".parse().unwrap(), &h), r("m-1", 8080, "/a?b=c"));
        h.insert(ROUTE_HEADER, HeaderValue::from_static("m-1/http"));
        assert_eq!(forwarded_route(&"/".parse().unwrap(), &h), None);
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
