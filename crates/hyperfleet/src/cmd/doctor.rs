//! `hyperfleet doctor`: runs the checks and exits non-zero when something is wrong.

use clap::Args;

use crate::config::{NetworkArgs, RuntimeArgs, StoreArgs};

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

pub async fn run(args: DoctorArgs) -> anyhow::Result<i32> {
    let (store, runtime, network) = (args.store.validate()?, args.runtime.validate()?, args.network.validate()?);
    let (report, ok) = crate::doctor::run(&store, &runtime, &network).await?;
    print!("{report}");
    println!("{}", if ok { "everything looks fine" } else { "some checks failed: see the fix lines above" });
    Ok(if ok { 0 } else { 1 })
}
