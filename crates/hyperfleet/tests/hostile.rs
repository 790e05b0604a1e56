//! Attacks a guest or a client can try, each asserted to fail against the real daemon: reaching the cloud
//! metadata address, exposing every port, running unboundedly many commands at once, holding the API's and
//! the proxy's connections open (slowloris, idle connections and tunnels, one address taking every place),
//! filling the disk through the console, planting device nodes or setuid files for the host, redirecting the
//! agent channel, making namespaces or mounts inside, naming files outside the assets directory as images, and a
//! guest escaping its VMM: every firecracker is jailed (own uid, chroot, cgroup, seccomp).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Daemon, Options, TestNet, fc_machine, machine, running, sh};
use futures::{SinkExt, StreamExt};
use hyperfleet::testing::jail;
use hyperfleet::testing::process;
use hyperfleet_client::types::*;
use tokio_tungstenite::tungstenite::Message;

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
    let update = UpdateMachine { exposed_ports: Some((1..=65).collect()), ..Default::default() };
    let e = d.client.update_machine(&m.id, &update).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    let update = UpdateMachine { exposed_ports: Some((1..=64).collect()), ..Default::default() };
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
    // Without a user namespace the guest's root may reopen its init's output (the host's log file) through
    // /proc/1/fd/1: the cap is then what bounds it. (In its own user namespace that reopen is refused, see
    // `a_guests_root_is_an_unprivileged_user_on_the_host`.)
    let d = Daemon::start(Options {
        env: vec![
            ("HYPERFLEET_CONSOLE_LOG_MAX_SIZE".into(), "1MiB".into()),
            ("HYPERFLEET_CONTAINER_USERNS".into(), "false".into()),
        ],
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
    let root = Path::new(hyperfleet::testing::ROOTS_DIR).join(&m.id);
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
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(d.dir.path().join("machines").join(&m.id).join("bundle/config.json")).unwrap(),
    )
    .unwrap();
    assert!(config["mounts"].as_array().unwrap().iter().all(|m| m["type"] != "bind"), "{}", config["mounts"]);
}

#[ignore = "needs root: runc container guests in user namespaces, idmapped mounts"]
#[tokio::test]
async fn a_guests_root_is_an_unprivileged_user_on_the_host() {
    let d = Daemon::start(Options::default()).await;
    let m = running(&d, machine("mapped")).await;
    let pid = m.pid.unwrap();
    // Machine N's ids 0..65535 are host ids BASE + N * 65536 onwards.
    let block: u32 = m.tap_device.strip_prefix(&d.tap_prefix).unwrap().parse().unwrap();
    let base = hyperfleet::testing::DEFAULT_CONTAINER_UID_BASE + block * 65536;
    let map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
    assert_eq!(map.split_whitespace().collect::<Vec<_>>(), ["0", base.to_string().as_str(), "65536"]);
    // The guest's init is root inside and `base` on the host, with no supplementary host groups.
    let status = PathBuf::from(format!("/proc/{pid}/status"));
    assert_eq!(status_field(&status, "Uid"), format!("{base}\t{base}\t{base}\t{base}"));
    assert_eq!(status_field(&status, "Gid"), format!("{base}\t{base}\t{base}\t{base}"));
    let (_, inside, _) = sh(&d, &m.id, "id -u; id -g").await;
    assert_eq!(inside.split_whitespace().collect::<Vec<_>>(), ["0", "0"]);
    // Its network namespace is its own user namespace's, so its root can ping and serve low ports there...
    let (code, _, err) =
        sh(&d, &m.id, &format!("ping -c 1 -W 2 {} && (nc -l -p 80 & sleep 0.2; kill $!)", m.tap_ip)).await;
    assert_eq!(code, 0, "{err}");
    // ...but not reconfigure it (no CAP_NET_ADMIN there).
    let (code, _, _) = sh(&d, &m.id, "ip link set lo down").await;
    assert_ne!(code, 0, "the guest reconfigured its network");

    // Files it makes, as root or as another user, belong to the mapped ids on the host's view of its disk.
    let (code, _, err) = sh(&d, &m.id, "touch /root/mine /root/theirs && chown 1000:1000 /root/theirs").await;
    assert_eq!(code, 0, "{err}");
    let root = Path::new(hyperfleet::testing::ROOTS_DIR).join(&m.id);
    let owner = |p: &str| {
        let meta = std::fs::metadata(root.join(p)).unwrap();
        (meta.uid(), meta.gid())
    };
    assert_eq!(owner("root/mine"), (base, base));
    assert_eq!(owner("root/theirs"), (base + 1000, base + 1000));
    assert_eq!(owner("etc/passwd"), (base, base), "the image's root-owned files are the guest's root's");
    assert!(mount_options(&root).contains("idmapped"), "{}", mount_options(&root));

    // Host files it is handed are not its own: the console log (root's, 0600 on the host) is its init's
    // standard output, yet reopening it through /proc is refused.
    let (code, _, err) = sh(&d, &m.id, "echo x >> /proc/1/fd/1").await;
    assert_ne!(code, 0, "the guest reopened the host's log file");
    assert!(err.contains("ermission denied"), "{err}");

    // Its processes survive a pause and resume, and stop leaves no namespace or mount behind.
    d.client.pause_machine(&m.id).await.unwrap();
    d.client.resume_machine(&m.id).await.unwrap();
    assert_eq!(sh(&d, &m.id, "id -u").await.1.trim(), "0");
    d.client.stop_machine(&m.id).await.unwrap();
    let bundle = d.dir.path().join("machines").join(&m.id).join("bundle");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!info.contains(bundle.to_str().unwrap()), "mounts left under {bundle:?}");
    assert!(!info.contains(root.to_str().unwrap()), "{root:?} is still mounted");
    assert!(!bundle.join("userns").exists());

    // With the setting off, the same guest's root is the host's root.
    drop(d);
    let plain = Daemon::start(Options {
        env: vec![("HYPERFLEET_CONTAINER_USERNS".into(), "false".into())],
        ..Default::default()
    })
    .await;
    let m = running(&plain, machine("unmapped")).await;
    let status = PathBuf::from(format!("/proc/{}/status", m.pid.unwrap()));
    assert_eq!(status_field(&status, "Uid"), "0\t0\t0\t0");
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
    let uid = hyperfleet::testing::DEFAULT_JAILER_UID_BASE + block;
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
    // With no machine left, neither is the jailer's parent cgroup.
    assert!(jail::parent_cgroup_dirs().is_empty(), "parent cgroups left: {:?}", jail::parent_cgroup_dirs());
    // The daemon made cgroup moves cheap at start (favordynmods), where the kernel has the option.
    let features = std::fs::read_to_string("/sys/kernel/cgroup/features").unwrap_or_default();
    if features.lines().any(|l| l == "favordynmods") {
        assert!(hyperfleet::testing::cgroups::dynamic_moves_favored(), "no cgroup hierarchy has favordynmods");
    }
}

/// Uploads the hyperfleet-testd fixture (HTTP and WebSocket echo) into the guest and starts it on `port`.
async fn start_testd(d: &Daemon, id: &str, port: u16) {
    let bin = std::fs::read(common::assets().join("bin/hyperfleet-testd")).expect("hyperfleet-testd: run `make setup`");
    d.client.upload_file(id, "/usr/local/bin/testd", &bin, Some(0o755)).await.unwrap();
    let (code, _, err) = sh(d, id, &format!("testd {port} >/dev/null 2>&1 &")).await;
    assert_eq!(code, 0, "{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while sh(d, id, &format!("nc -w 1 127.0.0.1 {port} </dev/null")).await.0 != 0 {
        assert!(Instant::now() < deadline, "nothing listens on {port} in the guest");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A machine serving HTTP and WebSocket echo on port 8080, exposed through the proxy.
async fn web_machine(d: &Daemon) -> String {
    let m = running(d, CreateMachine { exposed_ports: Some(vec![8080]), ..machine("web") }).await;
    start_testd(d, &m.id, 8080).await;
    m.id
}

/// One GET on a fresh connection, as a new visitor would make it; `Err` unless it answers 200 within 1 s.
async fn answers_within_a_second(url: &str) -> Result<(), String> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(1)).pool_max_idle_per_host(0).build().unwrap();
    let started = Instant::now();
    match http.get(url).send().await {
        Ok(r) if r.status() == 200 => Ok(()),
        Ok(r) => Err(format!("{url}: {} after {:?}", r.status(), started.elapsed())),
        Err(e) => Err(format!("{url}: {e} after {:?}", started.elapsed())),
    }
}

/// Whether the server has closed this connection (EOF or reset), without waiting.
fn closed_by_server(s: &std::net::TcpStream) -> bool {
    match s.peek(&mut [0u8; 1]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// A TCP connection to `port` on loopback from the source address `from`, left non-blocking.
async fn connect_from(from: [u8; 4], port: u16) -> std::io::Result<std::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((std::net::Ipv4Addr::from(from), 0).into())?;
    let s = tokio::time::timeout(Duration::from_secs(5), socket.connect(([127, 0, 0, 1], port).into()))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.into_std()
}

/// `n` slowloris connections to `port`: each sends half a request line, then nothing. They come from
/// 127.0.0.2-11 (loopback), so the per-address cap is not what stops them and 127.0.0.1 stays a fresh client.
async fn slowloris(port: u16, n: usize) -> Vec<std::net::TcpStream> {
    use futures::stream::{self, StreamExt as _};
    use std::io::Write;
    let opened: Vec<_> = stream::iter(0..n)
        .map(|i| async move {
            let mut s = connect_from([127, 0, 0, 2 + u8::try_from(i % 10).unwrap_or(0)], port).await?;
            s.write_all(b"GET /health HT")?;
            Ok::<_, std::io::Error>(s)
        })
        .buffer_unordered(200)
        .collect()
        .await;
    opened.into_iter().collect::<Result<_, _>>().unwrap_or_else(|e| panic!("opening slowloris connection: {e}"))
}

/// Raises this test process's open-files limit to its hard limit: 5,000 connections need more than 1024.
fn raise_own_open_files_limit(needed: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(hard >= needed, "the hard open-files limit ({hard}) is below the {needed} this test needs");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

#[ignore = "needs root: runc container behind the proxy; 10,000 loopback connections"]
#[tokio::test]
async fn slowloris_starves_neither_listener() {
    const N: usize = 5_000;
    let header_timeout = Duration::from_secs(5);
    raise_own_open_files_limit(3 * N as u64);
    let d = Daemon::start(Options {
        env: vec![("HYPERFLEET_HEADER_READ_TIMEOUT".into(), header_timeout.as_secs().to_string())],
        ..Default::default()
    })
    .await;
    let id = web_machine(&d).await;
    let health = format!("{}/health", d.url());
    let proxied = format!("{}/proxy/{id}/8080/headers", d.proxy_url());
    answers_within_a_second(&proxied).await.unwrap();

    for (listener, port) in [("API", d.port), ("proxy", d.proxy_port)] {
        let started = Instant::now();
        let hostile = slowloris(port, N).await;
        let opening = started.elapsed();
        assert!(opening < header_timeout - Duration::from_secs(1), "opening {N} connections took {opening:?}");
        // While they are all still open, a new client gets answers from both listeners within 1 s.
        for _ in 0..3 {
            answers_within_a_second(&health).await.unwrap_or_else(|e| panic!("{N} slowloris on the {listener}: {e}"));
            answers_within_a_second(&proxied).await.unwrap_or_else(|e| panic!("{N} slowloris on the {listener}: {e}"));
        }
        let closed = hostile.iter().filter(|s| closed_by_server(s)).count();
        assert_eq!(closed, 0, "{closed} slowloris connections to the {listener} were closed before their time");

        // Once the header-read timeout is past, the server has closed every one of them.
        let deadline = started + header_timeout + Duration::from_secs(5);
        let mut open = N;
        while open > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            open = hostile.iter().filter(|s| !closed_by_server(s)).count();
        }
        assert_eq!(
            open,
            0,
            "{open} of {N} slowloris connections to the {listener} still open after {:?}",
            started.elapsed()
        );
        eprintln!(
            "{listener}: {N} slowloris opened in {opening:?}, all closed by the server {:?} after",
            started.elapsed()
        );
        drop(hostile);
    }
}

/// A keep-alive HTTP/1.1 GET on `s`; true when a 200 came back.
async fn get_on(s: &mut tokio::net::TcpStream, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if s.write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").as_bytes()).await.is_err() {
        return false;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Enough of the response to see its status and that it is complete (bodies here are small JSON).
    while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"}") {
        match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return false,
        }
    }
    got.starts_with(b"HTTP/1.1 200")
}

/// Waits up to `within` for the server to close `s`.
async fn closes_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(within, s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

#[ignore = "needs root: runc container behind the proxy"]
#[tokio::test]
async fn idle_connections_and_tunnels_are_closed() {
    let idle = Duration::from_secs(2);
    let d = Daemon::start(Options {
        env: vec![
            ("HYPERFLEET_IDLE_TIMEOUT".into(), idle.as_secs().to_string()),
            ("PROXY_WEBSOCKET_IDLE_TIMEOUT".into(), idle.as_secs().to_string()),
        ],
        ..Default::default()
    })
    .await;
    let id = web_machine(&d).await;

    for (listener, port, path) in
        [("API", d.port, "/health".to_string()), ("proxy", d.proxy_port, format!("/proxy/{id}/8080/headers"))]
    {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        // A connection in use, one request a second for twice the idle timeout, stays open...
        for i in 0..4 {
            assert!(get_on(&mut s, &path).await, "request {i} on a kept-alive {listener} connection");
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        // ...and once it has nothing to do, the server closes it.
        assert!(
            closes_within(&mut s, idle + Duration::from_secs(3)).await,
            "an idle {listener} connection stayed open"
        );
    }

    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/proxy/{id}/8080/ws", d.proxy_port)).await.unwrap();
    for i in 0..4 {
        ws.send(Message::text(format!("ping {i}"))).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(format!("ping {i}")), "a busy tunnel");
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let end = tokio::time::timeout(idle + Duration::from_secs(3), ws.next()).await;
    assert!(matches!(end, Ok(None | Some(Err(_)))), "an idle WebSocket tunnel stayed open: {end:?}");
}

#[ignore = "needs root: the daemon sets up host networking"]
#[tokio::test]
async fn connections_past_the_per_address_cap_are_refused_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const CAP: usize = 8;
    let d = Daemon::start(Options {
        env: vec![("HYPERFLEET_MAX_CONNECTIONS_PER_IP".into(), CAP.to_string())],
        ..Default::default()
    })
    .await;
    for (listener, port) in [("API", d.port), ("proxy", d.proxy_port)] {
        // CAP connections from 127.0.0.2 that say nothing (yet): they are held, not refused.
        let mut held = Vec::new();
        for _ in 0..CAP {
            held.push(connect_from([127, 0, 0, 2], port).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(held.iter().all(|s| !closed_by_server(s)), "a connection within the cap was closed");
        // One more from the same address is answered and closed at once, not queued.
        let mut extra = tokio::net::TcpStream::from_std(connect_from([127, 0, 0, 2], port).await.unwrap()).unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(1), extra.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "the {listener} left a connection past the cap hanging");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 503"), "{listener}: {answer}");
        // Another address is not affected.
        let url = if port == d.port { format!("{}/health", d.url()) } else { format!("{}/proxy/x/1/", d.proxy_url()) };
        let status = reqwest::get(&url).await.unwrap().status().as_u16();
        assert!(status == 200 || status == 404, "{listener} from 127.0.0.1: {status}");
        // A place given back is taken again.
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut again = tokio::net::TcpStream::from_std(connect_from([127, 0, 0, 2], port).await.unwrap()).unwrap();
        let path = if port == d.port { "/health" } else { "/proxy/x/1/" };
        again
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut resp = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), again.read_to_end(&mut resp)).await.unwrap().unwrap();
        let resp = String::from_utf8_lossy(&resp);
        assert!(resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.1 404"), "{listener}: {resp}");
    }
}

/// The daemon's peak resident memory so far, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[ignore = "needs root: runc container guest"]
#[tokio::test]
async fn floods_of_output_do_not_take_the_daemons_memory() {
    let d = Daemon::start(Options {
        env: vec![("HYPERFLEET_EXEC_OUTPUT_BUDGET".into(), "64MiB".into())],
        ..Default::default()
    })
    .await;
    let m = running(&d, machine("flood")).await;
    let before = peak_rss_kib(d.pid());
    // Ten commands at once, each printing 20 MB of NUL bytes: as JSON, 120 MB each if all were kept.
    let flood = ExecRequest {
        command: CommandArgs(vec!["sh".into(), "-c".into(), "head -c 20000000 /dev/zero".into()]),
        timeout: Some(60),
        env: None,
        cwd: None,
        stdin: None,
    };
    let runs: Vec<_> = (0..10)
        .map(|_| {
            let (c, id, req) = (d.client.clone(), m.id.clone(), flood.clone());
            tokio::spawn(async move { c.exec_with(&id, &req).await })
        })
        .collect();
    for r in runs {
        let out = r.await.unwrap().unwrap();
        assert_eq!(out.exit_code, 0);
        assert!(out.stdout_truncated, "20 MB is past the cap: the result says it was cut");
        assert!(out.stdout.len() <= 10 << 20);
    }
    let grown = peak_rss_kib(d.pid()).saturating_sub(before);
    // The budget (64 MiB) bounds what is held at once; allow for the HTTP buffers around it.
    assert!(grown < 200 * 1024, "the daemon's peak memory grew by {grown} KiB");
    // The budget comes back: a small command's output is whole again.
    let (code, out, _) = sh(&d, &m.id, "echo whole").await;
    assert_eq!((code, out.trim()), (0, "whole"));
}
