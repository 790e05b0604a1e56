//! What the agent does when it is PID 1: mount the kernel filesystems, bring up `lo`, set the hostname,
//! write /etc/resolv.conf, and power the machine off cleanly on request.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use nix::mount::{MsFlags, mount};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Mounts what a userland expects; already-mounted targets (the container runtime mounts some) are skipped.
pub fn mount_filesystems() {
    let mounts: [(&str, &str, &str, Option<&str>); 7] = [
        ("proc", "/proc", "proc", None),
        ("sysfs", "/sys", "sysfs", None),
        ("devtmpfs", "/dev", "devtmpfs", Some("mode=0755")),
        ("devpts", "/dev/pts", "devpts", Some("gid=5,mode=620,ptmxmode=666")),
        ("tmpfs", "/dev/shm", "tmpfs", Some("mode=1777")),
        ("tmpfs", "/run", "tmpfs", Some("mode=0755")),
        ("tmpfs", "/tmp", "tmpfs", Some("mode=1777")),
    ];
    let mounted = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for (src, target, fstype, data) in mounts {
        if mounted.lines().any(|l| l.split_whitespace().nth(1) == Some(target)) {
            continue;
        }
        if let Err(e) = std::fs::create_dir_all(target) {
            eprintln!("hyperfleet-agent: create {target}: {e}");
        }
        if let Err(e) = mount(Some(src), target, Some(fstype), MsFlags::MS_NOSUID, data) {
            eprintln!("hyperfleet-agent: mount {target}: {e}");
        }
    }
}

/// Sets IFF_UP on `lo` with the classic ioctls (no netlink needed for one flag).
pub fn loopback_up() -> std::io::Result<()> {
    // SAFETY: socket() takes integer arguments only; its result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor socket() just opened and nothing else owns; the OwnedFd closes it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is a plain C struct (arrays and a union of integers) for which all-zero bytes are valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_name[0] = libc::c_char::from_ne_bytes([b'l']);
    req.ifr_name[1] = libc::c_char::from_ne_bytes([b'o']);
    let up = libc::c_short::try_from(libc::IFF_UP).map_err(std::io::Error::other)?;
    // SAFETY: `fd` is an open socket and `req` a valid ifreq naming "lo" (NUL-terminated by the zeroing);
    // SIOCGIFFLAGS writes only into `req`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS above filled the `ifru_flags` member of the union, so it is the one to read.
    unsafe { req.ifr_ifru.ifru_flags |= up };
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Resolvers from `HYPERFLEET_DNS` (container runtime), else the ones the guest kernel got from `ip=`
/// (/proc/net/pnp, Firecracker).
pub fn boot_resolvers() -> Vec<Ipv4Addr> {
    if let Ok(list) = std::env::var("HYPERFLEET_DNS") {
        return list.split(',').filter_map(|s| s.trim().parse().ok()).collect();
    }
    std::fs::read_to_string("/proc/net/pnp")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver")?.trim().parse().ok())
        .filter(|ip: &Ipv4Addr| !ip.is_unspecified())
        .collect()
}

pub fn write_resolv_conf(servers: &[Ipv4Addr]) {
    if servers.is_empty() {
        return;
    }
    let text: String = servers.iter().map(|s| format!("nameserver {s}\n")).collect();
    let path = Path::new("/etc/resolv.conf");
    // A symlink (e.g. into /run/systemd) would point nowhere here: replace it with a file.
    if path.is_symlink()
        && let Err(e) = std::fs::remove_file(path)
    {
        eprintln!("hyperfleet-agent: remove the /etc/resolv.conf symlink: {e}");
    }
    // A failure here shows as the write's error just below.
    if let Err(e) = std::fs::create_dir_all("/etc") {
        eprintln!("hyperfleet-agent: create /etc: {e}");
    }
    if let Err(e) = std::fs::write(path, text) {
        eprintln!("hyperfleet-agent: write /etc/resolv.conf: {e}");
    }
}

pub fn set_hostname_from_env() {
    if let Ok(name) = std::env::var("HYPERFLEET_HOSTNAME")
        && let Err(e) = nix::unistd::sethostname(&name)
    {
        eprintln!("hyperfleet-agent: sethostname {name}: {e}");
    }
}

/// Ends every other process, syncs, and then powers the VM off (Firecracker exits on the guest's reset) or,
/// in a container, exits, which ends the container. Blocking: called once the runtime is done.
pub fn shutdown(in_vm: bool) -> ! {
    // kill(-1) fails only with ESRCH, when no other process is left: nothing to end then.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    if in_vm {
        // With `reboot=k` a reset goes through the keyboard controller, which makes Firecracker exit.
        // reboot() returns only when it failed.
        let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
        eprintln!("hyperfleet-agent: reboot: {e}");
    }
    std::process::exit(0)
}
