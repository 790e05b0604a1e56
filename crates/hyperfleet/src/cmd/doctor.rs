//! `hyperfleet doctor`: runs the checks and exits non-zero when something is wrong.

use clap::Args;
use hyperfleet_types::MachineStatus;

use crate::config::{NetworkArgs, RuntimeArgs, Settings, StoreArgs};
use crate::store::Store;

/// What the checks look at: the database's machines, the runtime's binaries and assets, the host network.
#[derive(Args, Debug)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub network: NetworkArgs,
}

pub(crate) async fn run(args: DoctorArgs) -> anyhow::Result<i32> {
    let settings =
        Settings::without_serving(args.store.validate()?, args.runtime.validate()?, args.network.validate()?)?;
    let running = if settings.store.database_path.exists() {
        let store = Store::open(&settings.store.database_path)?;
        let service = super::serve::build_service(&settings, store).await?;
        Some(service.with_status(&[MachineStatus::Running]).await?)
    } else {
        None
    };
    let (report, ok) = crate::doctor::run(&settings, running).await?;
    print!("{report}");
    println!("{}", if ok { "everything looks fine" } else { "some checks failed: see the fix lines above" });
    Ok(if ok { 0 } else { 1 })
}
