//! hyperfleet: `serve` runs the daemon; `machines`, `keys`, `doctor` and `openapi` are the CLI.

use clap::Parser;
use hyperfleet::cmd::{self, Cli, Command};

fn init_logging() {
    // netlink-packet-route warns about every attribute newer than itself; that is noise for users.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,netlink_packet_route=error".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            init_logging();
            cmd::serve::run(args).await.map(|_| 0)
        }
        Command::Machines(args) => cmd::machines::run(args).await,
        Command::Keys(args) => cmd::keys::run(args).await,
        Command::Doctor(args) => cmd::doctor::run(args).await,
        Command::Purge(args) => cmd::purge::run(args).await,
        Command::Openapi => {
            println!("{}", hyperfleet::api::openapi_json());
            Ok(0)
        }
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
