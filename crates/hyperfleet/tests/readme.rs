//! The README's curl examples, run as written (only `localhost:4000` becomes the test proxy's port) against a
//! live daemon, in order. A block marked `<!-- readme-test expect="…" -->` must exit 0 and print the text.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Daemon, Options};

struct Example {
    script: String,
    expect: Option<String>,
}

fn examples(readme: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(marker) = line.trim().strip_prefix("<!-- readme-test") else {
            continue;
        };
        let expect = marker
            .split_once("expect=\"")
            .map(|(_, rest)| rest.rsplit_once("\" -->").map_or(rest, |(e, _)| e).replace("\\\"", "\""));
        assert_eq!(lines.next().map(str::trim), Some("```bash"), "a readme-test marker must precede a bash block");
        let script: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        out.push(Example { script: script.join("\n"), expect });
    }
    out
}

#[ignore = "needs root: the README's examples start runc containers"]
#[tokio::test]
async fn readme_examples_run_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let examples = examples(&readme);
    assert!(examples.len() >= 6, "found only {} examples", examples.len());
    let d = Daemon::start(Options::default()).await;
    for ex in &examples {
        let script = ex.script.replace("localhost:4000", &format!("127.0.0.1:{}", d.proxy_port));
        let out = std::process::Command::new("bash")
            // Examples run from the checkout's root, as a reader would (`scripts/…`).
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .args(["-euo", "pipefail", "-c", &script])
            .env("HF", d.url())
            .env("KEY", &d.key)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "README example failed:\n{script}\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(want) = &ex.expect {
            assert!(stdout.contains(want.as_str()), "README example did not print {want:?}:\n{script}\n{stdout}");
        }
    }
    // The tour ends by deleting its machine: nothing is left.
    assert_eq!(d.client.list_machines(&Default::default()).await.unwrap().total, 0);
    assert!(d.host_links().is_empty());
}

/// What the README's fleet block leaves on the host, removed when the test ends, passed or failed: its three
/// daemons (by the PIDs the block printed), their machines, interfaces, tables and routes (`purge` with each
/// node's settings), its database and user, and the system PostgreSQL cluster if the test started it.
struct FleetCleanup {
    pids: std::path::PathBuf,
    cluster_was_running: bool,
}

const NODES: [(&str, u8); 3] = [("a", 1), ("b", 2), ("c", 3)];

fn psql(sql: &str) -> std::process::Output {
    std::process::Command::new("runuser").args(["-u", "postgres", "--", "psql", "-tAc", sql]).output().unwrap()
}

fn system_cluster_running() -> bool {
    std::process::Command::new("pg_ctlcluster")
        .args(["15", "main", "status"])
        .output()
        .is_ok_and(|o| o.status.success())
}

impl Drop for FleetCleanup {
    fn drop(&mut self) {
        let pids = std::fs::read_to_string(&self.pids).unwrap_or_default();
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            let pid = nix::unistd::Pid::from_raw(pid);
            // Dropped: a daemon already gone is what we want.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while nix::sys::signal::kill(pid, None).is_ok() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        for (n, i) in NODES {
            let out = std::process::Command::new(common::bin())
                .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
                .arg("purge")
                .env("DATABASE_URL", "postgres://hyperfleet:change-me@127.0.0.1/hyperfleet")
                .env("HYPERFLEET_NODE_NAME", n)
                .env("HYPERFLEET_SUBNET", format!("172.16.{}.0/18", 64 * u32::from(i)))
                .env("HYPERFLEET_TAP_PREFIX", format!("hf{n}"))
                .env("HYPERFLEET_NFT_TABLE", format!("hyperfleet_{n}"))
                .env("HYPERFLEET_DATA_DIR", format!("/var/lib/hyperfleet-{n}"))
                .output()
                .unwrap();
            if !out.status.success() {
                eprintln!("purge of node {n} failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            // Dropped: either may not have been made.
            let _ = std::fs::remove_dir_all(format!("/var/lib/hyperfleet-{n}"));
            let _ = std::fs::remove_file(format!("/var/log/hyperfleet-{n}.log"));
        }
        psql("DROP DATABASE IF EXISTS hyperfleet");
        psql("DROP USER IF EXISTS hyperfleet");
        if !self.cluster_was_running {
            // Dropped: a cluster that did not start has nothing to stop.
            let _ = std::process::Command::new("pg_ctlcluster").args(["15", "main", "stop"]).output();
        }
    }
}

#[ignore = "needs root and Debian's postgresql: runs the README's fleet block on the system cluster, with three daemons"]
#[tokio::test]
async fn readme_fleet_section_runs_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let block = readme.split("<!-- readme-fleet-test").nth(1).expect("the fleet block's marker");
    let script: String = block
        .lines()
        .skip_while(|l| l.trim() != "```bash")
        .skip(1)
        .take_while(|l| l.trim() != "```")
        .collect::<Vec<_>>()
        .join("\n");
    assert!(script.contains("hyperfleet serve") && script.contains("curl"), "{script}");
    let cluster_was_running = system_cluster_running();
    if cluster_was_running {
        let out = psql("SELECT 1 FROM pg_database WHERE datname = 'hyperfleet'");
        assert!(
            String::from_utf8_lossy(&out.stdout).trim().is_empty(),
            "this host's PostgreSQL already has a database 'hyperfleet'; the test would not touch it"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let cleanup = FleetCleanup { pids: dir.path().join("pids"), cluster_was_running };
    // As written, except: the daemons' PIDs are noted for the clean-up, and the binary is the one under test.
    let bin_dir = std::path::Path::new(common::bin()).parent().unwrap().display().to_string();
    let script =
        script.replace("export PATH=$PWD/target/release:$PATH", &format!("export PATH={bin_dir}:$PATH")).replace(
            "> /var/log/hyperfleet-$n.log 2>&1 &",
            &format!("> /var/log/hyperfleet-$n.log 2>&1 & echo $! >> {}", cleanup.pids.display()),
        );
    assert!(script.contains(&cleanup.pids.display().to_string()), "the block starts its daemons differently now");
    let out = std::process::Command::new("timeout")
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .args(["300", "bash", "-euo", "pipefail", "-c", &script])
        .env_remove("HYPERFLEET_URL")
        .env_remove("HYPERFLEET_API_KEY")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let logs: String = NODES
        .iter()
        .map(|(n, _)| {
            format!(
                "---- node {n} ----\n{}\n",
                std::fs::read_to_string(format!("/var/log/hyperfleet-{n}.log")).unwrap_or_default()
            )
        })
        .collect();
    assert!(
        out.status.success(),
        "the fleet block failed:\nstdout: {stdout}\nstderr: {}\n{logs}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Three nodes listed, the machine made through a placed on c, and its web page reached through a's proxy.
    let listed: Vec<&str> = stdout.lines().filter(|l| l.contains("zone=") && l.contains(" up ")).collect();
    assert_eq!(listed.len(), 3, "{stdout}");
    assert!(stdout.contains("drained"), "{stdout}");
    assert!(stdout.contains("Hello from a Hyperfleet machine"), "{stdout}\n{logs}");
    let log_of = |n: &str| std::fs::read_to_string(format!("/var/log/hyperfleet-{n}.log")).unwrap_or_default();
    assert!(log_of("c").contains("machine running") && !log_of("a").contains("machine running"), "{logs}");
    drop(cleanup);
    assert!(
        !std::process::Command::new("ip")
            .args(["-br", "link"])
            .output()
            .unwrap()
            .stdout
            .windows(3)
            .any(|w| w == b"hfa" || w == b"hfb" || w == b"hfc"),
        "interfaces left behind"
    );
}
