//! `hyperfleet volumes …`: the volume endpoints through the SDK.

use clap::{Args, Subcommand};
use hyperfleet_types::{CloneVolume, CreateVolume, ResizeVolume, Volume};

use super::{ApiArgs, Output, print_table};

#[derive(Args, Debug)]
pub struct VolumesArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: VolumesCommand,
}

#[derive(Subcommand, Debug)]
enum VolumesCommand {
    /// List volumes and the machines that use them.
    Ls,
    /// Create an empty ext4 volume.
    Create {
        name: String,
        /// Size in MiB.
        #[arg(long = "size")]
        size_mib: i64,
    },
    /// Grow a volume no machine holds.
    Resize {
        id: String,
        #[arg(long = "size")]
        size_mib: i64,
    },
    /// Copy a volume to a new one.
    Clone { id: String, name: String },
    /// Delete a volume (and its data) that no machine names.
    Rm { id: String },
}

fn print_volumes(out: Output, list: &[Volume]) -> anyhow::Result<()> {
    if out == Output::Json {
        println!("{}", serde_json::to_string_pretty(list)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|v| {
            let users: Vec<String> = v
                .machines
                .iter()
                .map(|u| {
                    format!(
                        "{}{}{}",
                        u.machine_id,
                        if u.read_only { ":ro" } else { "" },
                        if u.attached { "*" } else { "" }
                    )
                })
                .collect();
            vec![v.id.clone(), v.name.clone(), format!("{} MiB", v.size_mib), users.join(",")]
        })
        .collect();
    print_table(&["ID", "NAME", "SIZE", "MACHINES (* attached)"], &rows);
    Ok(())
}

pub(crate) async fn run(args: VolumesArgs) -> anyhow::Result<i32> {
    let (hf, out) = args.api.client();
    match args.command {
        VolumesCommand::Ls => print_volumes(out, &hf.list_volumes().await?.volumes)?,
        VolumesCommand::Create { name, size_mib } => {
            let v = hf.create_volume(&CreateVolume { name: Some(name), size_mib: Some(size_mib) }).await?;
            print_volumes(out, &[v])?;
        }
        VolumesCommand::Resize { id, size_mib } => {
            print_volumes(out, &[hf.resize_volume(&id, &ResizeVolume { size_mib: Some(size_mib) }).await?])?;
        }
        VolumesCommand::Clone { id, name } => {
            print_volumes(out, &[hf.clone_volume(&id, &CloneVolume { name: Some(name) }).await?])?;
        }
        VolumesCommand::Rm { id } => hf.delete_volume(&id).await?,
    }
    Ok(0)
}
