//! Child machines: a machine created with `spawn` gets a token at each start (written into its guest) that
//! lets it create and drive machines of its own through the child API listener, within its quotas; its
//! children are stopped when it stops and deleted when it is deleted. What a token may do is decided here
//! ([`ChildAccess`]), the HTTP layer only asks.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use hyperfleet_types::{CreateMachine, Machine, MachineList, MachineStatus};
use tracing::{info, warn};

use super::{Error, Host, Result, Service};
use crate::store::children::{self, ChildInsertError};
use crate::store::machines::MachineRecord;

/// Where the token is written in a spawn machine's guest (root only: the directory is 0700, the file 0600).
pub(crate) const TOKEN_DIR: &str = "/run/hyperfleet";
pub(crate) const TOKEN_FILE: &str = "/run/hyperfleet/token";
/// The child API's URL, also written in the guest (0644), for processes that were not started by exec.
pub(crate) const URL_FILE: &str = "/run/hyperfleet/url";

/// The label every child carries: its parent's id (so a webhook's `label_selector` can pick a tree).
pub(crate) const PARENT_LABEL: &str = "hyperfleet.dev/parent";

/// How long a start waits for a spawn machine's agent to take its token (the unit tests' fake host has no
/// agent at all).
const TOKEN_PATIENCE: Duration = if cfg!(test) { Duration::ZERO } else { Duration::from_secs(30) };

/// What a child token asks to do, as the route table says it (the machine named in the path, if any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChildAccess<'a> {
    /// `POST /machines`: always the token's own parent's child.
    Create,
    /// `GET /machines/{id}/children`: only the parent's own list.
    ListChildren(&'a str),
    /// get, delete, start, stop, exec, files, wait of one machine: only the parent's children.
    Child(&'a str),
}

impl<H: Host> Service<H> {
    /// The child API's URL as seen from `m`'s guest: its own gateway.
    pub(crate) fn child_api_url(&self, m: &MachineRecord) -> Option<String> {
        let port = self.policy.child_api_port?;
        Some(format!("http://{}:{port}", self.addressing.block(m).tap_ip()))
    }

    /// What a spawn machine's commands see in their environment besides its own `env`.
    pub(super) fn spawn_env(&self, m: &MachineRecord) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        if m.spec.spawn.is_some()
            && let Some(url) = self.child_api_url(m)
        {
            env.insert("HYPERFLEET_URL".to_string(), url);
            env.insert("HYPERFLEET_TOKEN_FILE".to_string(), TOKEN_FILE.to_string());
        }
        env
    }

    /// The parent a child token belongs to, if the token is current and is presented from its parent's own
    /// guest address (a token copied out of the guest is worth nothing elsewhere).
    pub(crate) async fn child_token_parent(&self, secret: &str, peer: Ipv4Addr) -> Result<Option<MachineRecord>> {
        if !children::token_well_formed(secret) {
            return Ok(None);
        }
        let Some(parent) = children::token_owner(&mut *self.store.read().await?, secret).await? else {
            return Ok(None);
        };
        let rec = match self.record(&parent).await {
            Ok(r) => r,
            Err(Error::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let live = rec.status == MachineStatus::Running && rec.spec.spawn.is_some();
        if !live || self.addressing.block(&rec).guest_ip() != peer {
            return Ok(None);
        }
        Ok(Some(rec))
    }

    /// Whether the parent `parent` may do `access`; `Forbidden` says why not. A machine that does not exist
    /// is forbidden too (a token learns nothing of machines outside its tree).
    pub(crate) async fn check_child_access(&self, parent: &str, access: ChildAccess<'_>) -> Result<()> {
        let named = match access {
            ChildAccess::Create => return Ok(()),
            ChildAccess::ListChildren(id) | ChildAccess::Child(id) => id,
        };
        let rec = match self.record(named).await {
            Ok(r) => Some(r),
            Err(Error::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        let allowed = match (access, &rec) {
            (ChildAccess::ListChildren(_), Some(m)) => m.id == parent,
            (ChildAccess::Child(_), Some(m)) => m.spec.parent_id.as_deref() == Some(parent),
            _ => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "a child token of machine {parent} may only reach that machine's own children"
            )))
        }
    }

    /// `POST /machines` with a child token: a machine whose parent is `parent`, with the parent's `env`
    /// (unless `inherit_env` is false), network options and runtime as defaults, within the parent's quotas.
    pub(crate) async fn create_child(
        self: &Arc<Self>,
        parent: &MachineRecord,
        mut req: CreateMachine,
    ) -> Result<Machine> {
        if req.spawn.is_some() {
            return Err(Error::Forbidden("a child machine cannot be given spawn: only the host creates trees".into()));
        }
        if req.volumes.as_ref().is_some_and(|v| !v.is_empty()) {
            return Err(Error::Forbidden("volumes are outside what a child token may use".into()));
        }
        if req.inherit_env != Some(false) {
            let mut env = parent.spec.env.clone();
            env.append(&mut req.env.take().unwrap_or_default());
            req.env = Some(env);
        }
        if req.network.is_none() {
            req.network = Some(hyperfleet_types::NetworkOptions {
                dns: Some(parent.spec.network.dns.clone()).filter(|d| !d.is_empty()),
                egress: Some(parent.spec.network.egress.clone()),
            });
        }
        req.runtime = req.runtime.or(Some(parent.spec.runtime));
        let mut labels = req.labels.take().unwrap_or_default();
        labels.insert(PARENT_LABEL.to_string(), parent.id.clone());
        req.labels = Some(labels);
        self.create_as(req, Some(parent.id.clone())).await
    }

    /// `GET /machines/{id}/children`.
    pub(crate) async fn children(&self, id: &str) -> Result<MachineList> {
        let rec = self.record(id).await?;
        let rows = children::children(&mut *self.store.read().await?, &rec.id).await?;
        Ok(MachineList { total: rows.len() as u64, machines: rows.iter().map(|m| self.to_wire(m)).collect() })
    }

    /// A new token for a spawn machine that just started: stored (hashed, replacing the previous one) and
    /// written into its guest. A guest that cannot take it keeps running without one (logged).
    pub(super) async fn issue_token(&self, m: &MachineRecord) {
        if m.spec.spawn.is_none() {
            return;
        }
        let Some(url) = self.child_api_url(m) else {
            warn!(machine = %m.id, "spawn is set but the child API is off (HYPERFLEET_CHILD_API_PORT=0): no token");
            return;
        };
        let secret = children::generate_token();
        let stored = async {
            let mut tx = self.store.write().await?;
            let set = children::set_token(&mut tx, &m.id, &secret).await?;
            tx.commit().await?;
            Ok::<_, crate::store::StoreError>(set)
        };
        match stored.await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                warn!(machine = %m.id, error = %e, "could not store the machine's child token");
                return;
            }
        }
        if let Err(e) = self.write_token(m, &secret, &url).await {
            warn!(machine = %m.id, error = %e, "could not write the child token into the guest; revoking it");
            self.revoke_token(&m.id).await;
        }
    }

    async fn write_token(&self, m: &MachineRecord, secret: &str, url: &str) -> Result<()> {
        let agent = self.ready_agent(m, TOKEN_PATIENCE).await?;
        let max = self.policy.file_max_size;
        let fail = |e| super::guest::agent_error(e, TOKEN_FILE, max);
        agent.mkdir(TOKEN_DIR, true, Some(0o700)).await.map_err(fail)?;
        for (path, body, mode) in [(TOKEN_FILE, secret, 0o600), (URL_FILE, url, 0o644)] {
            let mut w = agent.write_file(path, Some(mode), Some(max)).await.map_err(fail)?;
            w.send(format!("{body}\n").as_bytes()).await.map_err(fail)?;
            w.finish().await.map_err(fail)?;
        }
        Ok(())
    }

    pub(super) async fn revoke_token(&self, id: &str) {
        let revoked = async {
            let mut tx = self.store.write().await?;
            children::revoke_token(&mut tx, id).await?;
            tx.commit().await
        };
        if let Err(e) = revoked.await {
            warn!(machine = %id, error = %e, "could not revoke the machine's child token");
        }
    }

    /// A parent has stopped or failed: its token goes, and its children are stopped (in a task of their
    /// own; each child's stop does the same for its own children).
    pub(super) fn parent_ended(self: &Arc<Self>, m: &MachineRecord) {
        if m.spec.spawn.is_none() {
            return;
        }
        let this = self.clone();
        let id = m.id.clone();
        tokio::spawn(async move {
            this.revoke_token(&id).await;
            let listed = async { children::children(&mut *this.store.read().await?, &id).await };
            let kids = match listed.await {
                Ok(k) => k,
                Err(e) => {
                    warn!(machine = %id, error = %e, "could not list the machine's children to stop them");
                    return;
                }
            };
            for kid in kids.into_iter().filter(|k| matches!(k.status, MachineStatus::Running | MachineStatus::Paused)) {
                match this.stop(&kid.id).await {
                    Ok(_) => info!(machine = %kid.id, parent = %id, "child stopped with its parent"),
                    Err(Error::InvalidState { .. } | Error::NotFound(_)) => {}
                    Err(e) => {
                        warn!(machine = %kid.id, parent = %id, error = %e, "could not stop a child of a stopped machine")
                    }
                }
            }
        });
    }

    /// Deletes every child of `parent` (forcing a stop first), depth first. The first failure stops the
    /// delete of the parent, so nothing is orphaned silently.
    pub(super) async fn delete_children(self: &Arc<Self>, parent: &str) -> Result<()> {
        let kids = children::children(&mut *self.store.read().await?, parent).await?;
        for kid in kids {
            // The parent's stop may be stopping this child right now: wait for that stop to land.
            let mut tries = 0;
            loop {
                match Box::pin(self.delete(&kid.id, true)).await {
                    Ok(()) | Err(Error::NotFound(_)) => {
                        info!(machine = %kid.id, %parent, "child deleted with its parent");
                        break;
                    }
                    Err(Error::InvalidState { .. }) if tries < 300 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// A quota or parent refusal of a child's insert, in domain terms.
pub(super) fn child_insert_error(
    e: ChildInsertError,
) -> std::result::Result<crate::store::machines::InsertError, Error> {
    match e {
        ChildInsertError::Insert(e) => Ok(e),
        other => Err(Error::Forbidden(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{World, create_req, service};
    use super::*;
    use hyperfleet_types::SpawnRequest;

    fn spawning(name: &str) -> CreateMachine {
        CreateMachine {
            spawn: Some(SpawnRequest { max_children: Some(2), max_vcpu: Some(2), max_mem_mib: Some(128) }),
            env: Some(BTreeMap::from([("A".to_string(), "parent".to_string())])),
            ..create_req(name)
        }
    }

    #[tokio::test]
    async fn a_tree_is_scoped_within_quotas_and_goes_with_its_parent() {
        let (_d, svc) = service().await;
        let parent = svc.create(spawning("parent")).await.unwrap();
        let other = svc.create(spawning("other")).await.unwrap();
        let plain = svc.create(create_req("plain")).await.unwrap();
        let rec = svc.record(&parent.id).await.unwrap();
        let e = svc.create_child(&rec, create_req("early")).await.unwrap_err();
        assert!(matches!(&e, Error::Forbidden(m) if m.contains("only while their parent runs")), "{e}");
        svc.start(&parent.id).await.unwrap();
        svc.start(&other.id).await.unwrap();
        let rec = svc.record(&parent.id).await.unwrap();
        assert_eq!(svc.spawn_env(&rec).get("HYPERFLEET_URL").map(String::as_str), Some("http://10.9.0.1:3001"));
        assert!(svc.spawn_env(&svc.record(&plain.id).await.unwrap()).is_empty());

        let kid = svc.create_child(&rec, create_req("kid")).await.unwrap();
        assert_eq!(kid.spec.parent_id.as_deref(), Some(parent.id.as_str()));
        assert_eq!(kid.spec.env.get("A").map(String::as_str), Some("parent"), "env inherited");
        assert_eq!(kid.spec.labels.get(PARENT_LABEL), Some(&parent.id));
        let own = CreateMachine { inherit_env: Some(false), ..create_req("own") };
        let own = svc.create_child(&rec, own).await.unwrap();
        assert!(own.spec.env.is_empty());
        let e = svc.create_child(&rec, create_req("third")).await.unwrap_err();
        assert!(matches!(&e, Error::Forbidden(m) if m.contains("spawn.max_children")), "{e}");
        let e = svc.create_child(&rec, spawning("grandparent")).await.unwrap_err();
        assert!(matches!(e, Error::Forbidden(_)), "{e}");
        let e = svc.create(CreateMachine { inherit_env: Some(true), ..create_req("host") }).await.unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "inherit_env is a child's: {e}");

        // Access: its own children only, by id or name; its own list only.
        let ok = |a| svc.check_child_access(&parent.id, a);
        ok(ChildAccess::Create).await.unwrap();
        ok(ChildAccess::Child(&kid.id)).await.unwrap();
        ok(ChildAccess::Child("own")).await.unwrap();
        ok(ChildAccess::ListChildren(&parent.id)).await.unwrap();
        for refused in [
            ChildAccess::Child(&parent.id),
            ChildAccess::Child(&other.id),
            ChildAccess::Child("plain"),
            ChildAccess::Child("nothing-here"),
            ChildAccess::ListChildren(&other.id),
            ChildAccess::ListChildren(&kid.id),
        ] {
            assert!(matches!(ok(refused).await, Err(Error::Forbidden(_))), "{refused:?}");
        }
        assert_eq!(svc.children(&parent.id).await.unwrap().total, 2);

        // Stop: its running children stop (in the background); delete: they go first, nothing is left.
        svc.start(&kid.id).await.unwrap();
        svc.stop(&parent.id).await.unwrap();
        for _ in 0..100 {
            if svc.get(&kid.id).await.unwrap().status == MachineStatus::Stopped {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(svc.get(&kid.id).await.unwrap().status, MachineStatus::Stopped);
        svc.start(&parent.id).await.unwrap();
        svc.start(&kid.id).await.unwrap();
        svc.delete(&parent.id, true).await.unwrap();
        for id in [&parent.id, &kid.id, &own.id] {
            assert!(matches!(svc.get(id).await, Err(Error::NotFound(_))), "{id}");
        }
        svc.delete(&other.id, true).await.unwrap();
        svc.delete(&plain.id, false).await.unwrap();
        let w = svc.host().world();
        assert_eq!(w, World::default(), "nothing left: {w:?}");
    }
}
