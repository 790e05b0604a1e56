//! The one nftables table Hyperfleet owns (`inet hyperfleet`): NAT for the machine subnet, isolation between
//! machines and from the host, anti-spoofing and per-machine egress policy. The rules are fixed; each machine
//! is a few set elements, added at start and deleted at stop in one `nft -f` transaction. The whole table is
//! replaced (also one transaction, never half-updated) only at reconcile and when an element update fails.
//! Other tables (the user's own rules) are never touched; deleting the table leaves the host clean.
//!
//! Every change holds the firewall's own lock, so changes from concurrent starts and stops never interleave.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use ipnet::Ipv4Net;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::NetError;

pub const DEFAULT_TABLE: &str = "hyperfleet";

/// Where a machine may open new connections to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Egress {
    Allow,
    Deny,
    Only(Vec<Ipv4Net>),
}

/// One running machine as the firewall sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallEntry {
    /// Host-side interface (TAP or veth host end).
    pub iface: String,
    pub tap_ip: Ipv4Addr,
    pub guest_ip: Ipv4Addr,
    pub egress: Egress,
    /// The machine may reach the daemon's child API on its own gateway (a machine with `spawn`).
    pub api: bool,
}

/// The table's handle; clones share one lock.
#[derive(Debug, Clone)]
pub struct Firewall {
    table: String,
    subnet: Ipv4Net,
    /// Destinations no machine may reach, whatever its own egress policy.
    deny: Vec<Ipv4Net>,
    /// The hosts of the rest of the fleet (the other nodes, the database), which no machine may reach either:
    /// their services are the control plane's. Changes at run time; shared by clones.
    fenced: Arc<std::sync::RwLock<Vec<std::net::Ipv4Addr>>>,
    nft: PathBuf,
    /// The child API's port: the one host port machines listed in `api_gateways` may reach.
    child_api_port: Option<u16>,
    /// Held for every change, and across a read-then-replace in [`Firewall::rebuild`] and
    /// [`Firewall::update`], so that an older view of the machines never overwrites a newer one.
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Firewall {
    pub fn new(table: &str, subnet: Ipv4Net) -> Self {
        Self {
            table: table.to_string(),
            subnet,
            deny: vec![],
            fenced: Arc::default(),
            nft: PathBuf::from("nft"),
            child_api_port: None,
            lock: Arc::default(),
        }
    }

    /// Opens TCP `port` on its own gateway address to every machine whose entry has `api` (and to no other).
    pub fn with_child_api_port(mut self, port: Option<u16>) -> Self {
        self.child_api_port = port;
        self
    }

    /// Destinations denied to every machine (e.g. the link-local range with the cloud metadata service).
    pub fn with_egress_deny(mut self, deny: Vec<Ipv4Net>) -> Self {
        self.deny = deny;
        self
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The set elements that stand for one machine, as `(set, element)` pairs. Everything per machine lives in
    /// sets, so the rules are fixed and a start or stop only adds or deletes elements.
    fn elements(m: &FirewallEntry) -> Vec<(&'static str, String)> {
        let mut e = vec![
            ("machine_ifaces", format!("\"{}\"", m.iface)),
            ("gateways", format!("\"{}\" . {}", m.iface, m.tap_ip)),
            ("guest_addrs", format!("\"{}\" . {}", m.iface, m.guest_ip)),
        ];
        if m.api {
            e.push(("api_gateways", format!("\"{}\" . {}", m.iface, m.tap_ip)));
        }
        // Deny is a restriction with nothing allowed.
        if let Egress::Deny | Egress::Only(_) = &m.egress {
            e.push(("egress_restricted", format!("\"{}\"", m.iface)));
        }
        if let Egress::Only(cidrs) = &m.egress {
            e.extend(cidrs.iter().map(|c| ("egress_allowed", format!("\"{}\" . {c}", m.iface))));
        }
        e
    }

    /// The full table for these machines, as one nft script that replaces any previous version atomically.
    pub fn render(&self, machines: &[FirewallEntry]) -> String {
        let t = &self.table;
        let subnet = self.subnet;
        let mut s = String::new();
        // Here and in `set`, `let _ =` drops the result of writing to a String, which is always Ok.
        // "add" makes the delete valid when the table does not exist yet; all three lines are one transaction.
        let _ = writeln!(s, "add table inet {t}\ndelete table inet {t}\ntable inet {t} {{");
        let all: Vec<(&str, String)> = machines.iter().flat_map(Self::elements).collect();
        for (name, ty, flags) in [
            ("machine_ifaces", "ifname", ""),
            ("gateways", "ifname . ipv4_addr", ""),
            ("guest_addrs", "ifname . ipv4_addr", ""),
            ("api_gateways", "ifname . ipv4_addr", ""),
            ("egress_restricted", "ifname", ""),
            ("egress_allowed", "ifname . ipv4_addr", "interval"),
        ] {
            let elements: Vec<&str> = all.iter().filter(|(n, _)| *n == name).map(|(_, e)| e.as_str()).collect();
            set(&mut s, name, ty, flags, &elements);
        }
        let fenced: Vec<String> = self.fenced().iter().map(ToString::to_string).collect();
        set(&mut s, "fenced_hosts", "ipv4_addr", "", &fenced.iter().map(String::as_str).collect::<Vec<_>>());

        // Guest -> host: only replies and a ping of its own gateway, and, for a machine with `spawn`, TCP to
        // the child API port on its own gateway from its own address. Everything else the host listens on
        // (ssh, the API, the proxy, the other machines' gateways) stays out of reach.
        let api = match self.child_api_port {
            Some(port) => format!(
                "meta nfproto ipv4 iifname . ip daddr @api_gateways iifname . ip saddr @guest_addrs \
                 tcp dport {port} accept\n    "
            ),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "  chain input {{\n    type filter hook input priority filter; policy accept;\n    \
             iifname @machine_ifaces jump guest_to_host\n  }}\n  \
             chain guest_to_host {{\n    ct state established,related accept\n    \
             meta nfproto ipv4 iifname . ip daddr @gateways icmp type echo-request accept\n    {api}drop\n  }}"
        );

        // Forwarded traffic: guest -> world, anti-spoofed, never to another machine nor a denied network,
        // with its egress policy; world -> guest only as replies.
        let _ = writeln!(
            s,
            "  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    \
             iifname @machine_ifaces jump guest_out\n    oifname @machine_ifaces jump guest_in\n  }}"
        );
        let denied = if self.deny.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = self.deny.iter().map(|n| n.to_string()).collect();
            format!("ip daddr {{ {} }} drop\n    ", list.join(", "))
        };
        let _ = writeln!(
            s,
            "  chain guest_out {{\n    meta nfproto != ipv4 drop\n    \
             iifname . ip saddr != @guest_addrs drop\n    \
             oifname @machine_ifaces drop\n    ip daddr {subnet} drop\n    {denied}\
             ip daddr @fenced_hosts drop\n    \
             ct state established,related accept\n    \
             iifname @egress_restricted iifname . ip daddr != @egress_allowed drop\n    accept\n  }}"
        );
        let _ = writeln!(s, "  chain guest_in {{\n    ct state established,related accept\n    drop\n  }}");

        // Masquerade what leaves through anything that is not a machine interface.
        let _ = writeln!(
            s,
            "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             ip saddr {subnet} oifname != @machine_ifaces masquerade\n  }}\n}}"
        );
        s
    }

    /// Replaces the table with the rules for `machines`.
    pub async fn apply(&self, machines: &[FirewallEntry]) -> Result<(), NetError> {
        let _guard = self.lock.lock().await;
        self.replace(machines).await
    }

    async fn replace(&self, machines: &[FirewallEntry]) -> Result<(), NetError> {
        self.run(&["-f", "-"], Some(self.render(machines))).await.map(|_| ())
    }

    /// Replaces the table with the machines `running` returns, read while the lock is held (`running` must
    /// not call this firewall).
    pub async fn rebuild<E: From<NetError>>(
        &self,
        running: impl AsyncFnOnce() -> Result<Vec<FirewallEntry>, E>,
    ) -> Result<(), E> {
        let _guard = self.lock.lock().await;
        let machines = running().await?;
        Ok(self.replace(&machines).await?)
    }

    /// Adds (`add`) or deletes one machine's elements. If that fails (table missing, elements not what a
    /// crash left expected) the table is replaced with the machines `running` returns, which is always
    /// right; all under one hold of the lock (`running` must not call this firewall).
    pub async fn update<E: From<NetError>>(
        &self,
        m: &FirewallEntry,
        add: bool,
        running: impl AsyncFnOnce() -> Result<Vec<FirewallEntry>, E>,
    ) -> Result<(), E> {
        let _guard = self.lock.lock().await;
        if let Err(e) = self.run(&["-f", "-"], Some(self.element_script(if add { "add" } else { "delete" }, m))).await {
            tracing::debug!(iface = %m.iface, error = %e, "incremental firewall update failed; replacing the table");
            let machines = running().await?;
            self.replace(&machines).await?;
        }
        Ok(())
    }

    fn element_script(&self, op: &str, m: &FirewallEntry) -> String {
        Self::elements(m)
            .into_iter()
            .map(|(set, e)| format!("{op} element inet {} {set} {{ {e} }}\n", self.table))
            .collect()
    }

    /// Adds one machine to the existing table, in one transaction (a few milliseconds, where replacing the
    /// table costs a kernel RCU grace period). Fails if the table is missing or the machine already listed.
    pub async fn add(&self, m: &FirewallEntry) -> Result<(), NetError> {
        let _guard = self.lock.lock().await;
        self.run(&["-f", "-"], Some(self.element_script("add", m))).await.map(|_| ())
    }

    /// Removes one machine from the table, in one transaction. Fails if any of its elements is missing.
    pub async fn delete(&self, m: &FirewallEntry) -> Result<(), NetError> {
        let _guard = self.lock.lock().await;
        self.run(&["-f", "-"], Some(self.element_script("delete", m))).await.map(|_| ())
    }

    fn fenced(&self) -> Vec<std::net::Ipv4Addr> {
        self.fenced.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes `hosts` (the rest of the fleet) unreachable from every machine, in place of the hosts fenced
    /// before; `Ok(false)` when nothing changed. The table is changed in one transaction; if it does not
    /// exist yet, the next replacement carries the fence.
    pub async fn fence(&self, mut hosts: Vec<std::net::Ipv4Addr>) -> Result<bool, NetError> {
        hosts.sort_unstable();
        hosts.dedup();
        let _guard = self.lock.lock().await;
        if self.fenced() == hosts {
            return Ok(false);
        }
        let before = std::mem::replace(&mut *self.fenced.write().unwrap_or_else(|e| e.into_inner()), hosts.clone());
        let t = &self.table;
        let mut script = format!("flush set inet {t} fenced_hosts\n");
        if !hosts.is_empty() {
            let list: Vec<String> = hosts.iter().map(ToString::to_string).collect();
            let _ = writeln!(script, "add element inet {t} fenced_hosts {{ {} }}", list.join(", "));
        }
        if let Err(e) = self.run(&["-f", "-"], Some(script)).await {
            // Not in the kernel: the next call tries again rather than taking it as done.
            *self.fenced.write().unwrap_or_else(|e| e.into_inner()) = before;
            return Err(e);
        }
        Ok(true)
    }

    /// Deletes the table (and with it every rule Hyperfleet made); a missing table is not an error.
    pub async fn remove(&self) -> Result<(), NetError> {
        let _guard = self.lock.lock().await;
        let script = format!("add table inet {t}\ndelete table inet {t}\n", t = self.table);
        self.run(&["-f", "-"], Some(script)).await.map(|_| ())
    }

    /// The table as the kernel has it (`nft list table inet hyperfleet`), or `None` when it does not exist.
    pub async fn current(&self) -> Result<Option<String>, NetError> {
        match self.run(&["list", "table", "inet", &self.table], None).await {
            Ok(out) => Ok(Some(out)),
            Err(NetError::Nft(msg)) if msg.contains("No such file") => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn run(&self, args: &[&str], stdin: Option<String>) -> Result<String, NetError> {
        let mut child = Command::new(&self.nft)
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| NetError::Nft(format!("run nft: {e} (install the nftables package)")))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).await.map_err(|e| NetError::Nft(format!("write to nft: {e}")))?;
        }
        let out = child.wait_with_output().await.map_err(|e| NetError::Nft(format!("wait for nft: {e}")))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(NetError::Nft(String::from_utf8_lossy(&out.stderr).trim().to_string()))
        }
    }
}

fn set(s: &mut String, name: &str, ty: &str, flags: &str, elements: &[&str]) {
    let _ = write!(s, "  set {name} {{\n    type {ty}\n");
    if !flags.is_empty() {
        let _ = writeln!(s, "    flags {flags}");
    }
    if !elements.is_empty() {
        let _ = writeln!(s, "    elements = {{ {} }}", elements.join(", "));
    }
    let _ = writeln!(s, "  }}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u32, egress: Egress) -> FirewallEntry {
        FirewallEntry {
            iface: format!("tap{i}"),
            tap_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 1)) + 4 * i),
            guest_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 2)) + 4 * i),
            egress,
            api: false,
        }
    }

    #[test]
    fn renders_one_entry_per_running_machine() {
        let fw = Firewall::new("hftest", "172.16.0.0/16".parse().unwrap());
        let text = fw.render(&[
            entry(0, Egress::Allow),
            entry(1, Egress::Deny),
            entry(2, Egress::Only(vec!["10.200.0.0/24".parse().unwrap()])),
        ]);
        assert!(text.starts_with("add table inet hftest\ndelete table inet hftest\n"));
        assert!(text.contains(r#"elements = { "tap0", "tap1", "tap2" }"#));
        assert!(text.contains(r#""tap1" . 172.16.0.5"#));
        assert!(text.contains(r#""tap2" . 172.16.0.10"#));
        // Deny and a CIDR list are both restrictions; only the list allows something.
        assert!(text.contains(r#"elements = { "tap1", "tap2" }"#), "{text}");
        assert!(text.contains(r#"elements = { "tap2" . 10.200.0.0/24 }"#), "{text}");
        assert!(text.contains("iifname @egress_restricted iifname . ip daddr != @egress_allowed drop"));
        assert!(text.contains("ip saddr 172.16.0.0/16 oifname != @machine_ifaces masquerade"));
        assert!(!text.contains("ip daddr {"), "nothing is denied unless configured");
    }

    #[test]
    fn denied_destinations_come_before_any_allowance() {
        let deny = vec!["169.254.0.0/16".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        let text = Firewall::new("hftest", "172.16.0.0/16".parse().unwrap()).with_egress_deny(deny).render(&[]);
        let denied = text.find("ip daddr { 169.254.0.0/16, 10.0.0.0/8 } drop").expect(&text);
        assert!(denied < text.find("ct state established,related accept\n    iifname @egress_restricted").unwrap());
    }

    #[test]
    fn a_machine_is_added_and_removed_as_set_elements() {
        let fw = Firewall::new("hftest", "172.16.0.0/16".parse().unwrap());
        let m = entry(3, Egress::Only(vec!["10.0.0.0/8".parse().unwrap(), "192.0.2.1/32".parse().unwrap()]));
        let add = fw.element_script("add", &m);
        assert_eq!(add.lines().count(), 6, "{add}");
        assert!(add.contains(r#"add element inet hftest egress_allowed { "tap3" . 192.0.2.1/32 }"#), "{add}");
        let del = fw.element_script("delete", &entry(4, Egress::Allow));
        assert_eq!(del.lines().count(), 3, "an unrestricted machine has no egress elements: {del}");
    }

    /// A stand-in for `nft` that logs each script it is given and refuses element edits, as the kernel does
    /// when the table is missing or a crash left other elements.
    fn refusing_nft(dir: &std::path::Path) -> Firewall {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join("nft");
        let log = dir.join("log");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nin=$(cat)\nprintf '%s\\n--\\n' \"$in\" >> {log}\n\
                 case \"$in\" in *' element '*) echo 'Error: No such file or directory' >&2; exit 1;; esac\n",
                log = log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        Firewall { nft: script, ..Firewall::new("hftest", "172.16.0.0/16".parse().unwrap()) }
    }

    #[tokio::test]
    async fn a_failed_element_edit_falls_back_to_replacing_the_table() {
        let dir = std::env::temp_dir().join(format!("hf-fw-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fw = refusing_nft(&dir);
        let running = vec![entry(0, Egress::Allow), entry(5, Egress::Deny)];
        let read = running.clone();
        fw.update(&entry(5, Egress::Deny), true, async || Ok::<_, NetError>(read)).await.unwrap();
        let log = std::fs::read_to_string(dir.join("log")).unwrap();
        let scripts: Vec<&str> = log.split("\n--\n").filter(|s| !s.is_empty()).collect();
        assert_eq!(scripts.len(), 2, "{log}");
        assert!(scripts[0].starts_with("add element inet hftest machine_ifaces"), "{log}");
        assert_eq!(scripts[1], fw.render(&running).trim_end(), "the table is replaced with what `running` read");

        // The machines could not be read: nothing is replaced and the caller gets that error.
        let e = fw.update(&entry(6, Egress::Allow), false, async || Err(NetError::Nft("store down".into()))).await;
        assert!(matches!(e, Err(NetError::Nft(m)) if m == "store down"));
        let log = std::fs::read_to_string(dir.join("log")).unwrap();
        assert_eq!(log.matches("\n--\n").count(), 3, "only the refused delete was run: {log}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn the_rest_of_the_fleet_is_fenced_off_from_every_machine() {
        let fw = Firewall::new("hftest", "172.16.0.0/16".parse().unwrap());
        let open = fw.render(&[entry(0, Egress::Allow)]);
        assert!(open.contains("set fenced_hosts {\n    type ipv4_addr\n  }"), "an empty fence\n{open}");
        let dir = std::env::temp_dir().join(format!("hf-fw-fence-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hosts: Vec<std::net::Ipv4Addr> =
            vec!["10.0.0.7".parse().unwrap(), "10.0.0.5".parse().unwrap(), "10.0.0.7".parse().unwrap()];
        // Refused by nft: not taken as done, so the next call tries again.
        let refused = refusing_nft(&dir);
        assert!(refused.fence(hosts.clone()).await.is_err());
        assert!(refused.fenced().is_empty());
        std::fs::remove_file(dir.join("log")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join("nft-ok");
        std::fs::write(&script, format!("#!/bin/sh\ncat >> {}\necho -- >> {0}\n", dir.join("log").display())).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let fw = Firewall { nft: script, ..Firewall::new("hftest", "172.16.0.0/16".parse().unwrap()) };
        assert!(fw.fence(hosts.clone()).await.unwrap(), "a change");
        assert!(!fw.fence(hosts).await.unwrap(), "the same hosts again: nothing to do");
        let log = std::fs::read_to_string(dir.join("log")).unwrap();
        assert_eq!(
            log,
            "flush set inet hftest fenced_hosts\nadd element inet hftest fenced_hosts { 10.0.0.5, 10.0.0.7 }\n--\n"
        );
        // Every replacement of the table carries the fence, before any allowance.
        let text = fw.render(&[entry(0, Egress::Allow)]);
        assert!(text.contains("elements = { 10.0.0.5, 10.0.0.7 }"), "{text}");
        let fenced = text.find("ip daddr @fenced_hosts drop").expect(&text);
        assert!(fenced < text.find("ct state established,related accept\n    iifname @egress_restricted").unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_spawn_machines_reach_the_child_api_port_on_their_own_gateway() {
        let fw = Firewall::new("hftest", "172.16.0.0/16".parse().unwrap());
        let closed = fw.render(&[FirewallEntry { api: true, ..entry(1, Egress::Allow) }]);
        assert!(!closed.contains("dport"), "no child API: no opening at all\n{closed}");
        let fw = fw.with_child_api_port(Some(3001));
        let text = fw.render(&[entry(0, Egress::Allow), FirewallEntry { api: true, ..entry(1, Egress::Allow) }]);
        assert!(
            text.contains(
                "iifname . ip daddr @api_gateways iifname . ip saddr @guest_addrs tcp dport 3001 accept\n    drop"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"type ifname . ipv4_addr
    elements = { "tap1" . 172.16.0.5 }"#
            ),
            "only the spawn machine's gateway: {text}"
        );
        let add = fw.element_script("add", &FirewallEntry { api: true, ..entry(2, Egress::Allow) });
        assert!(add.contains(r#"add element inet hftest api_gateways { "tap2" . 172.16.0.9 }"#), "{add}");
        assert!(!fw.element_script("add", &entry(2, Egress::Allow)).contains("api_gateways"));
    }

    #[test]
    fn empty_sets_have_no_elements_line() {
        let text = Firewall::new("hftest", "172.16.0.0/16".parse().unwrap()).render(&[]);
        assert!(!text.contains("elements"));
    }
}
