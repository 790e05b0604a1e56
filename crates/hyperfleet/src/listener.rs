//! What the API and the proxy listeners share against hostile clients: connection caps (global and per
//! client address, refused at once past them), the header-read and idle timeouts of each connection, the
//! idle timeout of upgraded tunnels, and the process's open-files limit the caps are sized under.
//!
//! hyper's own `header_read_timeout` is not used: its clock also runs while a kept-alive connection waits
//! for its next request, so it cannot be told apart from the idle timeout. Each connection here has one
//! watchdog instead, driven by what its socket and its service see.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// File descriptors kept back from the connection caps for everything else the daemon opens: the
/// database, machines' sockets, logs and disks, runc and firecracker.
pub(crate) const RESERVED_FDS: u64 = 1024;

/// Raises the soft open-files limit to the hard limit (or the kernel's ceiling, `fs.nr_open`, when the hard
/// limit is unlimited); returns the limit now in force.
pub(crate) fn raise_open_files_limit() -> io::Result<u64> {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok());
    let target = if hard == RLIM_INFINITY { ceiling.unwrap_or(1 << 20) } else { hard };
    if soft < target {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
        return Ok(target);
    }
    Ok(soft)
}

/// The largest connection caps an open-files limit allows: each listener gets at most a third of what is
/// left after [`RESERVED_FDS`], since a proxied connection holds two descriptors (client and guest).
pub(crate) fn fit_caps(open_files: u64, api: usize, proxy: usize) -> (usize, usize) {
    let share = (open_files.saturating_sub(RESERVED_FDS) / 3).max(16) as usize;
    (api.min(share), proxy.min(share))
}

/// How long a connection may wait for something.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From the opening of a connection, or the first byte of a later request, to the end of its headers.
    pub header_read: Duration,
    /// With no request in flight and no byte either way: a kept-alive connection between requests.
    pub idle: Duration,
}

/// How many connections a listener holds: in all, and from one client address.
pub(crate) struct Limits {
    max: usize,
    per_ip: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    /// The other nodes of the fleet: their forwarded calls carry many clients' requests on their own
    /// addresses, so only the total cap applies to them (each client was capped by the node it reached).
    nodes: std::sync::RwLock<std::collections::HashSet<IpAddr>>,
    /// Bytes read from and written to clients, for the metrics.
    received: AtomicU64,
    sent: AtomicU64,
}

impl Limits {
    pub(crate) fn new(max: usize, per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_ip,
            open: Mutex::new((0, HashMap::new())),
            nodes: Default::default(),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        })
    }

    /// Sets the addresses of the fleet's other nodes, which the per-address cap does not apply to.
    pub(crate) fn set_nodes(&self, ips: std::collections::HashSet<IpAddr>) {
        let ips = ips.into_iter().map(|ip| ip.to_canonical()).collect();
        *self.nodes.write().unwrap_or_else(|e| e.into_inner()) = ips;
    }

    /// A place for one more connection from `ip`, or `None` past either cap (only the total one for another
    /// node of the fleet).
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let ip = ip.to_canonical();
        let node = self.nodes.read().unwrap_or_else(|e| e.into_inner()).contains(&ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.0 >= self.max {
            return None;
        }
        let from_ip = open.1.entry(ip).or_insert(0);
        if *from_ip >= self.per_ip && !node {
            return None;
        }
        *from_ip += 1;
        open.0 += 1;
        Some(Slot { limits: self.clone(), ip })
    }

    /// Connections open now.
    fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Connections open now and bytes moved so far.
    pub(crate) fn stats(&self) -> crate::metrics::ListenerStats {
        crate::metrics::ListenerStats {
            open_connections: self.open() as u64,
            bytes_received: self.received.load(Ordering::Relaxed),
            bytes_sent: self.sent.load(Ordering::Relaxed),
        }
    }
}

/// One admitted connection; its place is given back on drop.
pub(crate) struct Slot {
    limits: Arc<Limits>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|e| e.into_inner());
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

/// Answers a connection refused by the caps and closes it, without waiting for anything.
pub(crate) fn refuse(stream: TcpStream) {
    let _ = stream.try_write(
        b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: 25\r\n\r\ntoo many open connections",
    );
}

const NONE: u64 = u64::MAX;

/// What a connection's watchdog reads: the times (ms since the connection opened) of its last byte read or
/// written and of the first byte of a request whose headers are not in yet, and how many requests are in
/// flight. Owned by the connection's socket, so it lives as long as an upgraded tunnel does, and so does the
/// connection's [`Slot`].
pub(crate) struct Activity {
    opened: Instant,
    last_io: AtomicU64,
    head_since: AtomicU64,
    in_flight: AtomicU32,
    slot: Slot,
}

impl Activity {
    fn new(slot: Slot) -> Arc<Self> {
        // The first request's clock starts at the opening: a client that connects and sends nothing is
        // held to the header-read timeout too.
        Arc::new(Self {
            opened: Instant::now(),
            last_io: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            slot,
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn on_read(&self, n: usize) {
        self.slot.limits.received.fetch_add(n as u64, Ordering::Relaxed);
        let now = self.now();
        self.last_io.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) == 0 && self.head_since.load(Ordering::Relaxed) == NONE {
            self.head_since.store(now, Ordering::Relaxed);
        }
    }

    fn on_write(&self, n: usize) {
        self.slot.limits.sent.fetch_add(n as u64, Ordering::Relaxed);
        self.last_io.store(self.now(), Ordering::Relaxed);
    }

    fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(NONE, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// When the connection is due to be closed if nothing happens until then.
    fn deadline(&self, t: &Timeouts) -> Due {
        let at = |ms: u64, d: Duration| self.opened + Duration::from_millis(ms) + d;
        match self.head_since.load(Ordering::Relaxed) {
            NONE if self.in_flight.load(Ordering::Relaxed) > 0 => Due::LookAgain(Instant::now() + t.idle),
            NONE => Due::Close(at(self.last_io.load(Ordering::Relaxed), t.idle)),
            since => Due::Close(at(since, t.header_read)),
        }
    }

    /// Resolves once no byte has gone either way for `idle`: for upgraded tunnels, whose requests are over.
    pub(crate) async fn idle_for(&self, idle: Duration) {
        loop {
            let due = self.opened + Duration::from_millis(self.last_io.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Due {
    Close(Instant),
    /// Never while a request is in flight: look again then.
    LookAgain(Instant),
}

/// One request being handled; the idle clock restarts when its response body has been sent.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.on_write(0);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A socket that tells its connection's [`Activity`] about every byte.
pub(crate) struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.activity.on_read(read);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.activity.on_write(n);
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.activity.on_write(n);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A service that counts its requests in flight, until their response bodies are sent.
struct Counted<S> {
    inner: S,
    activity: Arc<Activity>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> hyper::service::Service<Request<Incoming>> for Counted<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<CountedBody<B>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.begin_request();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|body| CountedBody { body, _in_flight: in_flight }))
        })
    }
}

/// A response body that ends its request's time in flight when it is dropped.
pub(crate) struct CountedBody<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves one admitted HTTP/1.1 connection (with upgrades) until it ends, its client is too slow with a
/// request's headers or idle too long, or `shutdown` fires (then it is closed once its request is done).
/// `make_service` gets the connection's [`Activity`], for tunnels that outlive the connection.
pub(crate) async fn serve_connection<S, B, F>(
    stream: TcpStream,
    slot: Slot,
    timeouts: Timeouts,
    mut shutdown: Option<tokio::sync::watch::Receiver<()>>,
    make_service: F,
) where
    F: FnOnce(Arc<Activity>) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _ = stream.set_nodelay(true);
    let activity = Activity::new(slot);
    let service = Counted { inner: make_service(activity.clone()), activity: activity.clone() };
    let io = TokioIo::new(Watched { inner: stream, activity: activity.clone() });
    // Half-close: a client that shuts its write side after the request (busybox `nc` at the end of its stdin,
    // as guest scripts of the child API do) still gets the answer.
    let conn =
        hyper::server::conn::http1::Builder::new().half_close(true).serve_connection(io, service).with_upgrades();
    let mut conn = pin!(conn);
    let mut closing = false;
    // A deadline can move earlier (a request ends: the idle clock replaces the header clock), so the watchdog
    // also looks again this often and closes at most this late.
    let step = timeouts.header_read.min(timeouts.idle) / 2;
    loop {
        let (Due::Close(due) | Due::LookAgain(due)) = activity.deadline(&timeouts);
        let wake = due.min(Instant::now() + step);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(wake.into()) => {
                // Only a deadline that still holds closes: the connection may have moved since.
                if let Due::Close(at) = activity.deadline(&timeouts)
                    && Instant::now() >= at
                {
                    debug!("closed a connection that was too slow with its headers or idle");
                    return;
                }
            }
            changed = async {
                match shutdown.as_mut() {
                    Some(rx) => rx.changed().await,
                    None => std::future::pending().await,
                }
            }, if shutdown.is_some() && !closing => {
                let _ = changed;
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Listening socket on `addr` with a backlog deep enough for a burst of connections; `reuse_port` lets
/// several threads each have their own on the same port.
pub(crate) fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)?.into_std()
}

/// Accepts connections until `stop` resolves, refusing those past `limits`, and serves each on its own task
/// with [`serve_connection`]. Once stopped, open connections finish their request in flight and close; this
/// returns when they all have.
pub(crate) async fn serve<M, S, B>(
    listener: TcpListener,
    limits: Arc<Limits>,
    timeouts: Timeouts,
    stop: impl Future<Output = ()>,
    make_service: M,
) where
    M: Fn(SocketAddr, Arc<Activity>) -> S + Clone + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (stopping, stop_rx) = tokio::sync::watch::channel(());
    let mut stop = pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors, most likely: wait for some to be given back.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.as_mut() => break,
        };
        let Some(slot) = limits.admit(peer.ip()) else {
            debug!(%peer, "refused a connection past the connection caps");
            refuse(stream);
            continue;
        };
        let make_service = make_service.clone();
        let stop_rx = stop_rx.clone();
        tokio::spawn(serve_connection(stream, slot, timeouts, Some(stop_rx), move |a| make_service(peer, a)));
    }
    drop(listener);
    drop(stop_rx);
    let _ = stopping.send(());
    stopping.closed().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_address_and_in_all() {
        let limits = Limits::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        let a1 = limits.admit(a).unwrap();
        let a2 = limits.admit(a).unwrap();
        assert!(limits.admit(a).is_none(), "a third connection from one address");
        let b1 = limits.admit(b).unwrap();
        assert!(limits.admit("127.0.0.2".parse().unwrap()).is_none(), "past the global cap");
        drop(a1);
        assert_eq!(limits.open(), 2);
        let a3 = limits.admit(a).unwrap();
        drop((a2, a3, b1));
        assert_eq!(limits.open(), 0);
        assert!(limits.open.lock().unwrap().1.is_empty(), "addresses with no connection are forgotten");
    }

    #[test]
    fn another_node_is_held_to_the_total_cap_only() {
        let limits = Limits::new(4, 1);
        let node: IpAddr = "10.0.0.5".parse().unwrap();
        limits.set_nodes([node].into());
        let held: Vec<Slot> = (0..4).map(|_| limits.admit(node).expect("a node past the per-address cap")).collect();
        assert!(limits.admit(node).is_none(), "but not past the total");
        drop(held);
        limits.set_nodes(Default::default());
        let one = limits.admit(node).unwrap();
        assert!(limits.admit(node).is_none(), "no longer a node: one connection again");
        drop(one);
    }

    #[test]
    fn caps_fit_the_open_files_limit() {
        assert_eq!(fit_caps(1_048_576, 8192, 8192), (8192, 8192));
        assert_eq!(fit_caps(20_000, 8192, 8192), (6325, 6325));
        assert_eq!(fit_caps(1024, 8192, 100), (16, 16));
    }

    #[tokio::test]
    async fn deadlines_follow_what_the_connection_does() {
        let t = Timeouts { header_read: Duration::from_secs(5), idle: Duration::from_secs(60) };
        let a = Activity::new(Limits::new(1, 1).admit("127.0.0.1".parse().unwrap()).unwrap());
        // Fresh: the first request's headers are due.
        assert_eq!(a.deadline(&t), Due::Close(a.opened + t.header_read));
        let req = a.begin_request();
        assert!(matches!(a.deadline(&t), Due::LookAgain(_)), "no deadline while a request is in flight");
        drop(req);
        let Due::Close(idle) = a.deadline(&t) else { panic!("between requests the idle timeout applies") };
        assert!(idle >= a.opened + t.idle);
        a.on_read(1);
        let Due::Close(head) = a.deadline(&t) else { panic!("no header deadline") };
        assert!(head < idle, "a new request's first byte starts the header clock");
    }
}
