//! The command-line interface: one module per command.

pub(crate) mod doctor;
pub(crate) mod events;
pub(crate) mod images;
pub(crate) mod keys;
pub(crate) mod machines;
pub(crate) mod nodes;
pub(crate) mod purge;
pub(crate) mod serve;
pub(crate) mod shell;
pub(crate) mod volumes;

use clap::{Parser, Subcommand, ValueEnum};

/// Logs to stderr, as text or JSON lines (`HYPERFLEET_LOG_FORMAT`), filtered by `RUST_LOG` (default `info`).
/// Request lines have the target `hyperfleet::request`: `RUST_LOG=info,hyperfleet::request=warn` turns
/// them off.
fn init_logging(format: crate::config::LogFormat) {
    // netlink-packet-route warns about every attribute newer than itself; that is noise for users.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,netlink_packet_route=error".into());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        crate::config::LogFormat::Text => fmt.init(),
        crate::config::LogFormat::Json => fmt.json().flatten_event(true).init(),
    }
}

/// Runs one command; the exit code on success.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(args) => {
            // Before the settings are validated, so that what is wrong with them is logged in the format asked for.
            let format = match args.api.log_format.as_str() {
                "json" => crate::config::LogFormat::Json,
                _ => crate::config::LogFormat::Text,
            };
            init_logging(format);
            serve::run(*args).await.map(|()| 0)
        }
        Command::Machines(args) => machines::run(args).await,
        Command::Images(args) => images::run(args).await,
        Command::Events(args) => events::run(args).await,
        Command::Keys(args) => keys::run(args).await,
        Command::Volumes(args) => volumes::run(args).await,
        Command::Nodes(args) => nodes::run(args).await,
        Command::Doctor(args) => doctor::run(args).await,
        Command::Purge(args) => purge::run(args).await,
        Command::Openapi => {
            println!("{}", crate::api::openapi_json());
            Ok(0)
        }
    }
}

#[derive(Parser, Debug)]
#[command(name = "hyperfleet", version, about = "Firecracker microVM orchestrator: daemon and CLI")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: REST API (PORT, default 3000) and reverse proxy (PROXY_PORT, default 4000).
    Serve(Box<crate::config::ServeArgs>),
    /// Manage machines through the API (HYPERFLEET_URL, HYPERFLEET_API_KEY).
    Machines(machines::MachinesArgs),
    /// Manage the daemon's image cache (ls, pull, rm) through the API.
    Images(images::ImagesArgs),
    /// Manage volumes through the API (HYPERFLEET_URL, HYPERFLEET_API_KEY).
    Volumes(volumes::VolumesArgs),
    /// The fleet's nodes: list, drain, undrain (HYPERFLEET_URL, HYPERFLEET_API_KEY).
    Nodes(nodes::NodesArgs),
    /// Follow machine events as they happen (HYPERFLEET_URL, HYPERFLEET_API_KEY).
    Events(events::EventsArgs),
    /// Manage API keys directly in the database (DATABASE_PATH); works without a running daemon.
    Keys(keys::KeysArgs),
    /// Check the host and every running machine's network; print what is wrong and how to fix it.
    Doctor(crate::config::HostArgs),
    /// Stop every machine and remove everything Hyperfleet made on this host (TAPs, veths, namespaces,
    /// containers, the nftables table, the subnet route). Machine records and disks are kept.
    Purge(crate::config::HostArgs),
    /// Print the OpenAPI document.
    Openapi,
}

/// Where the API is and how to print its answers: shared by the commands that are API clients.
#[derive(clap::Args, Debug)]
pub(crate) struct ApiArgs {
    /// API base URL.
    #[arg(long, env = "HYPERFLEET_URL", default_value = "http://127.0.0.1:3000", global = true)]
    url: String,
    #[arg(long, env = "HYPERFLEET_API_KEY", global = true, hide_env_values = true)]
    api_key: Option<String>,
    #[arg(long, value_enum, default_value = "table", global = true)]
    output: Output,
}

impl ApiArgs {
    pub(crate) fn client(&self) -> (hyperfleet_client::Client, Output) {
        (hyperfleet_client::Client::new(&self.url, self.api_key.clone()), self.output)
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Output {
    Table,
    Json,
}

/// Prints rows as aligned columns.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(header.to_vec()));
    for r in rows {
        println!("{}", line(r.iter().map(String::as_str).collect()));
    }
}
