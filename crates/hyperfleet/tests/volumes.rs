//! Volumes and disk size end to end: the real daemon, runc container guests, real ext4 images.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Daemon, Options, machine, running, sh};
use hyperfleet_client::types::*;
use serde_json::json;

fn with_volumes(name: &str, vols: &[(&str, &str, bool)]) -> CreateMachine {
    let volumes = vols
        .iter()
        .map(|(v, p, ro)| VolumeMount { volume: v.to_string(), mount_path: p.to_string(), read_only: *ro })
        .collect();
    CreateMachine { volumes: Some(volumes), ..machine(name) }
}

fn code(e: &hyperfleet_client::Error) -> (Option<u16>, Option<&str>) {
    (e.status(), e.code())
}

#[ignore = "needs root: runc containers, loop-mounted volumes"]
#[tokio::test]
async fn volumes_keep_data_across_machines_and_are_attached_safely() {
    let d = Daemon::start(Options::default()).await;
    let c = &d.client;

    // Create: validation, a sparse 0600 file, a duplicate name.
    let v = c.create_volume(&CreateVolume { name: Some("cache".into()), size_mib: Some(64) }).await.unwrap();
    assert_eq!((v.name.as_str(), v.size_mib, v.machines.len()), ("cache", 64, 0));
    let file = d.dir.path().join("machines/volumes").join(format!("{}.ext4", v.id));
    let meta = std::fs::metadata(&file).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(meta.blocks() * 512 < 64 << 20, "sparse");
    let e = c.create_volume(&CreateVolume { name: Some("cache".into()), size_mib: Some(64) }).await.unwrap_err();
    assert_eq!(code(&e), (Some(409), Some("CONFLICT")));
    for bad in [json!({"name": "x"}), json!({"name": "x", "size_mib": 1}), json!({"name": "Bad_Name", "size_mib": 64})]
    {
        let r = c.raw(hyperfleet_client::HttpMethod::POST, "/volumes").json(&bad).send().await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }

    // A machine naming an unknown volume, or a bad path, is refused at create.
    let e = c.create_machine(&with_volumes("w0", &[("nope", "/data", false)])).await.unwrap_err();
    assert_eq!(code(&e), (Some(400), Some("VALIDATION_ERROR")), "{e}");
    let e = c.create_machine(&with_volumes("w0", &[("cache", "/proc/x", false)])).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");

    // Machine A writes to the volume (mounted nosuid,nodev at /data); the JSON names the volume by id.
    let a = running(&d, with_volumes("writer", &[("cache", "/data", false)])).await;
    assert_eq!(a.spec.volumes[0].volume, v.id);
    assert_eq!(sh(&d, &a.id, "echo persisted > /data/note && sync").await.0, 0);
    let (_, mounts, _) = sh(&d, &a.id, "grep ' /data ' /proc/mounts").await;
    assert!(mounts.contains("nosuid") && mounts.contains("nodev"), "{mounts}");

    // Read-write to one running machine at most: B (rw) and C (ro) cannot start while A holds it.
    let b = c.create_machine(&with_volumes("second-writer", &[("cache", "/data", false)])).await.unwrap();
    let e = c.start_machine(&b.id).await.unwrap_err();
    assert_eq!(code(&e), (Some(409), Some("CONFLICT")), "{e}");
    assert!(e.to_string().contains("'cache'") && e.to_string().contains(&a.id), "{e}");
    assert_eq!(c.get_machine(&b.id).await.unwrap().status, MachineStatus::Pending, "a refused start changes nothing");
    let ro = c.create_machine(&with_volumes("reader", &[("cache", "/mnt/cache", true)])).await.unwrap();
    assert_eq!(c.start_machine(&ro.id).await.unwrap_err().status(), Some(409));
    let held = c.get_volume("cache").await.unwrap();
    assert!(held.machines.iter().any(|u| u.machine_id == a.id && u.attached && !u.read_only), "{held:?}");
    // While held: no resize, no delete; PATCH of a running machine's volumes is refused.
    assert_eq!(c.resize_volume("cache", &ResizeVolume { size_mib: Some(128) }).await.unwrap_err().status(), Some(409));
    assert_eq!(c.delete_volume("cache").await.unwrap_err().status(), Some(409));
    let e = c.update_machine(&a.id, &UpdateMachine { volumes: Some(vec![]), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("stop the machine first"), "{e}");

    // A is deleted; the data stays. B reads what A wrote.
    c.stop_machine(&a.id).await.unwrap();
    c.delete_machine(&a.id, false).await.unwrap();
    assert_eq!(c.start_machine(&b.id).await.unwrap().status, MachineStatus::Running);
    assert_eq!(sh(&d, &b.id, "cat /data/note").await.1, "persisted\n");
    c.stop_machine(&b.id).await.unwrap();

    // Read-only: two readers at once; writes are refused inside the guest.
    let ro2 = c.create_machine(&with_volumes("reader-two", &[("cache", "/mnt/cache", true)])).await.unwrap();
    c.start_machine(&ro.id).await.unwrap();
    c.start_machine(&ro2.id).await.unwrap();
    assert_eq!(sh(&d, &ro2.id, "cat /mnt/cache/note").await.1, "persisted\n");
    let (code_w, _, err) = sh(&d, &ro.id, "echo x > /mnt/cache/other").await;
    assert_ne!(code_w, 0);
    assert!(err.contains("Read-only"), "{err}");
    // A writer cannot take it while readers hold it.
    assert_eq!(c.start_machine(&b.id).await.unwrap_err().status(), Some(409));
    c.stop_machine(&ro.id).await.unwrap();
    c.stop_machine(&ro2.id).await.unwrap();

    // Resize (grow only, detached) and clone keep the data.
    let e = c.resize_volume("cache", &ResizeVolume { size_mib: Some(32) }).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert_eq!(c.resize_volume("cache", &ResizeVolume { size_mib: Some(256) }).await.unwrap().size_mib, 256);
    let copy = c.clone_volume("cache", &CloneVolume { name: Some("cache-copy".into()) }).await.unwrap();
    assert_eq!(copy.size_mib, 256);
    // PATCH while stopped: B now mounts the copy; df sees the grown size.
    let b2 = c
        .update_machine(
            &b.id,
            &UpdateMachine {
                volumes: Some(vec![VolumeMount {
                    volume: "cache-copy".into(),
                    mount_path: "/data".into(),
                    read_only: false,
                }]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(b2.spec.volumes[0].volume, copy.id);
    c.start_machine(&b.id).await.unwrap();
    assert_eq!(sh(&d, &b.id, "cat /data/note").await.1, "persisted\n");
    let (_, df, _) = sh(&d, &b.id, "df -m /data | tail -1").await;
    let size: u64 = df.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((200..=256).contains(&size), "{df}");
    // The original is free again (B uses the copy) and can go once nothing names it.
    assert_eq!(c.delete_volume("cache").await.unwrap_err().status(), Some(409), "ro and ro2 still name it");
    c.delete_machine(&ro.id, false).await.unwrap();
    c.delete_machine(&ro2.id, false).await.unwrap();
    c.delete_volume("cache").await.unwrap();
    assert!(!file.exists());
    assert_eq!(c.get_volume("cache").await.unwrap_err().status(), Some(404));

    // Deleting the machine leaves no mount behind.
    c.stop_machine(&b.id).await.unwrap();
    c.delete_machine(&b.id, false).await.unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&b.id), "a volume mount is left");
    assert_eq!(c.list_volumes().await.unwrap().volumes.len(), 1);
}

#[ignore = "needs root: runc containers, loop-mounted volumes"]
#[tokio::test]
async fn concurrent_starts_never_share_a_read_write_volume() {
    let d = Daemon::start(Options::default()).await;
    let c = &d.client;
    c.create_volume(&CreateVolume { name: Some("shared".into()), size_mib: Some(16) }).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(
            c.create_machine(&with_volumes(&format!("racer-{i}"), &[("shared", "/data", false)])).await.unwrap().id,
        );
    }
    let starts = futures::future::join_all(ids.iter().map(|id| c.start_machine(id))).await;
    let ok = starts.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{starts:?}");
    for r in starts.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.status(), Some(409), "{r}");
    }
}

#[ignore = "needs root: runc container"]
#[tokio::test]
async fn disk_size_grows_the_root_disk() {
    let d = Daemon::start(Options::default()).await;
    let c = &d.client;
    let plain = c.create_machine(&machine("plain")).await.unwrap();
    assert!(plain.spec.disk_size_mib > 0, "the image's size is shown");
    let e = c.create_machine(&CreateMachine { disk_size_mib: Some(1), ..machine("tiny") }).await.unwrap_err();
    assert!(e.to_string().contains("at least the image's size"), "{e}");
    let m = running(&d, CreateMachine { disk_size_mib: Some(512), ..machine("roomy") }).await;
    assert_eq!(m.spec.disk_size_mib, 512);
    let (_, df, _) = sh(&d, &m.id, "df -m / | tail -1").await;
    let size: u64 = df.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((450..=512).contains(&size), "{df}");
}
