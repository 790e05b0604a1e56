//! What a machine uses, read from the host: CPU and memory from the machine's own cgroup (runc's
//! `/hyperfleet/{id}`, or the jailer's `firecracker/{id}`), found through `/proc/PID/cgroup`, else from its
//! process; its disk file's size and allocated blocks; its host interface's counters. Blocking reads of
//! small files: call from a blocking thread.

use std::path::{Path, PathBuf};

/// The kernel's unit of process times in /proc (USER_HZ), fixed at 100 in its ABI.
const USER_HZ: f64 = 100.0;
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Usage {
    pub cpu_seconds: Option<f64>,
    /// The working set: usage less inactive page cache, like `docker stats`.
    pub memory_used: Option<u64>,
    pub memory_limit: Option<u64>,
    pub disk_used: Option<u64>,
    pub disk_size: Option<u64>,
    pub uptime_seconds: Option<f64>,
    /// The host interface's own counters (the guest's are the other way round).
    pub iface_rx: Option<u64>,
    pub iface_tx: Option<u64>,
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `/proc/PID/stat` fields after the command name: (utime + stime in seconds, start time in seconds after boot).
fn process_times(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Field 14 (utime) is f[11], 15 (stime) f[12], 22 (starttime) f[19].
    let tick = |i: usize| f.get(i)?.parse::<u64>().ok().map(|t| t as f64 / USER_HZ);
    Some((tick(11)? + tick(12)?, tick(19)?))
}

fn uptime() -> Option<f64> {
    std::fs::read_to_string("/proc/uptime").ok()?.split_whitespace().next()?.parse().ok()
}

/// The machine's cgroup directories of `pid`: (controller or "" for v2, directory), only those that are the
/// machine's own (their path ends with its id), not a parent shared with the daemon.
fn own_cgroups(pid: u32, id: &str) -> Vec<(String, PathBuf)> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else { return vec![] };
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        if !path.trim_end_matches('/').ends_with(id) {
            continue;
        }
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            // v2: the unified hierarchy is /sys/fs/cgroup itself, or /sys/fs/cgroup/unified on a hybrid host.
            for base in [Path::new(CGROUP_ROOT).to_path_buf(), Path::new(CGROUP_ROOT).join("unified")] {
                let dir = base.join(rel);
                if dir.join("cgroup.procs").exists() {
                    out.push((String::new(), dir));
                    break;
                }
            }
        } else {
            for c in controllers.split(',') {
                let c = c.trim_start_matches("name=");
                out.push((c.to_string(), Path::new(CGROUP_ROOT).join(controllers).join(rel)));
            }
        }
    }
    out
}

fn stat_value(file: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Reads the usage of machine `id`, whose process is `pid` (none when it does not run), with its disk at
/// `disk` and its host interface `iface`.
pub(crate) fn read(id: &str, pid: Option<u32>, disk: &Path, iface: &str) -> Usage {
    use std::os::unix::fs::MetadataExt;
    let mut u = Usage::default();
    if let Ok(meta) = std::fs::metadata(disk) {
        u.disk_size = Some(meta.len());
        u.disk_used = Some(meta.blocks().saturating_mul(512));
    }
    let Some(pid) = pid else { return u };
    let stats = Path::new("/sys/class/net").join(iface).join("statistics");
    u.iface_rx = read_u64(&stats.join("rx_bytes"));
    u.iface_tx = read_u64(&stats.join("tx_bytes"));
    let times = process_times(pid);
    if let (Some((_, started)), Some(now)) = (times, uptime()) {
        u.uptime_seconds = Some((now - started).max(0.0));
    }
    let groups = own_cgroups(pid, id);
    let dir = |want: &str| groups.iter().find(|(c, _)| c == want).map(|(_, d)| d.clone());
    if let Some(v2) = dir("") {
        u.cpu_seconds = stat_value(&v2.join("cpu.stat"), "usage_usec").map(|us| us as f64 / 1e6);
        let current = read_u64(&v2.join("memory.current"));
        let inactive = stat_value(&v2.join("memory.stat"), "inactive_file").unwrap_or(0);
        u.memory_used = current.map(|c| c.saturating_sub(inactive));
        u.memory_limit = read_u64(&v2.join("memory.max"));
    }
    if let Some(cpuacct) = dir("cpuacct") {
        u.cpu_seconds = read_u64(&cpuacct.join("cpuacct.usage")).map(|ns| ns as f64 / 1e9).or(u.cpu_seconds);
    }
    if let Some(mem) = dir("memory") {
        let usage = read_u64(&mem.join("memory.usage_in_bytes"));
        let inactive = stat_value(&mem.join("memory.stat"), "total_inactive_file").unwrap_or(0);
        u.memory_used = usage.map(|c| c.saturating_sub(inactive)).or(u.memory_used);
        // v1 reports "no limit" as a huge number; keep only a real one.
        u.memory_limit = read_u64(&mem.join("memory.limit_in_bytes")).filter(|l| *l < (1 << 62)).or(u.memory_limit);
    }
    // Without a cgroup of its own for a controller (a jailed firecracker on cgroup v1 has only memory), the
    // process's own figures: it is the whole machine.
    if u.cpu_seconds.is_none() {
        u.cpu_seconds = times.map(|t| t.0);
    }
    if u.memory_used.is_none() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok());
        u.memory_used = rss.map(|kb: u64| kb * 1024);
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_has_cpu_time_memory_and_an_uptime() {
        let disk = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(disk.path(), vec![1u8; 8192]).unwrap();
        let u = read("not-a-machine", Some(std::process::id()), disk.path(), "lo");
        assert!(u.cpu_seconds.is_some_and(|s| s >= 0.0), "{u:?}");
        assert!(u.memory_used.is_some_and(|m| m > 0), "{u:?}");
        assert!(u.uptime_seconds.is_some_and(|s| s >= 0.0), "{u:?}");
        assert_eq!(u.disk_size, Some(8192));
        assert!(u.iface_rx.is_some(), "loopback has counters");
        let stopped = read("x", None, Path::new("/nonexistent"), "lo");
        assert_eq!(stopped, Usage::default());
    }
}
