//! `hyperfleet serve`: validates the configuration, opens the database, prepares the host network,
//! reconciles with what survived a previous run, then serves the API (and the proxy).

use std::net::IpAddr;
use std::sync::Arc;

use anyhow::Context;
use hyper_util::service::TowerToHyperService;
use hyperfleet_types::{RuntimeKind, Scope};
use tracing::{info, warn};

use crate::api::{self, AppState, auth::Auth};
use crate::config::{RuntimeSettings, ServeArgs, Settings};
use crate::doctor::Doctor;
use crate::listener::{self, Limits};
use crate::machines::{LinuxHost, NodePolicy, Policy, Service, network::HostNetwork};
use crate::runtime::firecracker::JailSettings;
use crate::runtime::host::{self, HostCapacity, KvmKind};
use crate::runtime::volume::VolumeDir;
use crate::runtime::{Container, Firecracker, Runtimes};
use crate::store::nodes::Registration;
use crate::store::{Store, api_keys, leases};

/// Picks the runtime for machines that name none, and says why.
fn default_runtime(settings: &RuntimeSettings, kvm: KvmKind, fc: &Firecracker) -> (RuntimeKind, String) {
    if let Some(r) = settings.default_runtime {
        return (r, "set by HYPERFLEET_RUNTIME".into());
    }
    match (kvm, fc.unavailable()) {
        (KvmKind::Hardware, None) => (RuntimeKind::Firecracker, "hardware KVM and firecracker are available".into()),
        (KvmKind::Hardware, Some(why)) => (RuntimeKind::Container, why),
        (other, _) => (
            RuntimeKind::Container,
            format!("{}: guests cannot run userspace under Firecracker here", other.describe()),
        ),
    }
}

/// The orchestration service over this configuration, without touching the host yet.
pub(crate) async fn build_service(settings: &Settings, store: Store) -> anyhow::Result<Arc<Service>> {
    let kvm = KvmKind::detect();
    let rt = &settings.runtime;
    let firecracker = Firecracker::new(
        host::find_firecracker(rt.firecracker_bin.as_deref(), &rt.assets_dir),
        host::find_jailer(rt.jailer_bin.as_deref(), &rt.assets_dir),
        kvm,
        JailSettings { chroot_dir: rt.chroot_dir.clone(), uid_base: rt.jailer_uid_base },
    );
    let jails_dir = firecracker.jails_dir();
    let userns = match rt.container_uid_base {
        Some(base) if crate::runtime::idmap::supported() => Some(base),
        Some(_) => {
            warn!(
                "this kernel has no idmapped mounts (Linux 5.12+): container machines share the host's user namespace"
            );
            None
        }
        None => None,
    };
    let container = Container::new(host::find_on_path(&rt.runc_bin), userns);
    if userns.is_some() {
        info!("container machines run in their own user namespace (HYPERFLEET_CONTAINER_USERNS)");
    }
    let (default, why) = default_runtime(rt, kvm, &firecracker);
    info!(runtime = %default, kvm = kvm.describe(), "default runtime: {default} ({why})");
    if default == RuntimeKind::Container {
        info!("container machines share the host kernel: their isolation is a container's, not a VM's");
    }
    let network = &settings.network;
    let dns = HostNetwork::dns_default(network.dns.as_ref())
        .await
        .map_err(|m| anyhow::anyhow!("invalid HYPERFLEET_DNS: {m}"))?;
    let net = HostNetwork::new(network)?.with_child_api_port(settings.api.child_api_port);
    let addressing = net.addressing.clone();
    let images = std::sync::Arc::new(
        crate::machines::images::Images::new(
            rt.image_dir.clone(),
            rt.assets_dir.join("bin/hyperfleet-agent"),
            rt.image_cache_bytes,
            rt.registries.clone(),
        )
        .map_err(|e| anyhow::anyhow!("image cache {}: {e}", rt.image_dir.display()))?,
    );
    let host = LinuxHost {
        images: images.clone(),
        runtimes: Runtimes { firecracker, container, stop_grace: rt.stop_timeout },
        net,
        data_dir: rt.data_dir.clone(),
        jails_dir,
        assets_dir: rt.assets_dir.clone(),
        volumes: VolumeDir::new(rt.volumes_dir.clone()),
    };
    let policy = Policy {
        assets_dir: rt.assets_dir.clone(),
        default_kernel: rt.kernel_image_path.clone(),
        default_rootfs: rt.rootfs_path.clone(),
        default_kernel_args: rt.kernel_args.clone(),
        default_runtime: default,
        default_dns: dns,
        capacity: HostCapacity::detect(),
        file_max_size: settings.files.max_size,
        file_transfer_timeout: settings.files.transfer_timeout,
        max_execs_per_machine: settings.files.exec_max_concurrent,
        exec_output_budget: settings.files.exec_output_budget,
        events_backlog: settings.store.events_backlog,
        metrics: settings.api.metrics,
        webhooks: crate::machines::webhooks::WebhookPolicy {
            retry_base: settings.store.webhook_retry_base,
            max_attempts: settings.store.webhook_max_attempts,
            timeout: settings.store.webhook_timeout,
        },
        child_api_port: settings.api.child_api_port,
        node: node_policy(settings, &host),
    };
    Ok(Service::new(store, host, addressing, policy, images))
}

/// This daemon as a fleet node: its settings, with the host's capacity and runtimes where none are set.
fn node_policy(settings: &Settings, host: &LinuxHost) -> NodePolicy {
    use crate::machines::Host as _;
    let node = &settings.store.node;
    let capacity = HostCapacity::detect();
    let runtimes = [RuntimeKind::Container, RuntimeKind::Firecracker]
        .into_iter()
        .filter(|r| host.unavailable(*r).is_none())
        .collect();
    NodePolicy {
        registration: Registration {
            name: node.name.clone(),
            url: node.url.clone(),
            vcpus: node.vcpus.unwrap_or(capacity.cpus),
            mem_mib: node.mem_mib.unwrap_or(capacity.mem_mib),
            overcommit: node.overcommit,
            runtimes,
            labels: node.labels.clone(),
            proxy_url: node.proxy_url(settings.proxy.port),
            subnet: settings.network.subnet.to_string(),
            iface_prefix: settings.network.tap_naming.prefix().to_string(),
        },
        heartbeat: node.heartbeat_interval,
        down_after: node.down_after,
        cluster_secret: node.cluster_secret.clone(),
    }
}

/// Keeps the listeners' per-address cap off the fleet's other nodes and fences them and the database off
/// from this node's machines (refreshed with the heartbeat's view). A node forwarding to this one carries
/// many clients on one address, each already capped where it connected; and since a guest's traffic leaves
/// from its node's address, no guest may reach another node (or the database) at all, or it could pass for
/// its node.
async fn fence_the_fleet(service: Arc<Service>, database: Vec<IpAddr>, listeners: Vec<Arc<Limits>>) {
    let every = service.nodes().heartbeat_interval();
    loop {
        let nodes = service.nodes().peer_addresses().await;
        let fenced = nodes.iter().chain(&database).filter_map(|ip| match ip.to_canonical() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None, // machines have no IPv6 at all
        });
        service.fence_fleet(fenced.collect()).await;
        for l in &listeners {
            l.set_nodes(nodes.clone());
        }
        tokio::time::sleep(every).await;
    }
}

/// The addresses of the database's host (PostgreSQL), resolved at start; none for SQLite.
async fn database_addresses(location: &crate::store::Location) -> Vec<IpAddr> {
    match location {
        crate::store::Location::Postgres(url) => crate::nodes::addresses_of(url, 5432).await,
        crate::store::Location::Sqlite(_) => vec![],
    }
}

pub(crate) async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut settings = args.validate()?;
    fit_connection_caps(&mut settings);
    let settings = Arc::new(settings);
    if settings.api.disable_auth {
        warn!(
            "DISABLE_AUTH is set: the API accepts requests WITHOUT an API key; use this only on a trusted, local host"
        );
    }
    if let Some(old) = legacy_machine_data(&settings.runtime.assets_dir, &settings.runtime.data_dir) {
        anyhow::bail!(
            "{old} holds machines of an earlier Hyperfleet, which kept its data inside the assets directory; \
             that is no longer allowed (a request could name a machine's disk as its image). Stop every machine \
             of the old version, then move the data: mv {old} {new}",
            old = old.display(),
            new = settings.runtime.data_dir.display()
        );
    }
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let dir = &settings.runtime.data_dir;
        // Made 0700 when new; an existing directory (perhaps shared) keeps its mode, with a warning.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("create {}", dir.display()))?;
        let mode = std::fs::metadata(dir).with_context(|| format!("stat {}", dir.display()))?.permissions().mode();
        if mode & 0o077 != 0 {
            warn!(dir = %dir.display(), "other users can enter this directory; machine data belongs in a 0700 directory");
        }
    }
    let db = &settings.store.database;
    let store = Store::open(db).await.with_context(|| format!("open the database ({})", db.describe()))?;
    info!(database = %db.describe(), "database open");
    let subnet = settings.network.subnet.to_string();
    let mut tx = store.write().await?;
    if let Err(msg) = leases::bind_subnet(&mut tx, &settings.store.node.name, &subnet).await? {
        anyhow::bail!("invalid HYPERFLEET_SUBNET: {msg}");
    }
    // Counted and created in one write transaction: two daemons starting on one database make one key.
    let first_key = if !settings.api.disable_auth && api_keys::count(&mut tx).await? == 0 {
        Some(api_keys::create(&mut tx, "admin", &[Scope::All], None).await?)
    } else {
        None
    };
    tx.commit().await?;
    if let Some(made) = first_key {
        // Printed once, to stdout, never logged: the database keeps only its hash.
        println!(
            "\nCreated the first API key (admin, all scopes). It is shown only this once:\n\n    {}\n\n\
             Use it as: Authorization: Bearer <key>   (manage keys with `hyperfleet keys`)\n",
            made.secret
        );
    }

    if settings.runtime.cgroup_favordynmods {
        use crate::runtime::cgroups::{DynMods, favor_dynamic_moves};
        match favor_dynamic_moves() {
            DynMods::AlreadyOn => {}
            DynMods::TurnedOn(at) => info!(
                mount = %at.display(),
                "cgroup favordynmods turned on host-wide (cheap cgroup moves at start; HYPERFLEET_CGROUP_FAVORDYNMODS)"
            ),
            DynMods::Unavailable(why) => {
                warn!("cgroup favordynmods is off ({why}): each start waits ~10 ms per cgroup move")
            }
        }
    }
    let service = build_service(&settings, store.clone()).await?;
    // Registered (and the machines of a database from before fleets adopted) before reconcile, which acts
    // only on this node's machines.
    let adopted = service.nodes().register().await.context("register this node")?;
    let node = &settings.store.node;
    info!(node = %node.name, url = ?node.url, adopted, "registered as node '{}'", node.name);
    service.host().net.init().await.context("prepare host networking (are we root?)")?;
    service.reconcile().await.context("reconcile with the host")?;
    service.resume_pulls().await.context("resume image pulls")?;

    let network = &settings.network;
    let doctor = Arc::new(Doctor::new(network)?);
    let auth = Arc::new(Auth::new(store, settings.api.disable_auth, settings.api.metrics_token.clone()));
    tokio::spawn(service.nodes().clone().run_heartbeats());
    tokio::spawn(service.clone().run_timers());
    tokio::spawn(service.clone().run_webhooks());
    tokio::spawn(service.clone().relay_events());
    let api = &settings.api;
    let limits = Limits::new(api.max_connections, api.max_connections_per_ip);
    let addr = std::net::SocketAddr::new(settings.api.bind, settings.api.port);
    let listener = listener::bind(addr, false)
        .and_then(tokio::net::TcpListener::from_std)
        .with_context(|| format!("listen on {addr} (PORT)"))?;
    let mut proxy_limits = None;
    if let Some(proxy_port) = settings.proxy.port {
        let proxy_addr = std::net::SocketAddr::new(settings.api.bind, proxy_port);
        let prefix = settings.proxy.prefix.clone();
        let api = &settings.api;
        proxy_limits = Some(
            crate::proxy::start(
                proxy_addr,
                service.clone(),
                settings.proxy.clone(),
                api.timeouts,
                api.max_connections_per_ip,
            )
            .with_context(|| format!("listen on {proxy_addr} (PROXY_PORT)"))?,
        );
        info!("proxy listening on http://{proxy_addr}{prefix}/{{machine}}/{{port}}/");
    }
    tokio::spawn(crate::proxy::poll_exposed_ports(service.clone(), settings.proxy.poll_interval));
    let log_cap = settings.runtime.console_log_max_size;
    tokio::spawn(service.clone().cap_console_logs(log_cap, std::time::Duration::from_secs(2)));
    info!("API listening on http://{addr} (docs: /docs, dashboard: /ui)");
    let ui = Arc::new(api::ui::UiConfig {
        proxy_port: settings.proxy.port,
        proxy_prefix: settings.proxy.prefix.clone(),
        proxy_host_suffix: settings.proxy.host_suffix.clone(),
    });
    if !service.nodes().alone() {
        tokio::spawn(fence_the_fleet(
            service.clone(),
            database_addresses(&settings.store.database).await,
            [Some(limits.clone()), proxy_limits.clone()].into_iter().flatten().collect(),
        ));
    }
    let listeners = Arc::new(api::Listeners { api: limits.clone(), proxy: proxy_limits });
    let state = AppState {
        service: service.clone(),
        auth,
        doctor,
        listeners,
        ui,
        pty_client_timeout: settings.files.pty_client_timeout,
        forwarder: Default::default(),
    };
    let router = api::router(state);
    if let Some(port) = api.child_api_port {
        // Every address, as gateways come and go with machines; what it answers is decided per request
        // (a child token, from its own machine's address) and the firewall lets only spawn machines in.
        let addr = std::net::SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port);
        let child = listener::bind(addr, false)
            .and_then(tokio::net::TcpListener::from_std)
            .with_context(|| format!("listen on {addr} (HYPERFLEET_CHILD_API_PORT)"))?;
        let child_limits = Limits::new(api.max_connections, api.max_connections_per_ip);
        let child_router = router.clone();
        tokio::spawn(listener::serve(child, child_limits, api.timeouts, shutdown_signal(), move |peer, _| {
            TowerToHyperService::new(child_router.clone().layer(axum::Extension(api::auth::ChildPeer(peer.ip()))))
        }));
        info!("child API listening on {addr} (for machines with spawn, on their gateway)");
    }
    listener::serve(listener, limits, api.timeouts, shutdown_signal(), move |_, _| {
        TowerToHyperService::new(router.clone())
    })
    .await;
    info!("stopped serving; running machines keep running and are adopted at the next start");
    Ok(())
}

/// Raises the open-files limit as far as it goes and lowers the connection caps to fit under it.
fn fit_connection_caps(settings: &mut Settings) {
    let open_files = match listener::raise_open_files_limit() {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "could not read or raise the open-files limit (RLIMIT_NOFILE)");
            return;
        }
    };
    let (api, proxy) = (settings.api.max_connections, settings.proxy.max_connections);
    let (fit_api, fit_proxy) = listener::fit_caps(open_files, api, proxy);
    info!(
        open_files,
        api_connections = fit_api,
        proxy_connections = fit_proxy,
        "open-files limit raised to {open_files}"
    );
    if (fit_api, fit_proxy) != (api, proxy) {
        warn!(
            "the open-files limit ({open_files}) is too low for HYPERFLEET_API_MAX_CONNECTIONS={api} and \
             PROXY_MAX_CONNECTIONS={proxy}: using {fit_api} and {fit_proxy}; raise the hard limit (LimitNOFILE=)"
        );
    }
    settings.api.max_connections = fit_api;
    settings.proxy.max_connections = fit_proxy;
}

/// The data directory earlier versions used by default (`{assets}/machines`), if it still holds machines and
/// is not the data directory in use: starting without it would give those machines fresh disks.
fn legacy_machine_data(assets_dir: &std::path::Path, data_dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let old = assets_dir.join("machines");
    let in_use = old != data_dir && std::fs::read_dir(&old).is_ok_and(|mut entries| entries.next().is_some());
    in_use.then_some(old)
}

async fn shutdown_signal() {
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    let sigterm = async {
        match term {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM; stop the daemon with ctrl-c (SIGINT)");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = sigterm => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machines_left_in_the_old_data_directory_are_found() {
        let assets = tempfile::tempdir().unwrap();
        let data = assets.path().parent().unwrap().join("hf-test-data-elsewhere");
        assert_eq!(legacy_machine_data(assets.path(), &data), None, "no old directory");
        std::fs::create_dir(assets.path().join("machines")).unwrap();
        assert_eq!(legacy_machine_data(assets.path(), &data), None, "an empty one is harmless");
        std::fs::create_dir(assets.path().join("machines/abcdefgh12345678")).unwrap();
        assert_eq!(legacy_machine_data(assets.path(), &data), Some(assets.path().join("machines")));
    }
}
