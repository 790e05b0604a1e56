//! Volumes of a Firecracker guest: the host attaches each as an extra drive and names them on the kernel
//! command line, `hyperfleet.volumes=vdb:/data:rw,vdc:/cache:ro`; the agent mounts each at boot (nosuid,
//! nodev; read-only ones read-only). A container's volumes are bound in by the runtime instead.

use nix::mount::{MsFlags, mount};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub device: String,
    pub mount_path: String,
    pub read_only: bool,
}

/// The volumes named on a kernel command line; malformed entries are skipped (and reported).
pub fn from_cmdline(cmdline: &str) -> Vec<VolumeSpec> {
    let Some(list) = cmdline.split_whitespace().find_map(|a| a.strip_prefix("hyperfleet.volumes=")) else {
        return Vec::new();
    };
    list.split(',')
        .filter_map(|entry| {
            let mut parts = entry.split(':');
            let (device, path, mode) = (parts.next()?, parts.next()?, parts.next()?);
            let device_ok =
                device.starts_with("vd") && device.len() <= 5 && device.bytes().all(|c| c.is_ascii_lowercase());
            if !device_ok || !path.starts_with('/') || !matches!(mode, "rw" | "ro") || parts.next().is_some() {
                eprintln!("hyperfleet-agent: ignoring the volume entry '{entry}'");
                return None;
            }
            Some(VolumeSpec { device: device.into(), mount_path: path.into(), read_only: mode == "ro" })
        })
        .collect()
}

/// Mounts every volume named on this guest's kernel command line.
pub fn mount_all() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for v in from_cmdline(&cmdline) {
        if let Err(e) = std::fs::create_dir_all(&v.mount_path) {
            eprintln!("hyperfleet-agent: create {}: {e}", v.mount_path);
            continue;
        }
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if v.read_only {
            flags |= MsFlags::MS_RDONLY | MsFlags::MS_NOEXEC;
        }
        let dev = format!("/dev/{}", v.device);
        if let Err(e) = mount(Some(dev.as_str()), v.mount_path.as_str(), Some("ext4"), flags, None::<&str>) {
            eprintln!("hyperfleet-agent: mount {dev} at {}: {e}", v.mount_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_command_line_names_the_volumes() {
        let line = "console=ttyS0 hyperfleet.volumes=vdb:/data:rw,vdc:/srv/cache:ro ip=1.2.3.4";
        assert_eq!(
            from_cmdline(line),
            vec![
                VolumeSpec { device: "vdb".into(), mount_path: "/data".into(), read_only: false },
                VolumeSpec { device: "vdc".into(), mount_path: "/srv/cache".into(), read_only: true },
            ]
        );
        assert!(from_cmdline("console=ttyS0").is_empty());
        // Malformed entries are skipped, good ones kept.
        let odd = "hyperfleet.volumes=sda:/x:rw,vdb:relative:rw,vdc:/y:rx,vdd:/ok:ro,vde:/a:rw:extra";
        assert_eq!(
            from_cmdline(odd),
            vec![VolumeSpec { device: "vdd".into(), mount_path: "/ok".into(), read_only: true }]
        );
    }
}
