//! hyperfleet-agent: the guest side of Hyperfleet. Runs as PID 1 (or as the first service of an init) in a
//! Firecracker guest or a container, and serves exec, terminal and file operations to the host (protocol: see the
//! `hyperfleet-agent-proto` crate) on vsock port 52 or a unix socket.

mod exec;
mod files;
mod init;
mod main_process;
mod pty;
mod reaper;
mod volumes;

use std::sync::Arc;

use hyperfleet_agent_proto::{self as proto, ErrorKind, Hello, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::signal::unix::{SignalKind, signal};

use crate::reaper::Reaper;

const USAGE: &str = "usage: hyperfleet-agent [--listen vsock:PORT | --listen unix:PATH | --listen fd:N]\n\
  Default: fd:3 when LISTEN_FDS=1 (a listening socket handed over by the host), else\n\
  unix:$HYPERFLEET_AGENT_SOCKET when set, else vsock:52. Run as PID 1 it also mounts /proc, /sys,\n\
  /dev, /run, /tmp, brings up lo, writes /etc/resolv.conf and reaps orphans.";

/// The first descriptor of socket activation (`LISTEN_FDS`): 0-2 are stdio.
const FIRST_LISTEN_FD: i32 = 3;

#[derive(Debug, Clone)]
enum Listen {
    Vsock(u32),
    Unix(String),
    /// A listening unix socket the host made and passed in: the guest never sees its path on the host.
    Fd(i32),
}

fn parse_args() -> Result<Listen, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec = match args.as_slice() {
        [] if std::env::var("LISTEN_FDS").is_ok_and(|n| n.trim() == "1") => format!("fd:{FIRST_LISTEN_FD}"),
        [] => match std::env::var("HYPERFLEET_AGENT_SOCKET") {
            Ok(p) => format!("unix:{p}"),
            Err(_) => format!("vsock:{}", proto::AGENT_PORT),
        },
        [flag, v] if flag == "--listen" => v.clone(),
        [flag] if flag == "--help" || flag == "-h" => return Err(USAGE.to_string()),
        _ => return Err(USAGE.to_string()),
    };
    if let Some(port) = spec.strip_prefix("vsock:") {
        return port.parse().map(Listen::Vsock).map_err(|_| format!("bad vsock port '{port}'\n{USAGE}"));
    }
    if let Some(path) = spec.strip_prefix("unix:") {
        return Ok(Listen::Unix(path.to_string()));
    }
    if let Some(fd) = spec.strip_prefix("fd:") {
        return fd.parse().ok().filter(|n| *n > 2).map(Listen::Fd).ok_or_else(|| format!("bad fd '{fd}'\n{USAGE}"));
    }
    Err(format!("bad --listen '{spec}'\n{USAGE}"))
}

fn main() {
    let listen = match parse_args() {
        Ok(l) => l,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    let pid1 = std::process::id() == 1;
    if !pid1 {
        // Adopt orphans of the commands we run, as PID 1 would, so none is left unreaped.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }
    if pid1 {
        init::mount_filesystems();
        if let Err(e) = init::loopback_up() {
            eprintln!("hyperfleet-agent: bring up lo: {e}");
        }
        init::set_hostname_from_env();
        init::write_resolv_conf(&init::boot_resolvers());
    }
    let in_vm = matches!(listen, Listen::Vsock(_));
    if pid1 && in_vm {
        volumes::mount_all();
    }
    let code = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt.block_on(async move {
            match serve(listen).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("hyperfleet-agent: {e}");
                    1
                }
            }
        }),
        Err(e) => {
            eprintln!("hyperfleet-agent: cannot start the runtime: {e}");
            1
        }
    };
    if pid1 {
        // PID 1 must never simply return: the kernel would panic. Power off instead.
        init::shutdown(in_vm);
    }
    std::process::exit(code);
}

async fn serve(listen: Listen) -> std::io::Result<()> {
    let reaper = Reaper::start()?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (shutdown_tx, mut shutdown_rx) = tokio::sync::mpsc::channel::<()>(1);
    if let Some(spec) = main_process::load() {
        tokio::spawn(main_process::supervise(reaper.clone(), spec, shutdown_tx.clone()));
    }
    let ctx = Arc::new(Ctx { reaper, shutdown: shutdown_tx });
    eprintln!("hyperfleet-agent {}: listening on {listen:?}", env!("CARGO_PKG_VERSION"));
    macro_rules! accept_loop {
        ($listener:expr) => {
            loop {
                tokio::select! {
                    conn = $listener.accept() => {
                        let (stream, _) = conn?;
                        let ctx = ctx.clone();
                        tokio::spawn(async move { handle(ctx, stream).await });
                    }
                    _ = term.recv() => return Ok(()),
                    _ = int.recv() => return Ok(()),
                    _ = shutdown_rx.recv() => return Ok(()),
                }
            }
        };
    }
    match listen {
        Listen::Vsock(port) => {
            let l = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port))?;
            accept_loop!(l)
        }
        Listen::Fd(fd) => {
            use std::os::fd::FromRawFd;
            // Not inherited by the commands we run: only the agent answers on it.
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
            // SAFETY: the host handed us `fd` as an open listening unix socket (LISTEN_FDS convention) and
            // nothing else in this process uses it; the listener owns and closes it from here on.
            let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
            std_listener.set_nonblocking(true)?;
            let l = tokio::net::UnixListener::from_std(std_listener)?;
            accept_loop!(l)
        }
        Listen::Unix(path) => {
            // A socket left by an earlier run; a failure other than "not there" shows as bind's error.
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                eprintln!("hyperfleet-agent: remove {path}: {e}");
            }
            if let Some(dir) = std::path::Path::new(&path).parent() {
                std::fs::create_dir_all(dir)?;
            }
            let l = tokio::net::UnixListener::bind(&path)?;
            accept_loop!(l)
        }
    }
}

struct Ctx {
    reaper: Arc<Reaper>,
    shutdown: tokio::sync::mpsc::Sender<()>,
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(ctx: Arc<Ctx>, stream: S) {
    let (mut r, mut w) = tokio::io::split(stream);
    let hello = Hello { protocol: proto::PROTOCOL_VERSION, agent_version: env!("CARGO_PKG_VERSION").to_string() };
    if proto::write_json(&mut w, &hello).await.is_err() {
        return;
    }
    let req: Request = match proto::read_json(&mut r, "a request").await {
        Ok(req) => req,
        Err(proto::ProtoError::Closed) => return,
        Err(e) => {
            // Best effort: a host that sent garbage may not be listening for the answer.
            if let Err(e) = proto::write_json(&mut w, &files::fail(ErrorKind::BadRequest, e.to_string())).await {
                eprintln!("hyperfleet-agent: answering a bad request: {e}");
            }
            return;
        }
    };
    let op = request_name(&req);
    let res = match req {
        Request::Ping => proto::write_json(&mut w, &Response::Ok).await,
        Request::Exec(spec) => exec::run(&ctx.reaper, &mut r, &mut w, spec).await,
        Request::WriteFile { path, mode, max_size } => {
            let resp = files::write(&mut r, &path, mode, max_size).await;
            proto::write_json(&mut w, &resp).await
        }
        Request::ReadFile { path, max_size } => files::read(&mut w, &path, max_size).await,
        Request::Stat { path } => proto::write_json(&mut w, &files::stat(&path).await).await,
        Request::Delete { path, recursive } => proto::write_json(&mut w, &files::delete(&path, recursive).await).await,
        Request::Pty(spec) => pty::run(&ctx.reaper, &mut r, &mut w, spec).await,
        Request::ListDir { path, after, limit } => {
            proto::write_json(&mut w, &files::list(path, after, limit).await).await
        }
        Request::Mkdir { path, parents, mode } => {
            proto::write_json(&mut w, &files::mkdir(&path, parents, mode).await).await
        }
        Request::Shutdown => {
            let res = proto::write_json(&mut w, &Response::Ok).await;
            // Fails only when the accept loop has ended already, i.e. the agent is stopping anyway.
            let _ = ctx.shutdown.send(()).await;
            res
        }
    };
    match res {
        // The host hung up (it gave up waiting, or the command's output was no longer wanted): routine.
        Ok(()) | Err(proto::ProtoError::Closed) => {}
        Err(e) => eprintln!("hyperfleet-agent: {op}: {e}"),
    }
}

fn request_name(req: &Request) -> &'static str {
    match req {
        Request::Ping => "ping",
        Request::Exec(_) => "exec",
        Request::WriteFile { .. } => "write file",
        Request::ReadFile { .. } => "read file",
        Request::Stat { .. } => "stat",
        Request::Delete { .. } => "delete",
        Request::ListDir { .. } => "list",
        Request::Mkdir { .. } => "mkdir",
        Request::Shutdown => "shutdown",
        Request::Pty(_) => "terminal",
    }
}
