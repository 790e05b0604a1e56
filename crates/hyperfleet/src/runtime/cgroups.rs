//! Cheap cgroup moves: every start moves a fresh process into cgroups (the jailer's, runc's), and by default
//! each move waits for an RCU grace period (~10–14 ms measured here). The cgroup `favordynmods` option trades
//! that for slightly dearer fork/exit; this module turns it on host-wide by remounting the cgroup2 hierarchy.

use std::path::PathBuf;

use nix::mount::MsFlags;

/// What [`favor_dynamic_moves`] found or did.
#[derive(Debug, PartialEq, Eq)]
pub enum DynMods {
    /// A cgroup hierarchy already has `favordynmods`.
    AlreadyOn,
    /// The cgroup2 mount at this path was remounted with it.
    TurnedOn(PathBuf),
    /// Why it cannot be turned on here.
    Unavailable(String),
}

/// A remount that adds `favordynmods` to a cgroup2 mount, keeping its other options.
#[derive(Debug, PartialEq, Eq)]
struct Remount {
    target: PathBuf,
    flags: MsFlags,
    data: String,
}

/// The kernel's flag is global: any cgroup mount (v1 or v2) with `favordynmods` turns it on for all
/// hierarchies. Remounting cgroup2 re-applies all of its superblock options, so those it has are passed
/// back, and its per-mount flags (nosuid, nodev, …) too, which a remount would otherwise clear.
fn plan(mountinfo: &str) -> Result<Option<Remount>, String> {
    let mut cgroup2 = None;
    for line in mountinfo.lines() {
        let Some((mount, sup)) = line.split_once(" - ") else { continue };
        let fields: Vec<&str> = mount.split(' ').collect();
        let sup: Vec<&str> = sup.split(' ').collect();
        let (Some(target), Some(mount_opts), Some(fstype), Some(super_opts)) =
            (fields.get(4), fields.get(5), sup.first(), sup.get(2))
        else {
            continue;
        };
        if !fstype.starts_with("cgroup") {
            continue;
        }
        if super_opts.split(',').any(|o| o == "favordynmods") {
            return Ok(None);
        }
        if *fstype == "cgroup2" && cgroup2.is_none() {
            cgroup2 = Some((unescape(target), *mount_opts, *super_opts));
        }
    }
    let (target, mount_opts, super_opts) = cgroup2.ok_or("no cgroup2 hierarchy is mounted (pure cgroup v1 host)")?;
    let mut flags = MsFlags::MS_REMOUNT;
    for opt in mount_opts.split(',') {
        flags |= match opt {
            "ro" => MsFlags::MS_RDONLY,
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            "noatime" => MsFlags::MS_NOATIME,
            "nodiratime" => MsFlags::MS_NODIRATIME,
            "relatime" => MsFlags::MS_RELATIME,
            "strictatime" => MsFlags::MS_STRICTATIME,
            _ => MsFlags::empty(),
        };
    }
    let mut data: Vec<&str> = super_opts.split(',').filter(|o| !matches!(*o, "rw" | "ro")).collect();
    data.push("favordynmods");
    Ok(Some(Remount { target: PathBuf::from(target), flags, data: data.join(",") }))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// Turns `favordynmods` on for the host (kernel ≥ 6.0), unless a hierarchy has it already. Host-wide and
/// lasting until reboot (on ≥ 6.18 the per-process lock it switches to cannot be switched back at all).
pub fn favor_dynamic_moves() -> DynMods {
    let features = std::fs::read_to_string("/sys/kernel/cgroup/features").unwrap_or_default();
    if !features.lines().any(|l| l.trim() == "favordynmods") {
        return DynMods::Unavailable("the kernel has no cgroup favordynmods option (Linux 6.0 or later)".into());
    }
    let mountinfo = match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(m) => m,
        Err(e) => return DynMods::Unavailable(format!("cannot read /proc/self/mountinfo: {e}")),
    };
    match plan(&mountinfo) {
        Ok(None) => DynMods::AlreadyOn,
        Ok(Some(r)) => match nix::mount::mount(None::<&str>, &r.target, None::<&str>, r.flags, Some(r.data.as_str())) {
            Ok(()) => DynMods::TurnedOn(r.target),
            Err(e) => DynMods::Unavailable(format!("remounting {} with favordynmods: {e}", r.target.display())),
        },
        Err(why) => DynMods::Unavailable(why),
    }
}

/// Whether any cgroup hierarchy has `favordynmods` (for `doctor`).
pub fn dynamic_moves_favored() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| plan(&m) == Ok(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,memory
41 30 0:38 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn cgroup2_is_remounted_with_its_own_options_kept() {
        let r = plan(HYBRID).unwrap().unwrap();
        assert_eq!(r.target, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(r.data, "nsdelegate,favordynmods");
        let kept = MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        assert_eq!(r.flags, kept | MsFlags::MS_RELATIME);
    }

    #[test]
    fn nothing_to_do_when_a_hierarchy_has_it() {
        let on = HYBRID.replace("rw,memory", "rw,favordynmods,memory");
        assert_eq!(plan(&on), Ok(None));
    }

    #[test]
    fn pure_v1_hosts_say_why() {
        let v1: String = HYBRID.lines().take(2).map(|l| format!("{l}\n")).collect();
        assert!(plan(&v1).unwrap_err().contains("no cgroup2"));
    }
}
