//! A fake [`Host`] that keeps in memory what a real one would create on the host (disks, interfaces,
//! firewall entries, processes), can be told to fail at any step, and the Service's flows tested over it
//! with a real SQLite store: rollback at every step of a start, stop, and reconcile of every leftover.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyperfleet_agent_proto::client::{AgentClient, Endpoint};
use hyperfleet_net::{Subnet, TapNaming};
use hyperfleet_types::{CreateMachine, MachineStatus, RuntimeKind};
use tokio::sync::watch;

use super::network::Addressing;
use super::{Error, Host, Policy, Result, Service};
use crate::runtime::host::HostCapacity;
use crate::runtime::{Booted, Instance, RuntimeError};
use crate::store::Store;
use crate::store::machines::MachineRecord;

/// What exists on the fake host.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct World {
    /// Machines whose disk/root/namespace is prepared (and not released).
    pub prepared: BTreeSet<String>,
    pub interfaces: BTreeSet<String>,
    pub firewall: BTreeSet<String>,
    /// Running processes: pid → machine id.
    pub processes: HashMap<u32, String>,
    pub disks: BTreeSet<String>,
    /// Volumes whose file exists.
    pub volumes: BTreeSet<String>,
    /// Hosts no machine may reach.
    pub fenced: Vec<std::net::Ipv4Addr>,
}

#[derive(Default)]
pub(super) struct FakeHost {
    pub world: Mutex<World>,
    /// The step that fails next: "prepare", "attach", "firewall", "boot", "detach", "firewall_edit".
    pub fail: Mutex<HashSet<&'static str>>,
    next_pid: Mutex<u32>,
    /// Tells `exited` waiters which processes ended.
    ended: Mutex<HashMap<u32, watch::Sender<bool>>>,
}

impl FakeHost {
    fn failing(&self, step: &'static str) -> bool {
        self.fail.lock().unwrap().contains(step)
    }

    fn refuse(step: &'static str) -> Error {
        Error::Runtime(RuntimeError::Unavailable(format!("{step} refused by the test")))
    }

    pub(super) fn world(&self) -> World {
        self.world.lock().unwrap().clone()
    }

    /// Ends a process as if it crashed.
    pub(super) fn kill(&self, pid: u32) {
        self.world.lock().unwrap().processes.remove(&pid);
        if let Some(tx) = self.ended.lock().unwrap().get(&pid) {
            tx.send_replace(true);
        }
    }

    /// Ends a process while no daemon watches (it "crashed" before): nobody is told.
    pub(super) fn vanish(&self, pid: u32) {
        self.world.lock().unwrap().processes.remove(&pid);
    }

    fn end(&self, pid: u32) {
        self.kill(pid);
    }
}

impl Host for FakeHost {
    fn unavailable(&self, _runtime: RuntimeKind) -> Option<String> {
        None
    }

    async fn prepare(&self, m: &MachineRecord) -> Result<Option<String>> {
        if self.failing("prepare") {
            return Err(Self::refuse("prepare"));
        }
        let mut w = self.world.lock().unwrap();
        w.disks.insert(m.id.clone());
        w.prepared.insert(m.id.clone());
        Ok(Some(format!("ns-{}", m.id)))
    }

    async fn attach(&self, m: &MachineRecord, _netns: Option<&str>) -> Result<()> {
        if self.failing("attach") {
            return Err(Self::refuse("attach"));
        }
        self.world.lock().unwrap().interfaces.insert(m.id.clone());
        Ok(())
    }

    async fn boot(&self, m: &MachineRecord, _netns: Option<&str>) -> Result<Booted> {
        if self.failing("boot") {
            return Err(Self::refuse("boot"));
        }
        let pid = {
            let mut next = self.next_pid.lock().unwrap();
            *next += 1;
            1000 + *next
        };
        self.world.lock().unwrap().processes.insert(pid, m.id.clone());
        self.ended.lock().unwrap().insert(pid, watch::channel(false).0);
        Ok(Booted { pid, socket_path: None })
    }

    async fn stop(&self, m: &Instance) {
        if let Some(pid) = m.pid {
            self.end(pid);
        }
        self.world.lock().unwrap().prepared.remove(&m.id);
    }

    async fn detach(&self, m: &MachineRecord) -> Result<()> {
        if self.failing("detach") {
            return Err(Self::refuse("detach"));
        }
        self.world.lock().unwrap().interfaces.remove(&m.id);
        Ok(())
    }

    async fn firewall_edit(&self, m: &MachineRecord, add: bool) -> Result<()> {
        if self.failing("firewall") && add {
            return Err(Self::refuse("firewall"));
        }
        if self.failing("firewall_edit") {
            return Err(Self::refuse("firewall_edit"));
        }
        let mut w = self.world.lock().unwrap();
        if add {
            w.firewall.insert(m.id.clone())
        } else {
            w.firewall.remove(&m.id)
        };
        Ok(())
    }

    async fn firewall_rebuild(&self, active: &[MachineRecord]) -> Result<()> {
        if self.failing("firewall") {
            return Err(Self::refuse("firewall"));
        }
        self.world.lock().unwrap().firewall = active.iter().map(|m| m.id.clone()).collect();
        Ok(())
    }

    async fn fence(&self, hosts: Vec<std::net::Ipv4Addr>) -> Result<bool> {
        let mut w = self.world.lock().unwrap();
        let changed = w.fenced != hosts;
        w.fenced = hosts;
        Ok(changed)
    }

    async fn set_paused(&self, _m: &Instance, _pause: bool) -> Result<()> {
        if self.failing("pause") {
            return Err(Self::refuse("pause"));
        }
        Ok(())
    }

    async fn live_pid(&self, m: &Instance) -> Option<u32> {
        let w = self.world.lock().unwrap();
        w.processes.iter().find(|(_, id)| **id == m.id).map(|(pid, _)| *pid)
    }

    async fn exited(&self, pid: u32) {
        let rx = self.ended.lock().unwrap().entry(pid).or_insert_with(|| watch::channel(false).0).subscribe();
        let mut rx = rx;
        // Waits until the flag turns true (or the sender goes away with the host).
        let _ended = rx.wait_for(|ended| *ended).await;
    }

    async fn console_tail(&self, id: &str, _lines: usize) -> Vec<String> {
        vec![format!("console of {id}")]
    }

    fn agent(&self, m: &Instance) -> AgentClient {
        AgentClient::new(Endpoint::Unix(PathBuf::from(format!("/nonexistent/{}.sock", m.id))))
    }

    async fn destroy(&self, m: &Instance) -> Result<()> {
        self.world.lock().unwrap().disks.remove(&m.id);
        Ok(())
    }

    async fn remove_strays(&self, live: &HashSet<String>, known: &HashSet<String>) -> Result<Vec<String>> {
        let mut w = self.world.lock().unwrap();
        let World { interfaces, prepared, disks, .. } = &mut *w;
        let mut removed = Vec::new();
        for set in [interfaces, prepared] {
            let stray: Vec<String> = set.iter().filter(|id| !live.contains(*id)).cloned().collect();
            for id in stray {
                set.remove(&id);
                removed.push(id);
            }
        }
        disks.retain(|id| known.contains(id));
        Ok(removed)
    }

    async fn cap_console(&self, _id: &str, _max: u64) -> Result<()> {
        Ok(())
    }

    async fn remove_host_wide(&self) -> Result<()> {
        self.world.lock().unwrap().firewall.clear();
        Ok(())
    }

    async fn volume_create(&self, id: &str, _size_mib: u32) -> Result<()> {
        if self.failing("volume") {
            return Err(Self::refuse("volume"));
        }
        self.world.lock().unwrap().volumes.insert(id.to_string());
        Ok(())
    }

    async fn volume_grow(&self, _id: &str, _size_mib: u32) -> Result<()> {
        if self.failing("volume") {
            return Err(Self::refuse("volume"));
        }
        Ok(())
    }

    async fn volume_clone(&self, _from: &str, to: &str) -> Result<()> {
        if self.failing("volume") {
            return Err(Self::refuse("volume"));
        }
        self.world.lock().unwrap().volumes.insert(to.to_string());
        Ok(())
    }

    async fn volume_remove(&self, id: &str) -> Result<()> {
        self.world.lock().unwrap().volumes.remove(id);
        Ok(())
    }

    async fn usage(&self, m: &MachineRecord) -> crate::runtime::stats::Usage {
        let running = m.pid.is_some_and(|p| self.world.lock().unwrap().processes.contains_key(&p));
        crate::runtime::stats::Usage {
            cpu_seconds: running.then_some(1.0),
            memory_used: running.then_some(1 << 20),
            disk_size: Some(1 << 30),
            ..Default::default()
        }
    }
}

/// A service over a fake host and a real SQLite file.
pub(super) async fn service() -> (tempfile::TempDir, Arc<Service<FakeHost>>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_file(&dir.path().join("test.db")).await.unwrap();
    let (kernel, rootfs) = (dir.path().join("vmlinux"), dir.path().join("rootfs.ext4"));
    std::fs::write(&kernel, b"k").unwrap();
    std::fs::write(&rootfs, b"r").unwrap();
    let addressing =
        Addressing { subnet: "10.9.0.0/24".parse::<Subnet>().unwrap(), naming: TapNaming::new("tap").unwrap() };
    let policy = Policy {
        assets_dir: dir.path().to_path_buf(),
        default_kernel: kernel,
        default_rootfs: rootfs,
        default_kernel_args: "console=ttyS0".into(),
        default_runtime: RuntimeKind::Container,
        default_dns: vec![Ipv4Addr::new(10, 0, 0, 53)],
        capacity: HostCapacity { cpus: 2, mem_mib: 1024 },
        file_max_size: 1 << 20,
        file_transfer_timeout: Duration::from_secs(5),
        max_execs_per_machine: 4,
        exec_output_budget: 1 << 20,
        events_backlog: 1000,
        metrics: true,
        webhooks: crate::machines::webhooks::WebhookPolicy {
            retry_base: std::time::Duration::from_millis(10),
            max_attempts: 3,
            timeout: std::time::Duration::from_secs(5),
        },
        child_api_port: Some(3001),
        node: crate::machines::NodePolicy::single("local"),
    };
    let images = Arc::new(
        super::images::Images::new(
            dir.path().join("images"),
            dir.path().join("agent"),
            1 << 30,
            crate::oci::Registries::default(),
        )
        .unwrap(),
    );
    let svc = Service::new(store, FakeHost::default(), addressing, policy, images);
    svc.nodes().register().await.unwrap();
    (dir, svc)
}

pub(super) fn create_req(name: &str) -> CreateMachine {
    CreateMachine { name: Some(name.into()), vcpu_count: Some(1), mem_size_mib: Some(64), ..Default::default() }
}

mod flows {
    use super::*;
    use MachineStatus::*;

    #[tokio::test]
    async fn start_and_stop_make_and_remove_everything() {
        let (_d, svc) = service().await;
        let m = svc.create(create_req("web")).await.unwrap();
        let running = svc.start(&m.id).await.unwrap();
        assert_eq!(running.status, Running);
        let pid = running.pid.unwrap();
        let w = svc.host().world();
        assert!(w.prepared.contains(&m.id) && w.interfaces.contains(&m.id) && w.firewall.contains(&m.id));
        assert_eq!(w.processes.get(&pid), Some(&m.id));
        let stopped = svc.stop(&m.id).await.unwrap();
        assert_eq!((stopped.status, stopped.pid), (Stopped, None));
        let w = svc.host().world();
        assert_eq!((w.prepared.len(), w.interfaces.len(), w.firewall.len(), w.processes.len()), (0, 0, 0, 0));
        assert!(w.disks.contains(&m.id), "the disk survives a stop");
        svc.delete(&m.id, false).await.unwrap();
        assert!(svc.host().world().disks.is_empty(), "delete removes the disk");
    }

    #[tokio::test]
    async fn a_failed_start_at_any_step_leaves_nothing_behind() {
        for step in ["prepare", "attach", "firewall", "boot"] {
            let (_d, svc) = service().await;
            let m = svc.create(create_req("web")).await.unwrap();
            svc.host().fail.lock().unwrap().insert(step);
            let e = svc.start(&m.id).await.unwrap_err();
            assert!(e.to_string().contains(&format!("{step} refused")), "{step}: {e}");
            let after = svc.get(&m.id).await.unwrap();
            assert_eq!(after.status, Failed, "{step}");
            assert!(after.error_message.unwrap().contains("refused"), "{step}: the reason is kept");
            let w = svc.host().world();
            assert_eq!(
                (w.prepared.len(), w.interfaces.len(), w.firewall.len(), w.processes.len()),
                (0, 0, 0, 0),
                "{step}: {w:?}"
            );
            // Once the cause is gone the same machine starts.
            svc.host().fail.lock().unwrap().clear();
            assert_eq!(svc.start(&m.id).await.unwrap().status, Running, "{step}: retry");
        }
    }

    #[tokio::test]
    async fn a_failing_undo_is_reported_with_the_cause() {
        let (_d, svc) = service().await;
        let m = svc.create(create_req("web")).await.unwrap();
        svc.host().fail.lock().unwrap().extend(["boot", "detach"]);
        let e = svc.start(&m.id).await.unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("boot refused") && msg.contains("undoing it also failed") && msg.contains("detach"),
            "{msg}"
        );
        assert!(matches!(e.cause(), Error::Runtime(_)));
        assert_eq!(svc.get(&m.id).await.unwrap().status, Failed);
        // What could be undone was: no process, no firewall entry.
        let w = svc.host().world();
        assert_eq!((w.processes.len(), w.firewall.len()), (0, 0));
    }

    #[tokio::test]
    async fn the_firewall_is_rebuilt_when_an_edit_fails() {
        let (_d, svc) = service().await;
        let a = svc.create(create_req("a")).await.unwrap();
        let b = svc.create(create_req("b")).await.unwrap();
        svc.start(&a.id).await.unwrap();
        svc.host().fail.lock().unwrap().insert("firewall_edit");
        svc.start(&b.id).await.unwrap();
        assert_eq!(svc.host().world().firewall, [a.id.clone(), b.id.clone()].into_iter().collect());
        svc.stop(&a.id).await.unwrap();
        assert_eq!(svc.host().world().firewall, [b.id.clone()].into_iter().collect(), "a stopped machine is left out");
    }

    #[tokio::test]
    async fn two_starts_of_one_machine_do_not_both_act() {
        let (_d, svc) = service().await;
        let m = svc.create(create_req("web")).await.unwrap();
        let (a, b) = tokio::join!(svc.start(&m.id), svc.start(&m.id));
        assert!(a.is_ok() != b.is_ok(), "exactly one start wins: {a:?} {b:?}");
        let lost = a.err().or(b.err()).unwrap();
        assert!(matches!(lost, Error::InvalidState { .. }), "{lost}");
        assert_eq!(svc.host().world().processes.len(), 1);
    }

    #[tokio::test]
    async fn a_process_that_dies_makes_the_machine_failed_and_is_cleaned_up() {
        let (_d, svc) = service().await;
        let m = svc.create(create_req("web")).await.unwrap();
        let pid = svc.start(&m.id).await.unwrap().pid.unwrap();
        svc.host().kill(pid);
        // `wait` for `failed` reports the failure itself as an error; either way the machine must get there.
        match svc.wait(&m.id, Failed, Duration::from_secs(5)).await {
            Ok(_) | Err(Error::WaitFailed { .. }) => {}
            Err(e) => panic!("the machine did not fail: {e}"),
        }
        let after = svc.get(&m.id).await.unwrap();
        assert_eq!(after.status, Failed);
        assert!(after.error_message.unwrap().contains("exited unexpectedly"));
        // Events go out as the state is stored, so the cleanup that follows may still be under way.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let w = svc.host().world();
            if (w.interfaces.len(), w.firewall.len(), w.prepared.len()) == (0, 0, 0) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "not cleaned up: {w:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn reconcile_adopts_the_living_and_settles_the_rest() {
        let (_d, svc) = service().await;
        let mut ids = HashMap::new();
        for name in ["alive", "dead", "starting", "stopping"] {
            let m = svc.create(create_req(name)).await.unwrap();
            svc.start(&m.id).await.unwrap();
            ids.insert(name, m.id);
        }
        // The daemon "crashed": one process died meanwhile, one start and one stop were interrupted.
        let pid_of = |id: &str| svc.host().world().processes.iter().find(|(_, m)| m.as_str() == id).map(|(p, _)| *p);
        svc.host().vanish(pid_of(&ids["dead"]).unwrap());
        for (name, status) in [("starting", Starting), ("stopping", Stopping)] {
            let mut tx = svc.store.write().await.unwrap();
            sqlx::query("UPDATE machines SET status = $1 WHERE id = $2")
                .bind(status.as_str())
                .bind(&ids[name])
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        // Leftovers of a machine the database no longer knows.
        svc.host().world.lock().unwrap().interfaces.insert("ghost".into());
        svc.host().world.lock().unwrap().disks.insert("ghost".into());

        svc.reconcile().await.unwrap();
        let status = |name: &str| {
            let svc = svc.clone();
            let id = ids[name].clone();
            async move { svc.get(&id).await.unwrap() }
        };
        assert_eq!(status("alive").await.status, Running);
        assert_eq!(status("dead").await.status, Stopped);
        let s = status("starting").await;
        assert_eq!(s.status, Failed);
        assert!(s.error_message.unwrap().contains("starting"));
        assert_eq!(status("stopping").await.status, Stopped);
        let w = svc.host().world();
        assert_eq!(w.interfaces, [ids["alive"].clone()].into_iter().collect(), "{w:?}");
        assert_eq!(w.firewall, [ids["alive"].clone()].into_iter().collect());
        assert_eq!(w.processes.len(), 1);
        assert!(!w.disks.contains("ghost"));
    }

    #[tokio::test]
    async fn purge_stops_everything_and_keeps_records() {
        let (_d, svc) = service().await;
        let m = svc.create(create_req("web")).await.unwrap();
        svc.start(&m.id).await.unwrap();
        let stopped = svc.purge_host().await.unwrap();
        assert_eq!(stopped, vec![m.id.clone()]);
        assert_eq!(svc.get(&m.id).await.unwrap().status, Stopped);
        let w = svc.host().world();
        assert_eq!((w.interfaces.len(), w.firewall.len(), w.processes.len()), (0, 0, 0));
        assert!(w.disks.contains(&m.id));
    }

    #[tokio::test]
    async fn a_refused_pause_puts_the_state_back() {
        let (_d, svc) = service().await;
        let m = svc.create(create_req("web")).await.unwrap();
        svc.start(&m.id).await.unwrap();
        svc.host().fail.lock().unwrap().insert("pause");
        assert!(svc.pause(&m.id).await.is_err());
        assert_eq!(svc.get(&m.id).await.unwrap().status, Running);
        svc.host().fail.lock().unwrap().clear();
        assert_eq!(svc.pause(&m.id).await.unwrap().status, Paused);
        assert_eq!(svc.resume(&m.id).await.unwrap().status, Running);
        let e = svc.resume(&m.id).await.unwrap_err();
        assert_eq!(e.to_string(), "Cannot resume machine in 'running' state");
    }

    #[tokio::test]
    async fn names_and_ids_never_name_two_machines() {
        let (_d, svc) = service().await;
        let a = svc.create(create_req("first")).await.unwrap();
        // The bug this guards against: a machine named after another's id.
        let e = svc.create(create_req(&a.id)).await.unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        assert_eq!(svc.get("first").await.unwrap().id, a.id);
        assert!(matches!(svc.create(create_req("first")).await.unwrap_err(), Error::NameTaken(_)));
    }

    #[tokio::test]
    async fn delete_refuses_a_running_machine_unless_forced() {
        let (_d, svc) = service().await;
        let m = svc.create(create_req("web")).await.unwrap();
        svc.start(&m.id).await.unwrap();
        let e = svc.delete(&m.id, false).await.unwrap_err();
        assert!(e.to_string().contains("stop the machine first"), "{e}");
        svc.delete(&m.id, true).await.unwrap();
        assert!(matches!(svc.get(&m.id).await.unwrap_err(), Error::NotFound(_)));
        let w = svc.host().world();
        assert_eq!(w, World::default(), "nothing left: {w:?}");
    }
}

mod limits {
    use super::*;

    #[tokio::test]
    async fn execs_per_machine_are_bounded_and_slots_come_back() {
        let (_d, svc) = service().await;
        let m = svc.create(create_req("web")).await.unwrap();
        svc.start(&m.id).await.unwrap();
        // The fake agent does not answer, so each slot is held until its exec gives up; take them directly.
        let held: Vec<_> = (0..4).map(|_| svc.execs.acquire(&m.id, 4).unwrap()).collect();
        let e = svc.execs.acquire(&m.id, 4).unwrap_err();
        assert!(matches!(e, Error::TooManyExecs { limit: 4, .. }), "{e}");
        let other = svc.create(create_req("other")).await.unwrap();
        assert!(svc.execs.acquire(&other.id, 4).is_ok(), "another machine has its own slots");
        drop(held);
        assert!(svc.execs.acquire(&m.id, 4).is_ok(), "finished commands free their slots");
    }
}

mod event_store {
    use super::*;
    use crate::store::events::EventFilter;
    use hyperfleet_types::CreateWebhook;

    fn hook() -> CreateWebhook {
        CreateWebhook {
            url: Some("http://127.0.0.1:9/hook".into()),
            events: Some(vec!["machine.created".into()]),
            label_selector: None,
            secret: None,
        }
    }

    #[tokio::test]
    async fn a_change_stores_its_event_and_a_delivery_per_matching_webhook() {
        let (_d, svc) = service().await;
        let a = svc.create(create_req("before-hook")).await.unwrap();
        let w = svc.create_webhook(hook()).await.unwrap();
        let b = svc.create(create_req("after-hook")).await.unwrap();
        let events = svc.events_after(0, EventFilter::default()).await.unwrap().events;
        assert_eq!(events.iter().map(|e| e.machine_id.as_str()).collect::<Vec<_>>(), [a.id.as_str(), b.id.as_str()]);
        let queued = svc.webhook_deliveries(&w.id, None, None).await.unwrap().deliveries;
        assert_eq!(queued.len(), 1, "only the event after the webhook was made");
        assert_eq!(queued[0].machine_id, b.id);
    }

    #[tokio::test]
    async fn an_event_whose_deliveries_cannot_be_stored_is_not_stored_either() {
        let (_d, svc) = service().await;
        svc.create_webhook(hook()).await.unwrap();
        // Break the deliveries table behind the store's back: the delivery insert after the event now fails.
        let mut tx = svc.store.write().await.unwrap();
        sqlx::raw_sql("DROP TABLE webhook_deliveries").execute(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        // The change happens regardless (a failure to store its event is logged), without a stray event.
        let m = svc.create(create_req("web")).await.unwrap();
        assert_eq!(svc.get(&m.id).await.unwrap().status, MachineStatus::Pending);
        assert!(svc.events_after(0, EventFilter::default()).await.unwrap().events.is_empty());
    }
}
