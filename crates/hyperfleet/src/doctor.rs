//! Diagnostics: the host's and each running machine's networking as checks, each with what is wrong and
//! the command that fixes it — for `hyperfleet doctor` and `GET /machines/{id}/network`. This sits above
//! the orchestration: it reads machines through the service and looks at the host itself.

use std::time::Duration;

use hyperfleet_net::ipam::BLOCK_PREFIX;
use hyperfleet_net::{Firewall, NetError, Netlink, Subnet};
use hyperfleet_types::{Check, Machine, NetworkReport};

use crate::config::{NetworkSettings, RuntimeSettings, Settings};
use crate::runtime::host::{self, KvmKind};

/// Looks at the host's interfaces, firewall table and route for one subnet.
pub(crate) struct Doctor {
    netlink: Netlink,
    firewall: Firewall,
    subnet: Subnet,
}

pub(crate) fn check(name: &str, ok: bool, detail: impl Into<String>, fix: Option<&str>) -> Check {
    Check { name: name.into(), ok, detail: detail.into(), fix: if ok { None } else { fix.map(str::to_string) } }
}

pub(crate) async fn ip_forward_check() -> Check {
    let on = hyperfleet_net::sysctl::ip_forward_enabled().await;
    check(
        "ip forwarding",
        on,
        format!("net.ipv4.ip_forward is {}", if on { 1 } else { 0 }),
        Some("sysctl -w net.ipv4.ip_forward=1   (hyperfleet serve sets it at start)"),
    )
}

pub(crate) fn route_check(present: bool, subnet: &Subnet) -> Check {
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

impl Doctor {
    pub(crate) fn new(network: &NetworkSettings) -> Result<Self, NetError> {
        let subnet = network.subnet;
        Ok(Self { netlink: Netlink::connect()?, firewall: Firewall::new(&network.nft_table, subnet.net()), subnet })
    }

    async fn route_present(&self) -> bool {
        self.netlink.has_unreachable_route(self.subnet.net()).await.unwrap_or(false)
    }

    /// Host-wide checks: virtualization, binaries, assets, forwarding, firewall, route.
    pub(crate) async fn host_checks(&self, settings: &RuntimeSettings) -> Vec<Check> {
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
            check(
                "cgroup favordynmods",
                !settings.cgroup_favordynmods || crate::runtime::cgroups::dynamic_moves_favored(),
                if crate::runtime::cgroups::dynamic_moves_favored() {
                    "on: moving a starting machine into its cgroups costs no RCU grace period"
                } else {
                    "off: each cgroup move at a machine's start waits for an RCU grace period (~10 ms)"
                },
                Some(
                    "start hyperfleet serve (it remounts cgroup2 with favordynmods), or set HYPERFLEET_CGROUP_FAVORDYNMODS=false",
                ),
            ),
        ];
        let table = self.firewall.current().await;
        let name = self.firewall.table();
        let (ok, detail) = match &table {
            Ok(Some(t)) if t.contains("masquerade") => (true, format!("table inet {name} has the NAT rule")),
            Ok(Some(_)) => (false, format!("table inet {name} has no masquerade rule")),
            Ok(None) => (false, format!("table inet {name} does not exist")),
            Err(e) => (false, e.to_string()),
        };
        checks.push(check(
            "nftables NAT",
            ok,
            detail,
            Some(&format!("start hyperfleet serve (it builds the table); inspect with: nft list table inet {name}")),
        ));
        checks.push(route_check(self.route_present().await, &self.subnet));
        checks
    }

    /// The checks for one running machine, with the host-wide forwarding and route checks first.
    pub(crate) async fn machine_report(&self, m: &Machine) -> NetworkReport {
        let table = self.firewall.current().await.ok().flatten();
        let mut checks = vec![ip_forward_check().await, route_check(self.route_present().await, &self.subnet)];
        checks.extend(self.machine_checks(m, table.as_deref()).await);
        NetworkReport { machine_id: m.id.clone(), ok: checks.iter().all(|c| c.ok), checks }
    }

    /// The troubleshooting steps for one running machine: its interface, address, firewall entry, ping.
    pub(crate) async fn machine_checks(&self, m: &Machine, table: Option<&str>) -> Vec<Check> {
        let name = &m.tap_device;
        let owned = |l: &hyperfleet_net::link::LinkState| l.owner() == Some(m.id.as_str());
        let link = self.netlink.link(name).await.ok().flatten();
        let mut checks = vec![check(
            "interface exists",
            link.as_ref().is_some_and(owned),
            match &link {
                Some(l) if owned(l) => format!("{name} exists"),
                Some(_) => format!("{name} exists but is not this machine's"),
                None => format!("{name} is missing"),
            },
            Some(&format!("hyperfleet machines restart {}", m.id)),
        )];
        let up = link.as_ref().is_some_and(|l| l.up);
        checks.push(check(
            "interface up",
            up,
            format!("{name} is {}", if up { "up" } else { "down" }),
            Some(&format!("ip link set {name} up")),
        ));
        let addrs = match &link {
            Some(l) => self.netlink.addresses(l.index).await.unwrap_or_default(),
            None => vec![],
        };
        let has_ip = addrs.iter().any(|a| a.addr() == m.tap_ip && a.prefix_len() == BLOCK_PREFIX);
        checks.push(check(
            "interface address",
            has_ip,
            format!(
                "{name} has {:?}, wants {}/{BLOCK_PREFIX}",
                addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                m.tap_ip
            ),
            Some(&format!("ip addr add {}/{BLOCK_PREFIX} dev {name}", m.tap_ip)),
        ));
        checks.push(check(
            "firewall entry",
            table.is_some_and(|t| t.contains(&format!("\"{name}\""))),
            format!(
                "nftables table inet {} {} {name}",
                self.firewall.table(),
                if table.is_some() { "lists" } else { "is missing, so not" }
            ),
            Some("restart the hyperfleet daemon (it rebuilds the table)"),
        ));
        let guest = m.guest_ip;
        let rtt = hyperfleet_net::icmp::ping(guest, Duration::from_secs(1)).await.ok().flatten();
        checks.push(check(
            "guest reachable",
            rtt.is_some(),
            match rtt {
                Some(t) => format!("{guest} answered ping in {:.2} ms", t.as_secs_f64() * 1000.0),
                None => format!("{guest} did not answer ping within 1 s (a guest still booting does not answer yet)"),
            },
            Some(&format!("hyperfleet machines logs {}", m.id)),
        ));
        checks
    }
}

/// Runs every check over the machines `running` (as the service lists them); returns the report text and
/// whether all passed.
pub(crate) async fn run(
    settings: &Settings,
    database: Check,
    running: Option<Vec<Machine>>,
) -> anyhow::Result<(String, bool)> {
    let doctor = Doctor::new(&settings.network)?;
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
    section("database", &[database], &mut out);
    section("host", &doctor.host_checks(&settings.runtime).await, &mut out);
    match running {
        Some(running) => {
            let table = doctor.firewall.current().await.ok().flatten();
            for m in &running {
                let checks = doctor.machine_checks(m, table.as_deref()).await;
                section(&format!("machine {} ({}, {})", m.spec.name, m.id, m.tap_device), &checks, &mut out);
            }
            if running.is_empty() {
                out.push_str("no running machines\n");
            }
        }
        None => out.push_str(&format!("no machines read from the database ({})\n", settings.store.database.describe())),
    }
    Ok((out, all_ok))
}
