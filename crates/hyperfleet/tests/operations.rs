//! What an operator touches: `hyperfleet doctor` and `GET /machines/{id}/network`, the CLI, key management on
//! the database, DISABLE_AUTH, and the daemon's manners on a shared host (foreign interfaces, other nftables
//! tables, NAT surviving a daemon stop, cgroup limits of container machines).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Daemon, Options, machine, running};
use hyperfleet_client::types::*;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[ignore = "needs root: runc container on a veth, nftables and raw ICMP"]
#[tokio::test]
async fn doctor_and_network_report_find_a_broken_machine() {
    let d = Daemon::start(Options::default()).await;
    let m = running(&d, machine("patient")).await;

    let report = d.client.machine_network(&m.id).await.unwrap();
    assert!(report.ok, "{report:?}");
    let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
    for want in [
        "ip forwarding",
        "subnet route",
        "interface exists",
        "interface up",
        "interface address",
        "firewall entry",
        "guest reachable",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let out = d.cli(&["doctor"]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains(&format!("machine patient ({}, {})", m.id, m.tap_device)), "{}", stdout(&out));

    // Take the machine's interface down behind the daemon's back: both report it, with the fix.
    let down = Command::new("ip").args(["link", "set", &m.tap_device, "down"]).status().unwrap();
    assert!(down.success());
    let report = d.client.machine_network(&m.id).await.unwrap();
    assert!(!report.ok);
    let up = report.checks.iter().find(|c| c.name == "interface up").unwrap();
    assert!(!up.ok);
    assert_eq!(up.fix.as_deref(), Some(format!("ip link set {} up", m.tap_device).as_str()));
    let out = d.cli(&["doctor"]);
    assert_eq!(out.status.code(), Some(1), "doctor must fail: {}", stdout(&out));
    assert!(stdout(&out).contains(&format!("fix: ip link set {} up", m.tap_device)), "{}", stdout(&out));
    // Dropped: restoring the link is a courtesy; the stop below does not depend on it.
    let _ = Command::new("ip").args(["link", "set", &m.tap_device, "up"]).status();

    let stopped = d.client.stop_machine(&m.id).await.unwrap();
    let e = d.client.machine_network(&stopped.id).await.unwrap_err();
    assert_eq!(e.status(), Some(400));
}

#[ignore = "needs root: the daemon's nftables table and a runc container"]
#[tokio::test]
async fn cli_drives_the_api_and_manages_keys() {
    let d = Daemon::start(Options::default()).await;
    let cli = |args: &[&str]| {
        d.command().args(args).env("HYPERFLEET_URL", d.url()).env("HYPERFLEET_API_KEY", &d.key).output().unwrap()
    };
    let out = cli(&[
        "machines", "create", "--name", "from-cli", "--mem", "64", "--expose", "80", "--start", "--output", "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m: Machine = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((m.status, m.spec.exposed_ports.as_slice()), (MachineStatus::Running, &[80u16][..]));
    let out = cli(&["machines", "list"]);
    assert!(stdout(&out).contains("from-cli") && stdout(&out).contains("running"), "{}", stdout(&out));
    // exec streams the output and exits with the command's code.
    let out = cli(&["machines", "exec", "from-cli", "--", "sh", "-c", "echo streamed; exit 4"]);
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(4), "streamed\n"));
    let local = d.dir.path().join("up.txt");
    std::fs::write(&local, b"via the cli").unwrap();
    assert!(cli(&["machines", "put", "from-cli", local.to_str().unwrap(), "/root/up.txt"]).status.success());
    assert_eq!(stdout(&cli(&["machines", "fetch", "from-cli", "/root/up.txt", "-"])), "via the cli");
    // ls and mkdir: the directory made by the CLI is listed by it.
    assert!(cli(&["machines", "mkdir", "from-cli", "-p", "/root/made/by/cli"]).status.success());
    let ls = stdout(&cli(&["machines", "ls", "from-cli", "/root"]));
    assert!(ls.lines().any(|l| l.starts_with('d') && l.ends_with(" made")), "{ls}");
    assert!(ls.lines().any(|l| l.starts_with('-') && l.contains(" 11 ") && l.ends_with(" up.txt")), "{ls}");
    assert!(!cli(&["machines", "mkdir", "from-cli", "/root/made"]).status.success(), "exists, no -p");
    let out = cli(&["machines", "get", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Machine with id 'nope' not found"));
    assert!(cli(&["machines", "delete", "from-cli", "--force"]).status.success());

    // Keys on the database directly.
    let out = d.cli(&["keys", "create", "--name", "ci", "--scope", "machines:read", "--expires", "30d"]);
    let key = stdout(&out).trim().to_string();
    assert!(key.starts_with("hf_"), "{key}");
    let listed = stdout(&d.cli(&["keys", "list", "--output", "json"]));
    let keys: Vec<ApiKey> = serde_json::from_str(&listed).unwrap();
    let ci = keys.iter().find(|k| k.name == "ci").unwrap();
    assert_eq!(ci.scopes, vec![Scope::MachinesRead]);
    assert!(ci.expires_at.is_some());
    assert!(!listed.contains(&key), "secrets are never listed");
    d.client_with(&key).list_machines(&Default::default()).await.unwrap();
    assert!(d.cli(&["keys", "revoke", &ci.id]).status.success());
    // The daemon keeps a resolved key for up to 5 s (README): a revoke written by the CLI lands within that.
    let revoked = std::time::Instant::now();
    let e = loop {
        match d.client_with(&key).list_machines(&Default::default()).await {
            Err(e) => break e,
            Ok(_) if revoked.elapsed() < Duration::from_secs(6) => tokio::time::sleep(Duration::from_millis(200)).await,
            Ok(_) => panic!("a key revoked with the CLI still works after {:?}", revoked.elapsed()),
        }
    };
    assert_eq!(e.status(), Some(401));
    assert!(e.to_string().contains("API key has been revoked"), "{e}");
    assert!(!d.cli(&["keys", "create", "--name", "x", "--scope", "root"]).status.success());
}

#[ignore = "needs root: the daemon creates its nftables table at start"]
#[tokio::test]
async fn first_start_prints_one_admin_key_once() {
    let mut d = Daemon::start(Options { first_start_key: true, ..Default::default() }).await;
    let keys = d.client.list_api_keys().await.unwrap().api_keys;
    assert_eq!(keys.len(), 1);
    assert_eq!((keys[0].name.as_str(), keys[0].scopes.as_slice()), ("admin", &[Scope::All][..]));
    d.restart_after_crash().await;
    assert_eq!(common::printed_keys(&d.logs()), vec![d.key.clone()], "printed once, never again");
    let db = std::fs::read(d.dir.path().join("hyperfleet.db")).unwrap();
    assert!(!db.windows(d.key.len()).any(|w| w == d.key.as_bytes()), "the secret is not in the database");
}

#[ignore = "needs root: the daemon creates its nftables table at start"]
#[tokio::test]
async fn disable_auth_opens_the_api_with_a_warning() {
    let d = Daemon::start(Options { env: vec![("DISABLE_AUTH".into(), "true".into())], ..Default::default() }).await;
    let anon = hyperfleet_client::Client::new(&d.url(), None);
    anon.create_machine(&machine("open")).await.unwrap();
    assert_eq!(anon.list_machines(&Default::default()).await.unwrap().total, 1);
    assert!(d.logs().contains("DISABLE_AUTH is set"), "{}", d.logs());
}

#[ignore = "needs root: foreign nftables tables and interfaces next to the daemon's"]
#[tokio::test]
async fn good_neighbour_on_a_shared_host() {
    // A user's own nftables table and an interface that happens to have our next name.
    let user_table = format!("usertest_{}", std::process::id());
    let rules = format!(
        "table inet {user_table} {{\n chain c {{\n type filter hook forward priority 10; policy accept;\n counter\n }}\n}}\n"
    );
    let file = std::env::temp_dir().join(format!("{user_table}.nft"));
    std::fs::write(&file, rules).unwrap();
    assert!(Command::new("nft").arg("-f").arg(&file).status().unwrap().success());
    // Dropped: a leftover file in the temp directory is harmless.
    let _ = std::fs::remove_file(&file);
    let _cleanup = UserTable(user_table.clone());
    let mut d = Daemon::start(Options::default()).await;
    let first = running(&d, machine("first")).await;
    let squatter = format!("{}1", d.tap_prefix);
    assert!(Command::new("ip").args(["tuntap", "add", "dev", &squatter, "mode", "tap"]).status().unwrap().success());
    let _squatter_cleanup = ForeignLink(squatter.clone());

    let m = d.client.create_machine(&machine("second")).await.unwrap();
    assert_eq!(m.tap_device, squatter);
    let e = d.client.start_machine(&m.id).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(500), Some("RUNTIME_ERROR")));
    assert!(e.to_string().contains("not managed by hyperfleet"), "{e}");
    assert!(d.host_links().contains(&squatter), "the foreign interface is left alone");
    assert_eq!(d.client.get_machine(&m.id).await.unwrap().status, MachineStatus::Failed);

    // Stopping the daemon keeps running machines and their firewall; a restart's reconcile spares the
    // foreign interface too.
    d.stop();
    assert!(d.table_exists(), "the table outlives the daemon");
    assert!(hyperfleet_net::icmp::ping(first.guest_ip, Duration::from_secs(2)).await.unwrap().is_some());
    d.spawn().await;
    assert!(d.host_links().contains(&squatter));
    drop(d);
    let still = Command::new("ip").args(["link", "show", &squatter]).output().unwrap();
    assert!(still.status.success(), "purge must not delete an interface that is not ours");

    let after = Command::new("nft").args(["list", "table", "inet", &user_table]).output().unwrap();
    assert!(after.status.success(), "the user's table survived purge");
    assert!(stdout(&after).contains("hook forward priority filter + 10"), "{}", stdout(&after));
}

/// Deletes the test's foreign interface, also when the test fails.
struct ForeignLink(String);
impl Drop for ForeignLink {
    fn drop(&mut self) {
        // Dropped: best-effort cleanup in a destructor, which has no one to report to.
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// Deletes the test's own nftables table, also when the test fails.
struct UserTable(String);
impl Drop for UserTable {
    fn drop(&mut self) {
        // Dropped: best-effort cleanup in a destructor, which has no one to report to.
        let _ = Command::new("nft").args(["delete", "table", "inet", &self.0]).status();
    }
}

#[ignore = "needs root: runc container with cgroup memory and cpu limits"]
#[tokio::test]
async fn container_limits_are_cgroup_limits() {
    let d = Daemon::start(Options::default()).await;
    let m = running(&d, CreateMachine { vcpu_count: Some(1), mem_size_mib: Some(96), ..machine("limited") }).await;
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", m.pid.unwrap())).unwrap();
    let path_of = |controller: &str| {
        cgroups.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            ctrls.split(',').any(|c| c == controller).then(|| path.to_string())
        })
    };
    let mem_path = path_of("memory").expect("memory controller");
    assert!(mem_path.contains(&m.id), "{mem_path}");
    let limit = std::fs::read_to_string(format!("/sys/fs/cgroup/memory{mem_path}/memory.limit_in_bytes")).unwrap();
    assert_eq!(limit.trim(), (96u64 << 20).to_string());
    let cpu_path = path_of("cpu").expect("cpu controller");
    let quota = std::fs::read_to_string(format!("/sys/fs/cgroup/cpu,cpuacct{cpu_path}/cpu.cfs_quota_us"))
        .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/cpu{cpu_path}/cpu.cfs_quota_us")))
        .unwrap();
    assert_eq!(quota.trim(), "100000", "1 vCPU = one full period");
}
