//! What this host can run: the kind of KVM (hardware, or PVM software virtualization), and where the
//! firecracker and jailer binaries are.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// kvm_intel / kvm_amd: guests run normally.
    Hardware,
    /// kvm_pvm: the kernel boots (slowly, with extra boot args) but guest userspace cannot run.
    Pvm,
    /// No usable /dev/kvm.
    Missing,
}

impl KvmKind {
    /// Read from /sys/module, not CPU flags: PVM hosts have KVM without vmx/svm.
    pub fn detect() -> Self {
        let module = |m: &str| Path::new("/sys/module").join(m).exists();
        let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
        if !dev {
            Self::Missing
        } else if module("kvm_pvm") {
            Self::Pvm
        } else if module("kvm_intel") || module("kvm_amd") {
            Self::Hardware
        } else {
            // /dev/kvm works but we cannot tell the flavour: assume it is real.
            Self::Hardware
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Hardware => "hardware KVM",
            Self::Pvm => "PVM (software virtualization: the guest kernel boots, guest userspace cannot run)",
            Self::Missing => "no usable /dev/kvm",
        }
    }
}

/// Boot arguments the guest kernel needs under PVM (software virtualization: it emulates parts of the CPU and
/// trips over these features and the i8042 probe); none on real KVM.
pub(crate) const PVM_BOOT_ARGS: &str = "clearcpuid=cx16,popcnt,fsgsbase,invpcid,pcid,rdrand,rdseed,smap,movbe noxsave \
     i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// The firecracker binary: FIRECRACKER_BIN, else `firecracker` on PATH, else what `make setup` installed.
pub(crate) fn find_firecracker(configured: Option<&Path>, assets_dir: &Path) -> Option<PathBuf> {
    find_tool("firecracker", configured, assets_dir)
}

/// Firecracker's jailer, found the same way: JAILER_BIN, else `jailer` on PATH, else .hyperfleet/bin/jailer.
pub(crate) fn find_jailer(configured: Option<&Path>, assets_dir: &Path) -> Option<PathBuf> {
    find_tool("jailer", configured, assets_dir)
}

fn find_tool(name: &str, configured: Option<&Path>, assets_dir: &Path) -> Option<PathBuf> {
    if let Some(p) = configured {
        return is_executable(p).then(|| p.to_path_buf());
    }
    find_on_path(Path::new(name)).or_else(|| {
        let installed = assets_dir.join("bin").join(name);
        is_executable(&installed).then_some(installed)
    })
}

/// `name` itself if it is a path, else the first executable of that name on PATH.
pub fn find_on_path(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return is_executable(name).then(|| name.to_path_buf());
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// How much of this host machines may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HostCapacity {
    pub cpus: u32,
    pub mem_mib: u64,
}

impl HostCapacity {
    /// Reads the CPU count and /proc/meminfo (1 GiB assumed if it cannot be read).
    pub(crate) fn detect() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
        let mem_mib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| mem_total_mib(&t)).unwrap_or(1024);
        Self { cpus, mem_mib }
    }
}

/// `MemTotal` of a /proc/meminfo text, in MiB.
fn mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo() {
        assert_eq!(mem_total_mib("MemTotal:       24576000 kB\nMemFree: 1 kB\n"), Some(24000));
        assert_eq!(mem_total_mib("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total_mib("MemTotal: lots kB\n"), None);
    }
}
