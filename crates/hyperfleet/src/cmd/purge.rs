//! `hyperfleet purge`: leaves the host as if Hyperfleet had never run a machine on it (stop the daemon
//! first; it would rebuild what this removes).

use crate::config::HostArgs;
use crate::store::Store;

pub(crate) async fn run(args: HostArgs) -> anyhow::Result<i32> {
    let settings = args.settings()?;
    let store = Store::open(&settings.store.database).await?;
    let service = super::serve::build_service(&settings, store).await?;
    let stopped = service.purge_host().await?;
    println!(
        "stopped {} machine(s); removed hyperfleet's interfaces, namespaces, firewall table and route",
        stopped.len()
    );
    Ok(0)
}
