//! What this host can run: the kind of KVM (hardware, or PVM software virtualization), and where the
//! firecracker binary is.

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

/// Boot arguments the guest kernel needs under PVM (see ENVIRONMENT.md); none on real KVM.
pub const PVM_BOOT_ARGS: &str = "clearcpuid=cx16,popcnt,fsgsbase,invpcid,pcid,rdrand,rdseed,smap,movbe noxsave \
     i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// The firecracker binary: FIRECRACKER_BIN, else `firecracker` on PATH, else what `make setup` installed.
pub fn find_firecracker(configured: Option<&Path>, assets_dir: &Path) -> Option<PathBuf> {
    if let Some(p) = configured {
        return is_executable(p).then(|| p.to_path_buf());
    }
    find_on_path(Path::new("firecracker")).or_else(|| {
        let installed = assets_dir.join("bin/firecracker");
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
