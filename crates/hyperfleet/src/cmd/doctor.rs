//! `hyperfleet doctor`: runs the checks and exits non-zero when something is wrong.

use crate::config::ServeArgs;

pub async fn run(args: ServeArgs) -> anyhow::Result<i32> {
    let settings = args.validate()?;
    let (report, ok) = crate::doctor::run(&settings).await?;
    print!("{report}");
    println!("{}", if ok { "everything looks fine" } else { "some checks failed: see the fix lines above" });
    Ok(if ok { 0 } else { 1 })
}
