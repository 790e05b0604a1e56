//! `hyperfleet doctor`: runs the checks and exits non-zero when something is wrong.

use hyperfleet_types::MachineStatus;

use crate::config::HostArgs;
use crate::doctor::check;
use crate::store::{Location, Store};

pub(crate) async fn run(args: HostArgs) -> anyhow::Result<i32> {
    let settings = args.settings()?;
    let location = &settings.store.database;
    let (database, running) = match location {
        Location::Sqlite(p) if !p.exists() => {
            (check("database", true, format!("{}: not created yet (no machines yet)", location.describe()), None), None)
        }
        _ => match Store::open(location).await {
            Ok(store) => {
                let service = super::serve::build_service(&settings, store).await?;
                let running = service.with_status(&[MachineStatus::Running]).await?;
                let detail = format!(
                    "{} backend: {} (reachable, schema up to date)",
                    location.backend().as_str(),
                    location.describe()
                );
                (check("database", true, detail, None), Some(running))
            }
            Err(e) => (
                check(
                    "database",
                    false,
                    format!("{} backend: {}: {e}", location.backend().as_str(), location.describe()),
                    Some("check DATABASE_URL / DATABASE_PATH, and that the database server is up"),
                ),
                None,
            ),
        },
    };
    let (report, ok) = crate::doctor::run(&settings, database, running).await?;
    print!("{report}");
    println!("{}", if ok { "everything looks fine" } else { "some checks failed: see the fix lines above" });
    Ok(if ok { 0 } else { 1 })
}
