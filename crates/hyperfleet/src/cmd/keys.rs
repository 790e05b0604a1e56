//! `hyperfleet keys create|list|revoke`: key management on the database file, for bootstrapping and for
//! recovering access without a running daemon.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use hyperfleet_types::{CreateApiKey, Scope, timestamp};
use time::OffsetDateTime;

use super::{Output, print_table};
use crate::keys::{Grantor, KeyError, Keys};
use crate::store::{Location, Store};

#[derive(Args, Debug)]
pub struct KeysArgs {
    #[arg(long, env = "DATABASE_PATH", default_value = "./hyperfleet.db", global = true)]
    database_path: PathBuf,
    /// The database as a URL (`postgres://…` or `sqlite://PATH`); overrides DATABASE_PATH.
    #[arg(long = "database", env = "DATABASE_URL", global = true)]
    database_url: Option<String>,
    #[arg(long, value_enum, default_value = "table", global = true)]
    output: Output,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Create a key and print it (shown only this once).
    Create {
        #[arg(long)]
        name: String,
        /// machines:read, machines:write, machines:exec, keys:admin, metrics:read, webhooks:admin or * (repeat for several).
        #[arg(long = "scope", required = true, value_parser = parse_scope)]
        scopes: Vec<Scope>,
        /// Expiry: an RFC 3339 time, or a duration from now such as 30d, 12h, 90m.
        #[arg(long)]
        expires: Option<String>,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key by id.
    Revoke { id: String },
}

fn parse_scope(s: &str) -> Result<Scope, String> {
    Scope::parse(s).ok_or_else(|| {
        format!("unknown scope '{s}': use machines:read, machines:write, machines:exec, keys:admin, metrics:read, webhooks:admin or *")
    })
}

/// `30d`, `12h`, `90m` from now, or an RFC 3339 time.
fn parse_expiry(s: &str) -> Result<OffsetDateTime, String> {
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let secs = match (num.parse::<i64>(), unit) {
        (Ok(n), "d") => Some(n * 86_400),
        (Ok(n), "h") => Some(n * 3600),
        (Ok(n), "m") => Some(n * 60),
        _ => None,
    };
    match secs {
        Some(secs) => OffsetDateTime::now_utc()
            .checked_add(time::Duration::seconds(secs))
            .ok_or_else(|| format!("--expires {s} is too far in the future")),
        None => timestamp::parse(s)
            .ok_or_else(|| format!("--expires must be an RFC 3339 time or a duration such as 30d, got '{s}'")),
    }
}

fn time_or(t: Option<OffsetDateTime>, none: &str) -> String {
    t.map_or_else(|| none.to_string(), timestamp::format)
}

/// The root user on the host may create any key (no escalation check: [`Grantor::Host`]); a revoke written
/// here reaches a running daemon within [`crate::keys::CACHE_TTL`].
pub(crate) async fn run(args: KeysArgs) -> anyhow::Result<i32> {
    let location = match &args.database_url {
        Some(url) => Location::parse(url).map_err(anyhow::Error::msg)?,
        None => Location::Sqlite(crate::config::absolute(&args.database_path)),
    };
    let keys = Keys::new(Store::open(&location).await?);
    match args.command {
        KeysCommand::Create { name, scopes, expires } => {
            let expires_at = expires.map(|e| parse_expiry(&e)).transpose().map_err(anyhow::Error::msg)?;
            let made = keys.create(CreateApiKey { name, scopes, expires_at }, Grantor::Host).await?;
            match args.output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&hyperfleet_types::CreatedApiKey {
                        key: made.secret,
                        api_key: made.key
                    })?
                ),
                Output::Table => println!("{}", made.secret),
            }
        }
        KeysCommand::List => {
            let keys = keys.list().await?;
            match args.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&keys)?),
                Output::Table => {
                    let rows: Vec<Vec<String>> = keys
                        .iter()
                        .map(|k| {
                            vec![
                                k.id.clone(),
                                k.name.clone(),
                                k.key_prefix.clone(),
                                k.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(","),
                                time_or(k.expires_at, "never"),
                                time_or(k.last_used_at, "-"),
                                if k.revoked_at.is_some() { "revoked".into() } else { "active".into() },
                            ]
                        })
                        .collect();
                    print_table(&["ID", "NAME", "PREFIX", "SCOPES", "EXPIRES", "LAST USED", "STATE"], &rows);
                }
            }
        }
        KeysCommand::Revoke { id } => match keys.revoke(&id).await {
            Ok(_) => println!("revoked {id}"),
            Err(e @ KeyError::NotFound(_)) => {
                eprintln!("error: {e}");
                return Ok(1);
            }
            Err(e) => return Err(e.into()),
        },
    }
    Ok(0)
}
