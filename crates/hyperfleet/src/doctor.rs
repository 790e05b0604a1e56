//! `hyperfleet doctor`: the networking page's troubleshooting section as checks, each with what is wrong and
//! the command that fixes it. The per-machine part is shared with `GET /machines/{id}/network`.

use hyperfleet_net::Subnet;
use hyperfleet_types::{Check, MachineStatus};

use crate::config::{NetworkSettings, RuntimeSettings, StoreSettings};
use crate::machines::network::HostNetwork;
use crate::runtime::host::{self, KvmKind};
use crate::store::{Store, machines as records};

fn check(name: &str, ok: bool, detail: impl Into<String>, fix: Option<&str>) -> Check {
    Check { name: name.into(), ok, detail: detail.into(), fix: if ok { None } else { fix.map(str::to_string) } }
}

pub async fn ip_forward_check() -> Check {
    let on = hyperfleet_net::sysctl::ip_forward_enabled().await;
    check(
        "ip forwarding",
        on,
        format!("net.ipv4.ip_forward is {}", if on { 1 } else { 0 }),
        Some("sysctl -w net.ipv4.ip_forward=1   (hyperfleet serve sets it at start)"),
    )
}

pub fn route_check(present: bool, subnet: &Subnet) -> Check {
    check(
        "subnet route",
        present,
        if present {
            format!("unreachable route for {subnet} keeps unused machine addresses on the host")
        } else {
            format!("no unreachable route for {subnet}: traffic to a stopped machine's address may leave the host")
        },
        Some(&format!("ip route replace unreachable {subnet}")),
    )
}

/// Host-wide checks: virtualization, binaries, assets, forwarding, firewall, route.
pub async fn host_checks(settings: &RuntimeSettings, net: &HostNetwork) -> Vec<Check> {
    let kvm = KvmKind::detect();
    let fc = host::find_firecracker(settings.firecracker_bin.as_deref(), &settings.assets_dir);
    let runc = host::find_on_path(&settings.runc_bin);
    let mut checks = vec![
        check(
            "kvm",
            kvm != KvmKind::Missing,
            format!(
                "{}{}",
                kvm.describe(),
                if kvm == KvmKind::Pvm { "; container runtime is the default" } else { "" }
            ),
            Some("load kvm_intel or kvm_amd (modprobe kvm_intel) and check /dev/kvm permissions"),
        ),
        check(
            "firecracker binary",
            fc.is_some(),
            fc.as_ref()
                .map_or("not found (FIRECRACKER_BIN, PATH, .hyperfleet/bin)".into(), |p| p.display().to_string()),
            Some("make setup   (or set FIRECRACKER_BIN)"),
        ),
        check(
            "runc binary",
            runc.is_some(),
            runc.as_ref().map_or(format!("{} not found", settings.runc_bin.display()), |p| p.display().to_string()),
            Some("apt-get install runc"),
        ),
        check(
            "guest kernel",
            settings.kernel_image_path.is_file(),
            settings.kernel_image_path.display().to_string(),
            Some("make setup   (builds .hyperfleet/vmlinux)"),
        ),
        check(
            "guest rootfs",
            settings.rootfs_path.is_file(),
            settings.rootfs_path.display().to_string(),
            Some("make setup   (builds .hyperfleet/rootfs.ext4)"),
        ),
        ip_forward_check().await,
    ];
    let table = net.firewall.current().await;
    let (ok, detail) = match &table {
        Ok(Some(t)) if t.contains("masquerade") => {
            (true, format!("table inet {} has the NAT rule", net.firewall.table()))
        }
        Ok(Some(_)) => (false, format!("table inet {} has no masquerade rule", net.firewall.table())),
        Ok(None) => (false, format!("table inet {} does not exist", net.firewall.table())),
        Err(e) => (false, e.to_string()),
    };
    checks.push(check(
        "nftables NAT",
        ok,
        detail,
        Some(&format!(
            "start hyperfleet serve (it builds the table); inspect with: nft list table inet {}",
            net.firewall.table()
        )),
    ));
    checks.push(route_check(net.has_unreachable_route().await, &net.subnet));
    checks
}

/// Runs every check; returns the report text and whether all passed.
pub async fn run(
    store: &StoreSettings,
    runtime: &RuntimeSettings,
    network: &NetworkSettings,
) -> anyhow::Result<(String, bool)> {
    let net = HostNetwork::new(network.subnet, network.tap_naming.clone(), &network.nft_table)?;
    let mut out = String::new();
    let mut all_ok = true;
    let mut section = |title: &str, checks: &[Check], out: &mut String| {
        out.push_str(&format!("{title}\n"));
        for c in checks {
            all_ok &= c.ok;
            out.push_str(&format!("  {} {}: {}\n", if c.ok { "ok  " } else { "FAIL" }, c.name, c.detail));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("       fix: {fix}\n"));
            }
        }
    };
    section("host", &host_checks(runtime, &net).await, &mut out);
    if store.database_path.exists() {
        let store = Store::open(&store.database_path)?;
        let running = store.call(|c| records::with_status(c, &[MachineStatus::Running])).await?;
        let table = net.firewall.current().await.ok().flatten();
        for m in &running {
            let checks = net.checks(m, table.as_deref()).await;
            section(&format!("machine {} ({}, {})", m.name, m.id, net.iface(m)), &checks, &mut out);
        }
        if running.is_empty() {
            out.push_str("no running machines\n");
        }
    } else {
        out.push_str(&format!("no database at {} (no machines yet)\n", store.database_path.display()));
    }
    Ok((out, all_ok))
}
