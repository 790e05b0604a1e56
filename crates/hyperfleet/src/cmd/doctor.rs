//! `hyperfleet doctor`: runs the checks and exits non-zero when something is wrong.

use hyperfleet_types::MachineStatus;

use crate::config::ServeArgs;
use crate::store::Store;

pub async fn run(args: ServeArgs) -> anyhow::Result<i32> {
    let settings = std::sync::Arc::new(args.validate()?);
    let running = if settings.database_path.exists() {
        let store = Store::open(&settings.database_path)?;
        let service = super::serve::build_service(settings.clone(), store)?;
        Some(service.with_status(&[MachineStatus::Running]).await?)
    } else {
        None
    };
    let (report, ok) = crate::doctor::run(&settings, running).await?;
    print!("{report}");
    println!("{}", if ok { "everything looks fine" } else { "some checks failed: see the fix lines above" });
    Ok(if ok { 0 } else { 1 })
}
