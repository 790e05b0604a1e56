//! System benchmarks: starts real daemons (as the tests do), measures, and writes BENCHMARKS.md.
//! Every comparison is against a baseline measured in the same run. Run with `make bench` (root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Daemon, Options, machine, running, sh};
use hyperfleet::testing::MachineFiles;
use hyperfleet::testing::process;
use hyperfleet::testing::{FirecrackerApi, jail};
use hyperfleet_client::types::*;
use serde_json::json;

fn pct(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "p is a fraction in [0, 1], so the rounded index is in 0..len; f64 has no try_from to usize"
    )]
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

struct Wrk {
    rps: f64,
    p50: String,
    p99: String,
    /// Requests completed in the run.
    requests: u64,
}

impl Wrk {
    fn none() -> Self {
        Self { rps: 0.0, p50: "?".into(), p99: "?".into(), requests: 0 }
    }

    fn best(self, other: Self) -> Self {
        if other.rps > self.rps { other } else { self }
    }
}

/// Rounds of the read benchmarks in "API throughput".
const API_ROUNDS: usize = 3;

/// Rounds of the three-daemon comparison in "Metrics and request logging" (small differences: more rounds).
const OBSERVE_ROUNDS: usize = 5;

/// The host's 1-minute load average, to print next to comparisons that other load can skew.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Runs wrk (2 threads, `conns` connections, 5 s) and parses its --latency report.
fn wrk(url: &str, conns: u32, key: Option<&str>, script: Option<&Path>) -> Wrk {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", &format!("-c{conns}"), "-d5s", "--latency"]);
    if let Some(k) = key {
        cmd.args(["-H", &format!("Authorization: Bearer {k}")]);
    }
    if let Some(s) = script {
        cmd.arg("-s").arg(s);
    }
    let out = cmd.arg(url).output().expect("wrk is installed by make setup");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let find = |prefix: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_string()
    };
    let rps = find("Requests/sec:").parse().unwrap_or(0.0);
    // "  123456 requests in 5.00s, 12.34MB read"
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Wrk { rps, p50: find("50%"), p99: find("99%"), requests }
}

/// `GET /machines/{id}` (authenticated, one database row) on `d`, 32 connections.
fn wrk_get_machine(d: &Daemon, id: &str) -> Wrk {
    wrk(&format!("{}/machines/{id}", d.url()), 32, Some(&d.key), None)
}

/// `GET /health` (no auth, no database row; one `SELECT 1`) on `d`, 32 connections: the server's own baseline.
fn wrk_health(d: &Daemon) -> Wrk {
    wrk(&format!("{}/health", d.url()), 32, None, None)
}

struct Report {
    md: String,
}

// `let _ = write!(…)` below: writing to a String cannot fail.
impl Report {
    fn section(&mut self, title: &str, intro: &str) {
        let _ = write!(self.md, "\n## {title}\n\n{intro}\n\n");
    }
    fn table(&mut self, header: &[&str], rows: Vec<Vec<String>>) {
        let _ = writeln!(self.md, "| {} |", header.join(" | "));
        let _ = writeln!(self.md, "|{}", "---|".repeat(header.len()));
        for r in rows {
            let _ = writeln!(self.md, "| {} |", r.join(" | "));
        }
    }
}

async fn bench_api(r: &mut Report) {
    let d = Daemon::start(Options { prefix_len: 16, ..Default::default() }).await;
    let m = d.client.create_machine(&machine("bench-target")).await.unwrap();
    // Alternating rounds, best of each: a burst of other load on the host (or the first round warming the
    // server up) then cannot land on one side of the comparison only.
    let (mut get, mut health) = (Wrk::none(), Wrk::none());
    for _ in 0..API_ROUNDS {
        get = get.best(wrk_get_machine(&d, &m.id));
        health = health.best(wrk_health(&d));
    }
    let script = d.dir.path().join("post.lua");
    std::fs::write(
        &script,
        format!(
            "counter = 0\nrequest = function()\n  counter = counter + 1\n  local body = string.format('{{\"name\":\"w%d-%d\",\"vcpu_count\":1,\"mem_size_mib\":64}}', math.random(1000000000), counter)\n  return wrk.format('POST', '/machines', {{['Authorization'] = 'Bearer {}', ['Content-Type'] = 'application/json'}}, body)\nend\n",
            d.key
        ),
    )
    .unwrap();
    let post = wrk(&format!("{}/machines", d.url()), 8, None, Some(&script));
    r.section(
        "API throughput",
        &format!(
            "wrk, 2 threads, 5 s, against the release daemon on loopback (SQLite in WAL mode, API-key auth on). \
             `GET /health` (no auth, no database row, but a `SELECT 1` on a read connection to report the \
             database) is the baseline of the same server, so a cheaper read speeds it up too. The two GETs \
             alternate for {API_ROUNDS} rounds; the best round of each is shown. Load average at the end: {}.",
            load_average()
        ),
    );
    r.table(
        &["request", "connections", "requests/s", "p50", "p99", "vs baseline"],
        vec![
            vec![
                "GET /health (baseline)".into(),
                "32".into(),
                format!("{:.0}", health.rps),
                health.p50,
                health.p99,
                "1.00×".into(),
            ],
            vec![
                format!("GET /machines/{{id}}"),
                "32".into(),
                format!("{:.0}", get.rps),
                get.p50,
                get.p99,
                format!("{:.2}×", get.rps / health.rps),
            ],
            vec![
                "POST /machines (create + lease)".into(),
                "8".into(),
                format!("{:.0}", post.rps),
                post.p50,
                post.p99,
                format!("{:.2}×", post.rps / health.rps),
            ],
        ],
    );
}

async fn bench_concurrent_creates(r: &mut Report) {
    let d = Daemon::start(Options { prefix_len: 16, ..Default::default() }).await;
    let t = Instant::now();
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let c = d.client.clone();
            tokio::spawn(async move { c.create_machine(&machine(&format!("c{i}"))).await.unwrap() })
        })
        .collect();
    let mut ips = HashSet::new();
    for t in tasks {
        ips.insert(t.await.unwrap().guest_ip);
    }
    let wall = t.elapsed();
    r.section(
        "500 concurrent creates over HTTP",
        "500 `POST /machines` at once through the SDK; every machine must get its own block.",
    );
    r.table(
        &["machines", "wall time", "per create", "distinct addresses"],
        vec![vec!["500".into(), ms(wall), ms(wall / 500), format!("{} (duplicates: {})", ips.len(), 500 - ips.len())]],
    );
}

async fn bench_ipam(r: &mut Report) {
    use hyperfleet::testing::machine_rows::insert;
    let dir = tempfile::tempdir().unwrap();
    let store = hyperfleet::testing::Store::open_file(&dir.path().join("ipam.db")).await.unwrap();
    let blocks = 16_384u32;
    let new = |i: u32| hyperfleet::testing::machine_rows::example_spec(&format!("n{i}"));
    let t = Instant::now();
    for i in 0..blocks {
        let mut tx = store.write().await.unwrap();
        assert_eq!(insert(&mut tx, "bench", &format!("id{i}"), &new(i), blocks).await.unwrap().block, i);
        tx.commit().await.unwrap();
    }
    let lease = t.elapsed();
    let full = insert(&mut store.write().await.unwrap(), "bench", "full", &new(blocks), blocks).await.is_err();
    let t = Instant::now();
    for i in 0..blocks {
        let mut tx = store.write().await.unwrap();
        hyperfleet::testing::machine_rows::delete(&mut tx, &format!("id{i}"), &[MachineStatus::Pending]).await.unwrap();
        tx.commit().await.unwrap();
    }
    let free = t.elapsed();
    r.section(
        "IPAM",
        "Every /30 of 172.16.0.0/16 leased one by one through the store (machine row + lease in one transaction, \
         lowest free block each time), then freed. SQLite file on disk, WAL.",
    );
    r.table(
        &["operation", "blocks", "total", "per block"],
        vec![
            vec![
                "lease all (create)".into(),
                blocks.to_string(),
                ms(lease),
                format!("{:.1} µs", lease.as_secs_f64() * 1e6 / blocks as f64),
            ],
            vec![
                "free all (delete)".into(),
                blocks.to_string(),
                ms(free),
                format!("{:.1} µs", free.as_secs_f64() * 1e6 / blocks as f64),
            ],
            vec![
                "one more when full".into(),
                "-".into(),
                if full { "refused (IP_POOL_EXHAUSTED)".into() } else { "ACCEPTED (bug)".into() },
                "-".into(),
            ],
        ],
    );
}

/// Store operations behind POST /machines and GET /machines/{id}, one client, on `store`: (creates/s, gets/s).
async fn store_ops(store: &hyperfleet::testing::Store, n: u32) -> (f64, f64) {
    use hyperfleet::testing::machine_rows::{delete, get, insert};
    let t = Instant::now();
    for i in 0..n {
        let mut tx = store.write().await.unwrap();
        insert(
            &mut tx,
            "bench",
            &format!("sid{i}"),
            &hyperfleet::testing::machine_rows::example_spec(&format!("s{i}")),
            65_536,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    let creates = f64::from(n) / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..n {
        let mut c = store.read().await.unwrap();
        assert!(get(&mut c, &format!("sid{i}")).await.unwrap().is_some());
    }
    let gets = f64::from(n) / t.elapsed().as_secs_f64();
    for i in 0..n {
        let mut tx = store.write().await.unwrap();
        delete(&mut tx, &format!("sid{i}"), &[MachineStatus::Pending]).await.unwrap();
        tx.commit().await.unwrap();
    }
    (creates, gets)
}

async fn bench_database(r: &mut Report) {
    use hyperfleet::testing::{Durability, Location, PgCluster, Store};
    let pg_dir = tempfile::tempdir().unwrap();
    let pg = PgCluster::start(pg_dir.path(), Durability::LikeSqliteWal).unwrap();
    let url = pg.url("postgres");

    // The store alone, one client, no HTTP.
    let sqlite_dir = tempfile::tempdir().unwrap();
    let lite = Store::open_file(&sqlite_dir.path().join("bench.db")).await.unwrap();
    let pgs = Store::open(&Location::Postgres(url.clone())).await.unwrap();
    const N: u32 = 2000;
    let (lite_ops, pg_ops) = (store_ops(&lite, N).await, store_ops(&pgs, N).await);
    lite.close().await;
    pgs.close().await;

    // The daemon over HTTP: one on each backend, running side by side, measured alternately.
    let sqlite = Daemon::start(Options { prefix_len: 16, ..Default::default() }).await;
    let postgres = Daemon::start(Options {
        prefix_len: 16,
        env: vec![("DATABASE_URL".into(), url.clone())],
        ..Default::default()
    })
    .await;
    let target_s = sqlite.client.create_machine(&machine("bench-target")).await.unwrap();
    let target_p = postgres.client.create_machine(&machine("bench-target")).await.unwrap();
    let (mut get_s, mut get_p) = (Wrk::none(), Wrk::none());
    for _ in 0..API_ROUNDS {
        get_s = get_s.best(wrk_get_machine(&sqlite, &target_s.id));
        get_p = get_p.best(wrk_get_machine(&postgres, &target_p.id));
    }
    let post = |d: &Daemon| {
        let script = d.dir.path().join("post.lua");
        std::fs::write(
            &script,
            format!(
                "counter = 0\nrequest = function()\n  counter = counter + 1\n  local body = string.format('{{\"name\":\"w%d-%d\",\"vcpu_count\":1,\"mem_size_mib\":64}}', math.random(1000000000), counter)\n  return wrk.format('POST', '/machines', {{['Authorization'] = 'Bearer {}', ['Content-Type'] = 'application/json'}}, body)\nend\n",
                d.key
            ),
        )
        .unwrap();
        wrk(&format!("{}/machines", d.url()), 8, None, Some(&script))
    };
    let (post_s, post_p) = (post(&sqlite), post(&postgres));
    let load = load_average();
    drop(postgres);
    drop(sqlite);
    drop(pg);

    r.section(
        "Database backends",
        &format!(
            "The same daemon and store on SQLite (file, WAL, `synchronous=NORMAL`) and on PostgreSQL 15 (a local \
             cluster over loopback TCP, `synchronous_commit=off`: the same durability promise as SQLite's WAL \
             mode, fsync on), in the same run. Store: one client, {N} creates (machine row + lease + write lock \
             in one transaction, committed) then {N} gets by id. HTTP: wrk as in \"API throughput\" (GETs \
             alternate for {API_ROUNDS} rounds, best shown; one POST round each), both daemons running side by \
             side. Load average at the end: {load}."
        ),
    );
    let ratio = |p: f64, s: f64| if s > 0.0 { format!("{:.2}×", p / s) } else { "?".into() };
    r.table(
        &["operation", "SQLite", "PostgreSQL", "PostgreSQL / SQLite"],
        vec![
            vec![
                "store: create (1 client)".into(),
                format!("{:.0}/s", lite_ops.0),
                format!("{:.0}/s", pg_ops.0),
                ratio(pg_ops.0, lite_ops.0),
            ],
            vec![
                "store: get by id (1 client)".into(),
                format!("{:.0}/s", lite_ops.1),
                format!("{:.0}/s", pg_ops.1),
                ratio(pg_ops.1, lite_ops.1),
            ],
            vec![
                "HTTP GET /machines/{id} (32 conns)".into(),
                format!("{:.0}/s (p50 {}, p99 {})", get_s.rps, get_s.p50, get_s.p99),
                format!("{:.0}/s (p50 {}, p99 {})", get_p.rps, get_p.p50, get_p.p99),
                ratio(get_p.rps, get_s.rps),
            ],
            vec![
                "HTTP POST /machines (8 conns)".into(),
                format!("{:.0}/s (p50 {}, p99 {})", post_s.rps, post_s.p50, post_s.p99),
                format!("{:.0}/s (p50 {}, p99 {})", post_p.rps, post_p.p50, post_p.p99),
                ratio(post_p.rps, post_s.rps),
            ],
        ],
    );
}

async fn bench_network_setup(r: &mut Report) {
    use hyperfleet_net::{Egress, Firewall, FirewallEntry, Netlink};
    let nl = Netlink::connect().unwrap();
    let subnet: ipnet::Ipv4Net = "10.240.0.0/16".parse().unwrap();
    let fw = Firewall::new("hfbench_net", subnet);
    // 20 other running machines in the table, as on a busy host.
    let others: Vec<FirewallEntry> = (1..=20u32)
        .map(|i| FirewallEntry {
            iface: format!("hfbo{i}"),
            tap_ip: std::net::Ipv4Addr::from(u32::from(subnet.network()) + 4 * i + 1),
            guest_ip: std::net::Ipv4Addr::from(u32::from(subnet.network()) + 4 * i + 2),
            egress: Egress::Allow,
            api: false,
        })
        .collect();
    let mine = FirewallEntry {
        iface: "hfbench0".into(),
        tap_ip: "10.240.0.1".parse().unwrap(),
        guest_ip: "10.240.0.2".parse().unwrap(),
        egress: Egress::Only(vec!["10.0.0.0/8".parse().unwrap()]),
        api: false,
    };
    let mut with_mine = others.clone();
    with_mine.push(mine.clone());
    fw.apply(&others).await.unwrap();
    let (mut tap, mut add, mut del, mut rebuild, mut total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..50 {
        let t = Instant::now();
        nl.create_tap("hfbench0", "bench", "10.240.0.1/30".parse().unwrap()).await.unwrap();
        let t_tap = t.elapsed();
        fw.add(&mine).await.unwrap();
        total.push(t.elapsed());
        add.push(t.elapsed() - t_tap);
        tap.push(t_tap);
        let t = Instant::now();
        fw.delete(&mine).await.unwrap();
        del.push(t.elapsed());
        nl.delete_owned("hfbench0", "bench").await.unwrap();
        let t = Instant::now();
        fw.apply(&with_mine).await.unwrap();
        rebuild.push(t.elapsed());
        fw.apply(&others).await.unwrap();
    }
    fw.remove().await.unwrap();
    r.section(
        "Network setup per start",
        "What a start adds on the host: TAP create (ioctl) + alias, address and up (netlink), then the machine's \
         firewall entries added as set elements in one nft transaction (20 other machines in the table, the new \
         one with an egress CIDR list). The full table rebuild (reconcile, and the fallback when an incremental \
         update fails) is shown for comparison: replacing a table waits for a kernel RCU grace period. \
         50 rounds, median.",
    );
    r.table(
        &["step", "median", "p99"],
        vec![
            vec!["TAP + address + up".into(), ms(pct(&mut tap, 0.5)), ms(pct(&mut tap, 0.99))],
            vec!["firewall: add the machine's elements".into(), ms(pct(&mut add, 0.5)), ms(pct(&mut add, 0.99))],
            vec!["total at start".into(), ms(pct(&mut total, 0.5)), ms(pct(&mut total, 0.99))],
            vec!["firewall: delete its elements (stop)".into(), ms(pct(&mut del, 0.5)), ms(pct(&mut del, 0.99))],
            vec![
                "firewall: full table rebuild (21 machines)".into(),
                ms(pct(&mut rebuild, 0.5)),
                ms(pct(&mut rebuild, 0.99)),
            ],
        ],
    );
}

async fn bench_start_overhead(r: &mut Report) {
    if !Path::new("/dev/kvm").exists() {
        r.section("Firecracker start overhead", "Skipped: /dev/kvm is missing on this host.");
        return;
    }
    let assets = common::assets();
    let fc_bin = assets.join("bin/firecracker");
    let d = Daemon::start(Options { runtime: RuntimeKind::Firecracker, ..Default::default() }).await;
    let m = d
        .client
        .create_machine(&CreateMachine { runtime: Some(RuntimeKind::Firecracker), ..machine("fc-bench") })
        .await
        .unwrap();
    let rounds = 10;
    let mut daemon_times = Vec::new();
    for i in 0..=rounds {
        let t = Instant::now();
        d.client.start_machine(&m.id).await.unwrap();
        if i > 0 {
            // The first start also copies the disk; later ones measure the steady state.
            daemon_times.push(t.elapsed());
        }
        d.client.stop_machine(&m.id).await.unwrap();
    }
    // Baseline: the same firecracker spawn, configuration PUTs and InstanceStart with no daemon around it
    // (TAP and disk made once, beforehand).
    let nl = hyperfleet_net::Netlink::connect().unwrap();
    nl.create_tap("hfbase0", "baseline", "10.241.0.1/30".parse().unwrap()).await.unwrap();
    let disk = d.dir.path().join("baseline.ext4");
    hyperfleet::testing::sparse_copy(&assets.join("rootfs.ext4"), &disk).unwrap();
    let (mut base_times, mut base_socket) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let sock = d.dir.path().join(format!("base{i}.sock"));
        let vsock = d.dir.path().join(format!("base{i}.vsock"));
        let t = Instant::now();
        let pid = process::spawn_detached(
            Command::new(&fc_bin)
                .arg("--api-sock")
                .arg(&sock)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .unwrap();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        base_socket.push(t.elapsed());
        let api = FirecrackerApi::new(&sock);
        api.put("/machine-config", &json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false})).await.unwrap();
        api.put("/boot-source", &json!({"kernel_image_path": assets.join("vmlinux"), "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"}))
            .await
            .unwrap();
        api.put(
            "/drives/rootfs",
            &json!({"drive_id": "rootfs", "path_on_host": disk, "is_root_device": true, "is_read_only": false}),
        )
        .await
        .unwrap();
        api.put(
            "/network-interfaces/eth0",
            &json!({"iface_id": "eth0", "guest_mac": "AA:FC:00:00:10:01", "host_dev_name": "hfbase0"}),
        )
        .await
        .unwrap();
        api.put("/vsock", &json!({"guest_cid": 3, "uds_path": vsock})).await.unwrap();
        api.put("/actions", &json!({"action_type": "InstanceStart"})).await.unwrap();
        base_times.push(t.elapsed());
        process::terminate(pid, Duration::from_secs(2)).await;
        // Dropped: the sockets may be gone with the process already, and they live in the temporary directory.
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_file(&vsock);
    }
    // The same again, started by the jailer in a fresh chroot and cgroup as the daemon does, without the
    // daemon: what the jail itself costs.
    let jail_base = d.dir.path().join("bench-jail");
    let files = MachineFiles::new(d.dir.path(), &jail_base.join("firecracker"), "benchjail");
    let own_disk = files.disk.clone();
    std::fs::create_dir_all(&files.dir).unwrap();
    std::fs::rename(&disk, &own_disk).unwrap();
    jail::secure_base(&jail_base).unwrap();
    let cgroups = jail::CgroupVersion::detect();
    let identity = jail::Identity::of_block(hyperfleet::testing::DEFAULT_JAILER_UID_BASE, 60_000);
    let jailer_bin = assets.join("bin/jailer");
    let (mut jailed_times, mut jailed_socket) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        jail::populate(&files, &assets.join("vmlinux"), identity).unwrap();
        let pid = process::spawn_detached(
            jail::JailerCommand {
                jailer: &jailer_bin,
                firecracker: &fc_bin,
                chroot_dir: &jail_base,
                id: "benchjail",
                identity,
                cgroup_version: cgroups,
                cgroup_limits: cgroups.limits(1, 128),
            }
            .build()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        )
        .unwrap();
        while std::os::unix::net::UnixStream::connect(&files.api_socket).is_err() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        jailed_socket.push(t.elapsed());
        let api = FirecrackerApi::new(&files.api_socket);
        api.put("/machine-config", &json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false})).await.unwrap();
        api.put(
            "/boot-source",
            &json!({"kernel_image_path": "/vmlinux", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"}),
        )
        .await
        .unwrap();
        api.put(
            "/drives/rootfs",
            &json!({"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": true, "is_read_only": false}),
        )
        .await
        .unwrap();
        api.put(
            "/network-interfaces/eth0",
            &json!({"iface_id": "eth0", "guest_mac": "AA:FC:00:00:10:01", "host_dev_name": "hfbase0"}),
        )
        .await
        .unwrap();
        api.put("/vsock", &json!({"guest_cid": 3, "uds_path": "/run/vsock.sock"})).await.unwrap();
        api.put("/actions", &json!({"action_type": "InstanceStart"})).await.unwrap();
        jailed_times.push(t.elapsed());
        process::terminate(pid, Duration::from_secs(2)).await;
        jail::remove(&files, "benchjail").await;
    }
    nl.delete_owned("hfbase0", "baseline").await.unwrap();
    // The first move of a process into a fresh memory cgroup, as the jailer makes one: an RCU grace period
    // (~10–14 ms) unless cgroup favordynmods is on (the daemon turns it on at start).
    let mut moves = Vec::new();
    let probe = Path::new("/sys/fs/cgroup/memory/hyperfleet-bench-move");
    if Path::new("/sys/fs/cgroup/memory").is_dir() {
        for _ in 0..rounds {
            std::fs::create_dir_all(probe).unwrap();
            let mut sleeper = Command::new("sleep").arg("10").spawn().unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let t = Instant::now();
            std::fs::write(probe.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
            moves.push(t.elapsed());
            sleeper.kill().unwrap();
            sleeper.wait().unwrap();
            std::fs::remove_dir(probe).unwrap();
        }
    }
    let favored = hyperfleet::testing::cgroups::dynamic_moves_favored();
    let (dm, bm, jm) = (pct(&mut daemon_times, 0.5), pct(&mut base_times, 0.5), pct(&mut jailed_times, 0.5));
    let (bs, js) = (pct(&mut base_socket, 0.5), pct(&mut jailed_socket, 0.5));
    r.section(
        "Firecracker start overhead",
        &format!(
            "`POST /machines/{{id}}/start` (returns once InstanceStart is accepted: state CAS, TAP + firewall, chroot \
             with kernel and disk hard-linked in, the jailer (copies firecracker into the chroot, memory cgroup, \
             devices, own mount namespace, uid drop) execing firecracker, 5 configuration PUTs, InstanceStart, \
             state CAS) against a baseline doing only a plain (unjailed) spawn, the same PUTs and InstanceStart \
             over the same socket API, in the same run; and the jailed start alone, without the daemon, which is \
             what the jail itself costs. 10 rounds each, median. cgroup favordynmods: {}. Without it, moving \
             firecracker into its cgroup waits for an RCU grace period (13.7 ms measured on this host before it \
             was turned on; the previous run's jailed start was 2.11× the baseline); with it, the move takes the \
             per-process lock only. What the jail still costs is the jailer itself: it copies the 2.9 MB \
             firecracker binary into the chroot (a deliberate copy, so no two VMMs share text pages) and firecracker \
             then faults that fresh copy in, plus the mount namespace, pivot_root and device nodes.",
            if favored { "on" } else { "off" }
        ),
    );
    let ratio = |a: Duration, b: Duration| format!("{:.2}×", a.as_secs_f64() / b.as_secs_f64());
    let mut rows = vec![
        vec!["plain spawn + PUTs + InstanceStart (baseline)".into(), ms(bm), ms(pct(&mut base_times, 0.9))],
        vec!["chroot + jailer + PUTs + InstanceStart, no daemon".into(), ms(jm), ms(pct(&mut jailed_times, 0.9))],
        vec!["ratio jailed / baseline (the jail's cost)".into(), ratio(jm, bm), "".into()],
        vec!["spawn → API socket, plain".into(), ms(bs), ms(pct(&mut base_socket, 0.9))],
        vec!["spawn → API socket, jailed".into(), ms(js), ms(pct(&mut jailed_socket, 0.9))],
        vec!["POST /start through the daemon (jailed)".into(), ms(dm), ms(pct(&mut daemon_times, 0.9))],
        vec!["ratio daemon (jailed) / baseline".into(), ratio(dm, bm), "".into()],
    ];
    if !moves.is_empty() {
        rows.push(vec![
            "first move of a process into a fresh memory cgroup".into(),
            ms(pct(&mut moves, 0.5)),
            ms(pct(&mut moves, 0.9)),
        ]);
    }
    r.table(&["path", "median", "p90"], rows);
}

/// Create -> running -> first exec answered, `n` times.
async fn create_to_first_exec(d: &Daemon, n: usize) -> Vec<Duration> {
    let mut first = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        let m = running(d, machine(&format!("lat{i}"))).await;
        d.client.exec(&m.id, &["true"]).await.unwrap();
        first.push(t.elapsed());
        d.client.delete_machine(&m.id, true).await.unwrap();
    }
    first
}

async fn bench_exec_files(r: &mut Report) {
    // The same without the containers' user namespaces (HYPERFLEET_CONTAINER_USERNS=false), in this run.
    let plain = Daemon::start(Options {
        env: vec![("HYPERFLEET_CONTAINER_USERNS".into(), "false".into())],
        ..Default::default()
    })
    .await;
    let mut first_plain = create_to_first_exec(&plain, 10).await;
    drop(plain);
    let d = Daemon::start(Options::default()).await;
    let mut first = create_to_first_exec(&d, 10).await;
    let m = running(&d, machine("exec-bench")).await;
    let mut seq = Vec::new();
    for _ in 0..1000 {
        let t = Instant::now();
        d.client.exec(&m.id, &["true"]).await.unwrap();
        seq.push(t.elapsed());
    }
    let t = Instant::now();
    let c = Arc::new(d.client.clone());
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let c = c.clone();
            let id = m.id.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                c.exec(&id, &["true"]).await.unwrap();
                t.elapsed()
            })
        })
        .collect();
    let mut conc = Vec::new();
    for t in tasks {
        conc.push(t.await.unwrap());
    }
    let conc_wall = t.elapsed();
    let size = 100usize << 20;
    let data: Vec<u8> = (0..=250u8).cycle().take(size).collect();
    let t = Instant::now();
    d.client.upload_stream(&m.id, "/root/big.bin", data.clone(), None).await.unwrap();
    let up = t.elapsed();
    let t = Instant::now();
    let back = d.client.download_file(&m.id, "/root/big.bin").await.unwrap();
    let down = t.elapsed();
    assert_eq!(back.len(), size);
    let mbs = |d: Duration| format!("{:.0} MB/s", size as f64 / 1e6 / d.as_secs_f64());
    r.section(
        "Exec and files (container runtime, agent over its unix socket)",
        "Through the API and the SDK, as a user sees it: HTTP + auth + agent connection + spawn in the guest. \
         Containers run in their own user namespace with an idmapped root (the default); the create → first \
         exec row is also measured with that turned off, in the same run.",
    );
    r.table(
        &["measure", "result"],
        vec![
            vec![
                "exec `true`, 1,000 sequential: p50 / p99".into(),
                format!("{} / {}", ms(pct(&mut seq, 0.5)), ms(pct(&mut seq, 0.99))),
            ],
            vec!["exec `true`, 100 concurrent: wall time".into(), ms(conc_wall)],
            vec![
                "exec `true`, 100 concurrent: p50 / p99 each".into(),
                format!("{} / {}", ms(pct(&mut conc, 0.5)), ms(pct(&mut conc, 0.99))),
            ],
            vec!["upload 100 MB (raw stream)".into(), mbs(up)],
            vec!["download 100 MB".into(), mbs(down)],
            vec!["create → running → first exec, median of 10".into(), ms(pct(&mut first, 0.5))],
            vec![
                "create → running → first exec, without user namespaces, median of 10".into(),
                ms(pct(&mut first_plain, 0.5)),
            ],
            vec![
                "ratio with / without user namespaces".into(),
                format!("{:.2}×", pct(&mut first, 0.5).as_secs_f64() / pct(&mut first_plain, 0.5).as_secs_f64()),
            ],
        ],
    );
}

async fn bench_proxy(r: &mut Report) {
    let d = Daemon::start(Options::default()).await;
    let m = running(&d, CreateMachine { exposed_ports: Some(vec![8080]), ..machine("proxied") }).await;
    let bin = std::fs::read(common::assets().join("bin/hyperfleet-testd")).unwrap();
    d.client.upload_file(&m.id, "/usr/local/bin/testd", &bin, Some(0o755)).await.unwrap();
    sh(&d, &m.id, "testd 8080 >/dev/null 2>&1 &").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let parse_ms = |s: &str| -> Option<f64> {
        if let Some(v) = s.strip_suffix("ms") {
            v.parse().ok()
        } else if let Some(v) = s.strip_suffix("us") {
            v.parse::<f64>().ok().map(|u| u / 1000.0)
        } else {
            s.strip_suffix('s').and_then(|v| v.parse::<f64>().ok()).map(|s| s * 1000.0)
        }
    };
    // A reference reverse proxy in the same setup: nginx with a keep-alive upstream pool.
    let nginx = Nginx::start(d.dir.path(), &format!("{}:8080", m.guest_ip));
    let mut rows = Vec::new();
    for size in [1024usize, 65536, 1 << 20] {
        let direct = wrk(&format!("http://{}:8080/bytes?n={size}", m.guest_ip), 32, None, None);
        let proxied = wrk(&format!("{}/proxy/{}/8080/bytes?n={size}", d.proxy_url(), m.id), 32, None, None);
        let reference =
            nginx.as_ref().map(|n| wrk(&format!("http://127.0.0.1:{}/bytes?n={size}", n.port), 32, None, None));
        let added = match (parse_ms(&proxied.p50), parse_ms(&direct.p50)) {
            (Some(p), Some(d)) => format!("{:+.2} ms", p - d),
            _ => "?".into(),
        };
        rows.push(vec![
            format!("{} B", size),
            format!("{:.0}", direct.rps),
            format!("{:.0}", proxied.rps),
            format!("**{:.2}×**", proxied.rps / direct.rps),
            reference.map_or("n/a".into(), |r| format!("{:.0} ({:.2}×)", r.rps, r.rps / direct.rps)),
            format!("{} / {}", direct.p50, direct.p99),
            format!("{} / {}", proxied.p50, proxied.p99),
            added,
        ]);
    }
    drop(nginx);
    r.section(
        "Reverse proxy",
        "wrk, 2 threads, 32 connections, 5 s, `GET /bytes?n=SIZE` from the hyperfleet-testd server in a container \
         guest: straight to guest_ip:8080 from the host (baseline), through the Hyperfleet proxy, and through nginx \
         (proxy_pass with a keep-alive upstream, 2 workers) as a reference, in the same run. Goal: ≥ 0.8× direct \
         throughput. On this 2-core host wrk, the proxy and the guest's server share the same two CPUs, so for tiny \
         responses, where every request is pure HTTP handling, any proxy's extra hop costs about as much as the \
         server itself (see nginx); the ratio approaches 1 as responses carry real payload.",
    );
    r.table(
        &[
            "response",
            "direct req/s",
            "proxied req/s",
            "ratio",
            "nginx req/s (ratio)",
            "direct p50 / p99",
            "proxied p50 / p99",
            "added p50",
        ],
        rows,
    );
}

/// An image with Debian's dropbear (and the glibc it links against, copied from the host) on top of busybox:
/// the `ssh -tt` reference of the terminal benchmark. `authorized` is the client's public key line.
fn dropbear_image(authorized: &str) -> common::oci::Image {
    use common::oci::{Compression, Entry, Image, busybox_layer, layer, tar};
    let dropbear = "/usr/sbin/dropbear";
    let ldd = Command::new("ldd").arg(dropbear).output().expect("ldd");
    let libs: Vec<String> = String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')).map(str::to_string))
        .collect();
    assert!(libs.iter().any(|l| l.contains("libc.so")), "ldd {dropbear}: {libs:?}");
    let read = |p: &str| std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let files: Vec<(String, Vec<u8>)> = std::iter::once(dropbear.to_string())
        .chain(libs)
        .map(|p| (p.trim_start_matches('/').to_string(), read(&p)))
        .collect();
    let mut entries = vec![
        Entry::Dir("usr/"),
        Entry::Dir("usr/sbin/"),
        Entry::Dir("lib/"),
        Entry::Dir("lib/x86_64-linux-gnu/"),
        Entry::Dir("lib64/"),
        Entry::Dir("etc/dropbear/"),
        Entry::File("etc/shells", b"/bin/sh\n".to_vec(), 0o644),
        Entry::Dir("root/"),
        Entry::Dir("root/.ssh/"),
        Entry::File("root/.ssh/authorized_keys", authorized.as_bytes().to_vec(), 0o600),
    ];
    entries.extend(files.iter().map(|(p, b)| Entry::File(p, b.clone(), 0o755)));
    Image {
        layers: vec![busybox_layer(Compression::Gzip), layer(tar(&entries), Compression::Gzip)],
        // Foreground, log to stderr, host keys made at first use, public-key logins only.
        config: json!({"Env": ["PATH=/bin:/usr/sbin"], "Entrypoint": [dropbear, "-F", "-E", "-R", "-s", "-p", "2222"]}),
        docker: false,
    }
}

/// Keystroke echo through `ssh -tt` (OpenSSH client) to `cat` under dropbear in the guest: `n` samples after
/// 20 warm-up keystrokes.
fn ssh_keystrokes(key: &Path, guest: std::net::Ipv4Addr, n: usize) -> Vec<Duration> {
    use std::io::{Read, Write};
    let mut ssh = Command::new("ssh")
        .args(["-tt", "-q", "-p", "2222", "-i"])
        .arg(key)
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
        .arg(format!("root@{guest}"))
        .arg("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh (openssh-client)");
    let (mut stdin, mut stdout) = (ssh.stdin.take().unwrap(), ssh.stdout.take().unwrap());
    let mut samples = Vec::new();
    let mut buf = [0u8; 256];
    for i in 0..n + 20 {
        let t = Instant::now();
        stdin.write_all(&[b'a' + u8::try_from(i % 26).unwrap()]).unwrap();
        stdin.flush().unwrap();
        assert!(stdout.read(&mut buf).unwrap() > 0, "ssh ended");
        if i >= 20 {
            samples.push(t.elapsed());
        }
    }
    drop(stdin);
    // Our own child, by its PID.
    let _ = ssh.kill();
    let _ = ssh.wait();
    samples
}

/// 10 rounds of: the machine paused (or stopped), then timed, its first proxied request (the wake), and
/// again paused (stopped), then timed, `POST /resume` (`/start`) and the same URL until it answers.
async fn wake_rounds(d: &Daemon, id: &str, url: &str, stopped: bool) -> (Vec<Duration>, Vec<Duration>) {
    let http = reqwest::Client::new();
    let sleep = || async {
        if stopped { d.client.stop_machine(id).await.unwrap() } else { d.client.pause_machine(id).await.unwrap() }
    };
    let (mut wake, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        sleep().await;
        let t = Instant::now();
        assert_eq!(http.get(url).send().await.unwrap().status(), 200);
        wake.push(t.elapsed());
        sleep().await;
        let t = Instant::now();
        if stopped {
            d.client.start_machine(id).await.unwrap();
        } else {
            d.client.resume_machine(id).await.unwrap();
        }
        while !http.get(url).send().await.is_ok_and(|r| r.status() == 200) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        plain.push(t.elapsed());
    }
    (wake, plain)
}

async fn bench_interactive(r: &mut Report) {
    use futures::{SinkExt, StreamExt};
    use hyperfleet_client::{PtyMessage, PtyOptions};
    use tokio_tungstenite::tungstenite::Message;
    const KEYS: usize = 280;
    let d = Daemon::start(Options::default()).await;
    let reg = common::oci::Registry::start(None).await;
    // The `ssh -tt` reference: dropbear as the main process of a machine made from an image.
    let keydir = tempfile::tempdir().unwrap();
    let key = keydir.path().join("id");
    let keygen = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key).status();
    assert!(keygen.expect("ssh-keygen (openssh-client)").success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    reg.push("bench/dropbear", "v1", &dropbear_image(&public)).await;
    let image = |name: &str| format!("{}/bench/{name}:v1", reg.addr);
    let sshd = running(
        &d,
        CreateMachine { image: Some(image("dropbear")), exposed_ports: Some(vec![2222]), ..machine("sshd") },
    )
    .await;
    let addr = std::net::SocketAddr::from((sshd.guest_ip, 2222));
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "dropbear did not listen in the guest");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let guest = sshd.guest_ip;
    let mut ssh = tokio::task::spawn_blocking(move || ssh_keystrokes(&key, guest, KEYS)).await.unwrap();

    let req = CreateMachine { exposed_ports: Some(vec![8080]), auto_start: Some(true), ..machine("interactive") };
    let m = running(&d, req).await;
    let bin = std::fs::read(common::assets().join("bin/hyperfleet-testd")).unwrap();
    d.client.upload_file(&m.id, "/usr/local/bin/testd", &bin, Some(0o755)).await.unwrap();
    sh(&d, &m.id, "testd 8080 >/dev/null 2>&1 &").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Keystroke echo: one byte to `cat` on the guest's terminal, until its echo comes back.
    let opts = PtyOptions { command: vec!["cat".into()], ..Default::default() };
    let mut ws = d.client.pty(&m.id, &opts).await.unwrap();
    let mut keys = Vec::new();
    for i in 0..KEYS + 20 {
        let t = Instant::now();
        let key = b'a' + u8::try_from(i % 26).unwrap();
        ws.send(PtyMessage::Binary(vec![key].into())).await.unwrap();
        loop {
            if let Some(Ok(PtyMessage::Binary(_))) = ws.next().await {
                break;
            }
        }
        if i >= 20 {
            keys.push(t.elapsed());
        }
    }
    drop(ws);
    // A second reference in the same run: a WebSocket echo server in the same guest, through the same proxy.
    let (mut echo, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/proxy/{}/8080/ws", d.proxy_port, m.id))
            .await
            .unwrap();
    let mut refs = Vec::new();
    for i in 0..KEYS + 20 {
        let t = Instant::now();
        echo.send(Message::Binary(vec![b'a'].into())).await.unwrap();
        while !matches!(echo.next().await, Some(Ok(Message::Binary(_)))) {}
        if i >= 20 {
            refs.push(t.elapsed());
        }
    }
    drop(echo);
    // Wake from paused: the first request through the proxy, against resume + the same request.
    let url = format!("{}/proxy/{}/8080/headers", d.proxy_url(), m.id);
    let (mut wake, mut plain) = wake_rounds(&d, &m.id, &url, false).await;
    // Wake from stopped: a machine whose image serves HTTP as its main process (busybox httpd), so a start
    // brings the service back; against `POST /start` then polling the same URL until it answers.
    let web = CreateMachine {
        image: Some(image("web")),
        exposed_ports: Some(vec![8080]),
        auto_start: Some(true),
        ..machine("web")
    };
    let web_image = common::oci::Image {
        layers: vec![common::oci::busybox_layer(common::oci::Compression::Gzip)],
        config: json!({"Env": ["PATH=/bin"], "Cmd": ["httpd", "-f", "-p", "8080", "-h", "/www"]}),
        docker: false,
    };
    reg.push("bench/web", "v1", &web_image).await;
    let w = running(&d, web).await;
    let url = format!("{}/proxy/{}/8080/", d.proxy_url(), w.id);
    let (mut cold, mut cold_plain) = wake_rounds(&d, &w.id, &url, true).await;
    r.section(
        "Terminal and wake on request",
        "A terminal (`GET /machines/{id}/pty`) to `cat` in a container guest: one keystroke sent, its echo \
         received (280 samples after 20 warm-up). The reference in the same run is `ssh -tt` (OpenSSH client) \
         into a container guest of the same daemon running Debian's dropbear (made from an image holding \
         dropbear, the glibc it links against and busybox), also to `cat`; a second reference is a WebSocket \
         echo server in the guest reached through the proxy. Wake from paused: an `auto_start` machine paused, \
         then the first proxied request (resume + serve), against `POST /resume` then the same request. Wake \
         from stopped: an `auto_start` machine whose image's main process is busybox `httpd`, stopped, then the \
         first proxied request (start, wait for the port, serve), against `POST /start` then polling the same \
         URL every 2 ms until it answers. 10 each.",
    );
    let p = |v: &mut Vec<Duration>| (ms(pct(v, 0.5)), ms(pct(v, 0.99)));
    let row = |name: &str, v: &mut Vec<Duration>, reference: &str, rv: &mut Vec<Duration>| {
        let ((a, b), (c, e)) = (p(v), p(rv));
        vec![name.to_string(), a, b, format!("{c} / {e} ({reference})")]
    };
    r.table(
        &["measure", "p50", "p99", "reference p50 / p99"],
        vec![
            row("keystroke echo via /pty", &mut keys.clone(), "`ssh -tt` to dropbear", &mut ssh),
            row("keystroke echo via /pty", &mut keys, "WebSocket echo via proxy", &mut refs),
            row("paused → first byte (wake on request)", &mut wake, "resume + request", &mut plain),
            row("stopped → first byte (wake on request)", &mut cold, "start + request", &mut cold_plain),
        ],
    );
}

/// Issue 13: what metrics and request logging cost the API, and `/metrics` with 1,000 machines.
async fn bench_observe(r: &mut Report) {
    // Three daemons side by side, differing in one setting each; the daemon's own default filter is
    // `info,netlink_packet_route=error`, which the test harness sets explicitly too.
    let start = |env: &[(&str, &str)]| {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Daemon::start(Options { prefix_len: 16, env, ..Default::default() })
    };
    let base = start(&[]).await;
    let no_metrics = start(&[("HYPERFLEET_METRICS", "false")]).await;
    let no_logs = start(&[("RUST_LOG", "off")]).await;
    let daemons = [&base, &no_metrics, &no_logs];
    let mut ids = Vec::new();
    for d in daemons {
        ids.push(d.client.create_machine(&machine("observe-target")).await.unwrap().id);
    }
    let scrape_status = reqwest::Client::new()
        .get(format!("{}/metrics", no_metrics.url()))
        .bearer_auth(&no_metrics.key)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(scrape_status, 404, "HYPERFLEET_METRICS=false answers /metrics with 404");
    // Alternating rounds over the three daemons, best round of each (as in "API throughput").
    let mut best: Vec<Wrk> = (0..3).map(|_| Wrk::none()).collect();
    let (mut log_bytes, mut logged_requests) = (0u64, 0u64);
    let load_before = load_average();
    for round in 0..OBSERVE_ROUNDS {
        // Each round starts at the next daemon, so none of them always runs right after another.
        for i in (0..3).map(|k| (k + round) % 3) {
            let d = daemons[i];
            let before = std::fs::metadata(d.log_path()).map(|m| m.len()).unwrap_or(0);
            let w = wrk_get_machine(d, &ids[i]);
            if i == 0 {
                log_bytes += std::fs::metadata(d.log_path()).map(|m| m.len()).unwrap_or(0).saturating_sub(before);
                logged_requests += w.requests;
            }
            best[i] = std::mem::replace(&mut best[i], Wrk::none()).best(w);
        }
    }
    let load_after = load_average();
    let silent = std::fs::metadata(no_logs.log_path()).map(|m| m.len()).unwrap_or(0);
    let [on, metrics_off, logs_off] = <[Wrk; 3]>::try_from(best).ok().unwrap();
    drop(no_metrics);
    drop(no_logs);

    // Scrape time: 1 machine (baseline), then 1,000 (pending: creating is a database row and an address).
    let http = reqwest::Client::new();
    let scrape = |n: usize| {
        let (http, url, key) = (http.clone(), format!("{}/metrics", base.url()), base.key.clone());
        async move {
            let mut times = Vec::new();
            let mut size = 0;
            for i in 0..n + 3 {
                let t = Instant::now();
                let resp = http.get(&url).bearer_auth(&key).send().await.unwrap();
                assert_eq!(resp.status(), 200);
                size = resp.bytes().await.unwrap().len();
                if i >= 3 {
                    times.push(t.elapsed());
                }
            }
            (times, size)
        }
    };
    let (mut one, one_size) = scrape(20).await;
    let tasks: Vec<_> = (1..1000)
        .map(|i| {
            let c = base.client.clone();
            tokio::spawn(async move { c.create_machine(&machine(&format!("o{i}"))).await.unwrap() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let (mut thousand, thousand_size) = scrape(20).await;

    r.section(
        "Metrics and request logging",
        &format!(
            "Issue 13. wrk, 2 threads, 32 connections, 5 s, `GET /machines/{{id}}` against three release daemons \
             started side by side, alternating for {OBSERVE_ROUNDS} rounds (each round starting at the next daemon), best round of each: the default \
             (metrics on, `RUST_LOG` at the default `info`: one `hyperfleet::request` line per request) is the \
             baseline; `HYPERFLEET_METRICS=false` records nothing; `RUST_LOG=off` writes no log line. Goal for \
             metrics: ≤ 3 % difference. Log bytes per request: what the default daemon's log grew by during \
             its wrk runs, over the requests completed (the `RUST_LOG=off` daemon's whole log: {silent} bytes). \
             Host load average (1 min) before / after the rounds: {load_before} / {load_after}; on this 2-core \
             host wrk and the daemon share the CPUs, so a difference of a few percent is within the noise."
        ),
    );
    let pct_vs = |w: &Wrk| format!("{:+.1} %", (w.rps / on.rps - 1.0) * 100.0);
    r.table(
        &["daemon", "requests/s", "p50", "p99", "vs default"],
        vec![
            vec!["default (baseline)".into(), format!("{:.0}", on.rps), on.p50.clone(), on.p99.clone(), "—".into()],
            vec![
                "`HYPERFLEET_METRICS=false`".into(),
                format!("{:.0}", metrics_off.rps),
                metrics_off.p50.clone(),
                metrics_off.p99.clone(),
                pct_vs(&metrics_off),
            ],
            vec![
                "`RUST_LOG=off`".into(),
                format!("{:.0}", logs_off.rps),
                logs_off.p50.clone(),
                logs_off.p99.clone(),
                pct_vs(&logs_off),
            ],
        ],
    );
    #[allow(clippy::cast_precision_loss, reason = "byte and request counts far below 2^52")]
    let per_request = log_bytes as f64 / logged_requests.max(1) as f64;
    let _ = write!(
        r.md,
        "\nLog written at the default level: {per_request:.0} bytes per request ({log_bytes} bytes for \
         {logged_requests} requests).\n\n`GET /metrics` (authenticated, 20 scrapes after 3 warm-up, one at a \
         time) on the default daemon with 1 machine (baseline) and with 1,000 pending machines. Pending \
         machines add no per-machine series (those are built for running and paused machines only), so the body \
         barely grows; what grows is the snapshot's database reads (counts by status, leases, active machines).\n\n"
    );
    r.table(
        &["machines", "p50", "p99", "body", "p50 vs 1 machine"],
        vec![
            vec!["1".into(), ms(pct(&mut one, 0.5)), ms(pct(&mut one, 0.99)), format!("{one_size} B"), "1.00×".into()],
            vec![
                "1,000".into(),
                ms(pct(&mut thousand, 0.5)),
                ms(pct(&mut thousand, 0.99)),
                format!("{thousand_size} B"),
                format!("{:.2}×", pct(&mut thousand, 0.5).as_secs_f64() / pct(&mut one, 0.5).as_secs_f64()),
            ],
        ],
    );
}

/// Webhook delivery latency: a machine event (a PATCH of its labels, `machine.updated`) to a signed POST
/// arriving at a receiver on loopback, against the same event reaching a `GET /events` subscriber.
async fn bench_webhooks(r: &mut Report) {
    use futures::StreamExt;
    let d = Daemon::start(Options::default()).await;
    let (tx, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<()>();
    let app = axum::Router::new().fallback(move || {
        let tx = tx.clone();
        async move {
            // Dropped: the benchmark stops listening only at its end.
            let _ = tx.send(());
            axum::http::StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let m = d.client.create_machine(&machine("hooked")).await.unwrap();
    let hook = CreateWebhook {
        url: Some(format!("http://{addr}/hook")),
        events: Some(vec!["machine.updated".into()]),
        label_selector: None,
        secret: Some("bench-secret".into()),
    };
    d.client.create_webhook(&hook).await.unwrap();
    let mut sse = Box::pin(d.client.events(Some(&m.id), &[EventKind::Updated], None).await.unwrap());
    let (mut patch, mut webhook, mut events) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..220u32 {
        let update = UpdateMachine {
            labels: Some([("n".to_string(), i.to_string())].into_iter().collect()),
            ..Default::default()
        };
        let t = Instant::now();
        let (p, w, e) = tokio::join!(
            async {
                d.client.update_machine(&m.id, &update).await.unwrap();
                t.elapsed()
            },
            async {
                arrivals.recv().await.unwrap();
                t.elapsed()
            },
            async {
                sse.next().await.unwrap().unwrap();
                t.elapsed()
            }
        );
        if i >= 20 {
            patch.push(p);
            webhook.push(w);
            events.push(e);
        }
    }
    r.section(
        "Webhooks",
        "A container machine's labels changed by `PATCH` (a `machine.updated` event), 200 times after 20 warm-up: \
         the time from sending the PATCH to a signed webhook POST arriving at a receiver on loopback, against the \
         same event reaching a `GET /events` subscriber (the reference, same run), and the PATCH's own answer.",
    );
    let (w50, e50) = (pct(&mut webhook, 0.5), pct(&mut events, 0.5));
    r.table(
        &["measure", "p50", "p99"],
        vec![
            vec!["PATCH answered".into(), ms(pct(&mut patch, 0.5)), ms(pct(&mut patch, 0.99))],
            vec!["event via GET /events (reference)".into(), ms(e50), ms(pct(&mut events, 0.99))],
            vec![
                format!(
                    "webhook delivered ({:.2}x the reference at p50)",
                    w50.as_secs_f64() / e50.as_secs_f64().max(1e-9)
                ),
                ms(w50),
                ms(pct(&mut webhook, 0.99)),
            ],
        ],
    );
}

/// Start → running of a stopped machine, `n` times (stopped again after each).
async fn start_times(d: &Daemon, id: &str, n: usize) -> Vec<Duration> {
    let mut v = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        d.client.start_machine(id).await.unwrap();
        v.push(t.elapsed());
        d.client.stop_machine(id).await.unwrap();
    }
    v
}

async fn bench_volumes(r: &mut Report) {
    let d = Daemon::start(Options::default()).await;
    // Attach cost: the same start with and without one volume, interleaved in rounds of 5.
    let vol =
        d.client.create_volume(&CreateVolume { name: Some("bench-vol".into()), size_mib: Some(256) }).await.unwrap();
    let plain = d.client.create_machine(&machine("no-volume")).await.unwrap();
    let mount = VolumeMount { volume: vol.id.clone(), mount_path: "/data".into(), read_only: false };
    let with = d
        .client
        .create_machine(&CreateMachine { volumes: Some(vec![mount.clone()]), ..machine("one-volume") })
        .await
        .unwrap();
    let (mut without_v, mut with_v) = (Vec::new(), Vec::new());
    start_times(&d, &plain.id, 2).await;
    start_times(&d, &with.id, 2).await;
    for _ in 0..6 {
        without_v.extend(start_times(&d, &plain.id, 5).await);
        with_v.extend(start_times(&d, &with.id, 5).await);
    }
    let (w50, o50) = (pct(&mut with_v, 0.5), pct(&mut without_v, 0.5));

    // Clone: a 1 GiB volume holding 100 MiB, by the API (reflink where the filesystem has it, else a sparse
    // copy) against `cp --sparse=always` of the same file, alternating, 5 each.
    let big = d.client.create_volume(&CreateVolume { name: Some("big".into()), size_mib: Some(1024) }).await.unwrap();
    let writer_mount = VolumeMount { volume: big.id.clone(), mount_path: "/data".into(), read_only: false };
    let writer = running(&d, CreateMachine { volumes: Some(vec![writer_mount]), ..machine("filler") }).await;
    let (code, _, err) = sh(&d, &writer.id, "dd if=/dev/urandom of=/data/fill bs=1M count=100 2>&1 && sync").await;
    assert_eq!(code, 0, "{err}");
    d.client.delete_machine(&writer.id, true).await.unwrap();
    let file = d.dir.path().join("machines/volumes").join(format!("{}.ext4", big.id));
    let allocated = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    };
    let used_mib = allocated(&file) >> 20;
    let copy = d.dir.path().join("cp-baseline.ext4");
    let (mut api, mut cp) = (Vec::new(), Vec::new());
    for i in 0..5 {
        let t = Instant::now();
        let c = d.client.clone_volume(&big.id, &CloneVolume { name: Some(format!("big-copy-{i}")) }).await.unwrap();
        api.push(t.elapsed());
        d.client.delete_volume(&c.id).await.unwrap();
        let t = Instant::now();
        let ok = Command::new("cp").arg("--sparse=always").arg(&file).arg(&copy).status().unwrap().success();
        cp.push(t.elapsed());
        assert!(ok);
        std::fs::remove_file(&copy).unwrap();
    }
    let (a50, c50) = (pct(&mut api, 0.5), pct(&mut cp, 0.5));
    r.section(
        "Volumes",
        &format!(
            "Container runtime. Attach cost: `POST /machines/{{id}}/start` of a machine naming one 256 MiB volume \
             (loop-mounted nodev,nosuid on the host, bound in, mounted by the agent) against the same machine \
             without it, 30 starts each, interleaved in rounds of 5, same run. Clone: `POST /volumes/{{id}}/clone` \
             of a 1 GiB volume holding 100 MiB of random data ({used_mib} MiB allocated on the host), against \
             `cp --sparse=always` of the same file, alternating, 5 each."
        ),
    );
    r.table(
        &["measure", "median", "p90"],
        vec![
            vec!["start without a volume".into(), ms(o50), ms(pct(&mut without_v, 0.9))],
            vec!["start with one volume".into(), ms(w50), ms(pct(&mut with_v, 0.9))],
            vec![
                "added by the volume (median difference)".into(),
                format!("{:.1} ms", (w50.as_secs_f64() - o50.as_secs_f64()) * 1000.0),
                String::new(),
            ],
            vec!["clone 1 GiB / 100 MiB used, API".into(), ms(a50), ms(pct(&mut api, 0.9))],
            vec!["`cp --sparse=always` of the same file (baseline)".into(), ms(c50), ms(pct(&mut cp, 0.9))],
            vec![
                "ratio API / cp".into(),
                format!("{:.2}×", a50.as_secs_f64() / c50.as_secs_f64().max(1e-9)),
                String::new(),
            ],
        ],
    );
}

/// The guest side of a child create → start → first exec, with busybox nc and the machine's token.
const CHILD_API_SH: &str = r#"api() {
  tok=$(cat "$HYPERFLEET_TOKEN_FILE")
  hp=${HYPERFLEET_URL#http://}
  body=$3
  printf '%s %s HTTP/1.0\r\nHost: %s\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %s\r\n\r\n%s' \
    "$1" "$2" "$hp" "$tok" "${#body}" "$body" | nc -w 20 "${hp%:*}" "${hp#*:}"
}
"#;

async fn bench_children(r: &mut Report) {
    let d = Daemon::start(Options::default()).await;
    let spawn = SpawnRequest { max_children: Some(4), max_vcpu: Some(4), max_mem_mib: Some(1024) };
    let parent = running(&d, CreateMachine { spawn: Some(spawn), ..machine("bench-parent") }).await;
    let n = 12;
    let (mut host, mut inside, mut noop) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        // From the host: SDK create, start, exec.
        let t = Instant::now();
        let m = running(&d, machine(&format!("host-kid{i}"))).await;
        d.client.exec(&m.id, &["true"]).await.unwrap();
        host.push(t.elapsed());
        d.client.delete_machine(&m.id, true).await.unwrap();
        // From inside the parent: one script (create, start, exec) run through exec; the exec of `true` in
        // the parent (measured right after) is what the host adds around it.
        let name = format!("in-kid{i}");
        let script = format!(
            "{CHILD_API_SH}api POST /machines '{{\"name\":\"{name}\",\"vcpu_count\":1,\"mem_size_mib\":128}}' | head -1\n\
             api POST /machines/{name}/start '' | head -1\napi POST /machines/{name}/exec '{{\"command\":[\"true\"]}}' | head -1"
        );
        let t = Instant::now();
        let (code, out, err) = sh(&d, &parent.id, &script).await;
        inside.push(t.elapsed());
        assert_eq!(code, 0, "{out} {err}");
        assert_eq!(out.matches(" 20").count(), 3, "{out}");
        let t = Instant::now();
        d.client.exec(&parent.id, &["true"]).await.unwrap();
        noop.push(t.elapsed());
        d.client.delete_machine(&name, true).await.unwrap();
    }
    let (h50, i50, n50) = (pct(&mut host, 0.5), pct(&mut inside, 0.5), pct(&mut noop, 0.5));
    let net = i50.saturating_sub(n50);
    r.section(
        "Child machines",
        &format!(
            "Container runtime. Create → running → first exec (`true`) answered, {n} times each, same run: from the \
             host through the SDK, and from inside a `spawn` machine with a busybox `sh` script (`nc`, HTTP/1.0, \
             one connection per request) to the child API on its gateway. The inside run is timed from the host \
             around the exec that runs the script; the exec of `true` in the parent (also measured) is subtracted."
        ),
    );
    r.table(
        &["measure", "median", "p90"],
        vec![
            vec!["from the host (SDK)".into(), ms(h50), ms(pct(&mut host, 0.9))],
            vec!["from inside the parent, script as run".into(), ms(i50), ms(pct(&mut inside, 0.9))],
            vec!["exec `true` in the parent (subtracted)".into(), ms(n50), ms(pct(&mut noop, 0.9))],
            vec![
                format!("from inside, net ({:.2}× the host)", net.as_secs_f64() / h50.as_secs_f64().max(1e-9)),
                ms(net),
                String::new(),
            ],
        ],
    );
}

/// nginx as a reference reverse proxy, started (and stopped) by the benchmark when it is installed.
struct Nginx {
    port: u16,
    prefix: std::path::PathBuf,
}

impl Nginx {
    fn start(dir: &Path, upstream: &str) -> Option<Self> {
        let bin = hyperfleet::testing::find_on_path(Path::new("nginx"))?;
        let prefix = dir.join("nginx");
        std::fs::create_dir_all(&prefix).ok()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let conf = format!(
            "worker_processes 2;\npid {p}/nginx.pid;\nerror_log {p}/error.log;\nevents {{ worker_connections 1024; }}\n\
             http {{ access_log off; upstream g {{ server {upstream}; keepalive 64; }}\n\
             server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://g; proxy_http_version 1.1; \
             proxy_set_header Connection \"\"; proxy_buffering off; }} }} }}\n",
            p = prefix.display()
        );
        std::fs::write(prefix.join("nginx.conf"), conf).ok()?;
        let ok =
            Command::new(bin).arg("-p").arg(&prefix).arg("-c").arg(prefix.join("nginx.conf")).status().ok()?.success();
        std::thread::sleep(Duration::from_millis(300));
        ok.then_some(Nginx { port, prefix })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Only the master we started, by the PID it wrote.
        if let Some(pid) =
            std::fs::read_to_string(self.prefix.join("nginx.pid")).ok().and_then(|p| p.trim().parse::<u32>().ok())
        {
            process::signal(pid, nix::sys::signal::Signal::SIGQUIT);
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    pct(&mut v, 0.5)
}

/// An image of about 20 MiB: busybox and a 16 MiB file (`seed` makes its layer unique).
fn bench_image(seed: u32) -> common::oci::Image {
    use common::oci::{Compression, Entry, Image, busybox_layer, layer, tar};
    let big: Vec<u8> =
        (0..16u32 << 20).map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0]).collect();
    Image {
        layers: vec![
            busybox_layer(Compression::Gzip),
            layer(tar(&[Entry::File("data.bin", big, 0o644)]), Compression::Gzip),
        ],
        config: json!({"Env": ["PATH=/bin"]}),
        docker: false,
    }
}

async fn bench_images(r: &mut Report) {
    const ROUNDS: usize = 3;
    let reg = common::oci::Registry::start(None).await;
    reg.push("bench/img", "v1", &bench_image(1)).await;
    let image = format!("{}/bench/img:v1", reg.addr);

    // The baseline: skopeo copy + umoci unpack + mkfs.ext4 -d, from the same registry.
    let mut pipeline = Vec::new();
    for i in 0..ROUNDS {
        let work = tempfile::tempdir().unwrap();
        let w = work.path();
        let t = Instant::now();
        let ok = |c: &mut Command| assert!(c.stdout(Stdio::null()).status().unwrap().success(), "{c:?}");
        ok(Command::new("skopeo")
            .args(["copy", "-q", "--src-tls-verify=false"])
            .arg(format!("docker://{image}"))
            .arg(format!("oci:{}:v1", w.join("layout").display())));
        ok(Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:v1", w.join("layout").display()))
            .arg(w.join("bundle")));
        ok(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(w.join("bundle/rootfs"))
            .arg(w.join("root.ext4"))
            .arg("96M"));
        pipeline.push(t.elapsed());
        eprintln!("images: pipeline round {i}: {:?}", t.elapsed());
    }

    let d = Daemon::start(Options { prefix_len: 16, env: vec![], ..Default::default() }).await;
    let c = &d.client;
    let create = |name: String| CreateMachine { image: Some(image.clone()), ..machine(&name) };
    // Uncached: create → start → first exec, the cache emptied before each round.
    let mut uncached = Vec::new();
    for i in 0..ROUNDS {
        let t = Instant::now();
        let m = c.create_machine(&create(format!("unc{i}"))).await.unwrap();
        c.start_machine(&m.id).await.unwrap();
        assert_eq!(c.exec(&m.id, &["true"]).await.unwrap().exit_code, 0);
        uncached.push(t.elapsed());
        let digest = m.spec.image_digest.clone().unwrap();
        c.delete_machine(&m.id, true).await.unwrap();
        c.delete_image(&digest).await.unwrap();
    }
    // The daemon's own timings of each uncached pull (resolve → downloads done → applied) and start.
    let field = |l: &str, key: &str| -> Option<u64> {
        let at = l.find(&format!(" {key}="))? + key.len() + 2;
        l[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    let logs = d.logs();
    let logs: String = logs.chars().filter(|c| !c.is_control() || *c == '\n').collect();
    let (mut pulled, mut applied, mut prepared, mut booted) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for l in logs.lines() {
        let l = l.replace("[0m", "").replace("[2m", "").replace("[3m", "");
        if let Some(ms) = field(&l, "ms").filter(|_| l.contains("image pulled and converted")) {
            pulled.push(Duration::from_millis(ms));
        }
        if l.contains("image root built") {
            applied.extend(field(&l, "applied_ms").map(Duration::from_millis));
        }
        // The uncached rounds' starts are the first ones.
        if l.contains("machine running") && prepared.len() < ROUNDS {
            prepared.extend(field(&l, "prepare").map(Duration::from_millis));
            booted.extend(field(&l, "boot").map(Duration::from_millis));
        }
    }
    eprintln!("images: pulls {pulled:?}, applied {applied:?}, start: prepare {prepared:?} boot {booted:?}");
    // Cached: the image pulled once, then create → running and create → first exec.
    c.pull_image(&PullImage { image: image.clone(), registry_auth: None }).await.unwrap();
    let (mut to_running, mut to_exec) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS * 2 {
        let t = Instant::now();
        let m = c.create_machine(&create(format!("cached{i}"))).await.unwrap();
        c.start_machine(&m.id).await.unwrap();
        to_running.push(t.elapsed());
        assert_eq!(c.exec(&m.id, &["true"]).await.unwrap().exit_code, 0);
        to_exec.push(t.elapsed());
        c.delete_machine(&m.id, true).await.unwrap();
    }
    // 20 concurrent creates of an image nobody pulled yet.
    let img2 = bench_image(2);
    reg.push("bench/img2", "v1", &img2).await;
    let image2 = format!("{}/bench/img2:v1", reg.addr);
    let mark = reg.log().len();
    let t = Instant::now();
    let creates = (0..20).map(|i| {
        let c = c.clone();
        let req = CreateMachine { image: Some(image2.clone()), ..machine(&format!("conc{i}")) };
        async move { c.create_machine(&req).await.unwrap() }
    });
    let ms20 = futures::future::join_all(creates).await;
    let created = t.elapsed();
    while c.list_images().await.unwrap().images.len() < 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cached20 = t.elapsed();
    let gets: Vec<usize> =
        img2.layers.iter().map(|l| reg.blob_gets_since(mark, &common::oci::sha256(&l.bytes))).collect();
    for m in &ms20 {
        c.delete_machine(&m.id, true).await.unwrap();
    }
    let (p, u) = (median(pipeline), median(uncached.clone()));
    r.section(
        "Machines from images",
        &format!(
            "A ~20 MiB image (Debian's static busybox and a 16 MiB file, two gzip layers) in a local \
             `docker-registry` on loopback, container runtime, median of {ROUNDS} rounds (cached: {}). The baseline \
             is the pipeline the Hyperfleet docs use, run on the same image from the same registry in the same run: \
             `skopeo copy` + `umoci unpack` + `mkfs.ext4 -d`, which ends with a root image and no machine yet.",
            ROUNDS * 2
        ),
    );
    r.table(
        &["what", "time", "vs the pipeline"],
        vec![
            vec!["skopeo copy + umoci unpack + mkfs.ext4 -d (baseline)".into(), ms(p), "1.00×".into()],
            vec![
                "Hyperfleet, uncached: create → start → first exec".into(),
                ms(u),
                format!("{:.2}×", u.as_secs_f64() / p.as_secs_f64()),
            ],
            vec![
                "Hyperfleet, cached: create → running".into(),
                ms(median(to_running.clone())),
                format!("{:.2}×", median(to_running).as_secs_f64() / p.as_secs_f64()),
            ],
            vec![
                "Hyperfleet, cached: create → first exec".into(),
                ms(median(to_exec.clone())),
                format!("{:.2}×", median(to_exec).as_secs_f64() / p.as_secs_f64()),
            ],
        ],
    );
    if !pulled.is_empty() && !applied.is_empty() && !prepared.is_empty() && !booted.is_empty() {
        let goal = if u.as_secs_f64() <= 0.5 * p.as_secs_f64() { "is reached" } else { "is not reached" };
        let _ = write!(
            r.md,
            "\nWhere the uncached time goes (the daemon's log, medians): the pull took {} ({:.2}× the baseline): \
             resolving, downloading the layers (several at once) and applying each as its download arrives ({} \
             of applying) into the image's root tree, which is what the cache keeps; there is no `mkfs.ext4 -d` \
             on this path: a container machine runs from that tree (the read-only lower layer of its own overlay \
             root) and only a Firecracker machine's first start makes the image's ext4, once per image. The \
             machine's start then took {} to prepare (at once: its namespaces, and its own disk for the overlay's \
             upper layer, a synced sparse copy of an empty ext4 of its size, which the first machine of each size \
             makes with `mkfs.ext4`; then that disk loop-mounted, the tree mounted read-only and idmapped beneath \
             it, the overlay) and {} for runc to start the \
             container; the rest is the create and the exec. The goal of 0.5× {goal}.\n",
            ms(median(pulled.clone())),
            median(pulled.clone()).as_secs_f64() / p.as_secs_f64(),
            ms(median(applied)),
            ms(median(prepared)),
            ms(median(booted)),
        );
    }
    let _ = write!(
        r.md,
        "\n20 concurrent creates of one uncached image: all 20 answered 201 in {} (status `pending`, pull in \
         progress), the image was cached {} after the first request, and the registry served its layer blobs \
         {:?} time(s): its own layer once, and the busybox layer it shares with the image already cached not \
         at all (one pull, layers shared in the cache).\n",
        ms(created),
        ms(cached20),
        gets
    );
}

/// Issue 10: an exec through a node of the fleet that forwards it to the machine's owner, against the same exec
/// sent to the owner directly, alternately in the same run.
async fn bench_fleet(r: &mut Report) {
    use hyperfleet::testing::{Durability, PgCluster};
    let pg_dir = tempfile::tempdir().unwrap();
    let pg = PgCluster::start(pg_dir.path(), Durability::LikeSqliteWal).unwrap();
    let url = pg.url("postgres");
    let node = |name: &str| Options {
        env: [
            ("DATABASE_URL", url.as_str()),
            ("HYPERFLEET_NODE_NAME", name),
            ("HYPERFLEET_NODE_URL", "{url}"),
            ("HYPERFLEET_CLUSTER_SECRET", "bench-fleet-cluster-secret-0123"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        ..Default::default()
    };
    // Placement: the decision a create makes in its write transaction, with 3 and then 100 node rows and
    // 10,000 machines, on each backend.
    let sqlite_dir = tempfile::tempdir().unwrap();
    let mut placement_rows = Vec::new();
    for (backend, location) in [
        ("SQLite", hyperfleet::testing::Location::Sqlite(sqlite_dir.path().join("placement.db"))),
        ("PostgreSQL", hyperfleet::testing::Location::Postgres(url.clone())),
    ] {
        let store = hyperfleet::testing::Store::open(&location).await.unwrap();
        placement_rows.extend(bench_placement(&store, backend).await);
        store.close().await;
    }

    let a = Daemon::start(node("a")).await;
    let b = Daemon::start(node("b")).await;
    let req = CreateMachine { node: Some("b".into()), exposed_ports: Some(vec![8080]), ..machine("bench-owned-by-b") };
    let m = running(&b, req).await;
    for _ in 0..20 {
        a.client.exec(&m.id, &["true"]).await.unwrap();
        b.client.exec(&m.id, &["true"]).await.unwrap();
    }
    // A request to the guest's web server through b's proxy, and through a's, which sends it on to b's.
    common::start_testd(&b, &m.id, 8080).await;
    let http = reqwest::Client::new();
    let get = |proxy: String| {
        let http = http.clone();
        let url = format!("{proxy}/proxy/{}/8080/headers", m.id);
        async move {
            let t = Instant::now();
            let resp = http.get(&url).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.bytes().await.unwrap();
            t.elapsed()
        }
    };
    for _ in 0..20 {
        get(a.proxy_url()).await;
        get(b.proxy_url()).await;
    }
    let (mut proxy_direct, mut proxy_forwarded) = (Vec::new(), Vec::new());
    for _ in 0..300 {
        proxy_direct.push(get(b.proxy_url()).await);
        proxy_forwarded.push(get(a.proxy_url()).await);
    }
    const N: usize = 300;
    let (mut direct, mut forwarded) = (Vec::with_capacity(N), Vec::with_capacity(N));
    for _ in 0..N {
        let t = Instant::now();
        b.client.exec(&m.id, &["true"]).await.unwrap();
        direct.push(t.elapsed());
        let t = Instant::now();
        a.client.exec(&m.id, &["true"]).await.unwrap();
        forwarded.push(t.elapsed());
    }
    let load = load_average();
    drop(a);
    drop(b);
    drop(pg);
    let (d50, f50) = (pct(&mut direct, 0.5), pct(&mut forwarded, 0.5));
    r.section(
        "Fleet",
        &format!(
            "Two daemons as two nodes of one fleet on a local PostgreSQL 15, container runtime. `exec` of `true` in a \
             machine that node b owns, sent to b directly and sent to node a, which checks the key and forwards \
             the call to b with the cluster secret (streaming the body both ways); {N} of each, alternating, after \
             20 warm-up. Goal: forwarding adds at most 1 ms at the median. Load average at the end: {load}."
        ),
    );
    r.table(
        &["exec round trip", "p50", "p99"],
        vec![
            vec!["on the owner (node b)".into(), ms(d50), ms(pct(&mut direct, 0.99))],
            vec!["through node a (forwarded)".into(), ms(f50), ms(pct(&mut forwarded, 0.99))],
            vec!["added by forwarding".into(), ms(f50.saturating_sub(d50)), String::new()],
        ],
    );
    let (pd50, pf50) = (pct(&mut proxy_direct, 0.5), pct(&mut proxy_forwarded, 0.5));
    let _ = write!(
        r.md,
        "\nThe reverse proxy across nodes: a GET of a small page from a server in the same machine, through b's \
         proxy, and through a's, which sends it on to b's proxy with the cluster secret; 300 of each, \
         alternating, after 20 warm-up, one request at a time on kept-alive connections.\n\n"
    );
    r.table(
        &["proxied GET", "p50", "p99"],
        vec![
            vec!["through the owner's proxy (node b)".into(), ms(pd50), ms(pct(&mut proxy_direct, 0.99))],
            vec!["through node a's proxy".into(), ms(pf50), ms(pct(&mut proxy_forwarded, 0.99))],
            vec!["added by the hop".into(), ms(pf50.saturating_sub(pd50)), String::new()],
        ],
    );
    let _ = write!(
        r.md,
        "\nPlacement: one decision as a create makes it (a write transaction; every node row with what its \
         machines reserve, summed from the machines table; the least-loaded choice), 200 times after 10,000 \
         machines were inserted over the first 3 nodes; then 97 more node rows.\n\n"
    );
    r.table(&["backend", "nodes", "machines", "decision p50", "p99"], placement_rows);
}

/// Placement decision times with 3 and with 100 node rows and 10,000 machines in `store`.
async fn bench_placement(store: &hyperfleet::testing::Store, backend: &str) -> Vec<Vec<String>> {
    use hyperfleet::testing::machine_rows::{example_spec, insert};
    use hyperfleet::testing::placement::{decide, register_nodes};
    const MACHINES: usize = 10_000;
    register_nodes(store, 3).await.unwrap();
    let mut tx = store.write().await.unwrap();
    for i in 0..MACHINES {
        let node = format!("node-{:04}", i % 3);
        insert(&mut tx, &node, &format!("pm{i:05}"), &example_spec(&format!("p{i}")), 65_536).await.unwrap();
    }
    tx.commit().await.unwrap();
    let mut rows = Vec::new();
    for nodes in [3, 100] {
        register_nodes(store, nodes).await.unwrap();
        for _ in 0..20 {
            decide(store, 1, 128).await.unwrap();
        }
        let mut took: Vec<Duration> = Vec::with_capacity(200);
        for _ in 0..200 {
            let t = Instant::now();
            decide(store, 1, 128).await.unwrap();
            took.push(t.elapsed());
        }
        rows.push(vec![
            backend.to_string(),
            nodes.to_string(),
            MACHINES.to_string(),
            ms(pct(&mut took, 0.5)),
            ms(pct(&mut took, 0.99)),
        ]);
    }
    rows
}

#[tokio::main]
async fn main() {
    if !common::is_root() {
        eprintln!("benchmarks need root (TAPs, nftables, runc); run `make bench` as root");
        std::process::exit(1);
    }
    let kvm = hyperfleet::testing::KvmKind::detect();
    let uname = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut r = Report {
        md: format!(
            "# Benchmarks\n\nReproduce with `make bench` (root); this file is written by \
             `crates/hyperfleet/benches/system.rs`. Last run: {} on {} CPUs, Linux {uname}, {}. Release build.\n",
            hyperfleet::testing::now(),
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            kvm.describe()
        ),
    };
    // HYPERFLEET_BENCH_ONLY=api,ipam runs only those sections and replaces just them in BENCHMARKS.md.
    let only: Option<Vec<String>> = std::env::var("HYPERFLEET_BENCH_ONLY")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    const SECTIONS: &[&str] = &[
        "api",
        "creates",
        "ipam",
        "network",
        "start",
        "exec",
        "proxy",
        "interactive",
        "observe",
        "images",
        "webhooks",
        "volumes",
        "children",
        "database",
        "fleet",
    ];
    if let Some(unknown) = only.iter().flatten().find(|s| !SECTIONS.contains(&s.as_str())) {
        eprintln!("HYPERFLEET_BENCH_ONLY: unknown section '{unknown}'; sections: {}", SECTIONS.join(","));
        std::process::exit(2);
    }
    let run = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|s| s == name));
    if run("api") {
        bench_api(&mut r).await;
    }
    if run("creates") {
        bench_concurrent_creates(&mut r).await;
    }
    if run("ipam") {
        bench_ipam(&mut r).await;
    }
    if run("network") {
        bench_network_setup(&mut r).await;
    }
    if run("start") {
        bench_start_overhead(&mut r).await;
    }
    if run("exec") {
        bench_exec_files(&mut r).await;
    }
    if run("proxy") {
        bench_proxy(&mut r).await;
    }
    if run("interactive") {
        bench_interactive(&mut r).await;
    }
    if run("observe") {
        bench_observe(&mut r).await;
    }
    if run("images") {
        bench_images(&mut r).await;
    }
    if run("webhooks") {
        bench_webhooks(&mut r).await;
    }
    if run("volumes") {
        bench_volumes(&mut r).await;
    }
    if run("children") {
        bench_children(&mut r).await;
    }
    if run("database") {
        bench_database(&mut r).await;
    }
    if run("fleet") {
        bench_fleet(&mut r).await;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../BENCHMARKS.md");
    let md = match &only {
        None => r.md.clone(),
        Some(_) => replace_sections(&std::fs::read_to_string(&path).unwrap_or_default(), &r.md),
    };
    std::fs::write(&path, &md).unwrap();
    println!("{}", r.md);
}

/// `old` with each `## Title` section that `new` also has replaced by `new`'s; sections only in `new` are appended.
fn replace_sections(old: &str, new: &str) -> String {
    fn split(md: &str) -> (String, Vec<(String, String)>) {
        let mut parts = md.split("\n## ");
        let head = parts.next().unwrap_or_default().to_string();
        let sections = parts.map(|p| (p.lines().next().unwrap_or_default().to_string(), format!("\n## {p}"))).collect();
        (head, sections)
    }
    let (head, mut sections) = split(old);
    for (title, body) in split(new).1 {
        match sections.iter_mut().find(|(t, _)| *t == title) {
            Some(s) => s.1 = body,
            None => sections.push((title, body)),
        }
    }
    sections.into_iter().fold(head, |acc, (_, body)| acc + &body)
}
