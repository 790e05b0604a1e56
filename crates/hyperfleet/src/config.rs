//! Every setting of the daemon in one place: read from flags or the environment (same names as upstream),
//! validated once at start-up into [`Settings`], then trusted. A bad value stops the daemon with a message
//! naming the variable.
//!
//! The flags come in groups (API, proxy, store, runtime, network, files), each validated into its own
//! settings struct, so a command takes only the groups it uses (`doctor` has no API port).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, FromArgMatches};
use hyperfleet_net::{Subnet, TapNaming};
use hyperfleet_types::RuntimeKind;

use crate::listener::Timeouts;

pub const DEFAULT_KERNEL_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// First uid of jailed firecrackers: above the usual login, system and subordinate (`/etc/subuid`) ranges.
pub const DEFAULT_JAILER_UID_BASE: u32 = 900_000;
/// First host uid of container machines' user namespaces: 65,536 per machine from here, far above the
/// jailer's range and the usual subordinate-id ranges, and below 2^31 for a /16 of machines.
pub const DEFAULT_CONTAINER_UID_BASE: u32 = 1 << 30;
/// Room above the uid base: more address blocks than any subnet can have (a /8 cut into /30s is 2^22).
const JAILER_UID_SPAN: u32 = 1 << 22;

/// Everything `hyperfleet serve` reads.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub proxy: ProxyArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub network: NetworkArgs,
    #[command(flatten)]
    pub files: FileArgs,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "API")]
pub struct ApiArgs {
    /// Address the API and the proxy listen on.
    #[arg(long, env = "HYPERFLEET_BIND_ADDRESS", default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// API port (1-65535).
    #[arg(long, env = "PORT", default_value_t = 3000, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// Turn API-key authentication off (only for a trusted, local setup).
    #[arg(long, env = "DISABLE_AUTH", default_value = "false", value_parser = clap::builder::BoolishValueParser::new())]
    pub disable_auth: bool,
    /// Most connections the API holds at once; more are answered 503 and closed. Lowered at start to fit
    /// the open-files limit.
    #[arg(long, env = "HYPERFLEET_API_MAX_CONNECTIONS", default_value_t = 8192)]
    pub api_max_connections: usize,
    /// Most connections one client address holds on the API, and separately on the proxy.
    #[arg(long, env = "HYPERFLEET_MAX_CONNECTIONS_PER_IP", default_value_t = 1024)]
    pub max_connections_per_ip: usize,
    /// Seconds a client has to send a request's headers (API and proxy), counted from the opening of the
    /// connection or the first byte of the request.
    #[arg(long, env = "HYPERFLEET_HEADER_READ_TIMEOUT", default_value_t = 10)]
    pub header_read_timeout: u64,
    /// Seconds a connection may stay open with no request in flight and no byte either way (API and proxy).
    #[arg(long, env = "HYPERFLEET_IDLE_TIMEOUT", default_value_t = 60)]
    pub idle_timeout: u64,
    /// A bearer token that may read `GET /metrics` (and nothing else), for a Prometheus server; API keys
    /// with the `metrics:read` scope work too.
    #[arg(long, env = "HYPERFLEET_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Record Prometheus metrics and serve `GET /metrics`; false records nothing and `/metrics` answers 404.
    #[arg(long, env = "HYPERFLEET_METRICS", default_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub metrics: bool,
    /// Log lines as `text` (one line per event) or `json` (one object per line).
    #[arg(long, env = "HYPERFLEET_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Port of the child API: a second listener (on every address, answering only machines with `spawn`,
    /// from their own guest address, with their child token) that spawn machines reach on their gateway;
    /// 0 turns it off (then no machine may have `spawn`).
    #[arg(long, env = "HYPERFLEET_CHILD_API_PORT", default_value_t = 3001)]
    pub child_api_port: u16,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Proxy")]
pub struct ProxyArgs {
    /// Reverse proxy port; 0 disables the proxy.
    #[arg(long, env = "PROXY_PORT", default_value_t = 4000)]
    pub proxy_port: u16,
    /// Path prefix of proxied requests: {prefix}/{machine}/{port}/...
    #[arg(long, env = "PROXY_PREFIX", default_value = "/proxy")]
    pub proxy_prefix: String,
    /// Host-name routing suffix, e.g. `.vm.example.com` ({machine}-{port}{suffix}); unset: host routing off.
    #[arg(long, env = "PROXY_HOST_SUFFIX")]
    pub proxy_host_suffix: Option<String>,
    /// How often exposed ports are probed, in milliseconds.
    #[arg(long, env = "PROXY_EXPOSED_PORT_POLL_INTERVAL_MS", default_value_t = 10_000)]
    pub proxy_poll_interval_ms: u64,
    /// Most concurrent proxied connections; more are answered 503 and closed. Lowered at start to fit the
    /// open-files limit.
    #[arg(long, env = "PROXY_MAX_CONNECTIONS", default_value_t = 8192)]
    pub proxy_max_connections: usize,
    /// Seconds to wait for a guest to accept a proxied connection and send response headers.
    #[arg(long, env = "PROXY_UPSTREAM_TIMEOUT", default_value_t = 30)]
    pub proxy_upstream_timeout: u64,
    /// Seconds a WebSocket (or other upgraded) tunnel may pass no byte either way before it is closed.
    #[arg(long, env = "PROXY_WEBSOCKET_IDLE_TIMEOUT", default_value_t = 300)]
    pub proxy_websocket_idle_timeout: u64,
    /// Seconds a request to a stopped or paused `auto_start` machine waits for it to start and for the
    /// port to answer.
    #[arg(long, env = "PROXY_WAKE_TIMEOUT", default_value_t = 60)]
    pub proxy_wake_timeout: u64,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Store")]
pub struct StoreArgs {
    /// SQLite database file (the default backend); its directory must exist. Unused with DATABASE_URL.
    #[arg(long, env = "DATABASE_PATH", default_value = "./hyperfleet.db")]
    pub database_path: PathBuf,
    /// The database as a URL: `postgres://user:password@host:5432/db` for PostgreSQL (the shared database
    /// of a fleet), or `sqlite://PATH`. Unset: the SQLite file at DATABASE_PATH.
    #[arg(long = "database", env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Machine events kept in the database for `GET /events` to resume from (`Last-Event-ID`).
    #[arg(long, env = "HYPERFLEET_EVENTS_BACKLOG", default_value_t = 10_000)]
    pub events_backlog: u64,
    /// Milliseconds before a failed webhook delivery is tried again; doubled after each failure (at most
    /// 15 minutes apart).
    #[arg(long, env = "HYPERFLEET_WEBHOOK_RETRY_BASE_MS", default_value_t = 1000)]
    pub webhook_retry_base_ms: u64,
    /// Attempts per webhook delivery, the first included, before it is marked failed.
    #[arg(long, env = "HYPERFLEET_WEBHOOK_MAX_ATTEMPTS", default_value_t = 13)]
    pub webhook_max_attempts: u32,
    /// Seconds one webhook delivery attempt may take.
    #[arg(long, env = "HYPERFLEET_WEBHOOK_TIMEOUT", default_value_t = 10)]
    pub webhook_timeout: u64,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// This daemon as a node of a fleet (several daemons on one PostgreSQL database).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Fleet node")]
pub struct NodeArgs {
    /// This node's name in the fleet (letters, digits, '-', '.', '_'; at most 63); default: the host name.
    #[arg(long, env = "HYPERFLEET_NODE_NAME")]
    pub node_name: Option<String>,
    /// How the other nodes reach this node's API (`http://10.0.0.5:3000`). Unset: machines are placed on
    /// this node only when created here, and no other node can forward to it.
    #[arg(long, env = "HYPERFLEET_NODE_URL")]
    pub node_url: Option<String>,
    /// How the other nodes' proxies reach this node's proxy, to route to its machines' guests
    /// (`http://10.0.0.5:4000`); default: HYPERFLEET_NODE_URL's host with PROXY_PORT.
    #[arg(long, env = "HYPERFLEET_NODE_PROXY_URL")]
    pub node_proxy_url: Option<String>,
    /// Labels for `node_selector`: `k=v,k2=v2`.
    #[arg(long, env = "HYPERFLEET_NODE_LABELS", default_value = "")]
    pub node_labels: String,
    /// vCPUs placement may reserve on this node (before overcommit); default: the host's CPUs.
    #[arg(long, env = "HYPERFLEET_NODE_VCPUS")]
    pub node_vcpus: Option<u32>,
    /// MiB of memory placement may reserve on this node (before overcommit); default: the host's memory.
    #[arg(long, env = "HYPERFLEET_NODE_MEM_MIB")]
    pub node_mem_mib: Option<u64>,
    /// Capacity multiplier for placement (1.0: no overcommit). Default: 1.0 in a fleet (PostgreSQL and
    /// HYPERFLEET_NODE_URL), unenforced on a single host.
    #[arg(long, env = "HYPERFLEET_OVERCOMMIT")]
    pub overcommit: Option<f64>,
    /// Milliseconds between heartbeats.
    #[arg(long, env = "HYPERFLEET_HEARTBEAT_INTERVAL_MS", default_value_t = 2000)]
    pub heartbeat_interval_ms: u64,
    /// Milliseconds without a heartbeat (by the database's clock) after which a node is down.
    #[arg(long, env = "HYPERFLEET_NODE_DOWN_AFTER_MS", default_value_t = 10_000)]
    pub node_down_after_ms: u64,
    /// Secret the nodes of a fleet present to each other when forwarding (at least 16 printable
    /// characters); required on PostgreSQL with HYPERFLEET_NODE_URL.
    #[arg(long, env = "HYPERFLEET_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Runtime")]
pub struct RuntimeArgs {
    /// Directory for per-machine disks, console logs, container bundles and agent sockets (0700; never
    /// inside the assets directory, so no request can name a machine's private disk as its image).
    #[arg(long, env = "HYPERFLEET_DATA_DIR", default_value = ".hyperfleet-data/machines")]
    pub data_dir: PathBuf,
    /// Root-only (0700) directory of the Firecracker machines' chroots, which hold their API and vsock
    /// sockets; default: {data dir}/jail. On the data directory's filesystem (disks are hard-linked in).
    #[arg(long, env = "HYPERFLEET_CHROOT_DIR")]
    pub chroot_dir: Option<PathBuf>,
    /// Directory of the volumes' files (0700, each 0600); default: {data dir}/volumes.
    #[arg(long, env = "HYPERFLEET_VOLUMES_DIR")]
    pub volumes_dir: Option<PathBuf>,
    /// Kernels and root filesystems given in requests must be regular files inside this directory.
    #[arg(long, env = "HYPERFLEET_ASSETS_DIR", default_value = ".hyperfleet")]
    pub assets_dir: PathBuf,
    #[arg(long, env = "HYPERFLEET_KERNEL_IMAGE_PATH", default_value = ".hyperfleet/vmlinux")]
    pub kernel_image_path: PathBuf,
    #[arg(long, env = "HYPERFLEET_KERNEL_ARGS", default_value = DEFAULT_KERNEL_ARGS)]
    pub kernel_args: String,
    #[arg(long, env = "HYPERFLEET_ROOTFS_PATH", default_value = ".hyperfleet/rootfs.ext4")]
    pub rootfs_path: PathBuf,
    /// Firecracker binary; default: `firecracker` on PATH, else .hyperfleet/bin/firecracker.
    #[arg(long, env = "FIRECRACKER_BIN")]
    pub firecracker_bin: Option<PathBuf>,
    /// Firecracker's jailer, which starts every machine; default: `jailer` on PATH, else .hyperfleet/bin/jailer.
    #[arg(long, env = "JAILER_BIN")]
    pub jailer_bin: Option<PathBuf>,
    /// Machine N's firecracker runs as uid and gid BASE + N (N: its address block, unique among machines).
    #[arg(long, env = "HYPERFLEET_JAILER_UID_BASE", default_value_t = DEFAULT_JAILER_UID_BASE)]
    pub jailer_uid_base: u32,
    /// Turn the cgroup `favordynmods` option on at start (remounting the host's cgroup2 hierarchy): moving a
    /// new machine's process into its cgroups then costs no RCU grace period (~10 ms each), at a slightly
    /// dearer fork/exit host-wide, until reboot.
    #[arg(long, env = "HYPERFLEET_CGROUP_FAVORDYNMODS", default_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub cgroup_favordynmods: bool,
    /// Container machines run in their own user namespace (root in a guest is an unprivileged uid on the
    /// host), their disk mounted idmapped; on where the kernel has idmapped mounts (Linux 5.12+).
    #[arg(long, env = "HYPERFLEET_CONTAINER_USERNS", default_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub container_userns: bool,
    /// Container machine N's uids and gids 0..65535 are host ids BASE + N * 65536 onwards.
    #[arg(long, env = "HYPERFLEET_CONTAINER_UID_BASE", default_value_t = DEFAULT_CONTAINER_UID_BASE)]
    pub container_uid_base: u32,
    /// OCI runtime for the container runtime.
    #[arg(long, env = "HYPERFLEET_RUNC_BIN", default_value = "runc")]
    pub runc_bin: PathBuf,
    /// Runtime for machines that name none: firecracker, container, or auto (firecracker on hosts with
    /// hardware KVM, container elsewhere).
    #[arg(long, env = "HYPERFLEET_RUNTIME", default_value = "auto")]
    pub runtime: String,
    /// A machine's console log is moved aside (keeping one older part) once larger than this: bytes or 8MiB.
    #[arg(long, env = "HYPERFLEET_CONSOLE_LOG_MAX_SIZE", default_value = "8MiB")]
    pub console_log_max_size: String,
    /// Seconds a guest gets to shut down before its process is terminated.
    #[arg(long, env = "HYPERFLEET_STOP_TIMEOUT", default_value_t = 10)]
    pub stop_timeout: u64,
    /// Cache of pulled OCI images (layers, converted root images); default: `images` next to the data directory.
    #[arg(long, env = "HYPERFLEET_IMAGE_DIR")]
    pub image_dir: Option<PathBuf>,
    /// Size cap of the image cache in MiB; least recently used images no machine uses are evicted past it.
    #[arg(long, env = "HYPERFLEET_IMAGE_CACHE_MIB", default_value_t = 10240)]
    pub image_cache_mib: u64,
    /// `host[:port]` of a registry mirror for docker.io images.
    #[arg(long, env = "HYPERFLEET_REGISTRY_MIRROR")]
    pub registry_mirror: Option<String>,
    /// Comma-separated `host[:port]` registries reached over plain HTTP.
    #[arg(long, env = "HYPERFLEET_INSECURE_REGISTRIES", default_value = "")]
    pub insecure_registries: String,
    /// Comma-separated `host[:port]` registries images may come from; empty: any.
    #[arg(long, env = "HYPERFLEET_ALLOWED_REGISTRIES", default_value = "")]
    pub allowed_registries: String,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Network")]
pub struct NetworkArgs {
    /// Pool of machine addresses, cut into /30 blocks.
    #[arg(long, env = "HYPERFLEET_SUBNET", default_value = "172.16.0.0/16")]
    pub subnet: String,
    /// Host interface names are {prefix}{block}: tap0, tap1, ...
    #[arg(long, env = "HYPERFLEET_TAP_PREFIX", default_value = "tap")]
    pub tap_prefix: String,
    /// Guest resolvers, comma-separated; default: the host's (non-loopback) resolvers.
    #[arg(long, env = "HYPERFLEET_DNS")]
    pub dns: Option<String>,
    /// Name of the nftables table (family inet) Hyperfleet owns.
    #[arg(long, env = "HYPERFLEET_NFT_TABLE", default_value = "hyperfleet")]
    pub nft_table: String,
    /// Destinations no machine may reach, whatever its egress policy: comma-separated IPv4 CIDRs, or `none`.
    /// The default keeps guests away from the cloud metadata service (169.254.169.254) and link-local hosts.
    #[arg(long, env = "HYPERFLEET_EGRESS_DENY", default_value = "169.254.0.0/16")]
    pub egress_deny: String,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Files")]
pub struct FileArgs {
    /// Largest file accepted or returned by the files API: bytes, or with a unit (100MB, 1GiB).
    #[arg(long, env = "HYPERFLEET_FILE_MAX_SIZE", default_value = "100MB")]
    pub file_max_size: String,
    /// Seconds a file transfer may take.
    #[arg(long, env = "HYPERFLEET_FILE_TRANSFER_TIMEOUT", default_value_t = 60)]
    pub file_transfer_timeout: u64,
    /// Most commands (exec and streamed exec) one machine runs at once; more are refused with 429.
    #[arg(long, env = "HYPERFLEET_EXEC_MAX_CONCURRENT", default_value_t = 128)]
    pub exec_max_concurrent: usize,
    /// Memory all buffered commands' output may take at once, host-wide (bytes or 256MiB); past it, output
    /// is cut and flagged as truncated. Streamed exec is not buffered.
    #[arg(long, env = "HYPERFLEET_EXEC_OUTPUT_BUDGET", default_value = "256MiB")]
    pub exec_output_budget: String,
    /// Seconds a terminal's WebSocket client may not answer (it is pinged) before its session is hung up.
    #[arg(long, env = "HYPERFLEET_PTY_CLIENT_TIMEOUT", default_value_t = 30)]
    pub pty_client_timeout: u64,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub api: ApiSettings,
    pub proxy: ProxySettings,
    pub store: StoreSettings,
    pub runtime: RuntimeSettings,
    pub network: NetworkSettings,
    pub files: FileSettings,
}

#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub bind: IpAddr,
    pub port: u16,
    pub disable_auth: bool,
    pub max_connections: usize,
    /// Per listener.
    pub max_connections_per_ip: usize,
    /// Of both listeners.
    pub timeouts: Timeouts,
    pub metrics_token: Option<String>,
    /// `HYPERFLEET_METRICS`.
    pub metrics: bool,
    pub log_format: LogFormat,
    /// `HYPERFLEET_CHILD_API_PORT`; `None`: off.
    pub child_api_port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// `None`: no proxy listener (PROXY_PORT=0); exposed ports are still probed for the API.
    pub port: Option<u16>,
    pub prefix: String,
    pub host_suffix: Option<String>,
    pub poll_interval: Duration,
    pub max_connections: usize,
    pub upstream_timeout: Duration,
    pub websocket_idle_timeout: Duration,
    pub wake_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub database: crate::store::Location,
    pub node: NodeSettings,
    pub events_backlog: u64,
    pub webhook_retry_base: Duration,
    pub webhook_max_attempts: u32,
    pub webhook_timeout: Duration,
}

/// This daemon as a fleet node (see [`NodeArgs`]).
#[derive(Clone)]
pub struct NodeSettings {
    pub name: String,
    pub url: Option<String>,
    /// HYPERFLEET_NODE_PROXY_URL as given; [`Self::proxy_url`] says where the proxy is.
    pub proxy_url: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub vcpus: Option<u32>,
    pub mem_mib: Option<u64>,
    pub overcommit: Option<f64>,
    pub heartbeat_interval: Duration,
    pub down_after: Duration,
    pub cluster_secret: Option<String>,
}

impl std::fmt::Debug for NodeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSettings")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("labels", &self.labels)
            .field("overcommit", &self.overcommit)
            .field("cluster_secret", &self.cluster_secret.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

/// An `http://HOST[:PORT]` URL another node reaches this one by (nothing else: paths are appended to it), without a trailing '/'; `None` if unset.
fn node_url(var: &'static str, value: Option<&str>) -> Result<Option<String>, ConfigError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(u) => {
            let parsed = reqwest::Url::parse(u).map_err(|e| bad(var, format!("'{u}': {e}")))?;
            // The nodes' clients speak plain HTTP (with the cluster secret): a private network's job to protect.
            let bare = parsed.path() == "/"
                && parsed.query().is_none()
                && parsed.fragment().is_none()
                && parsed.username().is_empty()
                && parsed.password().is_none();
            if parsed.scheme() != "http" || parsed.host_str().is_none() || !bare {
                return Err(bad(
                    var,
                    format!("'{u}': use http://HOST:PORT (nodes call each other in plain HTTP, on a private network)"),
                ));
            }
            Ok(Some(u.trim_end_matches('/').to_string()))
        }
    }
}

impl NodeSettings {
    /// Where this node's proxy listening on `proxy_port` is reached from the other nodes:
    /// HYPERFLEET_NODE_PROXY_URL, else HYPERFLEET_NODE_URL's host with that port. `None` without a proxy or
    /// a URL.
    pub fn proxy_url(&self, proxy_port: Option<u16>) -> Option<String> {
        let port = proxy_port?;
        if let Some(u) = &self.proxy_url {
            return Some(u.clone());
        }
        let mut u = reqwest::Url::parse(self.url.as_deref()?).ok()?;
        u.set_port(Some(port)).ok()?;
        u.set_path("");
        Some(u.as_str().trim_end_matches('/').to_string())
    }
}

impl NodeArgs {
    pub fn validate(&self, database: &crate::store::Location) -> Result<NodeSettings, ConfigError> {
        let name = match self.node_name.as_deref().map(str::trim) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into()),
        };
        let name_ok = name.len() <= 63
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
        if !name_ok {
            return Err(bad(
                "HYPERFLEET_NODE_NAME",
                format!("'{name}': use letters, digits, '-', '.', '_' (at most 63, starting with a letter or digit)"),
            ));
        }
        let url = node_url("HYPERFLEET_NODE_URL", self.node_url.as_deref())?;
        let proxy_url = node_url("HYPERFLEET_NODE_PROXY_URL", self.node_proxy_url.as_deref())?;
        let mut labels = std::collections::BTreeMap::new();
        for pair in self.node_labels.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| bad("HYPERFLEET_NODE_LABELS", format!("'{pair}' is not key=value")))?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() || k.len() > 63 || v.len() > 63 {
                return Err(bad("HYPERFLEET_NODE_LABELS", format!("'{pair}': keys 1-63 characters, values up to 63")));
            }
            labels.insert(k.to_string(), v.to_string());
        }
        if self.node_vcpus == Some(0) {
            return Err(bad("HYPERFLEET_NODE_VCPUS", "must be at least 1"));
        }
        if self.node_mem_mib.is_some_and(|m| m < 4) {
            return Err(bad("HYPERFLEET_NODE_MEM_MIB", "must be at least 4"));
        }
        if let Some(o) = self.overcommit
            && !(o.is_finite() && (0.1..=100.0).contains(&o))
        {
            return Err(bad("HYPERFLEET_OVERCOMMIT", "must be a ratio between 0.1 and 100"));
        }
        if !(100..=600_000).contains(&self.heartbeat_interval_ms) {
            return Err(bad("HYPERFLEET_HEARTBEAT_INTERVAL_MS", "must be between 100 and 600000"));
        }
        if self.node_down_after_ms < 2 * self.heartbeat_interval_ms {
            return Err(bad(
                "HYPERFLEET_NODE_DOWN_AFTER_MS",
                "must be at least twice HYPERFLEET_HEARTBEAT_INTERVAL_MS",
            ));
        }
        let cluster_secret = match self.cluster_secret.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(t) if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(bad("HYPERFLEET_CLUSTER_SECRET", "use at least 16 printable characters, no spaces"));
            }
            Some(t) => Some(t.to_string()),
        };
        let fleet = url.is_some() && database.backend() == crate::store::Backend::Postgres;
        if fleet && cluster_secret.is_none() {
            return Err(bad(
                "HYPERFLEET_CLUSTER_SECRET",
                "is required on PostgreSQL with HYPERFLEET_NODE_URL (the nodes authenticate forwarded calls with it)",
            ));
        }
        Ok(NodeSettings {
            name,
            url,
            proxy_url,
            labels,
            vcpus: self.node_vcpus,
            mem_mib: self.node_mem_mib,
            overcommit: self.overcommit.or(fleet.then_some(1.0)),
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms),
            down_after: Duration::from_millis(self.node_down_after_ms),
            cluster_secret,
        })
    }
}

#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    pub data_dir: PathBuf,
    pub chroot_dir: PathBuf,
    pub volumes_dir: PathBuf,
    pub assets_dir: PathBuf,
    pub kernel_image_path: PathBuf,
    pub kernel_args: String,
    pub rootfs_path: PathBuf,
    pub firecracker_bin: Option<PathBuf>,
    pub jailer_bin: Option<PathBuf>,
    pub jailer_uid_base: u32,
    pub cgroup_favordynmods: bool,
    /// `Some(base)` when container machines get their own user namespace.
    pub container_uid_base: Option<u32>,
    pub runc_bin: PathBuf,
    /// `None`: auto, chosen from the host at start.
    pub default_runtime: Option<RuntimeKind>,
    pub stop_timeout: Duration,
    pub console_log_max_size: u64,
    pub image_dir: PathBuf,
    pub image_cache_bytes: u64,
    pub registries: crate::oci::Registries,
}

#[derive(Debug, Clone)]
pub struct NetworkSettings {
    pub subnet: Subnet,
    pub tap_naming: TapNaming,
    pub dns: Option<Vec<Ipv4Addr>>,
    pub nft_table: String,
    pub egress_deny: Vec<ipnet::Ipv4Net>,
}

#[derive(Debug, Clone)]
pub struct FileSettings {
    pub max_size: u64,
    pub transfer_timeout: Duration,
    pub exec_max_concurrent: usize,
    pub exec_output_budget: u64,
    pub pty_client_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid {name}: {message}")]
pub struct ConfigError {
    pub name: &'static str,
    pub message: String,
}

fn bad(name: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError { name, message: message.into() }
}

/// Resolves a relative path against the working directory (so relative settings mean the same from any
/// command run in that directory).
pub(crate) fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf())
    }
}

/// Parses `100MB`, `1GiB`, `512k` or plain bytes.
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

pub(crate) fn parse_dns_list(s: &str) -> Result<Vec<Ipv4Addr>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<Ipv4Addr>().map_err(|_| format!("'{p}' is not an IPv4 address")))
        .collect()
}

impl ServeArgs {
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let api = self.api.validate()?;
        let proxy = self.proxy.validate()?;
        if proxy.port == Some(api.port) {
            return Err(bad("PROXY_PORT", format!("{} is also the API PORT", api.port)));
        }
        if let Some(child) = api.child_api_port.filter(|c| *c == api.port || Some(*c) == proxy.port) {
            return Err(bad("HYPERFLEET_CHILD_API_PORT", format!("{child} is also the API PORT or PROXY_PORT")));
        }
        Ok(Settings {
            api,
            proxy,
            store: self.store.validate()?,
            runtime: self.runtime.validate()?,
            network: self.network.validate()?,
            files: self.files.validate()?,
        })
    }
}

/// The groups of a command that works on this host's machines without serving (`doctor`, `purge`): the
/// database, the runtimes, the network.
#[derive(Args, Debug, Clone)]
pub struct HostArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub network: NetworkArgs,
}

impl HostArgs {
    /// Full settings: these groups validated, the others at their defaults.
    pub(crate) fn settings(&self) -> Result<Settings, ConfigError> {
        Settings::without_serving(self.store.validate()?, self.runtime.validate()?, self.network.validate()?)
    }
}

impl Settings {
    /// Settings for a command that drives the machines but serves nothing and transfers no files (`purge`):
    /// the API, proxy and file groups keep their defaults, whatever the environment says.
    pub fn without_serving(
        store: StoreSettings,
        runtime: RuntimeSettings,
        network: NetworkSettings,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            api: defaults::<ApiArgs>()?.validate()?,
            proxy: defaults::<ProxyArgs>()?.validate()?,
            store,
            runtime,
            network,
            files: defaults::<FileArgs>()?.validate()?,
        })
    }
}

/// A group's default values, read from its clap attributes (so they are written down once) with the
/// environment ignored.
fn defaults<A: Args + FromArgMatches>() -> Result<A, ConfigError> {
    let cmd = A::augment_args(clap::Command::new("defaults")).mut_args(|a| a.env(None));
    let matches = cmd.try_get_matches_from(["defaults"]).map_err(|e| bad("defaults", e.to_string()))?;
    A::from_arg_matches(&matches).map_err(|e| bad("defaults", e.to_string()))
}

impl ApiArgs {
    pub fn validate(&self) -> Result<ApiSettings, ConfigError> {
        let at_least_one = |name, n: u64| if n == 0 { Err(bad(name, "must be at least 1")) } else { Ok(()) };
        at_least_one("HYPERFLEET_API_MAX_CONNECTIONS", self.api_max_connections as u64)?;
        at_least_one("HYPERFLEET_MAX_CONNECTIONS_PER_IP", self.max_connections_per_ip as u64)?;
        at_least_one("HYPERFLEET_HEADER_READ_TIMEOUT", self.header_read_timeout)?;
        at_least_one("HYPERFLEET_IDLE_TIMEOUT", self.idle_timeout)?;
        let metrics_token = match self.metrics_token.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(t) if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(bad("HYPERFLEET_METRICS_TOKEN", "use at least 16 printable characters, no spaces"));
            }
            Some(t) => Some(t.to_string()),
        };
        let log_format = match self.log_format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(bad("HYPERFLEET_LOG_FORMAT", format!("'{other}': use text or json"))),
        };
        Ok(ApiSettings {
            child_api_port: (self.child_api_port != 0).then_some(self.child_api_port),
            metrics_token,
            metrics: self.metrics,
            log_format,
            bind: self.bind,
            port: self.port,
            disable_auth: self.disable_auth,
            max_connections: self.api_max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            timeouts: Timeouts {
                header_read: Duration::from_secs(self.header_read_timeout),
                idle: Duration::from_secs(self.idle_timeout),
            },
        })
    }
}

impl ProxyArgs {
    pub fn validate(&self) -> Result<ProxySettings, ConfigError> {
        if self.proxy_poll_interval_ms == 0 {
            return Err(bad("PROXY_EXPOSED_PORT_POLL_INTERVAL_MS", "must be a positive number of milliseconds"));
        }
        let prefix = self.proxy_prefix.trim_end_matches('/').to_string();
        if !prefix.starts_with('/') || prefix.len() < 2 || prefix.contains(['?', '#', ' ']) {
            return Err(bad("PROXY_PREFIX", format!("'{}' must be a path such as /proxy", self.proxy_prefix)));
        }
        if let Some(suffix) = &self.proxy_host_suffix
            && (suffix.is_empty() || suffix.contains(['/', ':', ' ']))
        {
            return Err(bad("PROXY_HOST_SUFFIX", format!("'{suffix}' must be a host name suffix such as .vm.local")));
        }
        if self.proxy_max_connections == 0 {
            return Err(bad("PROXY_MAX_CONNECTIONS", "must be at least 1"));
        }
        if self.proxy_upstream_timeout == 0 {
            return Err(bad("PROXY_UPSTREAM_TIMEOUT", "must be at least 1 second"));
        }
        if self.proxy_websocket_idle_timeout == 0 {
            return Err(bad("PROXY_WEBSOCKET_IDLE_TIMEOUT", "must be at least 1 second"));
        }
        Ok(ProxySettings {
            port: (self.proxy_port != 0).then_some(self.proxy_port),
            prefix,
            host_suffix: self.proxy_host_suffix.clone(),
            poll_interval: Duration::from_millis(self.proxy_poll_interval_ms),
            max_connections: self.proxy_max_connections,
            upstream_timeout: Duration::from_secs(self.proxy_upstream_timeout),
            websocket_idle_timeout: Duration::from_secs(self.proxy_websocket_idle_timeout),
            wake_timeout: Duration::from_secs(self.proxy_wake_timeout.max(1)),
        })
    }
}

impl StoreArgs {
    pub fn validate(&self) -> Result<StoreSettings, ConfigError> {
        let (database, var) = match &self.database_url {
            Some(url) => (crate::store::Location::parse(url).map_err(|e| bad("DATABASE_URL", e))?, "DATABASE_URL"),
            None => (crate::store::Location::Sqlite(self.database_path.clone()), "DATABASE_PATH"),
        };
        let database = match database {
            crate::store::Location::Sqlite(p) => {
                let path = absolute(&p);
                let dir = path.parent().unwrap_or(Path::new("/"));
                if !dir.is_dir() {
                    return Err(bad(var, format!("directory {} does not exist", dir.display())));
                }
                crate::store::Location::Sqlite(path)
            }
            pg => pg,
        };
        if !(100..=10_000_000).contains(&self.events_backlog) {
            return Err(bad("HYPERFLEET_EVENTS_BACKLOG", "must be between 100 and 10000000"));
        }
        if !(1..=3_600_000).contains(&self.webhook_retry_base_ms) {
            return Err(bad("HYPERFLEET_WEBHOOK_RETRY_BASE_MS", "must be between 1 and 3600000"));
        }
        if !(1..=100).contains(&self.webhook_max_attempts) {
            return Err(bad("HYPERFLEET_WEBHOOK_MAX_ATTEMPTS", "must be between 1 and 100"));
        }
        if !(1..=300).contains(&self.webhook_timeout) {
            return Err(bad("HYPERFLEET_WEBHOOK_TIMEOUT", "must be between 1 and 300"));
        }
        Ok(StoreSettings {
            node: self.node.validate(&database)?,
            database,
            events_backlog: self.events_backlog,
            webhook_retry_base: Duration::from_millis(self.webhook_retry_base_ms),
            webhook_max_attempts: self.webhook_max_attempts,
            webhook_timeout: Duration::from_secs(self.webhook_timeout),
        })
    }
}

impl RuntimeArgs {
    pub fn validate(&self) -> Result<RuntimeSettings, ConfigError> {
        let default_runtime =
            match self.runtime.as_str() {
                "auto" => None,
                other => Some(RuntimeKind::parse(other).ok_or_else(|| {
                    bad("HYPERFLEET_RUNTIME", format!("'{other}': use auto, firecracker or container"))
                })?),
            };
        if self.kernel_args.contains(['\n', '\0']) {
            return Err(bad("HYPERFLEET_KERNEL_ARGS", "must be one line"));
        }
        if self.jailer_uid_base < 1000 || self.jailer_uid_base > i32::MAX as u32 - JAILER_UID_SPAN {
            return Err(bad(
                "HYPERFLEET_JAILER_UID_BASE",
                format!("{} must be between 1000 and {}", self.jailer_uid_base, i32::MAX as u32 - JAILER_UID_SPAN),
            ));
        }
        let jailer_end = u64::from(self.jailer_uid_base) + u64::from(JAILER_UID_SPAN);
        if self.container_uid_base < 65_536
            || (u64::from(self.container_uid_base) < jailer_end && self.container_uid_base >= self.jailer_uid_base)
        {
            return Err(bad(
                "HYPERFLEET_CONTAINER_UID_BASE",
                format!(
                    "{} must be at least 65536 and outside the jailer's uids {}..{jailer_end}",
                    self.container_uid_base, self.jailer_uid_base
                ),
            ));
        }
        let (data_dir, assets_dir) = (absolute(&self.data_dir), absolute(&self.assets_dir));
        if data_dir.starts_with(&assets_dir) || assets_dir.starts_with(&data_dir) {
            return Err(bad(
                "HYPERFLEET_DATA_DIR",
                format!(
                    "{} must not be inside HYPERFLEET_ASSETS_DIR {} (nor contain it): requests name images \
                     inside the assets directory, and machines' private disks must not be among them",
                    data_dir.display(),
                    assets_dir.display()
                ),
            ));
        }
        let chroot_dir = self.chroot_dir.as_deref().map(absolute).unwrap_or_else(|| data_dir.join("jail"));
        let image_dir = self.image_dir.as_deref().map(absolute).unwrap_or_else(|| data_dir.with_file_name("images"));
        if image_dir.starts_with(&assets_dir) || image_dir.starts_with(&data_dir) {
            return Err(bad(
                "HYPERFLEET_IMAGE_DIR",
                format!("{} must be outside the assets and data directories", image_dir.display()),
            ));
        }
        let host_list = |s: &str| -> Vec<String> {
            s.split(',').map(str::trim).filter(|h| !h.is_empty()).map(str::to_string).collect()
        };
        let registries = crate::oci::Registries {
            insecure: host_list(&self.insecure_registries),
            mirror: self.registry_mirror.as_deref().map(str::trim).filter(|m| !m.is_empty()).map(str::to_string),
            allowed: Some(host_list(&self.allowed_registries)).filter(|l| !l.is_empty()),
        };
        if self.image_cache_mib == 0 {
            return Err(bad("HYPERFLEET_IMAGE_CACHE_MIB", "must be at least 1"));
        }
        let volumes_dir = self.volumes_dir.as_deref().map(absolute).unwrap_or_else(|| data_dir.join("volumes"));
        if volumes_dir.starts_with(&assets_dir) {
            return Err(bad(
                "HYPERFLEET_VOLUMES_DIR",
                format!("{} must not be inside HYPERFLEET_ASSETS_DIR {}", volumes_dir.display(), assets_dir.display()),
            ));
        }
        Ok(RuntimeSettings {
            data_dir,
            chroot_dir,
            volumes_dir,
            assets_dir,
            kernel_image_path: absolute(&self.kernel_image_path),
            kernel_args: self.kernel_args.clone(),
            rootfs_path: absolute(&self.rootfs_path),
            firecracker_bin: self.firecracker_bin.as_deref().map(absolute),
            jailer_bin: self.jailer_bin.as_deref().map(absolute),
            jailer_uid_base: self.jailer_uid_base,
            cgroup_favordynmods: self.cgroup_favordynmods,
            container_uid_base: self.container_userns.then_some(self.container_uid_base),
            runc_bin: self.runc_bin.clone(),
            default_runtime,
            stop_timeout: Duration::from_secs(self.stop_timeout),
            image_dir,
            image_cache_bytes: self.image_cache_mib.saturating_mul(1 << 20),
            registries,
            console_log_max_size: parse_size(&self.console_log_max_size).filter(|n| *n >= 4096).ok_or_else(|| {
                bad(
                    "HYPERFLEET_CONSOLE_LOG_MAX_SIZE",
                    format!("'{}': use bytes or 8MiB, at least 4096", self.console_log_max_size),
                )
            })?,
        })
    }
}

impl NetworkArgs {
    pub fn validate(&self) -> Result<NetworkSettings, ConfigError> {
        let subnet: Subnet = self.subnet.parse().map_err(|e| bad("HYPERFLEET_SUBNET", format!("{e}")))?;
        let tap_naming = TapNaming::new(&self.tap_prefix).map_err(|e| bad("HYPERFLEET_TAP_PREFIX", e.to_string()))?;
        let dns = match &self.dns {
            Some(s) => {
                let list = parse_dns_list(s).map_err(|e| bad("HYPERFLEET_DNS", e))?;
                if list.is_empty() {
                    return Err(bad("HYPERFLEET_DNS", "give at least one IPv4 address"));
                }
                Some(list)
            }
            None => None,
        };
        if self.nft_table.is_empty() || !self.nft_table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(bad("HYPERFLEET_NFT_TABLE", "use letters, digits and '_'"));
        }
        let egress_deny = match self.egress_deny.trim() {
            "" | "none" => vec![],
            list => list
                .split(',')
                .map(|c| {
                    let c = c.trim();
                    c.parse::<ipnet::Ipv4Net>()
                        .or_else(|_| c.parse::<Ipv4Addr>().map(ipnet::Ipv4Net::from))
                        .map(|n| n.trunc())
                        .map_err(|_| bad("HYPERFLEET_EGRESS_DENY", format!("'{c}' is not an IPv4 CIDR")))
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(NetworkSettings { subnet, tap_naming, dns, nft_table: self.nft_table.clone(), egress_deny })
    }
}

impl FileArgs {
    pub fn validate(&self) -> Result<FileSettings, ConfigError> {
        let max_size = parse_size(&self.file_max_size).filter(|n| *n > 0).ok_or_else(|| {
            bad("HYPERFLEET_FILE_MAX_SIZE", format!("'{}': use bytes or 100MB, 1GiB", self.file_max_size))
        })?;
        if self.file_transfer_timeout == 0 {
            return Err(bad("HYPERFLEET_FILE_TRANSFER_TIMEOUT", "must be at least 1 second"));
        }
        if self.exec_max_concurrent == 0 {
            return Err(bad("HYPERFLEET_EXEC_MAX_CONCURRENT", "must be at least 1"));
        }
        let exec_output_budget = parse_size(&self.exec_output_budget).filter(|n| *n >= 1 << 20).ok_or_else(|| {
            bad(
                "HYPERFLEET_EXEC_OUTPUT_BUDGET",
                format!("'{}': use bytes or 256MiB, at least 1MiB", self.exec_output_budget),
            )
        })?;
        if self.pty_client_timeout == 0 {
            return Err(bad("HYPERFLEET_PTY_CLIENT_TIMEOUT", "must be at least 1 second"));
        }
        Ok(FileSettings {
            max_size,
            transfer_timeout: Duration::from_secs(self.file_transfer_timeout),
            exec_max_concurrent: self.exec_max_concurrent,
            exec_output_budget,
            pty_client_timeout: Duration::from_secs(self.pty_client_timeout),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Location;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn parse(extra: &[&str]) -> Result<Settings, String> {
        let mut argv = vec!["hyperfleet", "--database-path", "/tmp/x.db"];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        cli.args.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_validate() {
        let s = parse(&[]).unwrap();
        assert_eq!(s.api.port, 3000);
        assert_eq!(s.proxy.port, Some(4000));
        assert_eq!(s.proxy.poll_interval, Duration::from_secs(10));
        assert_eq!(s.network.subnet.to_string(), "172.16.0.0/16");
        assert_eq!(s.files.max_size, 100 << 20);
        assert!(s.runtime.kernel_image_path.is_absolute());
        assert_eq!(s.runtime.default_runtime, None);
        assert_eq!(s.runtime.chroot_dir, s.runtime.data_dir.join("jail"));
        assert_eq!(s.runtime.jailer_uid_base, DEFAULT_JAILER_UID_BASE);
        assert_eq!(s.runtime.container_uid_base, Some(DEFAULT_CONTAINER_UID_BASE));
        assert!(s.runtime.cgroup_favordynmods);
        assert_eq!(s.store.database, Location::Sqlite("/tmp/x.db".into()), "SQLite at DATABASE_PATH by default");
        let pg = parse(&["--database", "postgresql://hf@127.0.0.1/hf"]).unwrap();
        assert_eq!(pg.store.database.backend(), crate::store::Backend::Postgres);
    }

    #[test]
    fn bad_values_name_the_setting() {
        assert!(parse(&["--port", "0"]).unwrap_err().contains("--port"));
        assert!(parse(&["--port", "70000"]).unwrap_err().contains("--port"));
        let nested = parse(&["--assets-dir", "/srv/hf", "--data-dir", "/srv/hf/machines"]).unwrap_err();
        assert!(nested.contains("HYPERFLEET_DATA_DIR") && nested.contains("must not be inside"), "{nested}");
        assert!(parse(&["--assets-dir", "/srv/hf/assets", "--data-dir", "/srv/hf"]).is_err(), "nor contain it");
        assert!(parse(&["--assets-dir", "/srv/hf-assets", "--data-dir", "/srv/hf"]).is_ok(), "siblings are fine");
        assert!(parse(&["--database-path", "/no/such/dir/x.db"]).unwrap_err().contains("DATABASE_PATH"));
        assert!(parse(&["--database", "mysql://db/x"]).unwrap_err().contains("DATABASE_URL"));
        let pg = ["--database", "postgres://db/x", "--node-url", "http://10.0.0.1:3000"];
        assert!(parse(&pg).unwrap_err().contains("HYPERFLEET_CLUSTER_SECRET"), "a fleet needs the secret");
        assert!(parse(&["--node-name", "bad name"]).unwrap_err().contains("HYPERFLEET_NODE_NAME"));
        assert!(parse(&["--node-url", "ftp://x"]).unwrap_err().contains("HYPERFLEET_NODE_URL"));
        assert!(parse(&["--node-proxy-url", "nope"]).unwrap_err().contains("HYPERFLEET_NODE_PROXY_URL"));
        assert!(parse(&["--node-url", "https://10.0.0.1"]).unwrap_err().contains("plain HTTP"));
        for extra in ["http://10.0.0.1:3000/api", "http://10.0.0.1:3000?x=1", "http://u:p@10.0.0.1:3000"] {
            assert!(parse(&["--node-proxy-url", extra]).unwrap_err().contains("HOST:PORT"), "{extra}");
        }
        let derived = parse(&["--node-url", "http://10.0.0.1:3000/"]).unwrap().store.node;
        assert_eq!(derived.proxy_url(Some(4000)).as_deref(), Some("http://10.0.0.1:4000"), "the API's host");
        assert_eq!(derived.proxy_url(None), None, "no proxy, nothing to reach");
        assert!(parse(&["--node-labels", "novalue"]).unwrap_err().contains("HYPERFLEET_NODE_LABELS"));
        assert!(parse(&["--overcommit", "0"]).unwrap_err().contains("HYPERFLEET_OVERCOMMIT"));
        assert!(parse(&["--node-down-after-ms", "100"]).unwrap_err().contains("HYPERFLEET_NODE_DOWN_AFTER_MS"));
        assert!(parse(&["--cluster-secret", "short"]).unwrap_err().contains("HYPERFLEET_CLUSTER_SECRET"));
        let one_host = parse(&["--node-name", "solo"]).unwrap();
        assert_eq!((one_host.store.node.name.as_str(), one_host.store.node.overcommit), ("solo", None));
        assert!(parse(&["--database", "sqlite:///no/such/dir/x.db"]).unwrap_err().contains("DATABASE_URL"));
        assert!(parse(&["--proxy-poll-interval-ms", "0"]).unwrap_err().contains("PROXY_EXPOSED_PORT_POLL_INTERVAL_MS"));
        assert!(parse(&["--subnet", "10.0.0.0/31"]).unwrap_err().contains("HYPERFLEET_SUBNET"));
        assert!(parse(&["--subnet", "nope"]).unwrap_err().contains("HYPERFLEET_SUBNET"));
        assert!(parse(&["--dns", "1.2.3"]).unwrap_err().contains("HYPERFLEET_DNS"));
        assert!(parse(&["--runtime", "qemu"]).unwrap_err().contains("HYPERFLEET_RUNTIME"));
        assert!(parse(&["--file-max-size", "lots"]).unwrap_err().contains("HYPERFLEET_FILE_MAX_SIZE"));
        assert!(parse(&["--tap-prefix", "t1"]).unwrap_err().contains("HYPERFLEET_TAP_PREFIX"));
        assert!(parse(&["--proxy-port", "3000"]).unwrap_err().contains("PROXY_PORT"));
        assert!(parse(&["--jailer-uid-base", "0"]).unwrap_err().contains("HYPERFLEET_JAILER_UID_BASE"));
        assert!(parse(&["--jailer-uid-base", "2147483000"]).unwrap_err().contains("HYPERFLEET_JAILER_UID_BASE"));
        assert!(parse(&["--container-uid-base", "900100"]).unwrap_err().contains("HYPERFLEET_CONTAINER_UID_BASE"));
        assert!(parse(&["--container-uid-base", "100"]).unwrap_err().contains("HYPERFLEET_CONTAINER_UID_BASE"));
        assert!(parse(&["--proxy-port", "0"]).unwrap().proxy.port.is_none());
        assert!(parse(&["--header-read-timeout", "0"]).unwrap_err().contains("HYPERFLEET_HEADER_READ_TIMEOUT"));
        assert!(parse(&["--max-connections-per-ip", "0"]).unwrap_err().contains("HYPERFLEET_MAX_CONNECTIONS_PER_IP"));
        assert!(parse(&["--proxy-websocket-idle-timeout", "0"]).unwrap_err().contains("PROXY_WEBSOCKET_IDLE_TIMEOUT"));
        assert!(parse(&["--metrics-token", "short"]).unwrap_err().contains("HYPERFLEET_METRICS_TOKEN"));
        assert!(parse(&["--log-format", "xml"]).unwrap_err().contains("HYPERFLEET_LOG_FORMAT"));
        assert!(parse(&["--events-backlog", "5"]).unwrap_err().contains("HYPERFLEET_EVENTS_BACKLOG"));
    }

    #[test]
    fn settings_without_serving_have_the_documented_defaults() {
        let served = parse(&[]).unwrap();
        let s = Settings::without_serving(served.store, served.runtime, served.network).unwrap();
        assert_eq!((s.api.port, s.api.disable_auth, s.proxy.port), (3000, false, Some(4000)));
        assert_eq!((s.files.max_size, s.files.transfer_timeout), (100 << 20, Duration::from_secs(60)));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100MB"), Some(100 << 20));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("512k"), Some(512 << 10));
        assert_eq!(parse_size("42"), Some(42));
        assert_eq!(parse_size("12XB"), None);
        assert_eq!(parse_size(""), None);
    }

    /// One non-default value for every variable README.md documents.
    const SAMPLES: &[(&str, &str)] = &[
        ("PORT", "3100"),
        ("PROXY_PORT", "4100"),
        ("HYPERFLEET_BIND_ADDRESS", "127.0.0.1"),
        ("DATABASE_PATH", "/tmp/hf-env.db"),
        ("DATABASE_URL", "postgres://hf:pw@db.test:5432/hyperfleet"),
        ("DISABLE_AUTH", "true"),
        ("PROXY_PREFIX", "/p"),
        ("PROXY_HOST_SUFFIX", ".vm.test"),
        ("PROXY_EXPOSED_PORT_POLL_INTERVAL_MS", "2500"),
        ("PROXY_MAX_CONNECTIONS", "7"),
        ("PROXY_UPSTREAM_TIMEOUT", "9"),
        ("PROXY_WEBSOCKET_IDLE_TIMEOUT", "11"),
        ("HYPERFLEET_API_MAX_CONNECTIONS", "500"),
        ("HYPERFLEET_MAX_CONNECTIONS_PER_IP", "20"),
        ("HYPERFLEET_HEADER_READ_TIMEOUT", "4"),
        ("HYPERFLEET_IDLE_TIMEOUT", "12"),
        ("HYPERFLEET_DATA_DIR", "/srv/hf-data/machines"),
        ("HYPERFLEET_VOLUMES_DIR", "/srv/hf-data/volumes"),
        ("HYPERFLEET_CHROOT_DIR", "/srv/hf-data/jail"),
        ("HYPERFLEET_ASSETS_DIR", "/srv/hf"),
        ("HYPERFLEET_KERNEL_IMAGE_PATH", "/srv/hf/kernel"),
        ("HYPERFLEET_KERNEL_ARGS", "console=ttyS0"),
        ("HYPERFLEET_ROOTFS_PATH", "/srv/hf/root.ext4"),
        ("FIRECRACKER_BIN", "/opt/fc/firecracker"),
        ("JAILER_BIN", "/opt/fc/jailer"),
        ("HYPERFLEET_JAILER_UID_BASE", "50000"),
        ("HYPERFLEET_CGROUP_FAVORDYNMODS", "false"),
        ("HYPERFLEET_CONTAINER_USERNS", "false"),
        ("HYPERFLEET_CONTAINER_UID_BASE", "200000000"),
        ("HYPERFLEET_RUNC_BIN", "/opt/runc"),
        ("HYPERFLEET_RUNTIME", "container"),
        ("HYPERFLEET_SUBNET", "10.9.0.0/20"),
        ("HYPERFLEET_TAP_PREFIX", "hft"),
        ("HYPERFLEET_DNS", "192.0.2.53, 192.0.2.54"),
        ("HYPERFLEET_NFT_TABLE", "hf_env"),
        ("HYPERFLEET_EGRESS_DENY", "169.254.0.0/16, 10.0.0.0/8"),
        ("HYPERFLEET_EXEC_MAX_CONCURRENT", "3"),
        ("HYPERFLEET_PTY_CLIENT_TIMEOUT", "5"),
        ("PROXY_WAKE_TIMEOUT", "10"),
        ("HYPERFLEET_EXEC_OUTPUT_BUDGET", "64MiB"),
        ("HYPERFLEET_STOP_TIMEOUT", "3"),
        ("HYPERFLEET_CONSOLE_LOG_MAX_SIZE", "1MiB"),
        ("HYPERFLEET_FILE_MAX_SIZE", "1GiB"),
        ("HYPERFLEET_FILE_TRANSFER_TIMEOUT", "5"),
        ("HYPERFLEET_IMAGE_DIR", "/srv/hf-data/images"),
        ("HYPERFLEET_IMAGE_CACHE_MIB", "2048"),
        ("HYPERFLEET_REGISTRY_MIRROR", "mirror.test:5000"),
        ("HYPERFLEET_INSECURE_REGISTRIES", "127.0.0.1:5000, mirror.test:5000"),
        ("HYPERFLEET_ALLOWED_REGISTRIES", "127.0.0.1:5000"),
        ("HYPERFLEET_METRICS_TOKEN", "prometheus-scrape-token-1234"),
        ("HYPERFLEET_METRICS", "false"),
        ("HYPERFLEET_LOG_FORMAT", "json"),
        ("HYPERFLEET_EVENTS_BACKLOG", "500"),
        ("HYPERFLEET_WEBHOOK_RETRY_BASE_MS", "250"),
        ("HYPERFLEET_WEBHOOK_MAX_ATTEMPTS", "4"),
        ("HYPERFLEET_WEBHOOK_TIMEOUT", "7"),
        ("HYPERFLEET_CHILD_API_PORT", "3200"),
        ("HYPERFLEET_NODE_NAME", "node-7"),
        ("HYPERFLEET_NODE_URL", "http://10.0.0.7:3100/"),
        ("HYPERFLEET_NODE_PROXY_URL", "http://10.0.0.7:4100"),
        ("HYPERFLEET_NODE_LABELS", "zone=a, disk=ssd"),
        ("HYPERFLEET_NODE_VCPUS", "12"),
        ("HYPERFLEET_NODE_MEM_MIB", "4096"),
        ("HYPERFLEET_OVERCOMMIT", "1.5"),
        ("HYPERFLEET_HEARTBEAT_INTERVAL_MS", "700"),
        ("HYPERFLEET_NODE_DOWN_AFTER_MS", "5000"),
        ("HYPERFLEET_CLUSTER_SECRET", "a-cluster-secret-of-some-length"),
    ];

    /// The variables of README.md's configuration table (`PORT` / `PROXY_PORT` rows name two).
    fn documented() -> Vec<String> {
        let readme = include_str!("../../../README.md");
        let table = readme.split("## Configuration").nth(1).unwrap().split("\n## ").next().unwrap();
        table
            .lines()
            .filter_map(|l| l.strip_prefix("| "))
            .filter_map(|l| l.split(" |").next())
            .flat_map(|cell| cell.split('`').skip(1).step_by(2).map(str::to_string).collect::<Vec<_>>())
            .collect()
    }

    #[test]
    fn readme_documents_every_variable_and_only_those() {
        let mut doc = documented();
        doc.sort();
        let mut sampled: Vec<String> = SAMPLES.iter().map(|(k, _)| k.to_string()).collect();
        sampled.sort();
        assert_eq!(doc, sampled, "README.md's table and SAMPLES differ");
        let mut read: Vec<String> = Cli::command()
            .get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect();
        read.sort();
        assert_eq!(doc, read, "README.md's table and the variables `serve` reads differ");
    }

    const CHILD: &str = "HYPERFLEET_CONFIG_TEST_CHILD";

    /// The environment belongs to the whole process and other tests run on other threads, so the variables
    /// are set on a child: this test runs itself again there, and the child checks what it parsed.
    #[test]
    fn documented_variables_parse_from_the_environment() {
        if std::env::var_os(CHILD).is_none() {
            let name = "config::tests::documented_variables_parse_from_the_environment";
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([name, "--exact", "--nocapture", "--test-threads=1"])
                .envs(SAMPLES.iter().copied())
                .env(CHILD, "1")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && stdout.contains("1 passed"), "child: {stdout}\n{stderr}");
            return;
        }
        let s = Cli::try_parse_from(["hyperfleet"]).unwrap().args.validate().unwrap();
        let p = PathBuf::from;
        assert_eq!((s.api.port, s.api.bind, s.api.disable_auth), (3100, IpAddr::from([127, 0, 0, 1]), true));
        let proxy = &s.proxy;
        assert_eq!(
            (proxy.port, proxy.prefix.as_str(), proxy.host_suffix.as_deref()),
            (Some(4100), "/p", Some(".vm.test"))
        );
        assert_eq!(proxy.poll_interval, Duration::from_millis(2500));
        assert_eq!((proxy.max_connections, proxy.upstream_timeout), (7, Duration::from_secs(9)));
        assert_eq!(proxy.websocket_idle_timeout, Duration::from_secs(11));
        assert_eq!((s.api.max_connections, s.api.max_connections_per_ip), (500, 20));
        assert_eq!(
            (s.api.timeouts.header_read, s.api.timeouts.idle),
            (Duration::from_secs(4), Duration::from_secs(12))
        );
        assert_eq!(s.store.database, Location::Postgres("postgres://hf:pw@db.test:5432/hyperfleet".into()));
        assert_eq!(s.store.events_backlog, 500);
        let n = &s.store.node;
        assert_eq!((n.name.as_str(), n.url.as_deref()), ("node-7", Some("http://10.0.0.7:3100")));
        assert_eq!(n.proxy_url(s.proxy.port).as_deref(), Some("http://10.0.0.7:4100"));
        assert_eq!(n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(), ["disk=ssd", "zone=a"]);
        assert_eq!((n.vcpus, n.mem_mib, n.overcommit), (Some(12), Some(4096), Some(1.5)));
        assert_eq!((n.heartbeat_interval, n.down_after), (Duration::from_millis(700), Duration::from_secs(5)));
        assert_eq!(n.cluster_secret.as_deref(), Some("a-cluster-secret-of-some-length"));
        assert_eq!(
            (s.store.webhook_retry_base, s.store.webhook_max_attempts, s.store.webhook_timeout),
            (Duration::from_millis(250), 4, Duration::from_secs(7))
        );
        assert_eq!(s.api.metrics_token.as_deref(), Some("prometheus-scrape-token-1234"));
        assert!(!s.api.metrics);
        assert_eq!(s.api.log_format, LogFormat::Json);
        assert_eq!(s.api.child_api_port, Some(3200));
        let r = &s.runtime;
        assert_eq!(
            (&r.data_dir, &r.chroot_dir, &r.assets_dir),
            (&p("/srv/hf-data/machines"), &p("/srv/hf-data/jail"), &p("/srv/hf"))
        );
        assert_eq!((&r.jailer_bin, r.jailer_uid_base), (&Some(p("/opt/fc/jailer")), 50000));
        assert!(!r.cgroup_favordynmods);
        assert_eq!(r.container_uid_base, None, "HYPERFLEET_CONTAINER_USERNS=false");
        assert_eq!((&r.kernel_image_path, r.kernel_args.as_str()), (&p("/srv/hf/kernel"), "console=ttyS0"));
        assert_eq!((&r.rootfs_path, &r.firecracker_bin), (&p("/srv/hf/root.ext4"), &Some(p("/opt/fc/firecracker"))));
        assert_eq!((&r.runc_bin, r.default_runtime), (&p("/opt/runc"), Some(RuntimeKind::Container)));
        assert_eq!(r.stop_timeout, Duration::from_secs(3));
        assert_eq!(r.console_log_max_size, 1 << 20);
        assert_eq!((&r.image_dir, r.image_cache_bytes), (&p("/srv/hf-data/images"), 2048 << 20));
        assert_eq!(r.registries.insecure, ["127.0.0.1:5000", "mirror.test:5000"]);
        assert_eq!(r.registries.mirror.as_deref(), Some("mirror.test:5000"));
        assert_eq!(r.registries.allowed, Some(vec!["127.0.0.1:5000".to_string()]));
        let n = &s.network;
        assert_eq!(
            (n.subnet.to_string(), n.tap_naming.name(2), n.nft_table.as_str()),
            ("10.9.0.0/20".into(), "hft2".into(), "hf_env")
        );
        assert_eq!(n.dns, Some(vec![Ipv4Addr::new(192, 0, 2, 53), Ipv4Addr::new(192, 0, 2, 54)]));
        assert_eq!(n.egress_deny, vec!["169.254.0.0/16".parse().unwrap(), "10.0.0.0/8".parse().unwrap()]);
        assert_eq!((s.files.max_size, s.files.transfer_timeout), (1 << 30, Duration::from_secs(5)));
        assert_eq!((s.files.exec_max_concurrent, s.files.exec_output_budget), (3, 64 << 20));

        // The groups `purge` does not read keep their defaults whatever the environment says.
        let purge = Settings::without_serving(s.store, s.runtime, s.network).unwrap();
        assert_eq!((purge.api.port, purge.proxy.port, purge.files.max_size), (3000, Some(4000), 100 << 20));
    }
}
