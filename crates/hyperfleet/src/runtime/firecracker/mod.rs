//! The Firecracker runtime: one firecracker process per machine in its own session, configured over its API
//! socket (machine, kernel, root drive, network, vsock), console captured to the machine's log. The guest
//! kernel configures eth0 itself from the `ip=` boot argument, so networking needs no guest agent.

pub mod api;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hyperfleet_agent_proto::client::{AgentClient, Endpoint};
use serde_json::json;

use super::host::{KvmKind, PVM_BOOT_ARGS};
use super::{BootSpec, Booted, MachineFiles, RuntimeError, process};
pub use api::FirecrackerApi;

/// Guest context id of every machine (each has its own vsock device, so they need not differ).
const GUEST_CID: u32 = 3;

#[derive(Debug, Clone)]
pub struct Firecracker {
    bin: Option<PathBuf>,
    kvm: KvmKind,
}

impl Firecracker {
    pub fn new(bin: Option<PathBuf>, kvm: KvmKind) -> Self {
        Self { bin, kvm }
    }

    pub fn binary(&self) -> Option<&PathBuf> {
        self.bin.as_ref()
    }

    /// Why this runtime cannot start machines here, if it cannot.
    pub fn unavailable(&self) -> Option<String> {
        if self.bin.is_none() {
            return Some(
                "firecracker binary not found: set FIRECRACKER_BIN, put firecracker on PATH, or run `make setup`"
                    .into(),
            );
        }
        if self.kvm == KvmKind::Missing {
            return Some("KVM is unavailable: /dev/kvm is missing or not accessible".into());
        }
        None
    }

    /// The full kernel command line: the machine's arguments, the network (`ip=` with gateway and DNS, so
    /// the guest kernel configures eth0), and the PVM workarounds only on a PVM host.
    pub fn boot_args(&self, spec: &BootSpec) -> String {
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
        if self.kvm == KvmKind::Pvm {
            args.push(' ');
            args.push_str(PVM_BOOT_ARGS);
        }
        args
    }

    pub fn agent(files: &MachineFiles) -> AgentClient {
        AgentClient::new(Endpoint::FirecrackerVsock {
            uds: files.vsock_socket.clone(),
            port: hyperfleet_agent_proto::AGENT_PORT,
        })
    }

    /// Whether `pid` is the firecracker of this machine (checked by its socket path in /proc/PID/cmdline).
    pub fn owns(pid: u32, files: &MachineFiles) -> bool {
        process::alive(pid) && process::cmdline_contains(pid, &files.api_socket.display().to_string())
    }

    /// Finds this machine's firecracker by its socket path, for a process whose PID was never recorded (the
    /// daemon died between spawning it and saving the PID).
    pub fn find(files: &MachineFiles) -> Option<u32> {
        let needle = files.api_socket.display().to_string();
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| process::alive(*pid) && process::cmdline_contains(*pid, &needle))
    }

    /// Spawns and configures firecracker and starts the guest. On error the process is gone again.
    pub async fn boot(&self, spec: &BootSpec, files: &MachineFiles) -> Result<Booted, RuntimeError> {
        let (Some(bin), None) = (self.bin.clone(), self.unavailable()) else {
            return Err(RuntimeError::Unavailable(self.unavailable().unwrap_or_default()));
        };
        Self::remove_sockets(files);
        let console = files.open_console_log()?;
        let console_err = console.try_clone().map_err(RuntimeError::io("open", &files.console_log))?;
        let pid = process::spawn_detached(
            Command::new(&bin)
                .arg("--api-sock")
                .arg(&files.api_socket)
                .arg("--id")
                .arg(&spec.id)
                .stdin(Stdio::null())
                .stdout(console)
                .stderr(console_err),
        )
        .map_err(|e| RuntimeError::Unavailable(format!("cannot run {}: {e}", bin.display())))?;
        match self.configure(spec, files, pid).await {
            Ok(()) => Ok(Booted { pid, socket_path: Some(files.api_socket.display().to_string()) }),
            Err(e) => {
                process::terminate(pid, Duration::from_secs(1)).await;
                Self::remove_sockets(files);
                Err(e)
            }
        }
    }

    async fn configure(&self, spec: &BootSpec, files: &MachineFiles, pid: u32) -> Result<(), RuntimeError> {
        let net = &spec.net;
        // The API socket appears within milliseconds of the spawn.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !files.api_socket.exists() {
            if !process::alive(pid) {
                return Err(RuntimeError::ExitedAtStart {
                    process: "firecracker",
                    console: process::tail(&files.console_log, 5).join(" | "),
                });
            }
            if Instant::now() > deadline {
                return Err(RuntimeError::Timeout("firecracker's API socket appearing within 5 s"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let api = FirecrackerApi::new(&files.api_socket);
        api.put(
            "/machine-config",
            &json!({ "vcpu_count": spec.vcpu_count, "mem_size_mib": spec.mem_size_mib, "smt": false }),
        )
        .await?;
        api.put(
            "/boot-source",
            &json!({ "kernel_image_path": spec.kernel_image_path, "boot_args": self.boot_args(spec) }),
        )
        .await?;
        api.put(
            "/drives/rootfs",
            &json!({
                "drive_id": "rootfs",
                "path_on_host": files.disk,
                "is_root_device": true,
                "is_read_only": false
            }),
        )
        .await?;
        api.put(
            "/network-interfaces/eth0",
            &json!({ "iface_id": "eth0", "guest_mac": net.mac, "host_dev_name": net.iface }),
        )
        .await?;
        api.put("/vsock", &json!({ "guest_cid": GUEST_CID, "uds_path": files.vsock_socket })).await?;
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
    /// Returns once the process is gone.
    pub async fn stop(&self, pid: u32, files: &MachineFiles, grace: Duration) {
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
        Self::remove_sockets(files);
    }

    /// Removes the machine's API and vsock sockets (idempotent; a failure other than "not there" is logged).
    pub fn remove_sockets(files: &MachineFiles) {
        for path in [&files.api_socket, &files.vsock_socket] {
            process::remove_file_logged(path);
        }
    }
}
