//! Volumes: ext4 file systems that outlive machines. A machine names them at create (or PATCH while at
//! rest) and holds them while it may have a process; the store decides who may take one in the same
//! transaction that starts the machine (see `store/volumes.rs`). Changes to a volume's file (create, grow,
//! clone, delete) run under `volume_ops`, which a start taking volumes also holds for its transition, so a
//! volume is never resized or copied while a machine takes it.

use hyperfleet_types::{CloneVolume, CreateVolume, ResizeVolume, Volume, VolumeList, VolumeMount};
use tracing::info;

use super::{Error, Host, Result, Service, validate};
use crate::store::volumes::{self as records, VolumeRecord};

/// Smallest volume: what mkfs.ext4 needs for a journal and a few files.
const MIN_VOLUME_MIB: i64 = 8;

impl<H: Host> Service<H> {
    async fn volume_record(&self, id: &str) -> Result<VolumeRecord> {
        records::get(&mut *self.store.read().await?, id).await?.ok_or_else(|| Error::VolumeNotFound(id.to_string()))
    }

    async fn volume_wire(&self, v: VolumeRecord) -> Result<Volume> {
        let users = records::users(&mut *self.store.read().await?, &v.id).await?;
        Ok(v.to_wire(users))
    }

    /// A machine's volume list with names resolved to ids; an unknown volume is a 400 naming the entry.
    pub(super) async fn resolve_volumes(&self, list: Vec<VolumeMount>) -> Result<Vec<VolumeMount>> {
        let mut out = Vec::with_capacity(list.len());
        for (i, mut v) in list.into_iter().enumerate() {
            let Some(rec) = records::get(&mut *self.store.read().await?, &v.volume).await? else {
                return Err(Error::Invalid(format!(
                    "volumes[{i}].volume: no volume has the id or name '{}'",
                    v.volume
                )));
            };
            v.volume = rec.id;
            out.push(v);
        }
        Ok(out)
    }

    pub(crate) async fn create_volume(&self, req: CreateVolume) -> Result<Volume> {
        let name = req.name.ok_or_else(|| Error::Invalid("name is required".into()))?;
        validate::name(&name).map_err(Error::Invalid)?;
        let size = req.size_mib.ok_or_else(|| Error::Invalid("size_mib is required".into()))?;
        let size_mib = validate::size_mib("size_mib", size, MIN_VOLUME_MIB).map_err(Error::Invalid)?;
        let _ops = self.volume_ops.lock().await;
        self.new_volume(name, size_mib, None).await
    }

    /// Records a volume and makes its file (empty, or a copy of `from`); a failure leaves neither. The
    /// caller holds `volume_ops`.
    async fn new_volume(&self, name: String, size_mib: u32, from: Option<&str>) -> Result<Volume> {
        let id = crate::store::random_id();
        let mut tx = self.store.write().await?;
        let rec = records::insert(&mut tx, &id, &name, size_mib).await?;
        tx.commit().await?;
        let rec = rec.ok_or_else(|| Error::VolumeNameTaken(name.clone()))?;
        let made = match from {
            None => self.host.volume_create(&id, size_mib).await,
            Some(src) => self.host.volume_clone(src, &id).await,
        };
        if let Err(e) = made {
            let _ = self.host.volume_remove(&id).await;
            self.delete_volume_record(&id).await?;
            return Err(e);
        }
        info!(volume = %id, %name, size_mib, "volume created");
        self.volume_wire(rec).await
    }

    /// Deletes the volume's row unless a machine names it (409 then).
    async fn delete_volume_record(&self, id: &str) -> Result<()> {
        let mut tx = self.store.write().await?;
        records::delete(&mut tx, id).await?.map_err(Error::Conflict)?;
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn list_volumes(&self) -> Result<VolumeList> {
        let recs = records::list(&mut *self.store.read().await?).await?;
        let mut volumes = Vec::with_capacity(recs.len());
        for v in recs {
            volumes.push(self.volume_wire(v).await?);
        }
        Ok(VolumeList { volumes })
    }

    pub(crate) async fn get_volume(&self, id: &str) -> Result<Volume> {
        let v = self.volume_record(id).await?;
        self.volume_wire(v).await
    }

    /// Deletes a volume no machine names (409 otherwise), and its file.
    pub(crate) async fn delete_volume(&self, id: &str) -> Result<()> {
        let v = self.volume_record(id).await?;
        let _ops = self.volume_ops.lock().await;
        self.delete_volume_record(&v.id).await?;
        self.host.volume_remove(&v.id).await?;
        info!(volume = %v.id, name = %v.name, "volume deleted");
        Ok(())
    }

    /// Grows a volume no machine holds; shrinking is refused (it would cut the file system).
    pub(crate) async fn resize_volume(&self, id: &str, req: ResizeVolume) -> Result<Volume> {
        let size = req.size_mib.ok_or_else(|| Error::Invalid("size_mib is required".into()))?;
        let size_mib = validate::size_mib("size_mib", size, MIN_VOLUME_MIB).map_err(Error::Invalid)?;
        let v = self.volume_record(id).await?;
        let _ops = self.volume_ops.lock().await;
        if let Some(why) = records::busy(&mut *self.store.read().await?, &v.id, false).await? {
            return Err(Error::Conflict(why));
        }
        // Read again under the lock: another resize may have finished meanwhile.
        let v = self.volume_record(&v.id).await?;
        if size_mib < v.size_mib {
            return Err(Error::Invalid(format!(
                "size_mib must be at least the volume's size ({} MiB): volumes only grow",
                v.size_mib
            )));
        }
        if size_mib > v.size_mib {
            self.host.volume_grow(&v.id, size_mib).await?;
            let mut tx = self.store.write().await?;
            records::set_size(&mut tx, &v.id, size_mib).await?;
            tx.commit().await?;
            info!(volume = %v.id, from = v.size_mib, to = size_mib, "volume grown");
        }
        self.get_volume(&v.id).await
    }

    /// Copies a volume that no machine holds read-write (its file system is then at rest).
    pub(crate) async fn clone_volume(&self, id: &str, req: CloneVolume) -> Result<Volume> {
        let name = req.name.ok_or_else(|| Error::Invalid("name is required".into()))?;
        validate::name(&name).map_err(Error::Invalid)?;
        let v = self.volume_record(id).await?;
        let _ops = self.volume_ops.lock().await;
        let users = records::users(&mut *self.store.read().await?, &v.id).await?;
        if let Some(u) = users.iter().find(|u| u.attached && !u.read_only) {
            return Err(Error::Conflict(format!(
                "volume is attached read-write to machine {}; stop it first",
                u.machine_id
            )));
        }
        self.new_volume(name, v.size_mib, Some(&v.id)).await
    }
}
