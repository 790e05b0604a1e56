//! `hyperfleet images ls|pull|rm`: the daemon's image cache through the SDK.

use clap::{Args, Subcommand};
use hyperfleet_types::PullImage;

use super::{ApiArgs, Output, print_table};

#[derive(Args, Debug)]
pub struct ImagesArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: ImagesCommand,
}

#[derive(Subcommand, Debug)]
enum ImagesCommand {
    /// List cached images.
    #[command(alias = "list")]
    Ls,
    /// Pull an image into the cache (returns when it is cached).
    Pull {
        image: String,
        /// Registry user; the password is read from HYPERFLEET_REGISTRY_PASSWORD.
        #[arg(long)]
        registry_user: Option<String>,
    },
    /// Remove a cached image (refused while machines were created from it).
    #[command(alias = "delete")]
    Rm { digest: String },
}

pub(crate) async fn run(args: ImagesArgs) -> anyhow::Result<i32> {
    let (hf, out) = args.api.client();
    match args.command {
        ImagesCommand::Ls => {
            let list = hf.list_images().await?;
            if out == Output::Json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let rows: Vec<Vec<String>> = list
                    .images
                    .iter()
                    .map(|i| {
                        vec![
                            i.digest.chars().take(19).collect(),
                            i.references.join(","),
                            format!("{:.1} MiB", i.size_bytes as f64 / 1048576.0),
                            i.machines.len().to_string(),
                            hyperfleet_types::timestamp::format(i.last_used),
                        ]
                    })
                    .collect();
                print_table(&["DIGEST", "REFERENCES", "SIZE", "MACHINES", "LAST USED"], &rows);
            }
        }
        ImagesCommand::Pull { image, registry_user } => {
            let auth = super::machines::registry_auth(registry_user)?;
            let bar = indicatif::ProgressBar::new_spinner().with_message(format!("pulling {image}"));
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            let info = hf.pull_image(&PullImage { image, registry_auth: auth }).await;
            bar.finish_and_clear();
            let info = info?;
            if out == Output::Json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("{}", info.digest);
            }
        }
        ImagesCommand::Rm { digest } => hf.delete_image(&digest).await?,
    }
    Ok(0)
}
