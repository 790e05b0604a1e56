//! Attacks a guest or a client can try, each asserted to fail against the real daemon: reaching the cloud
//! metadata address, exposing every port, running unboundedly many commands at once, and a guest escaping its
//! VMM: every firecracker is jailed (own uid, chroot, cgroup, seccomp) so an escape lands nowhere useful.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Daemon, Options, TestNet, fc_machine, machine, running, sh};
use hyperfleet::runtime::firecracker::jail;
use hyperfleet::runtime::process;
use hyperfleet_client::types::*;

/// An HTTP GET from the guest with busybox nc.
async fn reaches(d: &Daemon, id: &str, host: &str, port: u16) -> bool {
    let (_, out, _) = sh(d, id, &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port}")).await;
    out.contains("hello from the internet")
}

#[ignore = "needs root: a test host in a namespace at the metadata address, nftables, runc"]
#[tokio::test]
async fn the_metadata_address_is_out_of_reach_by_default() {
    // A test host standing in for a cloud's metadata service (never the real one).
    let metadata = TestNet::with_addresses(31, "169.254.169.1", "169.254.169.254");
    let _seen = metadata.serve(80);
    // The host itself reaches it: the test host works, so only the firewall can stop the guest.
    let direct = std::net::TcpStream::connect_timeout(&"169.254.169.254:80".parse().unwrap(), Duration::from_secs(2));
    assert!(direct.is_ok(), "the host cannot reach the test host: {direct:?}");

    let d = Daemon::start(Options::default()).await;
    let m = running(&d, machine("curious")).await;
    assert!(!reaches(&d, &m.id, "169.254.169.254", 80).await, "a guest reached the metadata address");
    // Even a machine whose own policy allows exactly that address is denied: the host-wide list wins.
    let listed = CreateMachine {
        network: Some(serde_json::from_str(r#"{"egress": ["169.254.169.254/32"]}"#).unwrap()),
        ..machine("listed")
    };
    let l = running(&d, listed).await;
    assert!(!reaches(&d, &l.id, "169.254.169.254", 80).await, "a machine's egress list overrode the deny list");
    drop(d);

    // With the deny list emptied by the operator, the same guest gets through: the rule is what stopped it.
    let open =
        Daemon::start(Options { env: vec![("HYPERFLEET_EGRESS_DENY".into(), "none".into())], ..Default::default() })
            .await;
    let m = running(&open, machine("allowed")).await;
    assert!(reaches(&open, &m.id, "169.254.169.254", 80).await, "with no deny list the test host is reachable");
}

#[ignore = "needs root: the daemon sets up host networking"]
#[tokio::test]
async fn a_machine_cannot_expose_every_port() {
    let d = Daemon::start(Options::default()).await;
    let all: Vec<i64> = (1..=65535).collect();
    let req = CreateMachine { exposed_ports: Some(all), ..machine("greedy") };
    let e = d.client.create_machine(&req).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some("VALIDATION_ERROR")), "{e}");
    assert!(e.to_string().contains("at most 64"), "{e}");
    // PATCH is held to the same limit.
    let m = d.client.create_machine(&machine("modest")).await.unwrap();
    let update = UpdateMachine { exposed_ports: Some((1..=65).collect()) };
    let e = d.client.update_machine(&m.id, &update).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    let update = UpdateMachine { exposed_ports: Some((1..=64).collect()) };
    assert_eq!(d.client.update_machine(&m.id, &update).await.unwrap().spec.exposed_ports.len(), 64);
}

#[ignore = "needs root: runc container guest"]
#[tokio::test]
async fn concurrent_commands_per_machine_are_bounded() {
    let d = Daemon::start(Options {
        env: vec![("HYPERFLEET_EXEC_MAX_CONCURRENT".into(), "2".into())],
        ..Default::default()
    })
    .await;
    let m = running(&d, machine("busy")).await;
    let slow = || ExecRequest {
        command: CommandArgs(vec!["sleep".into(), "3".into()]),
        timeout: Some(10),
        env: None,
        cwd: None,
        stdin: None,
    };
    let (c1, c2) = (d.client.clone(), d.client.clone());
    let (id1, id2) = (m.id.clone(), m.id.clone());
    let (r1, r2) = (slow(), slow());
    let first = tokio::spawn(async move { c1.exec_with(&id1, &r1).await });
    let second = tokio::spawn(async move { c2.exec_with(&id2, &r2).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let e = d.client.exec_with(&m.id, &slow()).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(429), Some("TOO_MANY_REQUESTS")), "{e}");
    assert_eq!(first.await.unwrap().unwrap().exit_code, 0);
    assert_eq!(second.await.unwrap().unwrap().exit_code, 0);
    // Once they finish, commands run again.
    assert_eq!(sh(&d, &m.id, "echo again").await.1.trim(), "again");
}

/// The value of `field` in /proc/PID/status (or a thread's).
fn status_field(status_path: &Path, field: &str) -> String {
    let status = std::fs::read_to_string(status_path).unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with(&format!("{field}:"))).unwrap_or_default();
    line.split_once(':').map(|(_, v)| v.trim().to_string()).unwrap_or_default()
}

/// Every thread of `pid` has seccomp in filter mode (2), within a few seconds of InstanceStart.
async fn all_threads_filtered(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let threads: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .map(|t| t.path().join("status"))
            .collect();
        if !threads.is_empty() && threads.iter().all(|t| status_field(t, "Seccomp") == "2") {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    let (a, b) = (std::fs::metadata(a).unwrap(), std::fs::metadata(b).unwrap());
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

/// The memory limit of the machine's cgroup (v1 or v2), if the cgroup exists.
fn cgroup_memory_limit(id: &str) -> Option<u64> {
    jail::cgroup_dirs(id).iter().find_map(|d| {
        ["memory.limit_in_bytes", "memory.max"]
            .iter()
            .find_map(|f| std::fs::read_to_string(d.join(f)).ok()?.trim().parse().ok())
    })
}

#[ignore = "needs root and /dev/kvm: jailed Firecracker microVMs"]
#[tokio::test]
async fn firecracker_runs_jailed_and_leaves_nothing_behind() {
    assert!(Path::new("/dev/kvm").exists(), "/dev/kvm does not exist on this host: Firecracker cannot run");
    let mut d = Daemon::start(Options { runtime: RuntimeKind::Firecracker, ..Default::default() }).await;
    let c = d.client.clone();
    let m = running(&d, fc_machine("jailed")).await;
    let pid = m.pid.unwrap();
    let proc_status = PathBuf::from(format!("/proc/{pid}/status"));

    // Its own unprivileged identity: uid = gid = base + the machine's block (the TAP's number).
    let block: u32 = m.tap_device.strip_prefix(&d.tap_prefix).unwrap().parse().unwrap();
    let uid = hyperfleet::config::DEFAULT_JAILER_UID_BASE + block;
    assert_eq!(status_field(&proc_status, "Uid"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
    assert_eq!(status_field(&proc_status, "Gid"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
    assert_eq!(status_field(&proc_status, "Groups"), "", "no supplementary groups");

    // Its root is the machine's chroot, in its own mount namespace; the chroot base is root-only.
    let chroot = d.chroot(&m.id);
    assert!(same_dir(Path::new(&format!("/proc/{pid}/root")), &chroot), "/proc/{pid}/root is not {chroot:?}");
    let ns = |p: &str| std::fs::read_link(p).unwrap();
    assert_ne!(ns(&format!("/proc/{pid}/ns/mnt")), ns("/proc/self/ns/mnt"));
    let base = std::fs::metadata(d.dir.path().join("machines/jail")).unwrap();
    assert_eq!((base.uid(), base.permissions().mode() & 0o777), (0, 0o700));
    let disk = std::fs::metadata(chroot.join("rootfs.ext4")).unwrap();
    assert_eq!((disk.uid(), disk.gid(), disk.permissions().mode() & 0o777), (uid, uid, 0o600));
    assert!(Path::new(m.socket_path.as_deref().unwrap()).starts_with(&chroot));

    // A cgroup caps its memory (the guest's 128 MiB plus the VMM's 128), and holds it.
    assert_eq!(cgroup_memory_limit(&m.id), Some(256 << 20));
    let held = jail::cgroup_dirs(&m.id).iter().any(|dir| {
        std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().lines().any(|l| l == pid.to_string())
    });
    assert!(held, "pid {pid} is in none of {:?}", jail::cgroup_dirs(&m.id));

    // Firecracker's default seccomp filters are on, on every thread.
    assert!(all_threads_filtered(pid).await, "a thread of firecracker runs without a seccomp filter");

    // The daemon is killed and restarted: the jailed firecracker is adopted, then stopped and cleaned up.
    d.restart_after_crash().await;
    let adopted = c.get_machine(&m.id).await.unwrap();
    assert_eq!((adopted.status, adopted.pid), (MachineStatus::Running, Some(pid)));
    assert!(d.logs().contains("adopted running machine"));
    let stopped = c.stop_machine(&m.id).await.unwrap();
    assert_eq!(stopped.status, MachineStatus::Stopped);
    assert!(!process::alive(pid));
    assert!(!chroot.exists(), "chroot left after stop");
    assert!(jail::cgroup_dirs(&m.id).is_empty(), "cgroups left after stop: {:?}", jail::cgroup_dirs(&m.id));
    assert!(!Path::new(m.socket_path.as_deref().unwrap()).exists());
    assert!(d.dir.path().join("machines").join(&m.id).join("rootfs.ext4").exists(), "the disk outlives the chroot");

    // Started again, then its firecracker dies while the daemon is down: the restart's reconcile removes the
    // dead machine's chroot and cgroups.
    let again = c.start_machine(&m.id).await.unwrap();
    let pid = again.pid.unwrap();
    assert!(chroot.exists() && !jail::cgroup_dirs(&m.id).is_empty());
    d.kill9();
    process::signal(pid, nix::sys::signal::Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while process::alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    d.spawn().await;
    let after = c.get_machine(&m.id).await.unwrap();
    assert_ne!(after.status, MachineStatus::Running);
    assert!(!chroot.exists(), "a dead machine's chroot outlived reconcile");
    assert!(jail::cgroup_dirs(&m.id).is_empty(), "a dead machine's cgroups outlived reconcile");

    // Delete leaves nothing of it on the host.
    c.delete_machine(&m.id, true).await.unwrap();
    assert!(!d.dir.path().join("machines").join(&m.id).exists());
    assert!(!chroot.exists() && jail::cgroup_dirs(&m.id).is_empty());
    assert!(!d.dir.path().join("machines/jail/firecracker").join(&m.id).exists());
}
