//! hyperfleet: `serve` runs the daemon; `machines`, `keys`, `doctor`, `purge` and `openapi` are the CLI.

use clap::Parser;

#[tokio::main]
async fn main() {
    match hyperfleet::run(hyperfleet::Cli::parse()).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
