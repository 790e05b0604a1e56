//! `hyperfleet nodes ls|drain|undrain`: the fleet's nodes through the SDK.

use clap::{Args, Subcommand};

use super::{ApiArgs, Output, print_table};

#[derive(Args, Debug)]
pub struct NodesArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: NodesCommand,
}

#[derive(Subcommand, Debug)]
enum NodesCommand {
    /// List the fleet's nodes: status, capacity, what their machines reserve.
    #[command(alias = "list")]
    Ls,
    /// Give a node no new machines (its machines keep running and are served).
    Drain { name: String },
    /// Let placement choose a drained node again.
    Undrain { name: String },
}

pub(crate) async fn run(args: NodesArgs) -> anyhow::Result<i32> {
    let (hf, out) = args.api.client();
    let nodes = match args.command {
        NodesCommand::Ls => hf.list_nodes().await?.nodes,
        NodesCommand::Drain { name } => vec![hf.drain_node(&name).await?],
        NodesCommand::Undrain { name } => vec![hf.undrain_node(&name).await?],
    };
    if out == Output::Json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let ratio = n.overcommit.unwrap_or(1.0);
            vec![
                n.name.clone(),
                n.status.to_string(),
                n.machines.to_string(),
                format!("{}/{}", n.used_vcpus, (f64::from(n.vcpus) * ratio).floor()),
                format!("{}/{}", n.used_mem_size_mib, (n.mem_size_mib as f64 * ratio).floor()),
                n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
                format!("{:.1}s", n.heartbeat_age_ms as f64 / 1000.0),
                n.url.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print_table(&["NAME", "STATUS", "MACHINES", "VCPU", "MEM MIB", "LABELS", "HEARTBEAT", "URL"], &rows);
    Ok(0)
}
