//! Test harness: starts the real `hyperfleet serve` on free ports with its own database, data directory,
//! subnet, interface prefix and nftables table, and drives it through the SDK. On drop the daemon is
//! stopped and `hyperfleet purge` removes everything it made on the host, even when the test failed.

#![allow(dead_code)]

pub mod oci;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hyperfleet_client::Client;
use hyperfleet_client::types::{CreateMachine, Machine, MachineStatus, RuntimeKind};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_hyperfleet")
}

pub fn process_alive(pid: u32) -> bool {
    hyperfleet::testing::process::alive(pid)
}

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// The assets `make setup` builds: kernel, rootfs, firecracker.
pub fn assets() -> PathBuf {
    let dir = std::env::var_os("HYPERFLEET_TEST_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.hyperfleet"));
    for f in ["vmlinux", "rootfs.ext4"] {
        assert!(dir.join(f).is_file(), "{} is missing: run `make setup` first", dir.join(f).display());
    }
    dir.canonicalize().unwrap()
}

/// A port free on every address now and never handed out before by this process: the tests of one binary
/// start daemons in parallel, and a port just closed here can come back from the kernel at once.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = std::net::TcpListener::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

#[derive(Clone)]
pub struct Options {
    pub runtime: RuntimeKind,
    /// Prefix length of the daemon's subnet (a distinct 10.x block per daemon).
    pub prefix_len: u8,
    pub dns: String,
    pub env: Vec<(String, String)>,
    /// Do not create a key up front: use the admin key the daemon prints at its first start.
    pub first_start_key: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            runtime: RuntimeKind::Container,
            prefix_len: 24,
            dns: "10.200.255.53".into(),
            env: vec![],
            first_start_key: false,
        }
    }
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub proxy_port: u16,
    /// `HYPERFLEET_CHILD_API_PORT` (every address; machines with `spawn` reach it on their gateway).
    pub child_port: u16,
    pub key: String,
    pub client: Client,
    pub tap_prefix: String,
    pub table: String,
    pub subnet: String,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Daemon {
    pub async fn start(opts: Options) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let tag = format!("{:x}", (pid & 0xfff) * 64 + n);
        let dir = tempfile::tempdir().unwrap();
        let assets = assets();
        let (port, proxy_port, child_port) = (free_port(), free_port(), free_port());
        let subnet = match opts.prefix_len {
            p if p >= 24 => format!("10.{}.{}.0/{p}", 100 + n, pid % 250),
            p => format!("10.{}.0.0/{p}", 100 + n),
        };
        let tap_prefix = format!("ht{tag}x");
        let table = format!("hftest_{tag}");
        let d = dir.path();
        let mut env: Vec<(String, String)> = vec![
            ("PORT".into(), port.to_string()),
            ("PROXY_PORT".into(), proxy_port.to_string()),
            ("HYPERFLEET_CHILD_API_PORT".into(), child_port.to_string()),
            ("HYPERFLEET_BIND_ADDRESS".into(), "127.0.0.1".into()),
            ("DATABASE_PATH".into(), d.join("hyperfleet.db").display().to_string()),
            ("HYPERFLEET_DATA_DIR".into(), d.join("machines").display().to_string()),
            ("HYPERFLEET_ASSETS_DIR".into(), assets.display().to_string()),
            ("HYPERFLEET_KERNEL_IMAGE_PATH".into(), assets.join("vmlinux").display().to_string()),
            ("HYPERFLEET_ROOTFS_PATH".into(), assets.join("rootfs.ext4").display().to_string()),
            ("FIRECRACKER_BIN".into(), assets.join("bin/firecracker").display().to_string()),
            ("JAILER_BIN".into(), assets.join("bin/jailer").display().to_string()),
            ("HYPERFLEET_RUNTIME".into(), opts.runtime.as_str().into()),
            ("HYPERFLEET_SUBNET".into(), subnet.clone()),
            ("HYPERFLEET_TAP_PREFIX".into(), tap_prefix.clone()),
            ("HYPERFLEET_NFT_TABLE".into(), table.clone()),
            ("HYPERFLEET_DNS".into(), opts.dns.clone()),
            ("HYPERFLEET_STOP_TIMEOUT".into(), "2".into()),
            ("PROXY_EXPOSED_PORT_POLL_INTERVAL_MS".into(), "300".into()),
            ("RUST_LOG".into(), "info,netlink_packet_route=error".into()),
        ];
        // `{url}` in a value is this daemon's own API URL (e.g. HYPERFLEET_NODE_URL of a fleet node).
        let own_url = format!("http://127.0.0.1:{port}");
        for (k, v) in opts.env {
            env.retain(|(ek, _)| *ek != k);
            env.push((k, v.replace("{url}", &own_url)));
        }
        let mut daemon = Daemon {
            dir,
            port,
            proxy_port,
            child_port,
            key: String::new(),
            client: Client::new("http://127.0.0.1:1", None),
            tap_prefix,
            table,
            subnet,
            env,
            child: None,
        };
        if opts.first_start_key {
            daemon.client = Client::new(&daemon.url(), None);
            daemon.spawn().await;
            daemon.key = printed_keys(&daemon.logs()).first().cloned().expect("the first start prints an admin key");
        } else {
            let out = daemon.cli(&["keys", "create", "--name", "test-admin", "--scope", "*"]);
            assert!(out.status.success(), "keys create: {}", String::from_utf8_lossy(&out.stderr));
            daemon.key = String::from_utf8(out.stdout).unwrap().trim().to_string();
            daemon.client = Client::new(&daemon.url(), Some(daemon.key.clone()));
            daemon.spawn().await;
        }
        daemon.client = Client::new(&daemon.url(), Some(daemon.key.clone()));
        daemon
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(std::process::Child::id).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn proxy_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.proxy_port)
    }

    pub fn client_with(&self, key: &str) -> Client {
        Client::new(&self.url(), Some(key.to_string()))
    }

    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// The chroot of a firecracker machine of this daemon (default HYPERFLEET_CHROOT_DIR).
    pub fn chroot(&self, id: &str) -> PathBuf {
        self.dir.path().join("machines/jail/firecracker").join(id).join("root")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Runs the hyperfleet binary with this daemon's environment.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin()).args(args).envs(self.env.iter().cloned()).stdin(Stdio::null()).output().unwrap()
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(bin());
        c.envs(self.env.iter().cloned());
        c
    }

    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let child = Command::new(bin())
            .arg("serve")
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(h) = self.client.health().await
                && h.status == "ok"
            {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited ({status}) at start:\n{}", self.logs());
            }
            assert!(Instant::now() < deadline, "daemon not healthy after 20 s:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Dropped: the daemon may have exited already; either way it is gone afterwards.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait, as `systemctl stop` would.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Dropped: a daemon already gone is what we want; a live one is killed below after the deadline.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id().cast_signed()),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if c.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // Dropped: as in `kill9`.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn restart_after_crash(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// Interfaces on the host whose name has this daemon's prefix.
    pub fn host_links(&self) -> Vec<String> {
        let out = Command::new("ip").args(["-br", "link"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with(&self.tap_prefix))
            .collect()
    }

    /// The machine interfaces listed in this daemon's nftables table.
    pub fn firewall_ifaces(&self) -> Vec<String> {
        self.firewall_set("machine_ifaces")
    }

    /// The (single-string) elements of one set of this daemon's nftables table, sorted.
    pub fn firewall_set(&self, set: &str) -> Vec<String> {
        let out = Command::new("nft").args(["-j", "list", "set", "inet", &self.table, set]).output().unwrap();
        if !out.status.success() {
            return vec![];
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut names: Vec<String> = v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.get("set"))
            .flat_map(|s| s.get("elem").and_then(|e| e.as_array()).cloned().unwrap_or_default())
            .filter_map(|e| e.as_str().map(str::to_string))
            .collect();
        names.sort();
        names
    }

    pub fn table_exists(&self) -> bool {
        Command::new("nft").args(["list", "table", "inet", &self.table]).output().unwrap().status.success()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        let out = self.cli(&["purge"]);
        if !out.status.success() {
            eprintln!("purge failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        if std::thread::panicking() {
            eprintln!("---- daemon log ----\n{}\n---- end ----", self.logs());
        }
    }
}

/// API keys printed in a daemon's output.
pub fn printed_keys(log: &str) -> Vec<String> {
    log.split_whitespace().filter(|w| w.starts_with("hf_") && w.len() == 35).map(str::to_string).collect()
}

pub fn machine(name: &str) -> CreateMachine {
    CreateMachine { name: Some(name.into()), vcpu_count: Some(1), mem_size_mib: Some(128), ..Default::default() }
}

/// Whether /dev/kvm is PVM here: the guest kernel boots but no guest userspace runs.
pub fn is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// A Firecracker machine; under PVM it boots `init=/sbin/hyperfleet-idle`, as no guest userspace can run.
pub fn fc_machine(name: &str) -> CreateMachine {
    let mut args = hyperfleet::testing::DEFAULT_KERNEL_ARGS.to_string();
    if is_pvm() {
        args.push_str(" init=/sbin/hyperfleet-idle");
    }
    CreateMachine { runtime: Some(RuntimeKind::Firecracker), kernel_args: Some(args), ..machine(name) }
}

/// Creates and starts a machine, asserting it runs.
pub async fn running(d: &Daemon, req: CreateMachine) -> Machine {
    let m = d.client.create_machine(&req).await.unwrap();
    let m = d.client.start_machine(&m.id).await.unwrap_or_else(|e| panic!("start {}: {e}\n{}", m.spec.name, d.logs()));
    assert_eq!(m.status, MachineStatus::Running);
    m
}

/// Runs a shell command in the machine and returns (exit code, stdout, stderr).
pub async fn sh(d: &Daemon, id: &str, script: &str) -> (i32, String, String) {
    let r = d.client.exec(id, &["sh", "-c", script]).await.unwrap_or_else(|e| panic!("exec {script}: {e}"));
    (r.exit_code, r.stdout, r.stderr)
}

/// Uploads the fixture server (hyperfleet-testd: HTTP and WebSocket echo) into the guest and starts it on
/// `port` in the background.
pub async fn start_testd(d: &Daemon, id: &str, port: u16) {
    let bin = std::fs::read(assets().join("bin/hyperfleet-testd")).expect("hyperfleet-testd: run `make setup`");
    d.client.upload_file(id, "/usr/local/bin/testd", &bin, Some(0o755)).await.unwrap();
    serve_testd(d, id, port).await;
}

/// Starts the fixture server, uploaded before, on `port` and waits until it listens.
pub async fn serve_testd(d: &Daemon, id: &str, port: u16) {
    let (code, _, err) = sh(d, id, &format!("testd {port} >/dev/null 2>&1 &")).await;
    assert_eq!(code, 0, "{err}");
    wait_listening(d, id, port).await;
}

/// Waits until something in the guest listens on `port`.
pub async fn wait_listening(d: &Daemon, id: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while sh(d, id, &format!("nc -w 1 127.0.0.1 {port} </dev/null")).await.0 != 0 {
        assert!(Instant::now() < deadline, "nothing listens on {port} in the guest");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A network namespace made by the test to play "the internet": a veth pair with HOST_IP/24 on the host
/// and PEER_IP/24 inside. Removed on drop.
pub struct TestNet {
    pub ns: String,
    pub host_if: String,
    pub host_ip: String,
    pub peer_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl TestNet {
    pub fn new(third_octet: u8) -> Self {
        Self::with_addresses(third_octet, &format!("10.200.{third_octet}.1"), &format!("10.200.{third_octet}.2"))
    }

    /// A test host at `peer_ip`, reached from the host through `host_ip` (both in one /24); `tag` keeps the
    /// names of concurrent test hosts apart.
    pub fn with_addresses(tag: u8, host_ip: &str, peer_ip: &str) -> Self {
        let tag = format!("{}{}", std::process::id() % 10000, tag);
        let t = TestNet {
            ns: format!("hfinet{tag}"),
            host_if: format!("hfiv{tag}"),
            host_ip: host_ip.to_string(),
            peer_ip: peer_ip.to_string(),
        };
        // Dropped: leftovers of an earlier run are removed if present; usually there are none.
        let _ = Command::new("ip").args(["netns", "del", &t.ns]).output();
        let _ = Command::new("ip").args(["link", "del", &t.host_if]).output();
        ip(&["netns", "add", &t.ns]);
        ip(&["link", "add", &t.host_if, "type", "veth", "peer", "name", "inet0", "netns", &t.ns]);
        ip(&["addr", "add", &format!("{}/24", t.host_ip), "dev", &t.host_if]);
        ip(&["link", "set", &t.host_if, "up"]);
        ip(&["-n", &t.ns, "addr", "add", &format!("{}/24", t.peer_ip), "dev", "inet0"]);
        ip(&["-n", &t.ns, "link", "set", "inet0", "up"]);
        ip(&["-n", &t.ns, "link", "set", "lo", "up"]);
        t
    }

    /// A TCP server inside the namespace that answers "hello from the internet" and reports each peer
    /// address it saw.
    pub fn serve(&self, port: u16) -> std::sync::mpsc::Receiver<std::net::SocketAddr> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns = self.ns.clone();
        let addr = format!("{}:{port}", self.peer_ip);
        std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let l = std::net::TcpListener::bind(&addr).unwrap();
            ready_tx.send(()).unwrap();
            for s in l.incoming().flatten() {
                use std::io::{Read, Write};
                let peer = s.peer_addr().unwrap();
                let mut s = s;
                // Dropped: the answer does not depend on the request, and a peer that hung up gets nothing.
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 24\r\n\r\nhello from the internet\n");
                if tx.send(peer).is_err() {
                    return;
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        rx
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Dropped: best-effort cleanup in a destructor, which has no one to report to.
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}
