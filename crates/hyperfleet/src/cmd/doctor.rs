//! `hyperfleet doctor`: runs the checks and exits non-zero when something is wrong.

use hyperfleet_types::MachineStatus;

use crate::config::HostArgs;
use crate::store::Store;

pub(crate) async fn run(args: HostArgs) -> anyhow::Result<i32> {
    let settings = args.settings()?;
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
