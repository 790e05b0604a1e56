//! `hyperfleet events`: follows the daemon's machine events (`GET /events`) and prints one line each.

use clap::Args;
use futures::StreamExt;
use hyperfleet_client::Client;
use hyperfleet_types::{Event, EventKind};

use super::Output;

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// API base URL.
    #[arg(long, env = "HYPERFLEET_URL", default_value = "http://127.0.0.1:3000")]
    url: String,
    #[arg(long, env = "HYPERFLEET_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
    /// Only this machine's events (name or id).
    #[arg(long)]
    machine: Option<String>,
    /// Only these event types (repeatable): created, starting, running, stopped, failed, exec.finished, …
    #[arg(long = "type", value_parser = parse_kind)]
    types: Vec<EventKind>,
    /// Start after this event id (the stored events since are printed first).
    #[arg(long)]
    since: Option<u64>,
}

fn parse_kind(s: &str) -> Result<EventKind, String> {
    EventKind::parse(s).ok_or_else(|| {
        let all: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
        format!("'{s}' is not one of {}", all.join(", "))
    })
}

fn line(e: &Event) -> String {
    let mut detail = Vec::new();
    if let Some(s) = e.status {
        detail.push(format!("status={s}"));
    }
    if let Some(p) = &e.program {
        detail.push(format!("program={p}"));
    }
    if let Some(c) = e.exit_code {
        detail.push(format!("exit_code={c}"));
    }
    if let Some(d) = e.duration_ms {
        detail.push(format!("duration_ms={d}"));
    }
    if let Some(p) = &e.path {
        detail.push(format!("path={p}"));
    }
    if let Some(p) = e.port {
        detail.push(format!("port={p}"));
    }
    if let Some(r) = &e.reason {
        detail.push(format!("reason={r:?}"));
    }
    format!(
        "{:<6} {} {:<14} {} ({}) {}",
        e.id,
        hyperfleet_types::timestamp::format(e.at),
        e.kind.as_str(),
        e.machine_name,
        e.machine_id,
        detail.join(" ")
    )
}

/// Runs until the daemon closes the stream (exit 0) or an error (exit 1).
pub(crate) async fn run(args: EventsArgs) -> anyhow::Result<i32> {
    let client = Client::new(&args.url, args.api_key);
    let mut events = Box::pin(client.events(args.machine.as_deref(), &args.types, args.since).await?);
    while let Some(e) = events.next().await {
        let e = e?;
        match args.output {
            Output::Json => println!("{}", serde_json::to_string(&e)?),
            Output::Table => println!("{}", line(&e).trim_end()),
        }
    }
    Ok(0)
}
