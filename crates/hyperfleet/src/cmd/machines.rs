//! `hyperfleet machines …`: the API through the SDK, as a user's terminal sees it.

use std::io::Write;

use clap::{Args, Subcommand};
use futures::StreamExt;
use hyperfleet_client::ListOptions;
use hyperfleet_types::{
    CommandArgs, CreateMachine, EgressPolicy, EntryType, ExecEvent, ExecRequest, Machine, MachineStatus, MakeDir,
    NetworkOptions, RuntimeKind, TtlAction, UpdateMachine, VolumeMount, timestamp,
};

use super::{ApiArgs, Output, print_table};

#[derive(Args, Debug)]
pub struct MachinesArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: MachinesCommand,
}

// Parsed once per process: the size of the largest variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum MachinesCommand {
    /// Create a machine (pending; add --start to start it).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long = "vcpus", default_value_t = 1)]
        vcpu_count: i64,
        #[arg(long = "mem", default_value_t = 128)]
        mem_size_mib: i64,
        #[arg(long, value_parser = parse_runtime)]
        runtime: Option<RuntimeKind>,
        /// Guest port to expose through the proxy (repeatable).
        #[arg(long = "expose")]
        exposed_ports: Vec<i64>,
        /// Guest resolver (repeatable).
        #[arg(long)]
        dns: Vec<std::net::Ipv4Addr>,
        /// allow, deny, or comma-separated IPv4 CIDRs.
        #[arg(long)]
        egress: Option<String>,
        #[arg(long)]
        kernel: Option<String>,
        #[arg(long)]
        rootfs: Option<String>,
        #[arg(long)]
        kernel_args: Option<String>,
        /// A volume to mount: NAME:/path, or NAME:/path:ro (repeat for more).
        #[arg(long = "volume", value_name = "NAME:PATH[:ro]", value_parser = parse_volume)]
        volumes: Vec<VolumeMount>,
        /// Grow the machine's root disk to this size (MiB).
        #[arg(long = "disk-size")]
        disk_size_mib: Option<i64>,
        /// An environment variable for every command run in the machine (repeat: --env A=1 --env B=2).
        #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env_pair)]
        env: Vec<(String, String)>,
        /// An OCI image to run (instead of --rootfs), e.g. 127.0.0.1:5000/busybox:latest.
        #[arg(long, conflicts_with = "rootfs")]
        image: Option<String>,
        /// Disk size of an image machine in MiB.
        #[arg(long = "image-size", requires = "image")]
        image_size_mib: Option<i64>,
        /// Replaces the image's Entrypoint (repeat for each argument).
        #[arg(long)]
        entrypoint: Vec<String>,
        /// Replaces the image's Cmd (repeat for each argument).
        #[arg(long)]
        cmd: Vec<String>,
        /// What happens when the main process ends: no, on-failure, always.
        #[arg(long, value_parser = parse_restart)]
        restart: Option<hyperfleet_types::RestartPolicy>,
        /// Registry user; the password is read from HYPERFLEET_REGISTRY_PASSWORD.
        #[arg(long, requires = "image")]
        registry_user: Option<String>,
        #[command(flatten)]
        settings: Settings,
        /// Let the machine create this many child machines from inside (with --spawn-max-vcpu and
        /// --spawn-max-mem: quotas over all its children).
        #[arg(long = "spawn-max-children", requires_all = ["spawn_max_vcpu", "spawn_max_mem"])]
        spawn_max_children: Option<i64>,
        /// Total vCPUs of the machine's children.
        #[arg(long = "spawn-max-vcpu", requires = "spawn_max_children")]
        spawn_max_vcpu: Option<i64>,
        /// Total memory of the machine's children (MiB).
        #[arg(long = "spawn-max-mem", requires = "spawn_max_children")]
        spawn_max_mem: Option<i64>,
        /// Place the machine on this fleet node.
        #[arg(long)]
        node: Option<String>,
        /// Place the machine only on a node with this label (`key=value`; repeatable).
        #[arg(long = "node-selector")]
        node_selector: Vec<String>,
        #[arg(long)]
        start: bool,
    },
    /// List the child machines a machine created from inside.
    Children {
        id: String,
    },
    /// List machines.
    List {
        #[arg(long, value_parser = parse_status)]
        status: Option<MachineStatus>,
        /// Label selector: team=ml,env!=prod,gpu,!spot
        #[arg(long, short = 'l')]
        label: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        offset: Option<u64>,
    },
    Get {
        id: String,
    },
    Start {
        id: String,
    },
    Stop {
        id: String,
    },
    Restart {
        id: String,
    },
    /// Suspend a running machine (vCPUs paused, or processes frozen for a container).
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    Delete {
        id: String,
        /// Stop it first if it runs.
        #[arg(long)]
        force: bool,
    },
    /// Wait until the machine reaches a status.
    Wait {
        id: String,
        #[arg(long, default_value = "running", value_parser = parse_status)]
        status: MachineStatus,
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Show the tail of the machine's console log.
    Logs {
        id: String,
        #[arg(long, default_value_t = 100)]
        lines: usize,
    },
    /// Change the exposed ports of a machine (works while it runs).
    Expose {
        id: String,
        ports: Vec<i64>,
    },
    /// Change labels, secrets and lifecycle settings of a machine (each flag given replaces that setting).
    Set {
        id: String,
        #[command(flatten)]
        settings: Settings,
    },
    /// Activity now: restart the idle clock (and a ttl's count).
    Keepalive {
        id: String,
    },
    /// Open a terminal in the machine (its shell, or the command after --).
    Shell {
        id: String,
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Run a command in the machine; its output streams as it comes and its exit code becomes ours.
    Exec {
        id: String,
        #[arg(long)]
        timeout: Option<u64>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Copy a local file into the machine.
    Put {
        id: String,
        local: std::path::PathBuf,
        remote: String,
    },
    /// Copy a file out of the machine (to stdout with `-`).
    Fetch {
        id: String,
        remote: String,
        local: String,
    },
    /// List a directory in the machine (every page).
    Ls {
        id: String,
        #[arg(default_value = "/")]
        path: String,
    },
    /// Make a directory in the machine.
    Mkdir {
        id: String,
        path: String,
        /// Make missing parents too; an existing directory is fine.
        #[arg(short, long)]
        parents: bool,
    },
    /// Run the network checks for one machine.
    Network {
        id: String,
    },
}

/// Labels, secrets and lifecycle flags, shared by `create` and `set`.
#[derive(Args, Debug, Default)]
struct Settings {
    /// A label (repeat: --label team=ml --label env=dev).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_env_pair)]
    labels: Vec<(String, String)>,
    /// A secret variable: NAME=VALUE, or NAME alone to take the value from this environment (so it is not
    /// in the command line).
    #[arg(long = "secret", value_name = "NAME[=VALUE]", value_parser = parse_secret)]
    secrets: Vec<(String, String)>,
    /// Stop (or delete, with --on-ttl delete) this many seconds after each start; 0: never.
    #[arg(long)]
    ttl: Option<u64>,
    #[arg(long, value_parser = parse_ttl_action)]
    on_ttl: Option<TtlAction>,
    /// Stop after this many seconds without activity; 0: never.
    #[arg(long)]
    idle_timeout: Option<u64>,
    /// How long a silent open connection or terminal still counts as activity (default: the idle timeout).
    #[arg(long)]
    idle_max_connection: Option<u64>,
    /// Start (or resume) the machine when a proxied request arrives for it.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    auto_start: Option<bool>,
}

impl Settings {
    fn labels(&self) -> Option<std::collections::BTreeMap<String, String>> {
        (!self.labels.is_empty()).then(|| self.labels.iter().cloned().collect())
    }
    fn secrets(&self) -> Option<std::collections::BTreeMap<String, String>> {
        (!self.secrets.is_empty()).then(|| self.secrets.iter().cloned().collect())
    }
}

fn parse_secret(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => std::env::var(s).map(|v| (s.to_string(), v)).map_err(|_| format!("{s} is not set in this environment")),
    }
}

fn parse_ttl_action(s: &str) -> Result<TtlAction, String> {
    match s {
        "stop" => Ok(TtlAction::Stop),
        "delete" => Ok(TtlAction::Delete),
        _ => Err(format!("'{s}': use stop or delete")),
    }
}

fn parse_status(s: &str) -> Result<MachineStatus, String> {
    MachineStatus::parse(s).ok_or_else(|| format!("unknown status '{s}'"))
}

fn parse_runtime(s: &str) -> Result<RuntimeKind, String> {
    RuntimeKind::parse(s).ok_or_else(|| format!("unknown runtime '{s}': use firecracker or container"))
}

fn parse_volume(s: &str) -> Result<VolumeMount, String> {
    let mut parts = s.splitn(3, ':');
    let (volume, path, mode) = (parts.next().unwrap_or(""), parts.next(), parts.next());
    let read_only = match mode {
        None | Some("rw") => false,
        Some("ro") => true,
        Some(other) => return Err(format!("'{other}' is not a mode: use ro or rw")),
    };
    match path {
        Some(p) if !volume.is_empty() => Ok(VolumeMount { volume: volume.into(), mount_path: p.into(), read_only }),
        _ => Err(format!("'{s}' is not NAME:/path[:ro]")),
    }
}

fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("'{s}' is not NAME=VALUE"))
}

fn parse_egress(s: &str) -> anyhow::Result<EgressPolicy> {
    let json = match s {
        "allow" | "deny" => format!("\"{s}\""),
        list => serde_json::to_string(&list.split(',').map(str::trim).collect::<Vec<_>>())?,
    };
    Ok(serde_json::from_str(&json)?)
}

fn print_machines(output: Output, machines: &[Machine]) -> anyhow::Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(machines)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = machines
        .iter()
        .map(|m| {
            vec![
                m.id.clone(),
                m.spec.name.clone(),
                m.status.to_string(),
                m.spec.runtime.to_string(),
                m.spec.vcpu_count.to_string(),
                format!("{}M", m.spec.mem_size_mib),
                m.guest_ip.to_string(),
                m.tap_device.clone(),
                m.spec.exposed_ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(","),
                m.spec.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
            ]
        })
        .collect();
    print_table(&["ID", "NAME", "STATUS", "RUNTIME", "VCPUS", "MEM", "GUEST IP", "TAP", "PORTS", "LABELS"], &rows);
    Ok(())
}

fn print_one(output: Output, m: &Machine) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(m)?),
        Output::Table => print_machines(output, std::slice::from_ref(m))?,
    }
    if let (Output::Table, Some(err)) = (output, &m.error_message) {
        println!("error: {err}");
    }
    Ok(())
}

pub(crate) async fn run(args: MachinesArgs) -> anyhow::Result<i32> {
    let (hf, out) = args.api.client();
    match args.command {
        MachinesCommand::Create {
            name,
            vcpu_count,
            mem_size_mib,
            runtime,
            exposed_ports,
            dns,
            egress,
            kernel,
            rootfs,
            kernel_args,
            volumes,
            disk_size_mib,
            env,
            image,
            image_size_mib,
            entrypoint,
            cmd,
            restart,
            registry_user,
            settings,
            spawn_max_children,
            spawn_max_vcpu,
            spawn_max_mem,
            node,
            node_selector,
            start,
        } => {
            let mut selector = std::collections::BTreeMap::new();
            for pair in &node_selector {
                let (k, v) =
                    pair.split_once('=').ok_or_else(|| anyhow::anyhow!("--node-selector '{pair}' is not key=value"))?;
                selector.insert(k.to_string(), v.to_string());
            }
            let network = (!dns.is_empty() || egress.is_some()).then(|| -> anyhow::Result<NetworkOptions> {
                Ok(NetworkOptions {
                    dns: (!dns.is_empty()).then_some(dns),
                    egress: egress.as_deref().map(parse_egress).transpose()?,
                })
            });
            let req = CreateMachine {
                name: Some(name),
                vcpu_count: Some(vcpu_count),
                mem_size_mib: Some(mem_size_mib),
                kernel_image_path: kernel,
                kernel_args,
                rootfs_path: rootfs,
                exposed_ports: (!exposed_ports.is_empty()).then_some(exposed_ports),
                runtime,
                network: network.transpose()?,
                env: (!env.is_empty()).then(|| env.into_iter().collect()),
                image,
                image_size_mib,
                registry_auth: registry_auth(registry_user)?,
                entrypoint: (!entrypoint.is_empty()).then_some(entrypoint),
                cmd: (!cmd.is_empty()).then_some(cmd),
                restart_policy: restart,
                volumes: (!volumes.is_empty()).then_some(volumes),
                disk_size_mib,
                labels: settings.labels(),
                secrets: settings.secrets(),
                ttl_seconds: settings.ttl,
                on_ttl: settings.on_ttl,
                idle_timeout_seconds: settings.idle_timeout,
                idle_max_connection_seconds: settings.idle_max_connection,
                auto_start: settings.auto_start,
                spawn: spawn_max_children.map(|n| hyperfleet_types::SpawnRequest {
                    max_children: Some(n),
                    max_vcpu: spawn_max_vcpu,
                    max_mem_mib: spawn_max_mem,
                }),
                inherit_env: None,
                node,
                node_selector: (!selector.is_empty()).then_some(selector),
            };
            let mut m = hf.create_machine(&req).await?;
            if m.image_status.is_some() && out == Output::Table {
                m = show_pull(&hf, m).await?;
            }
            if start {
                m = hf.start_machine(&m.id).await?;
            }
            print_one(out, &m)?;
        }
        MachinesCommand::List { status, label, limit, offset } => {
            let list = hf.list_machines(&ListOptions { status, label, limit, offset }).await?;
            if out == Output::Json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_machines(out, &list.machines)?;
                println!("({} of {} machines)", list.machines.len(), list.total);
            }
        }
        MachinesCommand::Get { id } => print_one(out, &hf.get_machine(&id).await?)?,
        MachinesCommand::Children { id } => {
            let list = hf.machine_children(&id).await?;
            if out == Output::Json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_machines(out, &list.machines)?;
            }
        }
        MachinesCommand::Start { id } => print_one(out, &hf.start_machine(&id).await?)?,
        MachinesCommand::Stop { id } => print_one(out, &hf.stop_machine(&id).await?)?,
        MachinesCommand::Restart { id } => print_one(out, &hf.restart_machine(&id).await?)?,
        MachinesCommand::Pause { id } => print_one(out, &hf.pause_machine(&id).await?)?,
        MachinesCommand::Resume { id } => print_one(out, &hf.resume_machine(&id).await?)?,
        MachinesCommand::Delete { id, force } => {
            hf.delete_machine(&id, force).await?;
            println!("deleted {id}");
        }
        MachinesCommand::Wait { id, status, timeout } => print_one(out, &hf.wait_machine(&id, status, timeout).await?)?,
        MachinesCommand::Logs { id, lines } => {
            let logs = hf.machine_logs(&id, lines).await?;
            match out {
                Output::Json => println!("{}", serde_json::to_string_pretty(&logs)?),
                Output::Table => logs.lines.iter().for_each(|l| println!("{l}")),
            }
        }
        MachinesCommand::Expose { id, ports } => print_one(
            out,
            &hf.update_machine(&id, &UpdateMachine { exposed_ports: Some(ports), ..Default::default() }).await?,
        )?,
        MachinesCommand::Set { id, settings } => {
            let req = UpdateMachine {
                labels: settings.labels(),
                secrets: settings.secrets(),
                ttl_seconds: settings.ttl,
                on_ttl: settings.on_ttl,
                idle_timeout_seconds: settings.idle_timeout,
                idle_max_connection_seconds: settings.idle_max_connection,
                auto_start: settings.auto_start,
                ..Default::default()
            };
            print_one(out, &hf.update_machine(&id, &req).await?)?
        }
        MachinesCommand::Keepalive { id } => print_one(out, &hf.keepalive(&id).await?)?,
        MachinesCommand::Shell { id, command } => return super::shell::run(&hf, &id, command).await,
        MachinesCommand::Exec { id, timeout, command } => {
            let req = ExecRequest { command: CommandArgs(command), timeout, env: None, cwd: None, stdin: None };
            let mut events = Box::pin(hf.exec_stream(&id, &req).await?);
            while let Some(ev) = events.next().await {
                match ev? {
                    ExecEvent::Stdout { data } => {
                        print!("{data}");
                        std::io::stdout().flush()?;
                    }
                    ExecEvent::Stderr { data } => eprint!("{data}"),
                    ExecEvent::Exit { exit_code, .. } => return Ok(exit_code),
                    ExecEvent::Error { code, message } => {
                        eprintln!("error: {code}: {message}");
                        return Ok(1);
                    }
                }
            }
            eprintln!("error: the stream ended without an exit code");
            return Ok(1);
        }
        MachinesCommand::Put { id, local, remote } => {
            let file = tokio::fs::File::open(&local).await?;
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
            let w = hf.upload_stream(&id, &remote, body, None).await?;
            println!("wrote {} bytes to {}", w.size, w.path);
        }
        MachinesCommand::Fetch { id, remote, local } => {
            let mut stream = Box::pin(hf.download_stream(&id, &remote).await?);
            let mut sink: Box<dyn Write> =
                if local == "-" { Box::new(std::io::stdout()) } else { Box::new(std::fs::File::create(&local)?) };
            while let Some(chunk) = stream.next().await {
                sink.write_all(&chunk?)?;
            }
        }
        MachinesCommand::Ls { id, path } => {
            let mut after: Option<String> = None;
            let mut all = Vec::new();
            loop {
                let page = hf.list_dir(&id, &path, after.as_deref(), Some(500)).await?;
                all.extend(page.entries);
                match page.next_after {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            if out == Output::Json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                for e in &all {
                    let kind = match e.kind {
                        EntryType::Dir => 'd',
                        EntryType::Symlink => 'l',
                        EntryType::File => '-',
                        EntryType::Other => '?',
                    };
                    println!("{kind} {:04o} {:>12} {} {}", e.mode, e.size, timestamp::format(e.modified_at), e.name);
                }
            }
        }
        MachinesCommand::Mkdir { id, path, parents } => {
            let st = hf.make_dir(&id, &MakeDir { path, parents, mode: None }).await?;
            println!("{} ({:04o})", st.path, st.mode);
        }
        MachinesCommand::Network { id } => {
            let report = hf.machine_network(&id).await?;
            if out == Output::Json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for c in &report.checks {
                    println!("{} {}: {}", if c.ok { "ok  " } else { "FAIL" }, c.name, c.detail);
                    if let Some(fix) = &c.fix {
                        println!("     fix: {fix}");
                    }
                }
            }
            return Ok(if report.ok { 0 } else { 1 });
        }
    }
    Ok(0)
}

fn parse_restart(s: &str) -> Result<hyperfleet_types::RestartPolicy, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("'{s}': use no, on-failure or always"))
}

/// Basic credentials from --registry-user and the HYPERFLEET_REGISTRY_PASSWORD variable (never an argument:
/// arguments show in `ps`).
pub(crate) fn registry_auth(user: Option<String>) -> anyhow::Result<Option<hyperfleet_types::RegistryAuth>> {
    let Some(username) = user else { return Ok(None) };
    let password = std::env::var("HYPERFLEET_REGISTRY_PASSWORD")
        .map_err(|_| anyhow::anyhow!("--registry-user needs the password in HYPERFLEET_REGISTRY_PASSWORD"))?;
    Ok(Some(hyperfleet_types::RegistryAuth { username: Some(username), password: Some(password), token: None }))
}

/// Shows an image machine's pull as a progress bar until its image is ready (or failed).
async fn show_pull(hf: &hyperfleet_client::Client, mut m: Machine) -> anyhow::Result<Machine> {
    use hyperfleet_types::ImagePhase;
    let bar = indicatif::ProgressBar::new(0).with_message(m.spec.image.clone().unwrap_or_default());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    while let Some(st) = m.image_status.clone() {
        bar.set_length(st.bytes_total);
        bar.set_position(st.bytes_done);
        match st.phase {
            ImagePhase::Ready => break,
            ImagePhase::Failed => {
                bar.abandon();
                anyhow::bail!("pulling {}: {}", m.spec.image.unwrap_or_default(), st.error.unwrap_or_default());
            }
            ImagePhase::Converting => bar.set_message("converting"),
            ImagePhase::Pulling => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        m = hf.get_machine(&m.id).await?;
    }
    bar.finish_and_clear();
    Ok(m)
}
