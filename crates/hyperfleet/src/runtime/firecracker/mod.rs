//! The Firecracker runtime: one firecracker per machine, started by Firecracker's jailer in its own session
//! (own uid/gid, chroot, cgroups, seccomp: see [`jail`]), configured over its API socket (machine, kernel,
//! root drive, network, vsock), console captured to the machine's log. The guest kernel configures eth0
//! itself from the `ip=` boot argument, so networking needs no guest agent.

pub(crate) mod api;
pub mod jail;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use hyperfleet_agent_proto::client::{AgentClient, Endpoint};
use serde_json::json;

use super::host::{KvmKind, PVM_BOOT_ARGS};
use super::{BootSpec, Booted, MachineFiles, RuntimeError, process};
pub use api::FirecrackerApi;
use jail::{CgroupVersion, Identity, JailerCommand};

/// Guest context id of every machine (each has its own vsock device, so they need not differ).
const GUEST_CID: u32 = 3;

/// Where and as whom the jailer runs machines.
#[derive(Debug, Clone)]
pub(crate) struct JailSettings {
    /// Root-only base of the chroots (the jailer's `--chroot-base-dir`).
    pub chroot_dir: PathBuf,
    /// Machine N runs as uid and gid `uid_base + N`.
    pub uid_base: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct Firecracker {
    bin: Option<PathBuf>,
    jailer: Option<PathBuf>,
    kvm: KvmKind,
    jail: JailSettings,
    cgroup_version: CgroupVersion,
    /// File name of the (canonical) firecracker binary: the jailer names the jails' directory after it.
    exec_name: String,
}

impl Firecracker {
    pub(crate) fn new(bin: Option<PathBuf>, jailer: Option<PathBuf>, kvm: KvmKind, jail: JailSettings) -> Self {
        let exec_name = bin
            .as_deref()
            .and_then(|b| b.canonicalize().ok())
            .and_then(|b| b.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "firecracker".into());
        Self { bin, jailer, kvm, jail, cgroup_version: CgroupVersion::detect(), exec_name }
    }

    /// Where the jailer makes each machine's jail: `{chroot dir}/{firecracker's file name}`.
    pub(crate) fn jails_dir(&self) -> PathBuf {
        self.jail.chroot_dir.join(&self.exec_name)
    }

    /// Why this runtime cannot start machines here, if it cannot.
    pub(crate) fn unavailable(&self) -> Option<String> {
        if self.bin.is_none() {
            return Some(
                "firecracker binary not found: set FIRECRACKER_BIN, put firecracker on PATH, or run `make setup`"
                    .into(),
            );
        }
        if self.jailer.is_none() {
            return Some(
                "Firecracker's jailer not found: set JAILER_BIN, put jailer on PATH, or run `make setup`".into(),
            );
        }
        if self.kvm == KvmKind::Missing {
            return Some("KVM is unavailable: /dev/kvm is missing or not accessible".into());
        }
        // A unix socket address holds 107 bytes; machine ids are 16.
        let longest = self.jails_dir().join("0123456789abcdef/root").join(jail::VSOCK_SOCKET);
        if longest.as_os_str().len() > 107 {
            return Some(format!(
                "socket paths in the chroots ({}) exceed a unix socket address: shorten HYPERFLEET_CHROOT_DIR",
                longest.display()
            ));
        }
        None
    }

    /// The full kernel command line: the machine's arguments, the network (`ip=` with gateway and DNS, so
    /// the guest kernel configures eth0), and the PVM workarounds only on a PVM host.
    pub(crate) fn boot_args(&self, spec: &BootSpec) -> String {
        let net = &spec.net;
        let dns = |i: usize| net.dns.get(i).map(|d| d.to_string()).unwrap_or_default();
        let mut args = format!(
            "{} ip={}::{}:{}:{}:eth0:off:{}:{}",
            spec.kernel_args.trim(),
            net.guest_ip,
            net.tap_ip,
            net.netmask,
            net.hostname,
            dns(0),
            dns(1)
        );
        if let Some(init) = &spec.init
            && !spec.kernel_args.split_whitespace().any(|a| a.starts_with("init="))
        {
            args.push_str(" init=");
            args.push_str(init);
        }
        // The root disk is vda; the volumes follow in the order they are attached.
        let volumes: Vec<String> = spec
            .volumes
            .iter()
            .zip(b'b'..=b'z')
            .map(|(v, letter)| {
                format!("vd{}:{}:{}", char::from(letter), v.mount_path, if v.read_only { "ro" } else { "rw" })
            })
            .collect();
        if !volumes.is_empty() {
            args.push_str(&format!(" hyperfleet.volumes={}", volumes.join(",")));
        }
        if self.kvm == KvmKind::Pvm {
            args.push(' ');
            args.push_str(PVM_BOOT_ARGS);
        }
        args
    }

    pub(crate) fn agent(files: &MachineFiles) -> AgentClient {
        AgentClient::new(Endpoint::FirecrackerVsock {
            uds: files.vsock_socket.clone(),
            port: hyperfleet_agent_proto::AGENT_PORT,
        })
    }

    /// Whether `pid` is the firecracker of this machine: its `--id` and its chroot, so neither a reused PID
    /// nor another daemon's machine of the same id is taken for it.
    pub(crate) fn owns(pid: u32, files: &MachineFiles) -> bool {
        let id = files.jail.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        process::alive(pid) && process::cmdline_contains(pid, &id) && jail::runs_in(pid, files)
    }

    /// Finds this machine's firecracker when its PID was never recorded (the daemon died between spawning it
    /// and saving the PID): the jailer's pid file in the chroot, else a scan of /proc.
    pub(crate) fn find(&self, files: &MachineFiles) -> Option<u32> {
        if let Some(pid) = jail::recorded_pid(files, &self.exec_name).filter(|pid| Self::owns(*pid, files)) {
            return Some(pid);
        }
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| Self::owns(*pid, files))
    }

    /// Makes the machine's jail and starts firecracker in it through the jailer, configures it and starts the
    /// guest. On error the process, chroot and cgroups are gone again.
    pub(crate) async fn boot(&self, spec: &BootSpec, files: &MachineFiles) -> Result<Booted, RuntimeError> {
        let (Some(bin), Some(jailer), None) = (self.bin.clone(), self.jailer.clone(), self.unavailable()) else {
            return Err(RuntimeError::Unavailable(self.unavailable().unwrap_or_default()));
        };
        let mut took = super::StepTimes::new();
        // What a crash may have left of an earlier run (mknod in the chroot fails on existing devices).
        Self::release(&spec.id, files).await;
        took.lap("release");
        let identity = Identity::of_block(self.jail.uid_base, spec.block);
        let (chroot_dir, kernel, jail_files) =
            (self.jail.chroot_dir.clone(), spec.kernel_image_path.clone(), files.clone());
        let volumes = spec.volumes.clone();
        tokio::task::spawn_blocking(move || {
            jail::secure_base(&chroot_dir).map_err(RuntimeError::io("secure the chroot directory", &chroot_dir))?;
            jail::populate(&jail_files, &kernel, identity)
                .map_err(RuntimeError::io("place kernel and disk in the chroot", &jail_files.jail))?;
            jail::link_volumes(&jail_files, &volumes, identity)
                .map_err(RuntimeError::io("place the volumes in the chroot", &jail_files.jail))
        })
        .await??;
        took.lap("jail");
        let console = files.open_console_log()?;
        let console_err = console.try_clone().map_err(RuntimeError::io("open", &files.console_log))?;
        let mut cmd = JailerCommand {
            jailer: &jailer,
            firecracker: &bin,
            chroot_dir: &self.jail.chroot_dir,
            id: &spec.id,
            identity,
            cgroup_version: self.cgroup_version,
            cgroup_limits: self.cgroup_version.limits(spec.vcpu_count, spec.mem_size_mib),
        }
        .build();
        let parent = jail::PARENT_CGROUPS.read().await;
        let spawned = process::spawn_detached(cmd.stdin(Stdio::null()).stdout(console).stderr(console_err));
        let pid = match spawned {
            Ok(pid) => pid,
            Err(e) => {
                drop(parent);
                Self::release(&spec.id, files).await;
                return Err(RuntimeError::Unavailable(format!("cannot run {}: {e}", jailer.display())));
            }
        };
        took.lap("spawn");
        let socket = Self::wait_for_socket(files, pid).await;
        drop(parent);
        took.lap("socket");
        match async {
            socket?;
            self.configure(spec, files, pid).await
        }
        .await
        {
            Ok(()) => {
                took.lap("configure");
                tracing::debug!(machine = %spec.id, pid, took = %took, "firecracker booted");
                Ok(Booted { pid, socket_path: Some(files.api_socket.display().to_string()) })
            }
            Err(e) => {
                process::terminate(pid, Duration::from_secs(1)).await;
                Self::release(&spec.id, files).await;
                Err(e)
            }
        }
    }

    /// Waits for firecracker's API socket, which appears within milliseconds of the spawn (after the jailer
    /// made the cgroup and execed firecracker).
    async fn wait_for_socket(files: &MachineFiles, pid: u32) -> Result<(), RuntimeError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        // The file appears at bind(), a moment before listen(): wait until a connection is accepted.
        while std::os::unix::net::UnixStream::connect(&files.api_socket).is_err() {
            if !process::alive(pid) {
                return Err(RuntimeError::ExitedAtStart {
                    process: "jailer (firecracker)",
                    console: process::tail(&files.console_log, 5).join(" | "),
                });
            }
            if Instant::now() > deadline {
                return Err(RuntimeError::Timeout("firecracker's API socket appearing in its chroot within 5 s"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    async fn configure(&self, spec: &BootSpec, files: &MachineFiles, pid: u32) -> Result<(), RuntimeError> {
        let net = &spec.net;
        let api = FirecrackerApi::new(&files.api_socket);
        api.put(
            "/machine-config",
            &json!({ "vcpu_count": spec.vcpu_count, "mem_size_mib": spec.mem_size_mib, "smt": false }),
        )
        .await?;
        api.put(
            "/boot-source",
            &json!({ "kernel_image_path": jail::inside(jail::KERNEL), "boot_args": self.boot_args(spec) }),
        )
        .await?;
        api.put(
            "/drives/rootfs",
            &json!({
                "drive_id": "rootfs",
                "path_on_host": jail::inside(jail::DISK),
                "is_root_device": true,
                "is_read_only": false
            }),
        )
        .await?;
        for (i, v) in spec.volumes.iter().enumerate() {
            let id = format!("volume{i}");
            api.put(
                &format!("/drives/{id}"),
                &json!({
                    "drive_id": id,
                    "path_on_host": jail::inside(&jail::volume_file(i)),
                    "is_root_device": false,
                    "is_read_only": v.read_only
                }),
            )
            .await?;
        }
        api.put(
            "/network-interfaces/eth0",
            &json!({ "iface_id": "eth0", "guest_mac": net.mac, "host_dev_name": net.iface }),
        )
        .await?;
        api.put("/vsock", &json!({ "guest_cid": GUEST_CID, "uds_path": jail::inside(jail::VSOCK_SOCKET) })).await?;
        api.put("/actions", &json!({ "action_type": "InstanceStart" })).await?;
        if !process::alive(pid) {
            return Err(RuntimeError::ExitedAtStart {
                process: "firecracker (after InstanceStart)",
                console: process::tail(&files.console_log, 5).join(" | "),
            });
        }
        Ok(())
    }

    /// Stops the guest: the agent's shutdown, else Ctrl-Alt-Del, each given `grace`; then SIGTERM, SIGKILL.
    /// Returns once the process is gone; [`Self::release`] then removes its jail.
    pub(crate) async fn stop(&self, pid: u32, files: &MachineFiles, grace: Duration) {
        if Self::owns(pid, files) {
            let agent = Self::agent(files);
            let asked = tokio::time::timeout(Duration::from_millis(1500), agent.shutdown()).await;
            let graceful = if matches!(asked, Ok(Ok(()))) {
                true
            } else {
                // Without guest userspace (or agent) this does nothing, which is why a grace period follows.
                let api = FirecrackerApi::new(&files.api_socket);
                api.put("/actions", &json!({ "action_type": "SendCtrlAltDel" })).await.is_ok()
            };
            if !(graceful && process::wait_exit(pid, grace).await) {
                process::terminate(pid, Duration::from_secs(3)).await;
            }
        }
    }

    /// Removes the machine's jail: the chroot (with the sockets, the kernel link and the disk's link; the disk
    /// itself stays in the data directory) and its cgroups. Idempotent; only once its process is gone.
    pub(crate) async fn release(id: &str, files: &MachineFiles) {
        jail::remove(files, id).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::GuestNetwork;
    use hyperfleet_types::RuntimeKind;

    fn spec(dns: Vec<std::net::Ipv4Addr>) -> BootSpec {
        BootSpec {
            id: "m1".into(),
            block: 1,
            runtime: RuntimeKind::Firecracker,
            vcpu_count: 1,
            mem_size_mib: 128,
            kernel_image_path: PathBuf::from("/a/vmlinux"),
            kernel_args: "  console=ttyS0 reboot=k  ".into(),
            rootfs_path: PathBuf::from("/a/rootfs.ext4"),
            assets_dir: PathBuf::from("/a"),
            rootfs_dir: PathBuf::from("/a"),
            init: None,
            main_spec: None,
            image_tree: None,
            net: GuestNetwork {
                iface: "tap1".into(),
                tap_ip: "172.16.0.5".parse().unwrap(),
                guest_ip: "172.16.0.6".parse().unwrap(),
                netmask: "255.255.255.252".parse().unwrap(),
                prefix_len: 30,
                mac: "AA:FC:00:00:00:02".into(),
                dns,
                hostname: "web".into(),
            },
            disk_size_mib: 0,
            volumes: vec![],
        }
    }

    fn firecracker(kvm: KvmKind) -> Firecracker {
        Firecracker::new(None, None, kvm, JailSettings { chroot_dir: PathBuf::from("/j"), uid_base: 900_000 })
    }

    #[test]
    fn boot_args_configure_the_guest_network_in_the_kernel() {
        let two = vec!["10.0.0.53".parse().unwrap(), "10.0.0.54".parse().unwrap()];
        let args = firecracker(KvmKind::Hardware).boot_args(&spec(two));
        assert_eq!(
            args,
            "console=ttyS0 reboot=k ip=172.16.0.6::172.16.0.5:255.255.255.252:web:eth0:off:10.0.0.53:10.0.0.54"
        );
        let none = firecracker(KvmKind::Hardware).boot_args(&spec(vec![]));
        assert!(none.ends_with(":web:eth0:off::"), "{none}");
    }

    #[test]
    fn pvm_workarounds_only_on_pvm() {
        let dns = vec!["10.0.0.53".parse().unwrap()];
        assert!(!firecracker(KvmKind::Hardware).boot_args(&spec(dns.clone())).contains("clearcpuid"));
        assert!(firecracker(KvmKind::Pvm).boot_args(&spec(dns)).ends_with(PVM_BOOT_ARGS));
    }
}
