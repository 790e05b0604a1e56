//! A throwaway PostgreSQL server for tests and benchmarks (not used by the daemon): Debian's `postgresql`
//! package, a cluster in a directory the caller owns, stopped when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where Debian installs the PostgreSQL 15 server programs (`HYPERFLEET_PG_BIN` overrides).
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL server of its own: `initdb` into a temp dir as an unprivileged user (PostgreSQL refuses to
/// run as root; CI runs as root, so `nobody` then), listening on a free loopback port and a unix socket in
/// that dir. Trust authentication: only this host's loopback reaches it, for the test's lifetime.
pub struct PgCluster {
    data: PathBuf,
    log: PathBuf,
    port: u16,
    bin: PathBuf,
    /// The server options it was started with (port, socket dir, durability), for a start after a stop.
    opts: String,
}

/// How much durability the cluster keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// No fsync at all: for tests, whose data dies with them.
    None,
    /// fsync on, commits acknowledged before their WAL is flushed (`synchronous_commit=off`): a crash loses
    /// the last moments but never corrupts; the same promise as SQLite's WAL with `synchronous=NORMAL`, which
    /// is what benchmarks compare it with.
    LikeSqliteWal,
}

impl PgCluster {
    pub fn start(dir: &Path, durability: Durability) -> Result<Self, String> {
        let bin = PathBuf::from(std::env::var("HYPERFLEET_PG_BIN").unwrap_or_else(|_| PG_BIN.into()));
        if !bin.join("initdb").exists() {
            return Err(format!(
                "needs postgresql: {} not found; install Debian's `postgresql` package (scripts/setup.sh does)",
                bin.join("initdb").display()
            ));
        }
        if nix::unistd::geteuid().is_root() {
            // The dir is root's: the server's user must own it.
            let nobody = nix::unistd::User::from_name("nobody")
                .map_err(|e| e.to_string())?
                .ok_or("no user nobody to run PostgreSQL as")?;
            nix::unistd::chown(dir, Some(nobody.uid), Some(nobody.gid)).map_err(|e| format!("chown: {e}"))?;
        }
        let data = dir.join("pgdata");
        let out = pg_command(&bin, "initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "hyperfleet", "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"])
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!("initdb: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let log = dir.join("postgres.log");
        let durability = match durability {
            Durability::None => "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            Durability::LikeSqliteWal => "-c synchronous_commit=off",
        };
        // A free port: another test may take it between here and the server's bind, so retry a few times.
        for _ in 0..4 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("find a free port: {e}"))?
                .port();
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=100 {durability}",
                dir.display()
            );
            let started = pg_command(&bin, "pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "30", "-o", &opts, "start"])
                .output()
                .map_err(|e| format!("pg_ctl: {e}"))?;
            if started.status.success() {
                return Ok(Self { data, log, port, bin, opts });
            }
        }
        Err(format!("pg_ctl start failed: {}", std::fs::read_to_string(&log).unwrap_or_default()))
    }

    /// The URL of database `db` (`postgres` exists from the start).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://hyperfleet@127.0.0.1:{}/{db}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `pg_ctl restart` (fast shutdown: open connections are cut), as an operator's restart or a failover is.
    pub fn restart(&self) -> Result<(), String> {
        self.pg_ctl(&["-m", "fast", "-w", "-t", "30", "restart"])
    }

    /// `pg_ctl stop` (fast: open connections are cut): the database is down until [`Self::resume`].
    pub fn stop(&self) -> Result<(), String> {
        self.pg_ctl(&["-m", "fast", "-w", "-t", "30", "stop"])
    }

    /// Starts the cluster again after [`Self::stop`], on the same port.
    pub fn resume(&self) -> Result<(), String> {
        self.pg_ctl(&["-w", "-t", "30", "-o", &self.opts, "start"])
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let out = pg_command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(args)
            // The new server must not hold our pipes: its output goes to the log, and nothing is read here.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .output()
            .map_err(|e| format!("pg_ctl: {e}"))?;
        if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let stopped =
            pg_command(&self.bin, "pg_ctl").arg("-D").arg(&self.data).args(["-m", "immediate", "-w", "stop"]).output();
        if !stopped.is_ok_and(|o| o.status.success()) {
            eprintln!("could not stop the test PostgreSQL cluster in {}", self.data.display());
        }
    }
}

/// `program` of the PostgreSQL server, run as `nobody` when this is root (the server refuses root).
fn pg_command(bin: &Path, program: &str) -> Command {
    if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]).arg(bin.join(program));
        c
    } else {
        Command::new(bin.join(program))
    }
}
