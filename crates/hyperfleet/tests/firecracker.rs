//! Real Firecracker end to end. On this machine kind /dev/kvm is PVM: the guest kernel boots (slowly) and
//! answers ping but no guest userspace can run, so the machine boots `init=/sbin/hyperfleet-idle` and the
//! agent is not involved; on a host with hardware KVM the same test runs with the normal init.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, Options, fc_machine, is_pvm};
use hyperfleet::testing::FirecrackerApi;
use hyperfleet::testing::process;
use hyperfleet_client::types::*;

/// These tests are ignored by default; run with `--include-ignored` on a host without KVM they fail here
/// rather than pass without running.
fn require_kvm() {
    assert!(Path::new("/dev/kvm").exists(), "/dev/kvm does not exist on this host: Firecracker cannot run");
}

/// `ip -j addr show dev IFACE`: (is up, IPv4 addresses with prefix).
fn iface(name: &str) -> Option<(bool, Vec<String>)> {
    let out = Command::new("ip").args(["-j", "addr", "show", "dev", name]).output().unwrap();
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let link = v.as_array()?.first()?.clone();
    let up = link["flags"].as_array()?.iter().any(|f| f == "UP");
    let addrs = link["addr_info"]
        .as_array()?
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or(""), a["prefixlen"]))
        .collect();
    Some((up, addrs))
}

async fn wait_for(what: &str, secs: u64, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What a stalled guest's firecracker process is doing: its threads' states and CPU time, and the host's load.
fn process_report(pid: u32) -> String {
    let mut out = format!("load: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default());
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // comm is in parentheses; after it: state (3rd field), utime (14th), stime (15th).
            let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = after.split_whitespace().collect();
            let comm = stat.split_once('(').and_then(|(_, r)| r.rsplit_once(')')).map(|(c, _)| c).unwrap_or("?");
            out += &format!(
                "thread {comm}: state {} utime {} stime {} (ticks)\n",
                f.first().unwrap_or(&"?"),
                f.get(11).unwrap_or(&"?"),
                f.get(12).unwrap_or(&"?")
            );
        }
    }
    out
}

/// Serialises this file's tests: PVM guests slow each other down sharply (ENVIRONMENT.md: ~40 s to boot
/// alone, ~60 s two at once, several never), and these tests are about the daemon, not about PVM.
static ONE_GUEST_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits (420 s at most) until the guest kernel of running machine `m` has configured eth0 from `ip=` (the
/// nameserver line is the last of the kernel's IP-Config block). Under PVM a guest kernel has been seen, rarely,
/// to stall in early boot on a quiet host for good: then the machine is started once more (reported on stderr
/// with what its threads were doing), and a second stall fails the test.
async fn until_ip_config(d: &Daemon, mut m: Machine) -> Machine {
    let log = d.dir.path().join("machines").join(&m.id).join("console.log");
    for attempt in 1..=2 {
        let deadline = Instant::now() + Duration::from_secs(420);
        loop {
            let console = std::fs::read_to_string(&log).unwrap_or_default();
            if console.contains("IP-Config: Complete") && console.contains("nameserver0=") {
                return m;
            }
            if Instant::now() >= deadline {
                let report = format!(
                    "the guest kernel did not configure eth0 within 420 s (start {attempt} of 2)\n{}\n---- console tail ----\n{}",
                    process_report(m.pid.unwrap()),
                    tail(&console, 40)
                );
                assert!(attempt < 2, "{report}");
                eprintln!("{report}\nstarting the machine once more");
                d.client.stop_machine(&m.id).await.unwrap();
                m = d.client.start_machine(&m.id).await.unwrap();
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    unreachable!("the second attempt returns or fails")
}

#[ignore = "needs root and /dev/kvm: a Firecracker microVM on a TAP"]
#[tokio::test]
async fn firecracker_machine_lifecycle_network_and_adoption() {
    require_kvm();
    let _one = ONE_GUEST_AT_A_TIME.lock().await;
    let mut d = Daemon::start(Options { runtime: RuntimeKind::Firecracker, ..Default::default() }).await;
    let c = d.client.clone();
    let m = c.create_machine(&fc_machine("fc-one")).await.unwrap();
    let first_block = (m.tap_device.clone(), m.tap_ip, m.guest_ip, m.guest_mac.clone());
    let m = c.start_machine(&m.id).await.unwrap_or_else(|e| panic!("start: {e}\n{}", d.logs()));
    assert_eq!(m.status, MachineStatus::Running);
    let m = until_ip_config(&d, m).await;
    let pid = m.pid.unwrap();
    let socket = m.socket_path.clone().unwrap();
    assert!(process::cmdline_contains(pid, &m.id), "pid {pid} is our firecracker");
    assert!(Path::new(&socket).starts_with(d.chroot(&m.id)), "API socket in the chroot: {socket}");

    // Firecracker itself reports the configuration the daemon applied.
    let api = FirecrackerApi::new(Path::new(&socket));
    let cfg = api.get("/vm/config").await.unwrap();
    assert_eq!(cfg["machine-config"]["vcpu_count"], 1);
    assert_eq!(cfg["machine-config"]["mem_size_mib"], 128);
    let drive = &cfg["drives"][0];
    assert_eq!(drive["is_root_device"], true);
    // The drive is the machine's own copy, hard-linked into the chroot: one file, never the shared image.
    assert_eq!(drive["path_on_host"], "/rootfs.ext4");
    let own = d.dir.path().join("machines").join(&m.id).join("rootfs.ext4");
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    assert_eq!(inode(&d.chroot(&m.id).join("rootfs.ext4")), inode(&own));
    assert_ne!(inode(&own), inode(Path::new(&m.spec.rootfs_path)), "never the shared image");
    assert_eq!(cfg["network-interfaces"][0]["host_dev_name"], m.tap_device.as_str());
    assert_eq!(cfg["network-interfaces"][0]["guest_mac"].as_str().unwrap().to_uppercase(), m.guest_mac);
    assert_eq!(cfg["vsock"]["guest_cid"], 3);
    let boot_args = cfg["boot-source"]["boot_args"].as_str().unwrap();
    let ip_arg = format!("ip={}::{}:255.255.255.252:fc-one:eth0:off:10.200.255.53:", m.guest_ip, m.tap_ip);
    assert!(boot_args.contains(&ip_arg), "{boot_args}");
    assert_eq!(boot_args.contains("clearcpuid="), is_pvm(), "PVM boot args only on PVM: {boot_args}");

    // The TAP: up, with tap_ip/30.
    let (up, addrs) = iface(&m.tap_device).expect("TAP exists while running");
    assert!(up);
    assert_eq!(addrs, vec![format!("{}/30", m.tap_ip)]);

    // The guest kernel configures eth0 from ip= and answers ping from the host.
    let log = d.dir.path().join("machines").join(&m.id).join("console.log");
    // (until_ip_config waited for the whole IP-Config block.)
    let console = std::fs::read_to_string(&log).unwrap();
    assert!(console.contains("IP-Config: Complete") && console.contains("nameserver0="), "{console}");
    assert!(console.contains(&format!("ipaddr={}, mask=255.255.255.252, gw={}", m.guest_ip, m.tap_ip)), "{console}");
    assert!(console.contains("nameserver0=10.200.255.53"));
    let logs = c.machine_logs(&m.id, 2000).await.unwrap();
    assert!(logs.lines.iter().any(|l| l.contains("IP-Config: Complete")), "logs endpoint shows the console");
    let guest = m.guest_ip;
    wait_for("the guest to answer ping", 300, async || {
        hyperfleet_net::icmp::ping(guest, Duration::from_secs(2)).await.ok().flatten().is_some()
    })
    .await;

    // The daemon dies; firecracker does not. The restarted daemon adopts it.
    d.restart_after_crash().await;
    let adopted = c.get_machine(&m.id).await.unwrap();
    assert_eq!((adopted.status, adopted.pid), (MachineStatus::Running, Some(pid)));
    assert!(process::alive(pid));
    assert!(d.logs().contains("adopted running machine"));
    assert!(iface(&m.tap_device).is_some(), "TAP kept for the adopted machine");

    // Stop: process, sockets and TAP gone.
    let stopped = c.stop_machine(&m.id).await.unwrap();
    assert_eq!((stopped.status, stopped.pid), (MachineStatus::Stopped, None));
    assert!(!process::alive(pid), "firecracker still runs");
    assert!(!Path::new(&socket).exists(), "API socket left behind");
    assert!(!d.chroot(&m.id).exists(), "chroot left behind");
    assert!(iface(&m.tap_device).is_none(), "TAP left behind");
    assert!(d.firewall_ifaces().is_empty());

    // Start again: same addresses and TAP name, a new process.
    let again = c.start_machine(&m.id).await.unwrap();
    assert_eq!((again.tap_device.clone(), again.tap_ip, again.guest_ip, again.guest_mac.clone()), first_block);
    assert_ne!(again.pid, Some(pid));
    assert_eq!(iface(&again.tap_device).unwrap().1, vec![format!("{}/30", again.tap_ip)]);
    c.stop_machine(&m.id).await.unwrap();

    // Delete frees the block: the next machine gets it.
    c.delete_machine(&m.id, false).await.unwrap();
    assert!(!d.dir.path().join("machines").join(&m.id).exists());
    let next = c.create_machine(&fc_machine("fc-two")).await.unwrap();
    assert_eq!((next.tap_device.clone(), next.tap_ip, next.guest_ip, next.guest_mac.clone()), first_block);
}

#[ignore = "needs root and /dev/kvm: Firecracker microVMs on TAPs"]
#[tokio::test]
async fn firecracker_failures_are_reported_and_cleaned_up() {
    require_kvm();
    let _one = ONE_GUEST_AT_A_TIME.lock().await;
    let d = Daemon::start(Options { runtime: RuntimeKind::Firecracker, ..Default::default() }).await;
    let c = &d.client;

    // Firecracker refuses a "kernel" that is not one: FIRECRACKER_API_ERROR, machine failed, nothing left.
    let bogus = CreateMachine {
        kernel_image_path: Some(common::assets().join("rootfs.ext4").display().to_string()),
        ..fc_machine("bad-kernel")
    };
    let m = c.create_machine(&bogus).await.unwrap();
    let e = c.start_machine(&m.id).await.unwrap_err();
    assert_eq!(e.code(), Some("FIRECRACKER_API_ERROR"), "{e}");
    let failed = c.get_machine(&m.id).await.unwrap();
    assert_eq!(failed.status, MachineStatus::Failed);
    assert!(failed.error_message.unwrap().contains("firecracker rejected"));
    let e = c.wait_machine(&m.id, MachineStatus::Running, 5).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some("BAD_REQUEST")), "wait reports the failure: {e}");
    assert!(e.to_string().contains("failed instead of reaching status running"), "{e}");
    assert!(iface(&m.tap_device).is_none());
    assert!(!d.chroot(&m.id).exists(), "chroot left behind");
    assert!(d.firewall_ifaces().is_empty());
    c.delete_machine(&m.id, false).await.unwrap();

    // A firecracker that dies on its own: the machine fails with the console's last lines.
    let m = c.create_machine(&fc_machine("crasher")).await.unwrap();
    let m = c.start_machine(&m.id).await.unwrap();
    let pid = m.pid.unwrap();
    // Pause and resume go to firecracker itself.
    let api = FirecrackerApi::new(Path::new(m.socket_path.as_deref().unwrap()));
    assert_eq!(c.pause_machine(&m.id).await.unwrap().status, MachineStatus::Paused);
    assert_eq!(api.get("/").await.unwrap()["state"], "Paused");
    assert_eq!(c.resume_machine(&m.id).await.unwrap().status, MachineStatus::Running);
    assert_eq!(api.get("/").await.unwrap()["state"], "Running");
    process::signal(pid, nix::sys::signal::Signal::SIGKILL);
    wait_for("the machine to be marked failed", 20, async || {
        c.get_machine(&m.id).await.unwrap().status == MachineStatus::Failed
    })
    .await;
    let failed = c.get_machine(&m.id).await.unwrap();
    let msg = failed.error_message.unwrap();
    assert!(msg.contains(&format!("firecracker (pid {pid}) exited unexpectedly")), "{msg}");
    assert!(msg.contains("last console lines"), "{msg}");
    assert_eq!(failed.pid, None);
    assert!(iface(&m.tap_device).is_none(), "TAP removed after the crash");
    assert!(d.firewall_ifaces().is_empty());
    // A failed machine can be started again.
    let back = c.start_machine(&m.id).await.unwrap();
    assert_eq!(back.status, MachineStatus::Running);
    assert_eq!(back.error_message, None);
    c.delete_machine(&m.id, true).await.unwrap();
}
