//! Attacks a guest or a client can try, each asserted to fail against the real daemon: reaching the cloud
//! metadata address, exposing every port, running unboundedly many commands at once, filling the disk through
//! the console, planting device nodes or setuid files for the host, redirecting the agent channel, making
//! namespaces or mounts inside, naming files outside the assets directory as images, and a guest escaping its
//! VMM: every firecracker is jailed (own uid, chroot, cgroup, seccomp) so an escape lands nowhere useful.

#![allow(clippy::unwrap_used, clippy::expect_used)]

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

#[ignore = "needs root: runc container guest"]
#[tokio::test]
async fn a_guest_cannot_fill_the_disk_through_its_console() {
    let d = Daemon::start(Options {
        env: vec![("HYPERFLEET_CONSOLE_LOG_MAX_SIZE".into(), "1MiB".into())],
        ..Default::default()
    })
    .await;
    let m = running(&d, machine("chatty")).await;
    // The init's standard output is the console log on the host.
    let (code, _, err) = sh(&d, &m.id, "head -c 30000000 /dev/zero >> /proc/1/fd/1; echo done >> /proc/1/fd/1").await;
    assert_eq!(code, 0, "{err}");
    let dir = d.dir.path().join("machines").join(&m.id);
    let size = |name: &str| std::fs::metadata(dir.join(name)).map(|m| m.len()).unwrap_or(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while size("console.log") + size("console.log.1") > 2 << 20 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let total = size("console.log") + size("console.log.1");
    assert!(total <= 2 << 20, "30 MB written, {total} bytes kept");
    assert!(size("console.log.1") > 0, "the log was rotated, not deleted");
    // The machine's log stays readable through the API.
    let logs = d.client.machine_logs(&m.id, 5).await.unwrap();
    assert!(!logs.lines.is_empty());
}

/// The mount options of the mount point `path` on the host.
fn mount_options(path: &std::path::Path) -> String {
    let canon = path.canonicalize().unwrap();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find(|l| l.split_whitespace().nth(4) == Some(canon.to_str().unwrap()))
        .map(|l| l.split_whitespace().nth(5).unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[ignore = "needs root: runc container guest, setpriv as another user"]
#[tokio::test]
async fn a_guest_cannot_plant_devices_or_setuid_files_for_the_host() {
    let d = Daemon::start(Options::default()).await;
    let m = running(&d, machine("planter")).await;
    // No device nodes at all inside.
    let (code, _, _) = sh(&d, &m.id, "mknod /root/disk b 7 0").await;
    assert_ne!(code, 0, "mknod worked in the guest");
    // A setuid-root program is easy to make inside (the guest is root there)...
    let id_bin = std::fs::read("/usr/bin/id").unwrap();
    d.client.upload_file(&m.id, "/root/id", &id_bin, Some(0o4755)).await.unwrap();
    let (_, mode, _) = sh(&d, &m.id, "stat -c %a /root/id").await;
    assert_eq!(mode.trim(), "4755");
    // ...but the machine's disk is mounted nosuid,nodev on the host, so it grants nothing there.
    let root = d.dir.path().join("machines").join(&m.id).join("bundle/rootfs");
    let opts = mount_options(&root);
    assert!(opts.contains("nosuid") && opts.contains("nodev"), "{opts}");
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(root.join("root/id"))
        .arg("-u")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "65534", "the setuid bit was honoured on the host");
    // And no host directory is shared with the guest at all.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.parent().unwrap().join("config.json")).unwrap()).unwrap();
    assert!(config["mounts"].as_array().unwrap().iter().all(|m| m["type"] != "bind"), "{}", config["mounts"]);
}

#[ignore = "needs root: runc container guests"]
#[tokio::test]
async fn a_guest_cannot_redirect_the_agent_channel_to_another_machine() {
    let d = Daemon::start(Options::default()).await;
    let a = running(&d, machine("alpha")).await;
    let b = running(&d, machine("bravo")).await;
    // Where the agent socket used to be shared, and where the host keeps B's socket: neither is the guest's
    // to see. Plant symlinks everywhere it could matter anyway.
    let host_b = d.dir.path().join(format!("hyperfleet-{}.agent", b.id));
    let script = format!(
        "mkdir -p /run/hyperfleet $(dirname {p}); ln -sf {p} /run/hyperfleet/agent.sock; ln -sf {p} {p}.x; ls {dir}",
        p = host_b.display(),
        dir = d.dir.path().display()
    );
    let (_, _, listed) = sh(&d, &a.id, &script).await;
    assert!(
        !listed.contains(".agent") || listed.contains("No such file"),
        "the host's socket directory is visible: {listed}"
    );
    for _ in 0..3 {
        let (_, name, _) = sh(&d, &a.id, "hostname").await;
        assert_eq!(name.trim(), "alpha", "exec in A ran elsewhere");
    }
    let (_, name, _) = sh(&d, &b.id, "hostname").await;
    assert_eq!(name.trim(), "bravo");
    // Stopping A stops A only.
    d.client.stop_machine(&a.id).await.unwrap();
    assert_eq!(d.client.get_machine(&b.id).await.unwrap().status, MachineStatus::Running);
    assert_eq!(sh(&d, &b.id, "hostname").await.1.trim(), "bravo");
}

#[ignore = "needs root: runc container guests"]
#[tokio::test]
async fn namespaces_mounts_and_kernel_keyrings_are_refused_inside() {
    let d = Daemon::start(Options::default()).await;
    let m = running(&d, machine("escaper")).await;
    for (what, cmd) in [
        ("a user namespace", "unshare -Urn true"),
        ("a mount namespace", "unshare -m true"),
        ("a mount", "mount -t tmpfs none /mnt"),
        ("joining the host's namespaces", "nsenter -t 1 -m true"),
    ] {
        let (code, out, err) = sh(&d, &m.id, cmd).await;
        assert_ne!(code, 0, "{what} was allowed: {out}{err}");
    }
    let (_, status, _) = sh(&d, &m.id, "grep -E '^(Seccomp|NoNewPrivs|CapEff)' /proc/self/status").await;
    assert!(status.contains("Seccomp:\t2"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    // Ordinary work still works: files, users' ownership, ping of the gateway.
    let (code, _, err) =
        sh(&d, &m.id, &format!("touch /root/f && chown 1000:1000 /root/f && ping -c 1 -W 2 {}", m.tap_ip)).await;
    assert_eq!(code, 0, "{err}");
}

#[ignore = "needs root: the daemon sets up host networking"]
#[tokio::test]
async fn images_are_confined_to_the_assets_directory() {
    // Assets of its own, so the test can change them.
    let assets = tempfile::tempdir().unwrap();
    let shared = common::assets();
    for f in ["vmlinux", "rootfs.ext4"] {
        let ok = std::process::Command::new("cp")
            .args(["--sparse=always"])
            .arg(shared.join(f))
            .arg(assets.path().join(f))
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
    let a = assets.path().display().to_string();
    let d = Daemon::start(Options {
        env: vec![
            ("HYPERFLEET_ASSETS_DIR".into(), a.clone()),
            ("HYPERFLEET_KERNEL_IMAGE_PATH".into(), format!("{a}/vmlinux")),
            ("HYPERFLEET_ROOTFS_PATH".into(), format!("{a}/rootfs.ext4")),
        ],
        ..Default::default()
    })
    .await;
    // Another machine's private disk is not an image.
    let victim = running(&d, machine("victim")).await;
    let disk = d.dir.path().join("machines").join(&victim.id).join("rootfs.ext4");
    assert!(disk.exists());
    let req = CreateMachine { rootfs_path: Some(disk.display().to_string()), ..machine("thief") };
    let e = d.client.create_machine(&req).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    // A symlink inside the assets directory is refused at create...
    std::os::unix::fs::symlink("/etc/shadow", assets.path().join("link.ext4")).unwrap();
    let req = CreateMachine { rootfs_path: Some(format!("{a}/link.ext4")), ..machine("linked") };
    let e = d.client.create_machine(&req).await.unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    // ...and a file swapped for one between create and start is refused at start.
    let custom = assets.path().join("custom.ext4");
    std::fs::copy(assets.path().join("vmlinux"), &custom).unwrap();
    let req = CreateMachine { rootfs_path: Some(custom.display().to_string()), ..machine("swapped") };
    let m = d.client.create_machine(&req).await.unwrap();
    std::fs::remove_file(&custom).unwrap();
    std::os::unix::fs::symlink(&disk, &custom).unwrap();
    let e = d.client.start_machine(&m.id).await.unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    let after = d.client.get_machine(&m.id).await.unwrap();
    assert_eq!(after.status, MachineStatus::Failed);
    assert!(!d.dir.path().join("machines").join(&m.id).join("rootfs.ext4").exists(), "nothing was copied");
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
