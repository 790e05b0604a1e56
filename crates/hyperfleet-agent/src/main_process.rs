//! The machine's main process: read from `/.hyperfleet/main.json` at boot, started with its env, working
//! directory and user, its output going to the agent's own (the machine's console), restarted per its
//! policy; when it ends for good the agent prints the exit line the daemon reads and shuts the machine down.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use hyperfleet_agent_proto::main_process::{EXIT_MARKER, MAX_SPEC_BYTES, MainProcess, Restart, SPEC_PATH};

use crate::reaper::Reaper;

/// The spec, if this machine has a main process; a spec that cannot be read is reported and ignored.
pub fn load() -> Option<MainProcess> {
    let file = std::fs::File::open(SPEC_PATH).ok()?;
    let mut text = String::new();
    if let Err(e) = file.take(MAX_SPEC_BYTES).read_to_string(&mut text) {
        eprintln!("hyperfleet-agent: read {SPEC_PATH}: {e}");
        return None;
    }
    match serde_json::from_str::<MainProcess>(&text) {
        Ok(spec) if !spec.argv.is_empty() => Some(spec),
        Ok(_) => None,
        Err(e) => {
            eprintln!("hyperfleet-agent: {SPEC_PATH}: {e}");
            None
        }
    }
}

/// Runs the main process until its restart policy says it is over, then reports its last exit code and
/// asks the agent to shut down.
pub async fn supervise(reaper: Arc<Reaper>, spec: MainProcess, shutdown: tokio::sync::mpsc::Sender<()>) {
    let mut delay = Duration::from_millis(100);
    let code = loop {
        let code = match run_once(&reaper, &spec) {
            Ok(rx) => rx.await.unwrap_or(255),
            Err(e) => {
                eprintln!("hyperfleet-agent: cannot start {:?}: {e}", spec.argv[0]);
                127
            }
        };
        let again = match spec.restart {
            Restart::No => false,
            Restart::OnFailure => code != 0,
            Restart::Always => true,
        };
        if !again {
            break code;
        }
        eprintln!("hyperfleet-agent: main process exited with {code}; restarting in {delay:?}");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    };
    println!("{EXIT_MARKER}{code}");
    // Fails only when the agent is stopping already.
    let _ = shutdown.send(()).await;
}

fn run_once(reaper: &Reaper, spec: &MainProcess) -> std::io::Result<tokio::sync::oneshot::Receiver<i32>> {
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..]).env_clear().stdin(Stdio::null()).stdout(Stdio::inherit()).stderr(Stdio::inherit());
    let mut has_path = false;
    for kv in &spec.env {
        if let Some((k, v)) = kv.split_once('=') {
            has_path |= k == "PATH";
            cmd.env(k, v);
        }
    }
    if !has_path {
        cmd.env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    }
    cmd.current_dir(if spec.cwd.is_empty() { "/" } else { spec.cwd.as_str() });
    // argv[0] without a '/' is looked up in the process's PATH, not the agent's.
    if !spec.argv[0].contains('/')
        && let Some(found) = lookup(&spec.argv[0], &spec.env)
    {
        cmd = rebuild(cmd, found);
    }
    if !spec.user.is_empty() {
        let (uid, gid) = resolve_user(&spec.user)?;
        cmd.uid(uid).gid(gid);
        // std drops the supplementary groups (setgroups(0)) before it changes the uid.
    }
    reaper.spawn(&mut cmd).map(|(_, rx)| rx)
}

/// `cmd` with its program replaced (std has no setter for it): same args, env, cwd.
fn rebuild(cmd: Command, program: OsString) -> Command {
    let mut out = Command::new(program);
    out.args(cmd.get_args());
    out.env_clear();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            out.env(k, v);
        }
    }
    if let Some(dir) = cmd.get_current_dir() {
        out.current_dir(dir);
    }
    out.stdin(Stdio::null()).stdout(Stdio::inherit()).stderr(Stdio::inherit());
    out
}

fn lookup(name: &str, env: &[String]) -> Option<OsString> {
    let path = env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':').map(|d| std::path::Path::new(d).join(name)).find(|p| p.is_file()).map(|p| p.into_os_string())
}

/// `user[:group]` by name (from /etc/passwd, /etc/group) or number.
fn resolve_user(spec: &str) -> std::io::Result<(u32, u32)> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && (f[0] == user || f[2] == user));
    let uid = match user.parse::<u32>() {
        Ok(n) => n,
        Err(_) => entry
            .as_ref()
            .and_then(|f| f[2].parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("unknown user '{user}'")))?,
    };
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => std::fs::read_to_string("/etc/group")
                .unwrap_or_default()
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() > 2 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("unknown group '{g}'")))?,
        },
        None => entry.as_ref().and_then(|f| f[3].parse().ok()).unwrap_or(uid),
    };
    Ok((uid, gid))
}
