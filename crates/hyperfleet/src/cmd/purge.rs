//! `hyperfleet purge`: leaves the host as if Hyperfleet had never run a machine on it (stop the daemon
//! first; it would rebuild what this removes).

use std::sync::Arc;

use crate::config::ServeArgs;
use crate::store::Store;

pub async fn run(args: ServeArgs) -> anyhow::Result<i32> {
    let settings = Arc::new(args.validate()?);
    let store = Store::open(&settings.database_path)?;
    let service = super::serve::build_service(settings, store)?;
    let stopped = service.purge_host().await?;
    println!(
        "stopped {} machine(s); removed hyperfleet's interfaces, namespaces, firewall table and route",
        stopped.len()
    );
    Ok(0)
}
