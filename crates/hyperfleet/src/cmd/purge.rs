//! `hyperfleet purge`: leaves the host as if Hyperfleet had never run a machine on it (stop the daemon
//! first; it would rebuild what this removes).

use clap::Args;

use crate::config::{NetworkArgs, RuntimeArgs, Settings, StoreArgs};
use crate::store::Store;

/// What purging touches: the database's machines, their processes and files, the host network.
#[derive(Args, Debug)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub network: NetworkArgs,
}

pub(crate) async fn run(args: PurgeArgs) -> anyhow::Result<i32> {
    let settings =
        Settings::without_serving(args.store.validate()?, args.runtime.validate()?, args.network.validate()?)?;
    let store = Store::open(&settings.store.database_path)?;
    let service = super::serve::build_service(&settings, store).await?;
    let stopped = service.purge_host().await?;
    println!(
        "stopped {} machine(s); removed hyperfleet's interfaces, namespaces, firewall table and route",
        stopped.len()
    );
    Ok(0)
}
