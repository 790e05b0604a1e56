//! Every setting of the daemon in one place: read from flags or the environment (same names as upstream),
//! validated once at start-up into [`Settings`], then trusted. A bad value stops the daemon with a message
//! naming the variable.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use hyperfleet_net::{Subnet, TapNaming};
use hyperfleet_types::RuntimeKind;

pub const DEFAULT_KERNEL_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address the API and the proxy listen on.
    #[arg(long, env = "HYPERFLEET_BIND_ADDRESS", default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// API port (1-65535).
    #[arg(long, env = "PORT", default_value_t = 3000, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
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
    /// Most concurrent proxied connections.
    #[arg(long, env = "PROXY_MAX_CONNECTIONS", default_value_t = 1024)]
    pub proxy_max_connections: usize,
    /// Seconds to wait for a guest to accept a proxied connection and send response headers.
    #[arg(long, env = "PROXY_UPSTREAM_TIMEOUT", default_value_t = 30)]
    pub proxy_upstream_timeout: u64,
    /// SQLite database file; its directory must exist.
    #[arg(long, env = "DATABASE_PATH", default_value = "./hyperfleet.db")]
    pub database_path: PathBuf,
    /// Turn API-key authentication off (only for a trusted, local setup).
    #[arg(long, env = "DISABLE_AUTH", default_value = "false", value_parser = clap::builder::BoolishValueParser::new())]
    pub disable_auth: bool,
    /// Directory for Firecracker API and vsock sockets.
    #[arg(long, env = "HYPERFLEET_SOCKET_DIR", default_value = "/tmp")]
    pub socket_dir: PathBuf,
    /// Directory for per-machine disks, console logs and container bundles.
    #[arg(long, env = "HYPERFLEET_DATA_DIR", default_value = ".hyperfleet/machines")]
    pub data_dir: PathBuf,
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
    /// OCI runtime for the container runtime.
    #[arg(long, env = "HYPERFLEET_RUNC_BIN", default_value = "runc")]
    pub runc_bin: PathBuf,
    /// Runtime for machines that name none: firecracker, container, or auto (firecracker on hosts with
    /// hardware KVM, container elsewhere).
    #[arg(long, env = "HYPERFLEET_RUNTIME", default_value = "auto")]
    pub runtime: String,
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
    /// Seconds a guest gets to shut down before its process is terminated.
    #[arg(long, env = "HYPERFLEET_STOP_TIMEOUT", default_value_t = 10)]
    pub stop_timeout: u64,
    /// Largest file accepted or returned by the files API: bytes, or with a unit (100MB, 1GiB).
    #[arg(long, env = "HYPERFLEET_FILE_MAX_SIZE", default_value = "100MB")]
    pub file_max_size: String,
    /// Seconds a file transfer may take.
    #[arg(long, env = "HYPERFLEET_FILE_TRANSFER_TIMEOUT", default_value_t = 60)]
    pub file_transfer_timeout: u64,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub bind: IpAddr,
    pub port: u16,
    pub proxy: Option<ProxySettings>,
    pub proxy_poll_interval: Duration,
    pub database_path: PathBuf,
    pub disable_auth: bool,
    pub socket_dir: PathBuf,
    pub data_dir: PathBuf,
    pub assets_dir: PathBuf,
    pub kernel_image_path: PathBuf,
    pub kernel_args: String,
    pub rootfs_path: PathBuf,
    pub firecracker_bin: Option<PathBuf>,
    pub runc_bin: PathBuf,
    pub runtime: Option<RuntimeKind>,
    pub subnet: Subnet,
    pub tap_naming: TapNaming,
    pub dns: Option<Vec<Ipv4Addr>>,
    pub nft_table: String,
    pub stop_timeout: Duration,
    pub file_max_size: u64,
    pub file_transfer_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub port: u16,
    pub prefix: String,
    pub host_suffix: Option<String>,
    pub max_connections: usize,
    pub upstream_timeout: Duration,
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

/// Resolves a relative path against the working directory, as upstream did.
pub fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf())
    }
}

/// Parses `100MB`, `1GiB`, `512k` or plain bytes.
pub fn parse_size(s: &str) -> Option<u64> {
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

pub fn parse_dns_list(s: &str) -> Result<Vec<Ipv4Addr>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<Ipv4Addr>().map_err(|_| format!("'{p}' is not an IPv4 address")))
        .collect()
}

impl ServeArgs {
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let database_path = absolute(&self.database_path);
        let db_dir = database_path.parent().unwrap_or(Path::new("/"));
        if !db_dir.is_dir() {
            return Err(bad("DATABASE_PATH", format!("directory {} does not exist", db_dir.display())));
        }
        if self.proxy_poll_interval_ms == 0 {
            return Err(bad("PROXY_EXPOSED_PORT_POLL_INTERVAL_MS", "must be a positive number of milliseconds"));
        }
        if self.proxy_port != 0 && self.proxy_port == self.port {
            return Err(bad("PROXY_PORT", format!("{} is also the API PORT", self.proxy_port)));
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
        let runtime =
            match self.runtime.as_str() {
                "auto" => None,
                other => Some(RuntimeKind::parse(other).ok_or_else(|| {
                    bad("HYPERFLEET_RUNTIME", format!("'{other}': use auto, firecracker or container"))
                })?),
            };
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
        let file_max_size = parse_size(&self.file_max_size).filter(|n| *n > 0).ok_or_else(|| {
            bad("HYPERFLEET_FILE_MAX_SIZE", format!("'{}': use bytes or 100MB, 1GiB", self.file_max_size))
        })?;
        if self.file_transfer_timeout == 0 {
            return Err(bad("HYPERFLEET_FILE_TRANSFER_TIMEOUT", "must be at least 1 second"));
        }
        if self.kernel_args.contains(['\n', '\0']) {
            return Err(bad("HYPERFLEET_KERNEL_ARGS", "must be one line"));
        }
        let proxy = (self.proxy_port != 0).then(|| ProxySettings {
            port: self.proxy_port,
            prefix,
            host_suffix: self.proxy_host_suffix.clone(),
            max_connections: self.proxy_max_connections,
            upstream_timeout: Duration::from_secs(self.proxy_upstream_timeout),
        });
        Ok(Settings {
            bind: self.bind,
            port: self.port,
            proxy,
            proxy_poll_interval: Duration::from_millis(self.proxy_poll_interval_ms),
            database_path,
            disable_auth: self.disable_auth,
            socket_dir: absolute(&self.socket_dir),
            data_dir: absolute(&self.data_dir),
            assets_dir: absolute(&self.assets_dir),
            kernel_image_path: absolute(&self.kernel_image_path),
            kernel_args: self.kernel_args.clone(),
            rootfs_path: absolute(&self.rootfs_path),
            firecracker_bin: self.firecracker_bin.as_deref().map(absolute),
            runc_bin: self.runc_bin.clone(),
            runtime,
            subnet,
            tap_naming,
            dns,
            nft_table: self.nft_table.clone(),
            stop_timeout: Duration::from_secs(self.stop_timeout),
            file_max_size,
            file_transfer_timeout: Duration::from_secs(self.file_transfer_timeout),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

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
        assert_eq!(s.port, 3000);
        assert_eq!(s.proxy.as_ref().unwrap().port, 4000);
        assert_eq!(s.subnet.to_string(), "172.16.0.0/16");
        assert_eq!(s.file_max_size, 100 << 20);
        assert!(s.kernel_image_path.is_absolute());
    }

    #[test]
    fn bad_values_name_the_setting() {
        assert!(parse(&["--port", "0"]).unwrap_err().contains("--port"));
        assert!(parse(&["--port", "70000"]).unwrap_err().contains("--port"));
        assert!(parse(&["--database-path", "/no/such/dir/x.db"]).unwrap_err().contains("DATABASE_PATH"));
        assert!(parse(&["--proxy-poll-interval-ms", "0"]).unwrap_err().contains("PROXY_EXPOSED_PORT_POLL_INTERVAL_MS"));
        assert!(parse(&["--subnet", "10.0.0.0/31"]).unwrap_err().contains("HYPERFLEET_SUBNET"));
        assert!(parse(&["--subnet", "nope"]).unwrap_err().contains("HYPERFLEET_SUBNET"));
        assert!(parse(&["--dns", "1.2.3"]).unwrap_err().contains("HYPERFLEET_DNS"));
        assert!(parse(&["--runtime", "qemu"]).unwrap_err().contains("HYPERFLEET_RUNTIME"));
        assert!(parse(&["--file-max-size", "lots"]).unwrap_err().contains("HYPERFLEET_FILE_MAX_SIZE"));
        assert!(parse(&["--tap-prefix", "t1"]).unwrap_err().contains("HYPERFLEET_TAP_PREFIX"));
        assert!(parse(&["--proxy-port", "3000"]).unwrap_err().contains("PROXY_PORT"));
        assert!(parse(&["--proxy-port", "0"]).unwrap().proxy.is_none());
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
}
