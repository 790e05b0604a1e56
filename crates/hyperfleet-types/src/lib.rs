//! The REST wire types of the Hyperfleet API: what the daemon sends and accepts, shared by the server, the SDK
//! and the CLI. The OpenAPI document is generated from these same types, so the spec cannot drift from the code.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

pub mod timestamp;

/// Lifecycle state of a machine (see the state table in the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MachineStatus {
    Pending,
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    Failed,
}

impl MachineStatus {
    pub const ALL: [MachineStatus; 7] =
        [Self::Pending, Self::Starting, Self::Running, Self::Paused, Self::Stopping, Self::Stopped, Self::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The one place that says which transitions exist. `failed → starting` was added later (earlier versions only allowed
    /// deleting a failed machine): a machine keeps its disk and addresses, so retrying it is what users expect.
    pub fn can_become(self, next: MachineStatus) -> bool {
        use MachineStatus::*;
        matches!(
            (self, next),
            (Pending | Stopped | Failed, Starting)
                | (Starting, Running | Failed | Stopped)
                | (Running, Stopping | Paused | Failed)
                | (Paused, Running | Stopping | Failed)
                | (Stopping, Stopped | Failed)
                // Found dead when the daemon starts: the process is gone, so the machine is simply stopped.
                | (Running | Paused, Stopped)
        )
    }

    /// States without a process or host resources: a machine in one of them may be deleted as it is.
    pub const AT_REST: [MachineStatus; 3] = [Self::Pending, Self::Stopped, Self::Failed];

    pub fn is_at_rest(self) -> bool {
        Self::AT_REST.contains(&self)
    }
}

impl fmt::Display for MachineStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What runs a machine: a Firecracker microVM, or (hosts without hardware virtualization) an OCI container
/// under runc with the same image and agent. A container's isolation is a container's, not a VM's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    Firecracker,
    Container,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Firecracker => "firecracker",
            Self::Container => "container",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "firecracker" => Some(Self::Firecracker),
            "container" => Some(Self::Container),
            _ => None,
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a machine may send new connections. JSON: `"allow"`, `"deny"`, or a list of IPv4 CIDRs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum EgressPolicy {
    #[default]
    Allow,
    Deny,
    Cidrs(Vec<Ipv4Net>),
}

impl Serialize for EgressPolicy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Allow => s.serialize_str("allow"),
            Self::Deny => s.serialize_str("deny"),
            Self::Cidrs(c) => c.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for EgressPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            List(Vec<String>),
        }
        let raw = Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom(r#"egress must be "allow", "deny" or a list of IPv4 CIDRs"#))?;
        match raw {
            Raw::Word(w) if w == "allow" => Ok(Self::Allow),
            Raw::Word(w) if w == "deny" => Ok(Self::Deny),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                r#"egress must be "allow", "deny" or a list of IPv4 CIDRs, got "{w}""#
            ))),
            Raw::List(items) => items
                .iter()
                .map(|c| {
                    c.parse::<Ipv4Net>()
                        .or_else(|_| c.parse::<Ipv4Addr>().map(Ipv4Net::from))
                        .map(|n| n.trunc())
                        .map_err(|_| serde::de::Error::custom(format!("egress: '{c}' is not an IPv4 CIDR")))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Self::Cidrs),
        }
    }
}

impl utoipa::PartialSchema for EgressPolicy {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["allow", "deny"])))
            .item(ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::String).format(None)))
            .description(Some(
                "`allow` (default): any destination; `deny`: no new outbound connections; \
                 a list of IPv4 CIDRs: only those destinations.",
            ))
            .into()
    }
}
impl ToSchema for EgressPolicy {}

/// The network a machine was asked for (`dns`, `egress`), and in responses the addresses the daemon gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MachineNetwork {
    /// Prefix length of the machine's block (30: host side .1, guest .2). Responses only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_len: Option<u8>,
    /// The guest's default gateway: the host end of its link (`tap_ip`). Responses only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "172.16.0.1")]
    pub gateway: Option<Ipv4Addr>,
    /// Resolvers written to the guest's /etc/resolv.conf and the kernel's `ip=` line.
    #[schema(value_type = Vec<String>)]
    pub dns: Vec<Ipv4Addr>,
    pub egress: EgressPolicy,
}

/// A port listed in `exposed_ports` and whether something in the guest accepted a connection on it at the
/// last poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExposedPortStatus {
    pub port: u16,
    pub listening: bool,
    /// RFC 3339 time of the last check, absent before the first one.
    #[serde(default, with = "timestamp::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub checked_at: Option<time::OffsetDateTime>,
}

/// What the user asked for, validated and with the host's defaults filled in: the one description of a
/// machine's configuration. The daemon stores it as it is and every machine response carries it (flattened).
/// A new machine setting is a field here (with `#[serde(default)]` so stored machines still read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MachineSpec {
    pub name: String,
    pub runtime: RuntimeKind,
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    pub kernel_image_path: String,
    pub kernel_args: String,
    pub rootfs_path: String,
    pub exposed_ports: Vec<u16>,
    pub network: MachineNetwork,
    /// Environment variables set for every command run in the machine (exec, terminal, an image's main process).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The OCI image the machine runs, as given (`alpine:3.20`, `registry:5000/team/app@sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The image's manifest digest, once resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// Disk size asked for an image machine (default: the unpacked size plus headroom).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size_mib: Option<u32>,
    /// Replaces the image's Entrypoint for the main process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's Cmd for the main process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// What happens when the main process ends.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Volumes the machine mounts while it runs (`volume` is the volume's id).
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
    /// Size of the machine's own root disk: the image's size unless `disk_size_mib` asked for more.
    #[serde(default)]
    pub disk_size_mib: u32,
    /// Names of the machine's secrets: variables set like `env`, whose values are write-only.
    #[serde(default)]
    pub secret_names: Vec<String>,
    /// Free-form tags (`team=ml`), selectable with `GET /machines?label=…`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Stop (or delete, see `on_ttl`) the machine this many seconds after it started, whatever happens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    #[serde(default)]
    pub on_ttl: TtlAction,
    /// Stop the machine after this many seconds without activity (see the README for what counts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<u64>,
    /// How long an open but silent connection or terminal still counts as activity (default: the idle
    /// timeout), so a forgotten WebSocket cannot keep a machine alive forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_max_connection_seconds: Option<u64>,
    /// A proxied request to the stopped or paused machine starts or resumes it.
    #[serde(default)]
    pub auto_start: bool,
    /// The machine may create child machines from inside, within these quotas (see the README's "Child
    /// machines").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spawn: Option<SpawnLimits>,
    /// The machine that created this one (a child machine), deleted and stopped with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
}

/// What a machine with `spawn` may create from inside: its live children (every child until it is deleted)
/// together stay within these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SpawnLimits {
    /// Children that may exist at once.
    pub max_children: u32,
    /// The sum of the children's `vcpu_count`.
    pub max_vcpu: u32,
    /// The sum of the children's `mem_size_mib`.
    pub max_mem_mib: u32,
}

/// `spawn` in a create request (checked by the daemon: each at least 1, `max_mem_mib` at least 4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    #[schema(required = true, minimum = 1, maximum = 64, example = 4)]
    pub max_children: Option<i64>,
    #[schema(required = true, minimum = 1, example = 4)]
    pub max_vcpu: Option<i64>,
    #[schema(required = true, minimum = 4, example = 2048)]
    pub max_mem_mib: Option<i64>,
}

/// What happens when a machine's main process (an image's Entrypoint + Cmd) ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// The machine stops (exit 0) or fails (non-zero, with the code and last lines in `error_message`).
    #[default]
    No,
    /// Restarted inside the machine after a non-zero exit; a zero exit stops the machine.
    OnFailure,
    /// Restarted inside the machine whenever it ends.
    Always,
}

/// Credentials for a registry, used for one pull and never stored in plain text, echoed or logged:
/// `{"username", "password"}` or `{"token"}`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistryAuth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RegistryAuth(<redacted>)")
    }
}

/// Where getting a machine's image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImagePhase {
    Pulling,
    Converting,
    Ready,
    Failed,
}

/// A machine's image pull, while it runs and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageStatus {
    pub phase: ImagePhase,
    pub bytes_done: u64,
    pub bytes_total: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A cached image (`GET /images`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageInfo {
    /// Manifest digest (`sha256:…`).
    pub digest: String,
    /// References it was pulled by.
    pub references: Vec<String>,
    /// Bytes on disk: layers and the converted root image.
    pub size_bytes: u64,
    /// RFC 3339, UTC.
    #[serde(with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub last_used: time::OffsetDateTime,
    /// Ids of the machines created from it.
    pub machines: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageList {
    pub images: Vec<ImageInfo>,
}

/// `POST /images/pull`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullImage {
    #[schema(example = "busybox:latest")]
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<RegistryAuth>,
}

/// A volume a machine mounts: `{"volume": "cache", "mount_path": "/data", "read_only": false}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    /// The volume's name or id in a request; its id once stored.
    pub volume: String,
    /// Absolute path in the guest: letters, digits and `/._-`; not `/` nor under /proc, /sys or /dev.
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
}

/// A volume: an ext4 file system that outlives machines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    pub id: String,
    pub name: String,
    pub size_mib: u32,
    /// Machines that name this volume, and whether each holds it now (is starting, running, paused or stopping).
    pub machines: Vec<VolumeUser>,
    #[serde(with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: time::OffsetDateTime,
    #[serde(with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: time::OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeUser {
    pub machine_id: String,
    pub read_only: bool,
    pub attached: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeList {
    pub volumes: Vec<Volume>,
}

/// `POST /volumes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    /// Unique, like a machine name: lowercase letters, digits and '-', 1-63 characters.
    #[schema(required = true, example = "cache")]
    pub name: Option<String>,
    #[schema(required = true, minimum = 8, example = 1024)]
    pub size_mib: Option<i64>,
}

/// `POST /volumes/{id}/resize`: grow only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeVolume {
    #[schema(required = true, example = 2048)]
    pub size_mib: Option<i64>,
}

/// `POST /volumes/{id}/clone`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneVolume {
    /// The new volume's name.
    #[schema(required = true, example = "cache-copy")]
    pub name: Option<String>,
}

/// What happens when a machine's `ttl_seconds` run out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TtlAction {
    #[default]
    Stop,
    Delete,
}

/// A machine: its spec, plus what the daemon decided (id, addresses) and observes (status, process).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Machine {
    pub id: String,
    #[serde(flatten)]
    pub spec: MachineSpec,
    pub status: MachineStatus,
    /// Firecracker's API socket (firecracker runtime) while the machine has a process.
    pub socket_path: Option<String>,
    /// PID of the firecracker process or of the container's init while running.
    pub pid: Option<u32>,
    pub exposed_ports_status: Vec<ExposedPortStatus>,
    /// The image pull of an image machine (absent for other machines, and after a daemon restart until the
    /// next pull).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_status: Option<ImageStatus>,
    /// Host-side interface: a TAP device (firecracker) or the host end of a veth pair (container).
    pub tap_device: String,
    #[schema(value_type = String, example = "172.16.0.1")]
    pub tap_ip: Ipv4Addr,
    #[schema(value_type = String, example = "172.16.0.2")]
    pub guest_ip: Ipv4Addr,
    #[schema(example = "AA:FC:00:00:00:01")]
    pub guest_mac: String,
    pub error_message: Option<String>,
    /// When `ttl_seconds` runs out (RFC 3339), while the machine runs or is paused.
    #[serde(default, with = "timestamp::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<time::OffsetDateTime>,
    /// The last activity (RFC 3339) of a running machine with `idle_timeout_seconds`; it stops at
    /// `idle_since + idle_timeout_seconds` unless something happens.
    #[serde(default, with = "timestamp::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub idle_since: Option<time::OffsetDateTime>,
    /// RFC 3339, UTC.
    #[serde(with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: time::OffsetDateTime,
    #[serde(with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: time::OffsetDateTime,
    /// The fleet node that owns the machine (runs its process; other nodes forward to it).
    #[serde(default)]
    pub node: String,
    /// Whether that node is `up`, `drained` (serving, but taking no new machines) or `down` (no heartbeat
    /// within `HYPERFLEET_NODE_DOWN_AFTER`: its machines' status is the last one it recorded).
    #[serde(default)]
    pub node_status: NodeStatus,
}

/// A fleet node's state, from its heartbeat row (judged by the database's clock) and its drain flag.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    #[default]
    Up,
    Drained,
    Down,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Drained => "drained",
            Self::Down => "down",
        }
    }
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A daemon of the fleet (`GET /nodes`): what it registered, its heartbeat, and what its machines reserve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Node {
    #[schema(example = "node-a")]
    pub name: String,
    /// How the other nodes reach this node's API (`HYPERFLEET_NODE_URL`); absent: it takes no forwarded work.
    pub url: Option<String>,
    /// How the other nodes' proxies reach this node's proxy (`HYPERFLEET_NODE_PROXY_URL`); absent: requests
    /// for its machines' ports are served by its own proxy only.
    #[serde(default)]
    pub proxy_url: Option<String>,
    /// The subnet its machines' address blocks are cut from (`HYPERFLEET_SUBNET`).
    #[serde(default)]
    #[schema(example = "172.16.0.0/16")]
    pub subnet: Option<String>,
    pub status: NodeStatus,
    pub drained: bool,
    pub vcpus: u32,
    pub mem_size_mib: u64,
    /// Capacity multiplier used by placement (`HYPERFLEET_OVERCOMMIT`); absent: not enforced.
    pub overcommit: Option<f64>,
    pub runtimes: Vec<RuntimeKind>,
    pub labels: BTreeMap<String, String>,
    /// Machines owned by the node, and the vCPUs and memory they reserve.
    pub machines: u64,
    pub used_vcpus: u64,
    pub used_mem_size_mib: u64,
    /// Milliseconds since its last heartbeat, by the database's clock.
    pub heartbeat_age_ms: u64,
    /// When the node's daemon last started (RFC 3339).
    #[serde(with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub started_at: time::OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeList {
    pub nodes: Vec<Node>,
}

/// Per-machine network options in a create request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkOptions {
    /// Resolvers for this machine; defaults to the daemon's `HYPERFLEET_DNS` / the host's resolvers.
    #[schema(value_type = Option<Vec<String>>)]
    pub dns: Option<Vec<Ipv4Addr>>,
    pub egress: Option<EgressPolicy>,
}

/// `POST /machines`. Required fields are `Option` so a missing one gets the documented message
/// ("mem_size_mib is required") rather than a serde one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMachine {
    /// Unique, DNS-label style: lowercase letters, digits and '-', 1–63 characters.
    #[schema(required = true, example = "web-server")]
    pub name: Option<String>,
    #[schema(required = true, minimum = 1, example = 1)]
    pub vcpu_count: Option<i64>,
    #[schema(required = true, minimum = 4, example = 128)]
    pub mem_size_mib: Option<i64>,
    /// Defaults to `HYPERFLEET_KERNEL_IMAGE_PATH`; must be a regular file inside the assets directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_image_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_args: Option<String>,
    /// Defaults to `HYPERFLEET_ROOTFS_PATH`; must be a regular file inside the assets directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<Vec<i64>>,
    /// Defaults to `HYPERFLEET_RUNTIME` (container on hosts without hardware virtualization).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkOptions>,
    /// Environment variables for every command run in the machine: names are letters, digits and '_', not
    /// starting with a digit; at most 128 of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// An OCI image to run instead of `rootfs_path` (mutually exclusive with it).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "busybox:latest")]
    pub image: Option<String>,
    /// Disk size for an image machine; default: the unpacked size plus headroom, at least 64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_size_mib: Option<i64>,
    /// Credentials for pulling `image`; kept in memory for the pull only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<RegistryAuth>,
    /// Replaces the image's Entrypoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's Cmd.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<RestartPolicy>,
    /// Volumes to mount while the machine runs (at most 8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<VolumeMount>>,
    /// Grow the machine's own root disk (and its file system) to this size; at least the image's size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_size_mib: Option<i64>,
    /// String tags: keys like Kubernetes label keys (`[prefix/]name`), values up to 63 characters; at most 64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Variables set like `env` whose values are never shown again (responses list `secret_names`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secrets: Option<BTreeMap<String, String>>,
    /// Seconds after each start before the machine is stopped (or deleted); 0: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub ttl_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_ttl: Option<TtlAction>,
    /// Seconds without activity before a running machine is stopped; 0: never.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub idle_timeout_seconds: Option<u64>,
    /// Seconds an open but silent connection or terminal still counts as activity; 0: the idle timeout.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub idle_max_connection_seconds: Option<u64>,
    /// Start (or resume) the machine when a proxied request arrives for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_start: Option<bool>,
    /// Let the machine create child machines from inside (a token and `HYPERFLEET_URL` in the guest), within
    /// these quotas.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spawn: Option<SpawnRequest>,
    /// A child machine (created with a machine's token) takes its parent's `env` unless this is false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inherit_env: Option<bool>,
    /// Place the machine on this fleet node (refused with 409 if it has no room, is drained or down).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "node-a")]
    pub node: Option<String>,
    /// Place the machine only on a node carrying all these labels (`HYPERFLEET_NODE_LABELS`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
}

/// `PATCH /machines/{id}`: change what can change without a restart. Each field given replaces the
/// machine's (a map replaces the whole map); lifecycle changes take effect at once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateMachine {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<Vec<i64>>,
    /// Replaces the machine's volumes; only while it is not running (pending, stopped or failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<VolumeMount>>,
    /// Applies to commands started from now on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// String tags: keys like Kubernetes label keys (`[prefix/]name`), values up to 63 characters; at most 64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Variables set like `env` whose values are never shown again (responses list `secret_names`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secrets: Option<BTreeMap<String, String>>,
    /// Seconds after each start before the machine is stopped (or deleted); 0: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub ttl_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_ttl: Option<TtlAction>,
    /// Seconds without activity before a running machine is stopped; 0: never.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub idle_timeout_seconds: Option<u64>,
    /// Seconds an open but silent connection or terminal still counts as activity; 0: the idle timeout.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub idle_max_connection_seconds: Option<u64>,
    /// Start (or resume) the machine when a proxied request arrives for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_start: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MachineList {
    pub machines: Vec<Machine>,
    /// Number of machines matching the filter, before `limit`/`offset`.
    pub total: u64,
}

/// A command as an argument vector. A plain string is refused: it would have to go through a shell, and
/// quoting bugs there are how sandboxes get escaped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[schema(value_type = Vec<String>, example = json!(["ls", "-la", "/"]))]
pub struct CommandArgs(pub Vec<String>);

impl<'de> Deserialize<'de> for CommandArgs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            List(Vec<String>),
            Text(String),
            Other(serde::de::IgnoredAny),
        }
        match Raw::deserialize(d)? {
            Raw::List(v) if v.is_empty() => Err(serde::de::Error::custom("command must not be empty")),
            Raw::List(v) => Ok(Self(v)),
            Raw::Text(s) => Err(serde::de::Error::custom(format!(
                "command must be an array of strings, e.g. [\"sh\", \"-c\", {s:?}]"
            ))),
            Raw::Other(_) => Err(serde::de::Error::custom("command must be an array of strings")),
        }
    }
}

/// `POST /machines/{id}/exec` and `/exec/stream`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Argument vector; `cmd` is accepted as an alias (earlier API documentation used it).
    #[serde(alias = "cmd")]
    pub command: CommandArgs,
    /// Seconds before the command's process group is killed (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 3600)]
    pub timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Text fed to the command's standard input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    /// True when the output went past the agent's cap (the rest was discarded).
    #[serde(default)]
    pub stdout_truncated: bool,
    #[serde(default)]
    pub stderr_truncated: bool,
    #[serde(default)]
    pub duration_ms: u64,
}

/// One line of the NDJSON stream of `POST /machines/{id}/exec/stream`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ExecEvent {
    Stdout { data: String },
    Stderr { data: String },
    Exit { exit_code: i32, duration_ms: u64 },
    Error { code: String, message: String },
}

/// `POST /machines/{id}/files` (JSON form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileUpload {
    /// Absolute path inside the guest; parent directories are created.
    pub path: String,
    /// File content, base64.
    pub content: String,
    /// Permission bits, e.g. 420 (0o644, the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileWritten {
    pub path: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileStat {
    pub path: String,
    pub size: u64,
    pub mode: u32,
    pub is_dir: bool,
    /// RFC 3339, UTC.
    #[serde(with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub modified_at: time::OffsetDateTime,
}

/// `GET /machines/{id}/files/list`: one page of a directory, entries sorted by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DirListing {
    pub path: String,
    pub entries: Vec<DirEntry>,
    /// Pass as `after` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DirEntry {
    /// The entry's name (not UTF-8 names are shown lossily).
    pub name: String,
    #[serde(rename = "type")]
    pub kind: EntryType,
    /// Of the entry itself: a symlink is not followed.
    pub size: u64,
    /// Permission bits, e.g. 493 (0o755).
    pub mode: u32,
    /// RFC 3339, UTC.
    #[serde(with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub modified_at: time::OffsetDateTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EntryType {
    File,
    Dir,
    Symlink,
    Other,
}

/// `POST /machines/{id}/files/mkdir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MakeDir {
    /// Absolute path inside the guest.
    pub path: String,
    /// Make missing parents too, and accept an existing directory (like `mkdir -p`).
    #[serde(default)]
    pub parents: bool,
    /// Permission bits, e.g. 493 (0o755, the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// `POST /webhooks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    /// Where deliveries are POSTed: an `http` or `https` URL of at most 2048 characters. The daemon sends to
    /// whatever address this names (see the README's note on webhooks).
    #[schema(required = true, example = "https://hooks.example.com/hyperfleet")]
    pub url: Option<String>,
    /// Which events to deliver: `machine.<type>` for each event type (`machine.running`, `machine.failed`,
    /// `machine.exec.finished`, ...); 1-32 of them.
    #[schema(required = true, example = json!(["machine.running", "machine.stopped", "machine.failed"]))]
    pub events: Option<Vec<String>>,
    /// Only events of machines whose labels match (the syntax of `GET /machines?label=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "team=ml")]
    pub label_selector: Option<String>,
    /// Signs each delivery (`X-Hyperfleet-Signature`); 1-256 bytes. Write-only: never shown again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// A webhook as shown: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<String>,
    /// Whether deliveries are signed.
    pub has_secret: bool,
    #[serde(with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: time::OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WebhookList {
    pub webhooks: Vec<Webhook>,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Not delivered yet; attempted again at `next_attempt_at`.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Every attempt failed; no more are made.
    Failed,
}

/// One event's delivery to one webhook, with its attempts so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WebhookDelivery {
    /// Increases with every delivery (of any webhook).
    pub id: u64,
    pub webhook_id: String,
    /// The event's `id` (as in `GET /events`).
    pub event_id: u64,
    /// `machine.<type>`.
    pub event: String,
    pub machine_id: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    /// The HTTP status of the last attempt, when the receiver answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status_code: Option<u16>,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// While pending: when the next attempt is due.
    #[serde(default, with = "timestamp::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub next_attempt_at: Option<time::OffsetDateTime>,
    #[serde(with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: time::OffsetDateTime,
    #[serde(with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: time::OffsetDateTime,
}

/// `GET /webhooks/{id}/deliveries`: most recent first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WebhookDeliveryList {
    pub deliveries: Vec<WebhookDelivery>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before: Option<u64>,
}

/// The JSON body of a delivery POST (what `X-Hyperfleet-Signature` signs, byte for byte).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WebhookPayload {
    pub webhook_id: String,
    pub delivery_id: u64,
    /// 1 for the first attempt; a retry sends the same event with the next number.
    pub attempt: u32,
    /// `machine.<type>`.
    pub event_type: String,
    pub event: Event,
}

/// Permission a key grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum Scope {
    #[serde(rename = "machines:read")]
    MachinesRead,
    #[serde(rename = "machines:write")]
    MachinesWrite,
    #[serde(rename = "machines:exec")]
    MachinesExec,
    #[serde(rename = "keys:admin")]
    KeysAdmin,
    /// `GET /metrics` only.
    #[serde(rename = "metrics:read")]
    MetricsRead,
    /// `/webhooks` (create, list, get, delete, deliveries).
    #[serde(rename = "webhooks:admin")]
    WebhooksAdmin,
    /// Draining and undraining fleet nodes (`POST /nodes/{name}/drain|undrain`).
    #[serde(rename = "nodes:admin")]
    NodesAdmin,
    #[serde(rename = "*")]
    All,
}

impl Scope {
    pub const ALL: [Scope; 8] = [
        Self::MachinesRead,
        Self::MachinesWrite,
        Self::MachinesExec,
        Self::KeysAdmin,
        Self::MetricsRead,
        Self::WebhooksAdmin,
        Self::NodesAdmin,
        Self::All,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MachinesRead => "machines:read",
            Self::MachinesWrite => "machines:write",
            Self::MachinesExec => "machines:exec",
            Self::KeysAdmin => "keys:admin",
            Self::MetricsRead => "metrics:read",
            Self::WebhooksAdmin => "webhooks:admin",
            Self::NodesAdmin => "nodes:admin",
            Self::All => "*",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|sc| sc.as_str() == s)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An API key as listed: never the secret, only its first 11 characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    #[schema(example = "hf_AbCdEfGh")]
    pub key_prefix: String,
    pub scopes: Vec<Scope>,
    #[serde(with = "crate::timestamp::option")]
    pub expires_at: Option<time::OffsetDateTime>,
    #[serde(with = "crate::timestamp::option")]
    pub last_used_at: Option<time::OffsetDateTime>,
    #[serde(with = "crate::timestamp")]
    pub created_at: time::OffsetDateTime,
    #[serde(with = "crate::timestamp::option")]
    pub revoked_at: Option<time::OffsetDateTime>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    pub name: String,
    pub scopes: Vec<Scope>,
    /// RFC 3339 time after which the key stops working.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::timestamp::option")]
    pub expires_at: Option<time::OffsetDateTime>,
}

/// Returned once, at creation: the only time the secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreatedApiKey {
    #[schema(example = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345")]
    pub key: String,
    pub api_key: ApiKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiKeyList {
    pub api_keys: Vec<ApiKey>,
}

/// The error envelope of every non-2xx response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    #[schema(example = "NOT_FOUND")]
    pub code: String,
    #[schema(example = "Machine with id 'abc123' not found")]
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: String,
    pub version: String,
    /// Runtime used when a create request names none.
    pub default_runtime: RuntimeKind,
    /// Runtimes this host can run, with the reason when one cannot.
    pub runtimes: Vec<RuntimeAvailability>,
    #[schema(example = "ok")]
    pub database: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RuntimeAvailability {
    pub runtime: RuntimeKind,
    pub available: bool,
    pub detail: String,
}

/// One diagnostic check (`hyperfleet doctor`, `GET /machines/{id}/network`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// A command that fixes the problem, when there is one.
    pub fix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkReport {
    pub machine_id: String,
    pub ok: bool,
    pub checks: Vec<Check>,
}

/// `GET /machines/{id}/logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MachineLogs {
    pub machine_id: String,
    /// The last lines of the machine's console (firecracker) or init output (container).
    pub lines: Vec<String>,
}

/// What happened to a machine, as `GET /events` streams it (`type` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum EventKind {
    #[serde(rename = "created")]
    Created,
    #[serde(rename = "starting")]
    Starting,
    #[serde(rename = "running")]
    Running,
    #[serde(rename = "paused")]
    Paused,
    #[serde(rename = "stopping")]
    Stopping,
    #[serde(rename = "stopped")]
    Stopped,
    /// `reason` says why.
    #[serde(rename = "failed")]
    Failed,
    #[serde(rename = "deleted")]
    Deleted,
    /// Its settings changed (exposed ports).
    #[serde(rename = "updated")]
    Updated,
    #[serde(rename = "exec.started")]
    ExecStarted,
    /// `exit_code` (absent when it timed out or the agent went away).
    #[serde(rename = "exec.finished")]
    ExecFinished,
    /// `path` was written through the files API.
    #[serde(rename = "file.written")]
    FileWritten,
    /// The proxy woke the machine for a request to `port`.
    #[serde(rename = "proxy.wake")]
    ProxyWake,
}

impl EventKind {
    pub const ALL: [EventKind; 13] = [
        Self::Created,
        Self::Starting,
        Self::Running,
        Self::Paused,
        Self::Stopping,
        Self::Stopped,
        Self::Failed,
        Self::Deleted,
        Self::Updated,
        Self::ExecStarted,
        Self::ExecFinished,
        Self::FileWritten,
        Self::ProxyWake,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
            Self::Deleted => "deleted",
            Self::Updated => "updated",
            Self::ExecStarted => "exec.started",
            Self::ExecFinished => "exec.finished",
            Self::FileWritten => "file.written",
            Self::ProxyWake => "proxy.wake",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The event a change into `status` is.
    pub fn of_status(status: MachineStatus) -> Self {
        match status {
            MachineStatus::Pending => Self::Created,
            MachineStatus::Starting => Self::Starting,
            MachineStatus::Running => Self::Running,
            MachineStatus::Paused => Self::Paused,
            MachineStatus::Stopping => Self::Stopping,
            MachineStatus::Stopped => Self::Stopped,
            MachineStatus::Failed => Self::Failed,
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One machine event: the SSE `data` of `GET /events` (its SSE `id` is `id`, its SSE `event` is `type`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Increases with every event; give the last one seen as `Last-Event-ID` to resume.
    pub id: u64,
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub machine_id: String,
    pub machine_name: String,
    /// The machine's status after the event (absent once deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<MachineStatus>,
    /// RFC 3339, UTC.
    #[serde(with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub at: time::OffsetDateTime,
    /// Why the machine failed (`failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The program run (`exec.*`): the command's first word only, never its arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
    /// `exec.finished`: the exit code, absent when the command timed out or the agent went away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// `exec.finished`: how long it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// `file.written`: the guest path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `proxy.wake`: the port the request was for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The machine's parent, for a child machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
}

/// What a machine uses now (`GET /machines/{id}/stats`). Values a runtime cannot tell are absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MachineStats {
    pub machine_id: String,
    pub status: MachineStatus,
    /// Share of one CPU used since the previous stats request for this machine (or over the last 200 ms),
    /// 100 = one whole CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// CPU time used since it started (the machine's cgroup, or its process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// Bytes the machine's disk (a sparse copy) takes on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_used_bytes: Option<u64>,
    /// The disk's size as the guest sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size_bytes: Option<u64>,
    /// Bytes the guest received / sent (its host interface's counters, seen from the guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_rx_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_tx_bytes: Option<u64>,
    /// Seconds since its process started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_seconds: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_follow_the_state_table() {
        use MachineStatus::*;
        assert!(Pending.can_become(Starting));
        assert!(Stopped.can_become(Starting));
        assert!(!Running.can_become(Starting));
        assert!(!Pending.can_become(Stopping));
        assert!(Running.can_become(Stopping));
        assert!(Stopping.can_become(Stopped));
        assert!(!Stopped.can_become(Running));
        assert!(Running.can_become(Paused) && Paused.can_become(Running) && Paused.can_become(Stopping));
        assert!(!Pending.can_become(Paused));
        assert!(Failed.can_become(Starting), "a failed machine can be retried");
        let at_rest: Vec<_> = MachineStatus::ALL.into_iter().filter(|s| s.is_at_rest()).collect();
        assert_eq!(at_rest, vec![Pending, Stopped, Failed]);
    }

    #[test]
    fn command_must_be_an_array() {
        let r: Result<ExecRequest, _> = serde_json::from_str(r#"{"command": "ls -la"}"#);
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("array"), "{msg}");
        let ok: ExecRequest = serde_json::from_str(r#"{"cmd": ["ls", "-la"]}"#).unwrap();
        assert_eq!(ok.command.0, vec!["ls", "-la"]);
    }

    #[test]
    fn egress_policy_round_trips() {
        for (json, want) in [
            (r#""allow""#, EgressPolicy::Allow),
            (r#""deny""#, EgressPolicy::Deny),
            (
                r#"["10.0.0.0/8","192.0.2.7"]"#,
                EgressPolicy::Cidrs(vec!["10.0.0.0/8".parse().unwrap(), "192.0.2.7/32".parse().unwrap()]),
            ),
        ] {
            let p: EgressPolicy = serde_json::from_str(json).unwrap();
            assert_eq!(p, want);
            let back: EgressPolicy = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
            assert_eq!(back, want);
        }
        assert!(serde_json::from_str::<EgressPolicy>(r#""maybe""#).is_err());
        assert!(serde_json::from_str::<EgressPolicy>(r#"["nope"]"#).is_err());
    }

    #[test]
    fn scopes_use_the_documented_spelling() {
        let s: Vec<Scope> = serde_json::from_str(r#"["machines:read","*","keys:admin"]"#).unwrap();
        assert_eq!(s, vec![Scope::MachinesRead, Scope::All, Scope::KeysAdmin]);
    }

    #[test]
    fn key_times_keep_their_json_format() {
        let json = r#"{"id":"key_a","name":"ci","key_prefix":"hf_AbCdEfGh","scopes":["machines:read"],"expires_at":"2030-01-01T00:00:00.000Z","last_used_at":null,"created_at":"2026-12-01T10:00:00.123Z","revoked_at":null}"#;
        let key: ApiKey = serde_json::from_str(json).unwrap();
        assert_eq!(key.created_at, timestamp::parse("2026-12-01T10:00:00.123Z").unwrap());
        assert_eq!(serde_json::to_string(&key).unwrap(), json);
        let req: CreateApiKey =
            serde_json::from_str(r#"{"name":"x","scopes":["*"],"expires_at":"2030-01-01T01:00:00+01:00"}"#).unwrap();
        assert_eq!(req.expires_at, timestamp::parse("2030-01-01T00:00:00Z"));
        assert!(serde_json::from_str::<CreateApiKey>(r#"{"name":"x","scopes":["*"],"expires_at":"soon"}"#).is_err());
        // Year 10000 in UTC: refused as input (formatting it would otherwise panic in the time crate).
        let far = r#"{"name":"x","scopes":["*"],"expires_at":"9999-12-31T23:30:00-01:00"}"#;
        assert!(serde_json::from_str::<CreateApiKey>(far).is_err());
        assert_eq!(
            serde_json::to_string(&CreateApiKey { name: "x".into(), scopes: vec![], expires_at: None }).unwrap(),
            r#"{"name":"x","scopes":[]}"#
        );
    }
}
