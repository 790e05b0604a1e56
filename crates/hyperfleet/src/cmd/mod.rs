//! The command-line interface: one module per command.

pub(crate) mod doctor;
pub(crate) mod images;
pub(crate) mod keys;
pub(crate) mod machines;
pub(crate) mod purge;
pub(crate) mod serve;

use clap::{Parser, Subcommand, ValueEnum};

fn init_logging() {
    // netlink-packet-route warns about every attribute newer than itself; that is noise for users.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,netlink_packet_route=error".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// Runs one command; the exit code on success.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(args) => {
            init_logging();
            serve::run(*args).await.map(|()| 0)
        }
        Command::Machines(args) => machines::run(args).await,
        Command::Images(args) => images::run(args).await,
        Command::Keys(args) => keys::run(args).await,
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
