//! Exec and file transfer in a running machine, through its guest agent (vsock for Firecracker, a unix
//! socket for containers). While a machine boots, requests wait for its agent within their timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use hyperfleet_agent_proto::client::{AgentClient, ClientError, ExecSession, FileReader};
use hyperfleet_agent_proto::{self as proto, ErrorKind, ExecSpec};
use hyperfleet_types::{
    DirEntry, DirListing, EntryType, Event, EventKind, ExecRequest, ExecResult, FileStat, FileWritten, MakeDir,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::lifecycle::instance;
use super::{Error, Host, Result, Service, events};
use crate::metrics::Operation;
use crate::store::machines::MachineRecord;

pub(super) const DEFAULT_EXEC_TIMEOUT: u64 = 30;
pub(super) const MAX_EXEC_TIMEOUT: u64 = 3600;
/// Output kept per stream by the buffered exec API.
pub(super) const EXEC_OUTPUT_CAP: u64 = 10 << 20;

pub(super) fn agent_error(e: ClientError, path: &str, max: u64) -> Error {
    match e {
        ClientError::Agent { kind: ErrorKind::NotFound, .. } => Error::FileNotFound { path: path.to_string() },
        ClientError::Agent { kind: ErrorKind::InvalidPath, message } => Error::Invalid(message),
        // The guest's own refusal (a read-only mount, a file of /proc) is the caller's to see, not a failure
        // to reach the guest.
        ClientError::Agent { kind: ErrorKind::PermissionDenied, message } => Error::Forbidden(message),
        ClientError::Agent { kind: ErrorKind::NoSpace, message } => Error::GuestDiskFull(message),
        ClientError::Agent { kind: ErrorKind::TooLarge, .. } => Error::FileTooLarge { size: None, max },
        ClientError::Agent { kind: ErrorKind::BadRequest, message } => Error::GuestRefused(message),
        other => Error::Agent(other),
    }
}

/// Linux's limits on a path (`PATH_MAX` less the NUL) and on one name in it (`NAME_MAX`).
const GUEST_PATH_MAX: usize = 4095;
const GUEST_NAME_MAX: usize = 255;

/// How the agent's refusal of a command (a terminal's, or a streamed exec's mid-stream) reads to the caller:
/// a program that cannot be started or a bad cwd is the request's fault (400).
pub(crate) fn command_error(e: ClientError) -> Error {
    match e {
        ClientError::Agent { kind: ErrorKind::SpawnFailed, message } => Error::GuestRefused(message),
        other => agent_error(other, "", 0),
    }
}

/// What is sent to the guest to start a command (argv, env with the machine's env and secrets, cwd) must fit
/// one protocol frame: past that it is refused here, not failed at the agent's door.
pub(super) fn fits_a_frame(what: &impl serde::Serialize) -> Result<()> {
    // The request's own envelope around the spec is well under this margin.
    const MAX: usize = hyperfleet_agent_proto::MAX_FRAME - 4096;
    let size = serde_json::to_vec(what).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX {
        return Err(Error::Invalid(format!(
            "the command and its environment (with the machine's env and secrets) come to {size} bytes; at most {MAX} can be sent to the guest"
        )));
    }
    Ok(())
}

/// A path in the guest a request names (`what`: "path", "cwd"): absolute, without NUL, and within the
/// kernel's limits, so a bad one is the caller's 400 rather than the guest's error.
pub(super) fn check_guest_path(what: &str, path: &str) -> Result<()> {
    if path.is_empty() {
        return Err(Error::Invalid(format!("{what} is required")));
    }
    if !path.starts_with('/') {
        return Err(Error::Invalid(format!("{what} must be an absolute path, got '{path}'")));
    }
    if path.contains('\0') {
        return Err(Error::Invalid(format!("{what} must not contain NUL bytes")));
    }
    if path.len() > GUEST_PATH_MAX {
        return Err(Error::Invalid(format!("{what} is {} bytes, at most {GUEST_PATH_MAX} allowed", path.len())));
    }
    if let Some(name) = path.split('/').find(|name| name.len() > GUEST_NAME_MAX) {
        return Err(Error::Invalid(format!(
            "{what} has a {}-byte name, at most {GUEST_NAME_MAX} bytes allowed: '{}…'",
            name.len(),
            name.chars().take(32).collect::<String>()
        )));
    }
    Ok(())
}

/// Budget bytes one byte of kept output may cost: the byte, the buffer's growth, and up to six bytes of JSON
/// escape (a control character is written as `\u0000`).
const OUTPUT_COST_PER_BYTE: usize = 8;

/// A command's share of the host-wide output budget, given back when dropped.
pub(crate) struct OutputLease(Option<OwnedSemaphorePermit>);

/// Output bytes as text, without a copy when they are valid UTF-8.
fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Commands running per machine, so one client cannot make a machine (and the daemon) run unboundedly many.
#[derive(Default)]
pub(super) struct ExecSlots(std::sync::Mutex<std::collections::HashMap<String, Arc<Semaphore>>>);

impl ExecSlots {
    pub(super) fn acquire(&self, id: &str, limit: usize) -> Result<OwnedSemaphorePermit> {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Forget machines with nothing running, so the map does not grow with every machine ever seen.
        // (Under the lock, so a semaphore is never replaced while a permit of it is being taken.)
        all.retain(|_, s| s.available_permits() < limit);
        let sem = all.entry(id.to_string()).or_insert_with(|| Arc::new(Semaphore::new(limit))).clone();
        sem.try_acquire_owned().map_err(|_| Error::TooManyExecs { id: id.to_string(), limit })
    }
}

/// A validated exec request.
pub(crate) struct ExecPlan {
    pub spec: ExecSpec,
    pub stdin: Vec<u8>,
    pub timeout: Duration,
    /// Held while the command runs (for a streamed exec: until the stream ends).
    slot: Option<OwnedSemaphorePermit>,
    /// The command is activity in its machine while it runs.
    hold: Option<super::Hold>,
    /// The `exec.started` event, once sent, and when: `exec.finished` is made from it.
    started: Option<(Event, Instant)>,
}

impl ExecPlan {
    pub(crate) fn new(req: ExecRequest, max_output: Option<u64>) -> Result<Self> {
        let secs = req.timeout.unwrap_or(DEFAULT_EXEC_TIMEOUT);
        if !(1..=MAX_EXEC_TIMEOUT).contains(&secs) {
            return Err(Error::Invalid(format!("timeout must be between 1 and {MAX_EXEC_TIMEOUT} seconds")));
        }
        if let Some(cwd) = &req.cwd {
            check_guest_path("cwd", cwd)?;
        }
        if req.command.0[0].is_empty() {
            return Err(Error::Invalid("command[0] must name a program".into()));
        }
        if req.command.0.iter().any(|a| a.contains('\0')) {
            return Err(Error::Invalid("command must not contain NUL bytes".into()));
        }
        if let Some(env) = &req.env {
            super::validate::env("env", env).map_err(Error::Invalid)?;
        }
        Ok(Self {
            spec: ExecSpec {
                argv: req.command.0,
                env: req.env.unwrap_or_default(),
                cwd: req.cwd,
                timeout_ms: secs * 1000,
                max_output,
            },
            stdin: req.stdin.map(String::into_bytes).unwrap_or_default(),
            timeout: Duration::from_secs(secs),
            slot: None,
            hold: None,
            started: None,
        })
    }

    /// The machine's `env` and secrets under the request's own: a variable the request sets wins.
    /// Refused when the whole no longer fits what the guest is sent ([`fits_a_frame`]).
    fn with_machine_env(
        &mut self,
        machine: &BTreeMap<String, String>,
        mut secrets: BTreeMap<String, String>,
    ) -> Result<()> {
        let mut env = machine.clone();
        env.append(&mut secrets);
        env.append(&mut self.spec.env);
        self.spec.env = env;
        fits_a_frame(&self.spec)
    }

    pub(crate) fn timeout_error(&self) -> Error {
        Error::ExecTimedOut { secs: self.timeout.as_secs() }
    }
}

fn unix_time(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn wire_stat(path: &str, st: &proto::FileStat) -> FileStat {
    FileStat {
        path: path.to_string(),
        size: st.size,
        mode: st.mode,
        is_dir: st.is_dir,
        modified_at: unix_time(st.modified_unix),
    }
}

impl<H: Host> Service<H> {
    pub(super) async fn running(&self, id: &str, what: &'static str) -> Result<MachineRecord> {
        let rec = self.record(id).await?;
        if rec.status != hyperfleet_types::MachineStatus::Running {
            return Err(Error::NotRunning { what, status: rec.status });
        }
        Ok(rec)
    }

    /// The machine's `env`, with the child API's variables for a machine with `spawn`.
    pub(super) fn machine_env(&self, rec: &MachineRecord) -> BTreeMap<String, String> {
        let mut env = self.spawn_env(rec);
        env.append(&mut rec.spec.env.clone());
        env
    }

    /// The machine's secrets (read only when it has some).
    pub(super) async fn machine_secrets(&self, rec: &MachineRecord) -> Result<BTreeMap<String, String>> {
        if rec.spec.secret_names.is_empty() {
            return Ok(BTreeMap::new());
        }
        self.secrets(&rec.id).await
    }

    /// A file operation is activity in its machine.
    async fn running_for_files(&self, id: &str) -> Result<MachineRecord> {
        let rec = self.running(id, "transfer files").await?;
        self.activity.note(&rec.id);
        Ok(rec)
    }

    /// Fails unless the machine exists and runs: checked before a client's upload body is read, so a request
    /// for nothing costs nothing.
    pub(crate) async fn accepts_files(&self, id: &str) -> Result<()> {
        self.running(id, "transfer files").await.map(|_| ())
    }

    /// The machine's agent once it answers, waiting up to `patience` while the guest boots.
    pub(super) async fn ready_agent(&self, rec: &MachineRecord, patience: Duration) -> Result<AgentClient> {
        let agent = self.host.agent(&instance(rec));
        let deadline = Instant::now() + patience;
        loop {
            match agent.ping().await {
                Ok(()) => return Ok(agent),
                Err(ClientError::Unreachable(_)) if Instant::now() + Duration::from_millis(200) < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    if matches!(e, ClientError::Unreachable(_)) {
                        self.metrics.agent_failure();
                    }
                    return Err(Error::Agent(e));
                }
            }
        }
    }

    /// Runs a command and collects its output. The [`OutputLease`] is the output's share of the host-wide
    /// budget: hold it until the result has been serialized.
    pub(crate) async fn exec(&self, id: &str, req: ExecRequest) -> Result<(ExecResult, OutputLease)> {
        let mut plan = ExecPlan::new(req, Some(EXEC_OUTPUT_CAP))?;
        let rec = self.running(id, "execute commands").await?;
        plan.slot = Some(self.execs.acquire(&rec.id, self.policy.max_execs_per_machine)?);
        plan.with_machine_env(&self.machine_env(&rec), self.machine_secrets(&rec).await?)?;
        plan.hold = Some(self.activity.hold(&rec.id, super::HoldKind::Command));
        self.exec_started(&rec, &mut plan).await;
        let done = self.exec_collect(&rec, &plan).await;
        self.exec_finished(&plan, done.as_ref().ok().map(|(r, _)| r.exit_code)).await;
        done
    }

    /// Sends `exec.started` for `plan` (its program only, never the arguments).
    async fn exec_started(&self, rec: &MachineRecord, plan: &mut ExecPlan) {
        let program = plan.spec.argv.first().cloned();
        let event = Event { program, ..events::draft(EventKind::ExecStarted, rec) };
        plan.started = Some((event.clone(), Instant::now()));
        self.emit(event).await;
    }

    /// Sends `exec.finished` for a command started by [`Self::exec_started`] and records its duration;
    /// `exit_code` is `None` when it did not finish by itself (timeout, agent gone).
    pub(crate) async fn exec_finished(&self, plan: &ExecPlan, exit_code: Option<i32>) {
        let Some((started, at)) = &plan.started else { return };
        let took = at.elapsed();
        self.metrics.operation(Operation::Exec, exit_code.is_some(), took);
        let event = Event {
            kind: EventKind::ExecFinished,
            at: hyperfleet_types::timestamp::now(),
            exit_code,
            duration_ms: Some(u64::try_from(took.as_millis()).unwrap_or(u64::MAX)),
            ..started.clone()
        };
        self.emit(event).await;
    }

    async fn exec_collect(&self, rec: &MachineRecord, plan: &ExecPlan) -> Result<(ExecResult, OutputLease)> {
        let started = Instant::now();
        let agent = self.ready_agent(rec, plan.timeout).await?;
        let mut spec = plan.spec.clone();
        spec.timeout_ms =
            u64::try_from(plan.timeout.saturating_sub(started.elapsed()).as_millis()).unwrap_or(u64::MAX).max(1);
        let mut lease = OutputLease(None);
        let budget = self.output_budget.clone();
        // Output is kept only while the host-wide budget has room for it (and for its JSON form); past that
        // it is dropped and flagged as truncated, so many floods at once cannot exhaust the daemon's memory.
        let mut grant = |n: usize| {
            let kib = u32::try_from(n.saturating_mul(OUTPUT_COST_PER_BYTE).div_ceil(1024)).unwrap_or(u32::MAX);
            match budget.clone().try_acquire_many_owned(kib) {
                Ok(more) => {
                    match &mut lease.0 {
                        Some(held) => held.merge(more),
                        None => lease.0 = Some(more),
                    }
                    true
                }
                Err(_) => false,
            }
        };
        // The agent enforces the timeout; the margin only covers a guest that stops answering.
        let out = tokio::time::timeout(
            plan.timeout + Duration::from_secs(5),
            agent.exec_collect_within(spec, &plan.stdin, EXEC_OUTPUT_CAP, &mut grant),
        )
        .await
        .map_err(|_| plan.timeout_error())?;
        let out = match out {
            Ok(o) => o,
            // A program that cannot be started answers like a shell would: exit code 127.
            Err(ClientError::Agent { kind: ErrorKind::SpawnFailed, message }) => {
                let result = ExecResult {
                    exit_code: 127,
                    stdout: String::new(),
                    stderr: message,
                    stdout_truncated: false,
                    stderr_truncated: false,
                    duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                };
                return Ok((result, lease));
            }
            Err(e) => return Err(agent_error(e, "", self.policy.file_max_size)),
        };
        if out.exit.timed_out {
            return Err(plan.timeout_error());
        }
        let result = ExecResult {
            exit_code: out.exit.exit_code,
            stdout: text(out.stdout),
            stderr: text(out.stderr),
            stdout_truncated: out.exit.stdout_truncated,
            stderr_truncated: out.exit.stderr_truncated,
            duration_ms: out.exit.duration_ms,
        };
        Ok((result, lease))
    }

    /// Starts a command whose output the caller streams; stdin is already sent and closed.
    pub(crate) async fn exec_stream(&self, id: &str, req: ExecRequest) -> Result<(ExecSession, ExecPlan)> {
        let mut plan = ExecPlan::new(req, None)?;
        let rec = self.running(id, "execute commands").await?;
        plan.slot = Some(self.execs.acquire(&rec.id, self.policy.max_execs_per_machine)?);
        plan.with_machine_env(&self.machine_env(&rec), self.machine_secrets(&rec).await?)?;
        plan.hold = Some(self.activity.hold(&rec.id, super::HoldKind::Command));
        let agent = self.ready_agent(&rec, plan.timeout).await?;
        let max = self.policy.file_max_size;
        let mut session = agent.exec(plan.spec.clone()).await.map_err(|e| agent_error(e, "", max))?;
        session.send_stdin(&plan.stdin).await.map_err(|e| agent_error(e, "", max))?;
        session.close_stdin().await.map_err(|e| agent_error(e, "", max))?;
        self.exec_started(&rec, &mut plan).await;
        Ok((session, plan))
    }

    async fn with_timeout<T>(&self, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let limit = self.policy.file_transfer_timeout;
        tokio::time::timeout(limit, fut).await.map_err(|_| Error::TransferTimedOut { secs: limit.as_secs() })?
    }

    fn check_size(&self, size: u64) -> Result<()> {
        let max = self.policy.file_max_size;
        if size > max {
            return Err(Error::FileTooLarge { size: Some(size), max });
        }
        Ok(())
    }

    /// Writes a file from a base64 body.
    pub(crate) async fn write_file_base64(
        &self,
        id: &str,
        path: &str,
        content: &str,
        mode: Option<u32>,
    ) -> Result<FileWritten> {
        check_guest_path("path", path)?;
        // Base64 is 4/3 of the data: refuse before decoding anything huge.
        self.check_size((content.len() as u64 / 4) * 3)?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(content.trim())
            .map_err(|e| Error::Invalid(format!("content is not valid base64: {e}")))?;
        self.check_size(data.len() as u64)?;
        let body = futures::stream::once(async move { Ok::<_, Error>(Bytes::from(data)) });
        self.write_file_stream(id, path, mode, body).await
    }

    /// Writes a file from a stream of chunks, refusing it once it passes the size limit.
    pub(crate) async fn write_file_stream<S>(
        &self,
        id: &str,
        path: &str,
        mode: Option<u32>,
        body: S,
    ) -> Result<FileWritten>
    where
        S: futures::Stream<Item = Result<Bytes>> + Send,
    {
        use futures::StreamExt;
        check_guest_path("path", path)?;
        if let Some(m) = mode.filter(|m| *m > 0o7777) {
            return Err(Error::Invalid(format!("mode {m:o} is not a permission mode (at most 0o7777)")));
        }
        let rec = self.running_for_files(id).await?;
        let max = self.policy.file_max_size;
        let written = self
            .with_timeout(async {
                let agent = self.ready_agent(&rec, Duration::from_secs(5)).await?;
                let mut w = agent.write_file(path, mode, Some(max)).await.map_err(|e| agent_error(e, path, max))?;
                futures::pin_mut!(body);
                while let Some(chunk) = body.next().await {
                    let chunk = chunk?;
                    self.check_size(w.sent() + chunk.len() as u64)?;
                    w.send(&chunk).await.map_err(|e| agent_error(e, path, max))?;
                }
                let size = w.finish().await.map_err(|e| agent_error(e, path, max))?;
                Ok(FileWritten { path: path.to_string(), size })
            })
            .await?;
        self.emit(Event { path: Some(written.path.clone()), ..events::draft(EventKind::FileWritten, &rec) }).await;
        Ok(written)
    }

    /// Opens a file for download; the caller streams its chunks.
    pub(crate) async fn read_file(&self, id: &str, path: &str) -> Result<FileReader> {
        check_guest_path("path", path)?;
        let rec = self.running_for_files(id).await?;
        self.with_timeout(async {
            let agent = self.ready_agent(&rec, Duration::from_secs(5)).await?;
            let max = self.policy.file_max_size;
            agent.read_file(path, Some(max)).await.map_err(|e| agent_error(e, path, max))
        })
        .await
    }

    pub(crate) async fn stat_file(&self, id: &str, path: &str) -> Result<FileStat> {
        check_guest_path("path", path)?;
        let rec = self.running_for_files(id).await?;
        let st = self
            .with_timeout(async {
                let agent = self.ready_agent(&rec, Duration::from_secs(5)).await?;
                agent.stat(path).await.map_err(|e| agent_error(e, path, self.policy.file_max_size))
            })
            .await?;
        Ok(wire_stat(path, &st))
    }

    /// One page of a directory, at most `limit` entries after the name `after`.
    pub(crate) async fn list_dir(&self, id: &str, path: &str, after: Option<&str>, limit: u32) -> Result<DirListing> {
        check_guest_path("path", path)?;
        let rec = self.running(id, "transfer files").await?;
        let (entries, more) = self
            .with_timeout(async {
                let agent = self.ready_agent(&rec, Duration::from_secs(5)).await?;
                agent.list_dir(path, after, limit).await.map_err(|e| agent_error(e, path, self.policy.file_max_size))
            })
            .await?;
        let entries: Vec<DirEntry> = entries
            .into_iter()
            .map(|e| DirEntry {
                name: e.name,
                kind: match e.kind {
                    proto::EntryKind::File => EntryType::File,
                    proto::EntryKind::Dir => EntryType::Dir,
                    proto::EntryKind::Symlink => EntryType::Symlink,
                    proto::EntryKind::Other => EntryType::Other,
                },
                size: e.size,
                mode: e.mode,
                modified_at: unix_time(e.modified_unix),
            })
            .collect();
        let next_after = if more { entries.last().map(|e| e.name.clone()) } else { None };
        Ok(DirListing { path: path.to_string(), entries, next_after })
    }

    pub(crate) async fn make_dir(&self, id: &str, req: &MakeDir) -> Result<FileStat> {
        check_guest_path("path", &req.path)?;
        if let Some(mode) = req.mode.filter(|m| *m > 0o7777) {
            return Err(Error::Invalid(format!("mode must be permission bits (at most 0o7777 = 4095), got {mode}")));
        }
        let rec = self.running(id, "transfer files").await?;
        let path = req.path.as_str();
        let st = self
            .with_timeout(async {
                let agent = self.ready_agent(&rec, Duration::from_secs(5)).await?;
                agent
                    .mkdir(path, req.parents, req.mode)
                    .await
                    .map_err(|e| agent_error(e, path, self.policy.file_max_size))
            })
            .await?;
        Ok(wire_stat(path, &st))
    }

    pub(crate) async fn delete_file(&self, id: &str, path: &str, recursive: bool) -> Result<()> {
        check_guest_path("path", path)?;
        let rec = self.running_for_files(id).await?;
        self.with_timeout(async {
            let agent = self.ready_agent(&rec, Duration::from_secs(5)).await?;
            agent.delete(path, recursive).await.map_err(|e| agent_error(e, path, self.policy.file_max_size))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(path: &str) -> String {
        match check_guest_path("path", path) {
            Err(Error::Invalid(message)) => message,
            other => panic!("{path:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn guest_paths_are_checked_before_the_guest_sees_them() {
        assert!(check_guest_path("path", "/tmp/a b/ü.txt").is_ok());
        assert!(check_guest_path("path", &format!("/{}", "n".repeat(GUEST_NAME_MAX))).is_ok());
        assert_eq!(refused(""), "path is required");
        assert_eq!(refused("tmp/x"), "path must be an absolute path, got 'tmp/x'");
        assert_eq!(refused("/a\0b"), "path must not contain NUL bytes");
        // 128 two-byte characters: 256 bytes, one past NAME_MAX (the guest would answer ENAMETOOLONG).
        assert!(refused(&format!("/tmp/{}", "é".repeat(128))).starts_with("path has a 256-byte name"));
        let deep = "/abc".repeat(1024);
        assert_eq!(refused(&deep), "path is 4096 bytes, at most 4095 allowed");
        match check_guest_path("cwd", "x") {
            Err(Error::Invalid(m)) => assert_eq!(m, "cwd must be an absolute path, got 'x'"),
            other => panic!("{other:?}"),
        }
    }
}
