//! The container runtime, for hosts without hardware virtualization: the same image and the same agent (as
//! PID 1) under runc, driven by an OCI `config.json`. The machine's own copy of the image is loop-mounted as
//! the root; its network namespace is made by Hyperfleet and joined to the host by a veth pair whose host end
//! has the machine's TAP name and address, so IPAM, firewall and proxy work exactly as for Firecracker.
//! Isolation is a container's (shared host kernel), not a VM's.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hyperfleet_agent_proto::client::{AgentClient, Endpoint};
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder, ProcessBuilder, RootBuilder,
    Spec,
};
use tokio::process::Command;

use super::{BootSpec, Booted, MachineFiles, RuntimeError, process};

/// Where the agent's socket directory is mounted inside the container.
const AGENT_DIR_IN_GUEST: &str = "/run/hyperfleet";
/// runc's state directory for our containers, apart from anyone else's.
const RUNC_ROOT: &str = "/run/hyperfleet/runc";

#[derive(Debug, Clone)]
pub struct Container {
    runc: Option<PathBuf>,
}

/// Container and network namespace names of a machine.
pub fn container_id(machine_id: &str) -> String {
    format!("hf-{machine_id}")
}

pub fn netns_name(machine_id: &str) -> String {
    format!("hf-{machine_id}")
}

impl Container {
    pub fn new(runc: Option<PathBuf>) -> Self {
        Self { runc }
    }

    pub fn unavailable(&self) -> Option<String> {
        self.runc
            .is_none()
            .then(|| "runc not found: install it (apt-get install runc) or set HYPERFLEET_RUNC_BIN".into())
    }

    pub fn agent(files: &MachineFiles) -> AgentClient {
        AgentClient::new(Endpoint::Unix(files.agent_dir.join("agent.sock")))
    }

    fn runc(&self) -> Result<Command, RuntimeError> {
        let bin =
            self.runc.as_ref().ok_or_else(|| RuntimeError::Unavailable(self.unavailable().unwrap_or_default()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--root").arg(RUNC_ROOT);
        Ok(cmd)
    }

    async fn runc_ok(&self, args: &[&str]) -> Result<String, RuntimeError> {
        let out = self.runc()?.args(args).stdin(Stdio::null()).output().await.map_err(|e| RuntimeError::Command {
            command: format!("runc {}", args.join(" ")),
            message: e.to_string(),
        })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(RuntimeError::Command {
                command: format!("runc {}", args.first().unwrap_or(&"")),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// Runs runc for a clean-up step whose refusal is expected (nothing to act on); the reason is kept at debug.
    async fn runc_quiet(&self, args: &[&str]) {
        if let Err(e) = self.runc_ok(args).await {
            tracing::debug!(error = %e, "runc {} refused", args.join(" "));
        }
    }

    /// Runs runc for a step that should work; a failure is logged.
    async fn runc_logged(&self, args: &[&str]) {
        if let Err(e) = self.runc_ok(args).await {
            tracing::warn!(error = %e, "runc {} failed", args.join(" "));
        }
    }

    /// Mounts the machine's disk as the bundle's root (idempotent).
    pub async fn mount_root(files: &MachineFiles) -> Result<(), RuntimeError> {
        let root = files.bundle.join("rootfs");
        std::fs::create_dir_all(&root).map_err(RuntimeError::io("create", &root))?;
        if is_mountpoint(&root) {
            return Ok(());
        }
        let out = Command::new("mount")
            // nodev and nosuid: a device node or setuid file the guest makes on its disk means nothing on the host.
            .args(["-o", "loop,nosuid,nodev"])
            .arg(&files.disk)
            .arg(&root)
            .output()
            .await
            .map_err(|e| RuntimeError::Command { command: "mount".into(), message: e.to_string() })?;
        if !out.status.success() {
            return Err(RuntimeError::Command {
                command: format!("mount {}", files.disk.display()),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// Unmounts the root and frees its loop device (idempotent).
    pub async fn unmount_root(files: &MachineFiles) {
        let root = files.bundle.join("rootfs");
        if is_mountpoint(&root) {
            // -d releases the loop device too; a busy mount is detached lazily instead.
            if let Err(e) = Command::new("umount").arg("-d").arg(&root).output().await {
                tracing::warn!(error = %e, "umount {}", root.display());
            }
            if is_mountpoint(&root)
                && let Err(e) = Command::new("umount").args(["-l", "-d"]).arg(&root).output().await
            {
                tracing::warn!(error = %e, "umount -l {}", root.display());
            }
            if is_mountpoint(&root) {
                tracing::warn!(path = %root.display(), "the machine's root is still mounted");
            }
        }
    }

    /// The OCI `config.json` of a machine: its init (the agent) with the agent socket and DNS in its
    /// environment, cgroup limits from the machine's vCPUs and memory, the namespace made for it.
    pub fn spec(m: &BootSpec, files: &MachineFiles, netns: &Path) -> Result<Spec, RuntimeError> {
        let net = &m.net;
        let e = RuntimeError::Spec;
        let caps: HashSet<Capability> = [
            Capability::AuditWrite,
            Capability::Chown,
            Capability::DacOverride,
            Capability::Fowner,
            Capability::Fsetid,
            Capability::Kill,
            Capability::Mknod,
            Capability::NetBindService,
            Capability::NetRaw,
            Capability::Setfcap,
            Capability::Setgid,
            Capability::Setpcap,
            Capability::Setuid,
            Capability::SysChroot,
        ]
        .into_iter()
        .collect();
        let dns: Vec<String> = net.dns.iter().map(|d| d.to_string()).collect();
        let process = ProcessBuilder::default()
            .terminal(false)
            .args(vec!["/sbin/init".to_string()])
            .env(vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
                format!("HYPERFLEET_AGENT_SOCKET={AGENT_DIR_IN_GUEST}/agent.sock"),
                format!("HYPERFLEET_DNS={}", dns.join(",")),
            ])
            .cwd("/")
            .no_new_privileges(true)
            .capabilities(
                LinuxCapabilitiesBuilder::default()
                    .bounding(caps.clone())
                    .effective(caps.clone())
                    .permitted(caps)
                    .build()
                    .map_err(e)?,
            )
            .build()
            .map_err(e)?;
        let mut mounts: Vec<Mount> = oci_spec::runtime::get_default_mounts();
        let tmpfs = |dest: &str, mode: &str| {
            MountBuilder::default()
                .destination(dest)
                .typ("tmpfs")
                .source("tmpfs")
                .options(vec!["nosuid".into(), "nodev".into(), format!("mode={mode}")])
                .build()
        };
        // /run first, so the agent sees it mounted and the socket directory below stays visible.
        mounts.push(tmpfs("/run", "755").map_err(e)?);
        mounts.push(
            MountBuilder::default()
                .destination(AGENT_DIR_IN_GUEST)
                .typ("bind")
                .source(&files.agent_dir)
                .options(vec!["rbind".into(), "rw".into()])
                .build()
                .map_err(e)?,
        );
        mounts.push(tmpfs("/tmp", "1777").map_err(e)?);
        let ns = |typ: LinuxNamespaceType| LinuxNamespaceBuilder::default().typ(typ).build();
        let namespaces = vec![
            ns(LinuxNamespaceType::Pid).map_err(e)?,
            ns(LinuxNamespaceType::Ipc).map_err(e)?,
            ns(LinuxNamespaceType::Uts).map_err(e)?,
            ns(LinuxNamespaceType::Mount).map_err(e)?,
            LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network).path(netns).build().map_err(e)?,
        ];
        let period: u64 = 100_000;
        let resources = LinuxResourcesBuilder::default()
            .memory(LinuxMemoryBuilder::default().limit(i64::from(m.mem_size_mib) * 1024 * 1024).build().map_err(e)?)
            .cpu(
                LinuxCpuBuilder::default()
                    .period(period)
                    .quota(i64::from(m.vcpu_count) * period as i64)
                    .build()
                    .map_err(e)?,
            )
            .pids(LinuxPidsBuilder::default().limit(4096i64).build().map_err(e)?)
            .build()
            .map_err(e)?;
        let linux = LinuxBuilder::default()
            .namespaces(namespaces)
            .resources(resources)
            .cgroups_path(PathBuf::from(format!("/hyperfleet/{}", m.id)))
            .masked_paths(oci_spec::runtime::get_default_maskedpaths())
            .readonly_paths(oci_spec::runtime::get_default_readonly_paths())
            .build()
            .map_err(e)?;
        let mut spec = Spec::default();
        spec.set_process(Some(process))
            .set_root(Some(RootBuilder::default().path("rootfs").readonly(false).build().map_err(e)?))
            .set_hostname(Some(net.hostname.clone()))
            .set_mounts(Some(mounts))
            .set_linux(Some(linux));
        Ok(spec)
    }

    /// Writes the bundle and starts the container (`runc run --detach`), its init's output going to the
    /// machine's console log. Expects the root mounted and the network namespace ready.
    pub async fn boot(&self, m: &BootSpec, files: &MachineFiles, netns: &Path) -> Result<Booted, RuntimeError> {
        if let Some(why) = self.unavailable() {
            return Err(RuntimeError::Unavailable(why));
        }
        std::fs::create_dir_all(&files.agent_dir).map_err(RuntimeError::io("create", &files.agent_dir))?;
        process::remove_file_logged(&files.agent_dir.join("agent.sock"));
        Self::spec(m, files, netns)?.save(files.bundle.join("config.json"))?;
        let cid = container_id(&m.id);
        // A container of that name left by a crash would make `run` fail; usually there is none to delete.
        self.runc_quiet(&["delete", "--force", &cid]).await;
        let pid_file = files.dir.join("container.pid");
        process::remove_file_logged(&pid_file);
        let console = files.open_console_log()?;
        let console_err = console.try_clone().map_err(RuntimeError::io("open", &files.console_log))?;
        let status = self
            .runc()?
            .arg("run")
            .arg("--detach")
            .arg("--bundle")
            .arg(&files.bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(&cid)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_err)
            .status()
            .await
            .map_err(|e| RuntimeError::Command { command: "runc run".into(), message: e.to_string() })?;
        if !status.success() {
            self.runc_quiet(&["delete", "--force", &cid]).await;
            return Err(RuntimeError::Command {
                command: "runc run".into(),
                message: process::tail(&files.console_log, 3).join(" | "),
            });
        }
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| RuntimeError::Command { command: "runc run".into(), message: "wrote no pid file".into() })?;
        Ok(Booted { pid, socket_path: None })
    }

    /// The PID of the container's init if runc says it runs.
    pub async fn running_pid(&self, machine_id: &str) -> Option<u32> {
        let out = self.runc_ok(&["state", &container_id(machine_id)]).await.ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (v.get("status")?.as_str()? == "running").then_some(())?;
        let pid = u32::try_from(v.get("pid")?.as_u64()?).ok()?;
        process::alive(pid).then_some(pid)
    }

    /// Freezes (`runc pause`) or thaws (`runc resume`) every process of the container.
    pub async fn set_paused(&self, machine_id: &str, pause: bool) -> Result<(), RuntimeError> {
        let verb = if pause { "pause" } else { "resume" };
        self.runc_ok(&[verb, &container_id(machine_id)]).await.map(|_| ())
    }

    /// Asks the agent to shut down, then `runc kill` TERM and KILL; finally removes the container.
    pub async fn stop(&self, machine_id: &str, pid: Option<u32>, files: &MachineFiles, grace: Duration) {
        let cid = container_id(machine_id);
        // A frozen container cannot act on a signal, not even SIGKILL: thaw it first (refused if not frozen).
        self.runc_quiet(&["resume", &cid]).await;
        if let Some(pid) = pid.filter(|p| process::alive(*p)) {
            let asked = tokio::time::timeout(Duration::from_millis(1500), Self::agent(files).shutdown()).await;
            let graceful = matches!(asked, Ok(Ok(()))) && process::wait_exit(pid, grace).await;
            if !graceful {
                self.runc_logged(&["kill", &cid, "TERM"]).await;
                if !process::wait_exit(pid, Duration::from_secs(3)).await {
                    self.runc_logged(&["kill", "--all", &cid, "KILL"]).await;
                    process::wait_exit(pid, Duration::from_secs(5)).await;
                }
            }
        }
        // Refused when the container is already gone, which is the usual case after a clean shutdown.
        self.runc_quiet(&["delete", "--force", &cid]).await;
        process::remove_file_logged(&files.agent_dir.join("agent.sock"));
    }
}

fn is_mountpoint(path: &Path) -> bool {
    let Ok(canon) = path.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .any(|mp| Path::new(&unescape_mount(mp)) == canon)
}

/// /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}
