//! Machines from OCI images, end to end: a real registry on loopback (Debian's docker-registry), images built
//! and pushed by the test, the daemon pulling, converting and booting them in the container runtime.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::oci::{Compression, Entry, Image, Registry, TokenServer, busybox_layer, layer, tar};
use common::{Daemon, Options, machine, sh};
use hyperfleet_client::types::*;
use serde_json::json;

fn daemon_opts(reg: &Registry) -> Options {
    Options { env: vec![("HYPERFLEET_INSECURE_REGISTRIES".into(), reg.addr.clone())], ..Options::default() }
}

/// Polls the machine until it is in `want` (or fails the test after `secs`).
async fn until_status(d: &Daemon, id: &str, want: MachineStatus, secs: u64) -> Machine {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let m = d.client.get_machine(id).await.unwrap();
        if m.status == want {
            return m;
        }
        if Instant::now() > deadline {
            let console = d.client.machine_logs(id, 30).await.map(|l| l.lines.join("\n")).unwrap_or_default();
            panic!("machine {id} is {:?}, not {want:?}: {:?}\nconsole:\n{console}", m.status, m.error_message);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn httpd_image() -> Image {
    let extra = tar(&[Entry::Dir("www/"), Entry::File("www/second.txt", b"from the zstd layer\n".to_vec(), 0o644)]);
    Image {
        layers: vec![busybox_layer(Compression::Gzip), layer(extra, Compression::Zstd)],
        config: json!({
            "Entrypoint": ["/bin/busybox"],
            "Cmd": ["httpd", "-f", "-p", "8080", "-h", "/www"],
            "Env": ["PATH=/bin", "GREETING=from-image", "OVERRIDDEN=image"],
            "WorkingDir": "/www",
            "User": "app",
        }),
        docker: false,
    }
}

#[ignore = "needs root: runc containers with a netns, chown while unpacking layers"]
#[tokio::test]
async fn an_image_runs_its_process_serves_through_the_proxy_and_ends_the_machine() {
    let reg = Registry::start(None).await;
    let (digest, _) = reg.push("team/app", "v1", &httpd_image()).await;
    let d = Daemon::start(daemon_opts(&reg)).await;
    let c = &d.client;
    let image = format!("{}/team/app:v1", reg.addr);

    let env = [("FROM_MACHINE", "yes"), ("OVERRIDDEN", "machine")].map(|(k, v)| (k.to_string(), v.to_string()));
    let req = CreateMachine {
        image: Some(image.clone()),
        exposed_ports: Some(vec![8080]),
        env: Some(env.clone().into()),
        ..machine("web")
    };
    let m = c.create_machine(&req).await.unwrap();
    assert_eq!(m.status, MachineStatus::Pending);
    assert_eq!(m.spec.image.as_deref(), Some(image.as_str()));
    assert_eq!(m.spec.image_digest.as_deref(), Some(digest.as_str()));
    assert!(m.image_status.is_some(), "the pull shows on the machine");
    let m = c.start_machine(&m.id).await.unwrap_or_else(|e| panic!("start: {e}\n{}", d.logs()));
    assert_eq!(m.status, MachineStatus::Running);
    let st = c.get_machine(&m.id).await.unwrap().image_status.unwrap();
    assert_eq!(st.phase, ImagePhase::Ready);
    assert!(st.bytes_total > 0 && st.bytes_done == st.bytes_total, "{st:?}");

    // The image's own process serves on the exposed port, reached through the proxy.
    let url = format!("{}/proxy/web/8080/", d.proxy_url());
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = loop {
        if let Ok(r) = reqwest::get(&url).await
            && r.status().is_success()
        {
            break r.text().await.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "proxy never reached httpd\n{}",
            c.machine_logs(&m.id, 50).await.unwrap().lines.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(body.contains("hello from an image"), "{body}");
    // Exec and files work as in the built-in rootfs; both layers are there; DNS is written by the agent.
    assert_eq!(sh(&d, &m.id, "cat /www/second.txt").await.1, "from the zstd layer\n");
    assert_eq!(sh(&d, &m.id, "cat /etc/resolv.conf").await.1, "nameserver 10.200.255.53\n");
    let (_, ps, _) = sh(&d, &m.id, "ps -o user,args").await;
    assert!(ps.lines().any(|l| l.contains("httpd -f -p 8080") && l.trim_start().starts_with("app")), "{ps}");
    c.upload_file(&m.id, "/tmp/up.txt", b"uploaded", None).await.unwrap();
    assert_eq!(&c.download_file(&m.id, "/tmp/up.txt").await.unwrap()[..], b"uploaded");

    // Env (the machine's over the image's), WorkingDir and User reach the main process; a non-zero exit
    // fails the machine with the code and the last lines.
    let script = "echo env=$GREETING/$FROM_MACHINE/$OVERRIDDEN cwd=$(pwd) uid=$(id -u); exit 3";
    let req = CreateMachine {
        image: Some(image.clone()),
        entrypoint: Some(vec!["sh".into(), "-c".into()]),
        cmd: Some(vec![script.into()]),
        env: Some(env.into()),
        ..machine("exits-3")
    };
    let failing = c.create_machine(&req).await.unwrap();
    c.start_machine(&failing.id).await.unwrap();
    let failed = until_status(&d, &failing.id, MachineStatus::Failed, 30).await;
    let msg = failed.error_message.unwrap();
    assert!(msg.contains("exited with code 3"), "{msg}");
    assert!(msg.contains("env=from-image/yes/machine cwd=/www uid=1000"), "{msg}");

    // Exit 0 stops it; on-failure restarts until it succeeds.
    let ok = c
        .create_machine(&CreateMachine {
            image: Some(image.clone()),
            cmd: Some(vec!["true".into()]),
            ..machine("exits-0")
        })
        .await
        .unwrap();
    c.start_machine(&ok.id).await.unwrap();
    let stopped = until_status(&d, &ok.id, MachineStatus::Stopped, 30).await;
    assert_eq!(stopped.error_message, None);
    let retry =
        "n=$(cat /dev/shm/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > /dev/shm/n; echo run $n; [ $n -ge 3 ]";
    let r = c
        .create_machine(&CreateMachine {
            image: Some(image.clone()),
            entrypoint: Some(vec!["sh".into(), "-c".into(), retry.into()]),
            restart_policy: Some(RestartPolicy::OnFailure),
            ..machine("retries")
        })
        .await
        .unwrap();
    assert!(r.spec.cmd.is_none());
    c.start_machine(&r.id).await.unwrap();
    until_status(&d, &r.id, MachineStatus::Stopped, 30).await;
    let logs = c.machine_logs(&r.id, 50).await.unwrap().lines.join("\n");
    assert!(logs.contains("run 1") && logs.contains("run 3"), "{logs}");

    // The cache: one image shared by every machine; deleting it is refused while they exist.
    let images = c.list_images().await.unwrap().images;
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(images[0].digest, digest);
    assert_eq!(images[0].machines.len(), 4);
    let e = c.delete_image(&digest).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    for id in [&m.id, &failing.id, &ok.id, &r.id] {
        c.delete_machine(id, true).await.unwrap();
    }
    c.delete_image(&digest).await.unwrap();
    assert!(c.list_images().await.unwrap().images.is_empty());
    let roots = std::fs::read_dir(d.dir.path().join("images/roots")).unwrap().count();
    assert_eq!(roots, 0, "the converted image is gone");
}

#[ignore = "needs root: runc containers with a netns, overlay and idmapped mounts"]
#[tokio::test]
async fn machines_of_one_image_share_its_tree_and_write_only_their_own_layer() {
    let reg = Registry::start(None).await;
    let img =
        Image { layers: vec![busybox_layer(Compression::Gzip)], config: json!({"Env": ["PATH=/bin"]}), docker: false };
    let (digest, _) = reg.push("team/sandbox", "v1", &img).await;
    let d = Daemon::start(daemon_opts(&reg)).await;
    let c = &d.client;
    let req = |name: &str| CreateMachine { image: Some(format!("{}/team/sandbox:v1", reg.addr)), ..machine(name) };
    let mut ids = Vec::new();
    for name in ["writer", "reader"] {
        let m = c.create_machine(&req(name)).await.unwrap();
        let m = c.start_machine(&m.id).await.unwrap_or_else(|e| {
            panic!(
                "start: {e}
{}",
                d.logs()
            )
        });
        ids.push(m.id);
    }
    let (writer, reader) = (&ids[0], &ids[1]);
    // The image's files are root's inside the machine (its own user namespace), and it may change them.
    let (code, out, err) = sh(&d, writer, "stat -c %u:%g /bin/busybox /www/index.html; id -u").await;
    assert_eq!((code, out.as_str()), (0, "0:0\n0:0\n0\n"), "{err}");
    let script = "echo changed > /www/index.html && busybox rm /etc/group && echo new > /www/new.txt && cat /www/*";
    let (code, out, err) = sh(&d, writer, script).await;
    assert_eq!((code, out.as_str()), (0, "changed\nnew\n"), "{err}");
    // The other machine of the image, and the cached tree, are untouched.
    let (_, out, _) = sh(&d, reader, "cat /www/index.html /etc/group; ls /www").await;
    assert_eq!(out, "<h1>hello from an image</h1>\nroot:x:0:\napp:x:1000:\nindex.html\n");
    let tree = d.dir.path().join("images/roots").join(digest.replace(':', "-"));
    assert_eq!(std::fs::read_to_string(tree.join("www/index.html")).unwrap(), "<h1>hello from an image</h1>\n");
    assert!(tree.join("etc/group").exists() && !tree.join("www/new.txt").exists());
    // What the writer changed is its own disk's: kept across a restart.
    c.stop_machine(writer).await.unwrap();
    c.start_machine(writer).await.unwrap_or_else(|e| panic!("restart: {e}\n{}", d.logs()));
    let (_, out, _) = sh(&d, writer, "cat /www/index.html /www/new.txt; ls /etc").await;
    assert_eq!(out, "changed\nnew\npasswd\nresolv.conf\n");
    // Every mount of both machines goes with them.
    for id in &ids {
        c.delete_machine(id, true).await.unwrap();
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for id in &ids {
        assert!(!mounts.contains(id.as_str()), "a mount of {id} is left:\n{mounts}");
    }
}

#[ignore = "needs root: runc containers with a netns, the daemon's host networking"]
#[tokio::test]
async fn docker_hub_images_come_through_the_mirror() {
    let upstream = Registry::start(None).await;
    let mirror = Registry::start_mirror(&upstream).await;
    let img =
        Image { layers: vec![busybox_layer(Compression::Gzip)], config: json!({"Env": ["PATH=/bin"]}), docker: false };
    let (digest, _) = upstream.push("library/mirrored", "v1", &img).await;
    let layer = common::oci::sha256(&img.layers[0].bytes);
    let opts = Options {
        env: vec![
            ("HYPERFLEET_REGISTRY_MIRROR".into(), mirror.addr.clone()),
            // Were the mirror not used, the pull would fail here rather than reach the internet.
            ("HTTPS_PROXY".into(), "http://127.0.0.1:9".into()),
            ("HTTP_PROXY".into(), "http://127.0.0.1:9".into()),
            ("NO_PROXY".into(), "127.0.0.1,localhost".into()),
        ],
        ..Options::default()
    };
    let d = Daemon::start(opts).await;
    let c = &d.client;
    // A docker.io name (short, with the `library/` rule) is pulled from the mirror, which fetched it upstream.
    let pulled = c.pull_image(&PullImage { image: "mirrored:v1".into(), registry_auth: None }).await;
    let pulled = pulled.unwrap_or_else(|e| panic!("pull: {e}\n{}\n{}", d.logs(), mirror.log()));
    assert_eq!(pulled.digest, digest);
    assert!(mirror.log().contains("GET /v2/library/mirrored/manifests/v1"), "{}", mirror.log());
    // Asked as docker.io's (`ns`), as a mirror is.
    let asked = format!("\"GET /v2/library/mirrored/blobs/{layer}?ns=docker.io HTTP/1.1\" 200");
    assert_eq!(mirror.log().matches(&asked).count(), 1, "the layer came from the mirror:\n{}", mirror.log());
    assert!(upstream.blob_gets(&layer) >= 1, "the mirror fetched it upstream");
    // A machine from the full name runs it.
    let req = CreateMachine { image: Some("docker.io/library/mirrored:v1".into()), ..machine("mirrored") };
    let m = c.create_machine(&req).await.unwrap();
    assert_eq!(m.spec.image_digest.as_deref(), Some(digest.as_str()));
    let m = c.start_machine(&m.id).await.unwrap_or_else(|e| panic!("start: {e}\n{}", d.logs()));
    assert_eq!(sh(&d, &m.id, "cat /www/index.html").await.1, "<h1>hello from an image</h1>\n");
    c.delete_machine(&m.id, true).await.unwrap();
}

#[ignore = "needs root: the daemon's host networking"]
#[tokio::test]
async fn insecure_registries_are_reached_over_plain_http() {
    let reg = Registry::start(None).await;
    let img = Image { layers: vec![busybox_layer(Compression::Gzip)], config: json!({}), docker: false };
    let (digest, _) = reg.push("team/plain", "v1", &img).await;
    // The registry by a name that is not loopback (`.test` resolves nowhere): reached only through a proxy
    // on loopback that forwards plain HTTP to it and refuses HTTPS (CONNECT).
    let proxy = common::oci::NameProxy::start(&reg.addr).await;
    let name = "registry.hyperfleet.test:5000";
    let image = format!("{name}/team/plain:v1");
    let opts = |insecure: bool| {
        let url = format!("http://{}", proxy.addr);
        let mut env: Vec<(String, String)> = vec![
            ("HTTP_PROXY".into(), url.clone()),
            ("HTTPS_PROXY".into(), url),
            ("NO_PROXY".into(), "127.0.0.1,localhost".into()),
        ];
        if insecure {
            env.push(("HYPERFLEET_INSECURE_REGISTRIES".into(), format!("other.test,{name}")));
        }
        Options { env, ..Options::default() }
    };
    // Not listed: HTTPS, which this registry does not speak.
    let d = Daemon::start(opts(false)).await;
    let e = d.client.pull_image(&PullImage { image: image.clone(), registry_auth: None }).await.unwrap_err();
    assert_eq!(e.status(), Some(502), "{e}");
    let asked = proxy.asked();
    assert!(!asked.is_empty() && asked.iter().all(|a| a == &format!("CONNECT {name}")), "{asked:?}");
    drop(d);
    // Listed in HYPERFLEET_INSECURE_REGISTRIES: plain HTTP.
    let d = Daemon::start(opts(true)).await;
    let pulled = d.client.pull_image(&PullImage { image: image.clone(), registry_auth: None }).await;
    let pulled = pulled.unwrap_or_else(|e| panic!("pull: {e}\n{}", d.logs()));
    assert_eq!(pulled.digest, digest);
    assert!(pulled.references.contains(&image), "{:?}", pulled.references);
    let asked = proxy.asked();
    assert!(asked.iter().any(|a| a == &format!("GET {name}")), "{asked:?}");
    assert!(asked.iter().all(|a| a.ends_with(name)), "{asked:?}");
}

#[ignore = "needs root: runc containers, chown while unpacking layers"]
#[tokio::test]
async fn layers_stack_indexes_resolve_and_hostile_layers_are_refused() {
    let reg = Registry::start(None).await;
    let base = tar(&[
        Entry::Dir("etc/"),
        Entry::File("etc/keep", b"keep\n".to_vec(), 0o644),
        Entry::File("etc/gone", b"gone\n".to_vec(), 0o644),
        Entry::Dir("opq/"),
        Entry::File("opq/old", b"old\n".to_vec(), 0o644),
        Entry::Owned("opt/tool", b"#!/bin/sh\necho tool\n".to_vec(), 0o4755, 1234),
        Entry::Hardlink("opt/tool-link", "opt/tool"),
        Entry::Symlink("opt/sh-link", "/bin/busybox"),
        Entry::File("arch", b"amd64\n".to_vec(), 0o644),
    ]);
    let top = tar(&[
        Entry::File("etc/.wh.gone", vec![], 0o644),
        Entry::Dir("opq/"),
        Entry::File("opq/.wh..wh..opq", vec![], 0o644),
        Entry::File("opq/new", b"new\n".to_vec(), 0o644),
    ]);
    let amd = Image {
        layers: vec![busybox_layer(Compression::Gzip), layer(base, Compression::Gzip), layer(top, Compression::Zstd)],
        config: json!({}),
        docker: false,
    };
    let arm = Image {
        layers: vec![layer(tar(&[Entry::File("arch", b"arm64\n".to_vec(), 0o644)]), Compression::Gzip)],
        config: json!({}),
        docker: false,
    };
    let (amd_digest, amd_size) = reg.push("multi", "amd64-only", &amd).await;
    let (arm_digest, arm_size) = reg.push("multi", "arm64-only", &arm).await;
    reg.push_index("multi", "latest", &[(arm_digest, arm_size, "arm64"), (amd_digest.clone(), amd_size, "amd64")])
        .await;
    let docker = Image { docker: true, ..httpd_image() };
    let docker = Image { layers: vec![busybox_layer(Compression::Gzip)], ..docker };
    reg.push("docker-v2", "latest", &docker).await;

    let d = Daemon::start(daemon_opts(&reg)).await;
    let c = &d.client;
    // An index resolves to its linux/amd64 image; an image with no Entrypoint/Cmd is a sandbox.
    let m = c
        .create_machine(&CreateMachine { image: Some(format!("{}/multi:latest", reg.addr)), ..machine("layers") })
        .await
        .unwrap();
    assert_eq!(m.spec.image_digest.as_deref(), Some(amd_digest.as_str()));
    let m = c.start_machine(&m.id).await.unwrap_or_else(|e| panic!("start: {e}\n{}", d.logs()));
    let check = "cat /arch /etc/keep; test -e /etc/gone && echo gone-still-there; ls /opq; \
                 stat -c '%u %a %i' /opt/tool /opt/tool-link; readlink /opt/sh-link";
    let (code, out, err) = sh(&d, &m.id, check).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..3], ["amd64", "keep", "new"], "{out}");
    let (a, b) = (lines[3].split(' ').collect::<Vec<_>>(), lines[4].split(' ').collect::<Vec<_>>());
    assert_eq!((a[0], a[1]), ("1234", "4755"), "owner and set-uid mode kept: {out}");
    assert_eq!(a[2], b[2], "hard link shares the inode: {out}");
    assert_eq!(lines[5], "/bin/busybox");
    // The machine runs the agent only (no main process): it stays running.
    assert_eq!(c.get_machine(&m.id).await.unwrap().status, MachineStatus::Running);

    // A Docker v2 schema 2 manifest pulls too.
    let info = c
        .pull_image(&PullImage { image: format!("{}/docker-v2:latest", reg.addr), registry_auth: None })
        .await
        .unwrap();
    assert!(info.size_bytes > 0);

    // Hostile layers: `..` and a symlink-then-file escape are refused; nothing lands outside the root.
    let canary = tempfile::tempdir().unwrap();
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("dotdot", tar(&[Entry::File("../../../../../../tmp/hf-escape-x", b"pwned".to_vec(), 0o644)])),
        (
            "symlink",
            tar(&[
                Entry::Symlink("evil", canary.path().to_str().unwrap()),
                Entry::File("evil/x", b"pwned".to_vec(), 0o644),
            ]),
        ),
    ];
    for (name, t) in hostile {
        let img = Image { layers: vec![layer(t, Compression::Gzip)], config: json!({}), docker: false };
        reg.push(&format!("hostile-{name}"), "latest", &img).await;
        let e = c
            .pull_image(&PullImage { image: format!("{}/hostile-{name}:latest", reg.addr), registry_auth: None })
            .await
            .unwrap_err();
        assert_eq!((e.status(), e.code()), (Some(500), Some("IMAGE_ERROR")), "{name}: {e}");
        assert!(e.to_string().contains("refused"), "{name}: {e}");
    }
    assert!(!std::path::Path::new("/tmp/hf-escape-x").exists());
    assert_eq!(std::fs::read_dir(canary.path()).unwrap().count(), 0, "nothing written through the symlink");
    let images = d.dir.path().join("images");
    // The good pulls' scratch trees go in the background: give them a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(images.join("tmp")).unwrap().count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(std::fs::read_dir(images.join("tmp")).unwrap().count(), 0, "no partial files left");
    assert_eq!(c.list_images().await.unwrap().images.len(), 2, "only the good images are cached");
    c.delete_machine(&m.id, true).await.unwrap();
}

#[ignore = "needs root: the daemon's host networking"]
#[tokio::test]
async fn registry_errors_and_credentials() {
    let reg = Registry::start(Some(("hfuser", "s3cret-pass"))).await;
    reg.push("private/app", "v1", &httpd_image()).await;
    let d = Daemon::start(daemon_opts(&reg)).await;
    let c = &d.client;
    let image = format!("{}/private/app:v1", reg.addr);
    let pull = |auth: Option<RegistryAuth>| PullImage { image: image.clone(), registry_auth: auth };

    let e = c.pull_image(&pull(None)).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(403), Some("REGISTRY_UNAUTHORIZED")), "{e}");
    let wrong = RegistryAuth { username: Some("hfuser".into()), password: Some("wrong".into()), token: None };
    let e = c.pull_image(&pull(Some(wrong))).await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    let e = c.pull_image(&pull(Some(RegistryAuth { token: None, ..RegistryAuth::default() }))).await.unwrap_err();
    assert_eq!(e.code(), Some("VALIDATION_ERROR"), "{e}");
    let right = RegistryAuth { username: Some("hfuser".into()), password: Some("s3cret-pass".into()), token: None };
    let m = c
        .create_machine(&CreateMachine {
            image: Some(image.clone()),
            registry_auth: Some(right.clone()),
            ..machine("private")
        })
        .await
        .unwrap();
    let json = serde_json::to_string(&c.get_machine(&m.id).await.unwrap()).unwrap();
    assert!(!json.contains("s3cret-pass") && !json.contains("registry_auth"), "{json}");
    c.start_machine(&m.id).await.unwrap_or_else(|e| panic!("start: {e}\n{}", d.logs()));

    // Unknown images, bad references, image with rootfs_path, a registry that is down.
    let unknown = format!("{}/private/app:nope", reg.addr);
    let e = c.pull_image(&PullImage { image: unknown, registry_auth: Some(right) }).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(404), Some("NOT_FOUND")), "{e}");
    let e = c.pull_image(&PullImage { image: "Bad Ref!".into(), registry_auth: None }).await.unwrap_err();
    assert_eq!(e.code(), Some("VALIDATION_ERROR"), "{e}");
    let both = CreateMachine { image: Some(image.clone()), rootfs_path: Some("/x".into()), ..machine("both") };
    let e = c.create_machine(&both).await.unwrap_err();
    assert!(e.to_string().contains("mutually exclusive"), "{e}");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = c.pull_image(&PullImage { image: format!("127.0.0.1:{port}/x:1"), registry_auth: None }).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(502), Some("REGISTRY_ERROR")), "{e}");

    // The password is nowhere: not in the daemon's log, not in the database.
    c.delete_machine(&m.id, true).await.unwrap();
    assert!(!d.logs().contains("s3cret-pass"));
    let db = std::fs::read(d.dir.path().join("hyperfleet.db")).unwrap();
    assert!(!db.windows(11).any(|w| w == b"s3cret-pass"));
}

#[ignore = "needs root: the daemon's host networking"]
#[tokio::test]
async fn twenty_concurrent_creates_pull_once() {
    let reg = Registry::start(None).await;
    let big: Vec<u8> = (0..16u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0]).collect();
    let img = Image {
        layers: vec![
            busybox_layer(Compression::Gzip),
            layer(tar(&[Entry::File("blob", big, 0o644)]), Compression::Gzip),
        ],
        config: json!({}),
        docker: false,
    };
    reg.push("big", "v1", &img).await;
    let layer_digests: Vec<String> = img.layers.iter().map(|l| common::oci::sha256(&l.bytes)).collect();
    let d = Daemon::start(daemon_opts(&reg)).await;
    let image = format!("{}/big:v1", reg.addr);
    let creates = (0..20).map(|i| {
        let c = d.client.clone();
        let req = CreateMachine { image: Some(image.clone()), ..machine(&format!("m{i}")) };
        async move { c.create_machine(&req).await.unwrap() }
    });
    let machines = futures::future::join_all(creates).await;
    assert!(machines.iter().all(|m| m.status == MachineStatus::Pending && m.image_status.is_some()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.client.list_images().await.unwrap().images.is_empty() {
        assert!(Instant::now() < deadline, "the image never got cached\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for l in &layer_digests {
        assert_eq!(reg.blob_gets(l), 1, "layer {l} fetched once\n{}", reg.log());
    }
    let images = d.client.list_images().await.unwrap().images;
    assert_eq!(images[0].machines.len(), 20);
}

#[ignore = "needs root and /dev/kvm: a Firecracker microVM booting an image's converted disk"]
#[tokio::test]
async fn a_firecracker_machine_boots_the_converted_image() {
    assert!(std::path::Path::new("/dev/kvm").exists(), "/dev/kvm does not exist on this host");
    let reg = Registry::start(None).await;
    reg.push("team/app", "v1", &httpd_image()).await;
    let d = Daemon::start(Options { runtime: RuntimeKind::Firecracker, ..daemon_opts(&reg) }).await;
    let c = &d.client;
    let req = CreateMachine {
        image: Some(format!("{}/team/app:v1", reg.addr)),
        runtime: Some(RuntimeKind::Firecracker),
        image_size_mib: Some(96),
        ..machine("fc-image")
    };
    let m = c.create_machine(&req).await.unwrap();
    let m = c.start_machine(&m.id).await.unwrap_or_else(|e| panic!("start: {e}\n{}", d.logs()));
    let api = hyperfleet::testing::FirecrackerApi::new(std::path::Path::new(m.socket_path.as_deref().unwrap()));
    let cfg = api.get("/vm/config").await.unwrap();
    let boot_args = cfg["boot-source"]["boot_args"].as_str().unwrap();
    assert!(boot_args.contains("init=/.hyperfleet/agent"), "the injected agent is the init: {boot_args}");
    assert_eq!(cfg["drives"][0]["path_on_host"], "/rootfs.ext4");

    // The disk it was given is the converted image (grown to image_size_mib) with the main process spec.
    let disk = d.dir.path().join("machines").join(&m.id).join("rootfs.ext4");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 96 << 20);
    let debugfs = |cmd: &str| {
        let o = std::process::Command::new("debugfs").args(["-R", cmd]).arg(&disk).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(debugfs("cat /www/index.html").contains("hello from an image"));
    assert!(debugfs("cat /.hyperfleet/main.json").contains("\"httpd\""));
    assert!(debugfs("stat /.hyperfleet/agent").contains("Mode:  0755"));

    // The guest kernel mounts it and starts the agent as init (on PVM, no further: no guest userspace runs).
    let log = d.dir.path().join("machines").join(&m.id).join("console.log");
    let deadline = Instant::now() + Duration::from_secs(420);
    loop {
        let console = std::fs::read_to_string(&log).unwrap_or_default();
        if console.contains("Run /.hyperfleet/agent as init process") {
            break;
        }
        assert!(Instant::now() < deadline, "the kernel never ran the image's init:\n{console}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if !common::is_pvm() {
        assert_eq!(sh(&d, &m.id, "cat /www/second.txt").await.1, "from the zstd layer\n");
    }
    c.delete_machine(&m.id, true).await.unwrap();
}

/// Waits until the machine's logs contain `needle`.
async fn until_logged(d: &Daemon, id: &str, needle: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let logs = d.client.machine_logs(id, 200).await.unwrap().lines.join("\n");
        if logs.contains(needle) {
            return logs;
        }
        assert!(Instant::now() < deadline, "machine {id} never logged {needle:?}:\n{logs}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[ignore = "needs root: runc containers with a netns, chown while unpacking layers"]
#[tokio::test]
async fn restart_policies_decide_what_an_exit_does() {
    let reg = Registry::start(None).await;
    reg.push("team/app", "v1", &httpd_image()).await;
    let d = Daemon::start(daemon_opts(&reg)).await;
    let c = &d.client;
    let image = format!("{}/team/app:v1", reg.addr);
    // Each run counts itself in /dev/shm (kept across restarts inside the machine) and exits with `code`.
    let counting = |code: i32| {
        format!("n=$(cat /dev/shm/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > /dev/shm/n; echo run $n; exit {code}")
    };
    let create = |name: &str, code: i32, policy: RestartPolicy| CreateMachine {
        image: Some(image.clone()),
        entrypoint: Some(vec!["sh".into(), "-c".into(), counting(code)]),
        restart_policy: Some(policy),
        ..machine(name)
    };

    // always: a clean exit and a failing one are both restarted, the machine keeps running, and each restart
    // is in the machine's log.
    let mut always = Vec::new();
    for (name, code) in [("always-0", 0), ("always-7", 7)] {
        let m = c.create_machine(&create(name, code, RestartPolicy::Always)).await.unwrap();
        assert_eq!(m.spec.restart_policy, RestartPolicy::Always);
        c.start_machine(&m.id).await.unwrap_or_else(|e| panic!("start: {e}\n{}", d.logs()));
        always.push((m.id, code));
    }
    for (id, code) in &always {
        let logs = until_logged(&d, id, "run 3", 30).await;
        assert!(logs.contains(&format!("main process exited with {code}; restarting")), "{logs}");
        let m = c.get_machine(id).await.unwrap();
        assert_eq!((m.status, m.error_message), (MachineStatus::Running, None), "{logs}");
    }

    // on-failure: a clean exit is not restarted, the machine stops.
    let once = c.create_machine(&create("on-failure-0", 0, RestartPolicy::OnFailure)).await.unwrap();
    c.start_machine(&once.id).await.unwrap();
    let stopped = until_status(&d, &once.id, MachineStatus::Stopped, 30).await;
    assert_eq!(stopped.error_message, None);
    let logs = c.machine_logs(&once.id, 200).await.unwrap().lines.join("\n");
    assert!(logs.contains("run 1") && !logs.contains("run 2") && !logs.contains("restarting"), "{logs}");

    // no: a failing exit fails the machine at once, with the code; a clean one stops it.
    let no = c.create_machine(&create("no-5", 5, RestartPolicy::No)).await.unwrap();
    c.start_machine(&no.id).await.unwrap();
    let failed = until_status(&d, &no.id, MachineStatus::Failed, 30).await;
    let msg = failed.error_message.unwrap();
    assert!(msg.contains("exited with code 5") && msg.contains("run 1"), "{msg}");
    let logs = c.machine_logs(&no.id, 200).await.unwrap().lines.join("\n");
    assert!(!logs.contains("run 2") && !logs.contains("restarting"), "{logs}");
    let no0 = c.create_machine(&create("no-0", 0, RestartPolicy::No)).await.unwrap();
    c.start_machine(&no0.id).await.unwrap();
    assert_eq!(until_status(&d, &no0.id, MachineStatus::Stopped, 30).await.error_message, None);

    // A restarting machine still stops on request.
    let (id, _) = &always[0];
    assert_eq!(c.stop_machine(id).await.unwrap().status, MachineStatus::Stopped);
    for id in [&always[0].0, &always[1].0, &once.id, &no.id, &no0.id] {
        c.delete_machine(id, true).await.unwrap();
    }
}

#[ignore = "needs root: the daemon's host networking"]
#[tokio::test]
async fn token_auth_registry_takes_credentials_and_tokens() {
    let tokens = TokenServer::start("tokuser", "tok-s3cret").await;
    let reg = Registry::start_with_tokens(&tokens).await;
    let (digest, _) = reg.push("private/app", "v1", &httpd_image()).await;
    let d = Daemon::start(daemon_opts(&reg)).await;
    let c = &d.client;
    let image = format!("{}/private/app:v1", reg.addr);
    let pull = |auth: Option<RegistryAuth>| PullImage { image: image.clone(), registry_auth: auth };
    let basic = |p: &str| RegistryAuth { username: Some("tokuser".into()), password: Some(p.into()), token: None };
    let token = |t: String| RegistryAuth { token: Some(t), ..RegistryAuth::default() };

    // Anonymous (the token server gives a token with no access), a wrong password (it answers 401), a token
    // for another repository, and a token signed by a key the registry does not trust: all refused.
    let other_issuer = TokenServer::start("tokuser", "tok-s3cret").await;
    let refused = [
        ("anonymous", None),
        ("wrong password", Some(basic("wrong"))),
        ("other repository", Some(token(tokens.mint("tokuser", &[("private/other", "pull")])))),
        ("untrusted key", Some(token(other_issuer.mint("tokuser", &[("private/app", "pull")])))),
        ("not a jwt", Some(token("garbage".into()))),
    ];
    for (what, auth) in refused {
        let e = c.pull_image(&pull(auth)).await.unwrap_err();
        assert_eq!((e.status(), e.code()), (Some(403), Some("REGISTRY_UNAUTHORIZED")), "{what}: {e}");
    }
    assert!(c.list_images().await.unwrap().images.is_empty());

    // Username and password: exchanged at the token server for a pull token.
    let info = c.pull_image(&pull(Some(basic("tok-s3cret")))).await.unwrap_or_else(|e| panic!("{e}\n{}", reg.log()));
    assert_eq!(info.digest, digest);
    c.delete_image(&digest).await.unwrap();

    // A registry token given as is, for a machine: the create resolves with it, the pull in the background
    // and the start use it.
    let t = tokens.mint("tokuser", &[("private/app", "pull")]);
    let m = c
        .create_machine(&CreateMachine {
            image: Some(image.clone()),
            registry_auth: Some(token(t.clone())),
            ..machine("tok")
        })
        .await
        .unwrap();
    assert_eq!(m.spec.image_digest.as_deref(), Some(digest.as_str()));
    let m = c.start_machine(&m.id).await.unwrap_or_else(|e| panic!("start: {e}\n{}", d.logs()));
    assert_eq!(m.status, MachineStatus::Running);
    assert_eq!(sh(&d, &m.id, "cat /www/second.txt").await.1, "from the zstd layer\n");
    let json = serde_json::to_string(&c.get_machine(&m.id).await.unwrap()).unwrap();
    assert!(!json.contains(&t), "the token is not echoed");
    c.delete_machine(&m.id, true).await.unwrap();
    assert!(!d.logs().contains("tok-s3cret") && !d.logs().contains(&t), "credentials are not logged");
    let db = std::fs::read(d.dir.path().join("hyperfleet.db")).unwrap();
    assert!(!db.windows(t.len()).any(|w| w == t.as_bytes()), "the token is not stored");
}

/// A tmpfs of `mib` MiB mounted by the test, unmounted when dropped.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn mount(mib: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700"), "hf-test-small"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        Self(dir)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let st = std::process::Command::new("umount").arg(self.0.path()).status();
        if !st.is_ok_and(|s| s.success()) {
            let _ = std::process::Command::new("umount").arg("-l").arg(self.0.path()).status();
        }
    }
}

/// Every file under `dir`, recursively (directories themselves not listed).
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

#[ignore = "needs root: mounts a tmpfs; the daemon's host networking"]
#[tokio::test]
async fn a_pull_that_fills_the_disk_fails_with_507_and_leaves_nothing() {
    let reg = Registry::start(None).await;
    // A layer that does not compress (so its download fills the disk), and one that does (so unpacking does).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..12 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect();
    let blob = Image {
        layers: vec![layer(tar(&[Entry::File("noise", noise, 0o644)]), Compression::Gzip)],
        config: json!({}),
        docker: false,
    };
    let tree = Image {
        layers: vec![
            busybox_layer(Compression::Gzip),
            layer(tar(&[Entry::File("zeros", vec![0; 24 << 20], 0o644)]), Compression::Gzip),
        ],
        config: json!({}),
        docker: false,
    };
    reg.push("full/blob", "v1", &blob).await;
    reg.push("full/tree", "v1", &tree).await;
    let small = SmallFs::mount(8);
    let images = small.0.path().join("images");
    let mut opts = daemon_opts(&reg);
    opts.env.push(("HYPERFLEET_IMAGE_DIR".into(), images.display().to_string()));
    let d = Daemon::start(opts).await;
    let c = &d.client;

    for repo in ["full/blob", "full/tree"] {
        let e = c
            .pull_image(&PullImage { image: format!("{}/{repo}:v1", reg.addr), registry_auth: None })
            .await
            .unwrap_err();
        assert_eq!((e.status(), e.code()), (Some(507), Some("INSUFFICIENT_STORAGE")), "{repo}: {e}");
        assert!(e.to_string().contains("No space left on device"), "{repo}: the reason is given: {e}");
        let left: Vec<String> = files_under(&images).into_iter().filter(|f| !f.ends_with("index.json")).collect();
        assert!(left.is_empty(), "{repo}: nothing of the pull is left: {left:?}");
    }
    assert!(c.list_images().await.unwrap().images.is_empty());

    // A machine from it: created (pending), its pull fails in the background and shows on the machine; a
    // start pulls again and fails the same way, the machine still pending.
    let m = c
        .create_machine(&CreateMachine { image: Some(format!("{}/full/tree:v1", reg.addr)), ..machine("full") })
        .await
        .unwrap();
    assert_eq!(m.status, MachineStatus::Pending);
    let deadline = Instant::now() + Duration::from_secs(30);
    let m = loop {
        let m = c.get_machine(&m.id).await.unwrap();
        if m.image_status.as_ref().is_some_and(|s| s.phase == ImagePhase::Failed) {
            break m;
        }
        assert!(Instant::now() < deadline, "the pull never failed: {:?}\n{}", m.image_status, d.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let st = m.image_status.unwrap();
    assert!(st.error.as_deref().is_some_and(|e| e.contains("No space left on device")), "{st:?}");
    // The store write lands just after the in-memory status.
    let deadline = Instant::now() + Duration::from_secs(5);
    let msg = loop {
        if let Some(msg) = c.get_machine(&m.id).await.unwrap().error_message {
            break msg;
        }
        assert!(Instant::now() < deadline, "no error_message on the machine");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(msg.contains("the image pull failed") && msg.contains("No space left on device"), "{msg}");
    let e = c.start_machine(&m.id).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(507), Some("INSUFFICIENT_STORAGE")), "{e}");
    assert_eq!(c.get_machine(&m.id).await.unwrap().status, MachineStatus::Pending);
    let left: Vec<String> = files_under(&images).into_iter().filter(|f| !f.ends_with("index.json")).collect();
    assert!(left.is_empty(), "nothing of the pulls is left: {left:?}");
    c.delete_machine(&m.id, true).await.unwrap();
    drop(d);
}

#[ignore = "needs root: runc containers, the daemon's host networking"]
#[tokio::test]
async fn a_pull_cut_by_a_daemon_crash_resumes_or_shows_its_failure() {
    let public = Registry::start(None).await;
    let private = Registry::start(Some(("hfuser", "s3cret-pass"))).await;
    // Big enough (64 MiB unpacked) that the pull is still running when the daemon is killed.
    let img = Image {
        layers: vec![
            busybox_layer(Compression::Gzip),
            layer(tar(&[Entry::File("zeros", vec![0; 64 << 20], 0o644)]), Compression::Gzip),
        ],
        config: json!({}),
        docker: false,
    };
    public.push("big", "v1", &img).await;
    // Another digest (pulls are shared per digest): its own config.
    private.push("big", "v1", &Image { config: json!({"Env": ["PRIVATE=1"]}), ..img }).await;
    let mut d = Daemon::start(daemon_opts(&public)).await;
    let c = d.client.clone();
    let right = RegistryAuth { username: Some("hfuser".into()), password: Some("s3cret-pass".into()), token: None };
    let anon = c
        .create_machine(&CreateMachine { image: Some(format!("{}/big:v1", public.addr)), ..machine("anon") })
        .await
        .unwrap();
    let authed = c
        .create_machine(&CreateMachine {
            image: Some(format!("{}/big:v1", private.addr)),
            registry_auth: Some(right.clone()),
            ..machine("authed")
        })
        .await
        .unwrap();
    d.kill9();
    let images = d.dir.path().join("images");
    assert_eq!(files_under(&images.join("roots")), Vec::<String>::new(), "the crash came before the pulls ended");
    d.spawn().await;

    // The anonymous pull starts again by itself and the machine starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = c.get_machine(&anon.id).await.unwrap().image_status;
        if st.as_ref().is_some_and(|s| s.phase == ImagePhase::Ready) {
            break;
        }
        assert!(Instant::now() < deadline, "the pull never resumed: {st:?}\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = c.start_machine(&anon.id).await.unwrap_or_else(|e| panic!("start: {e}\n{}", d.logs()));
    assert_eq!(sh(&d, &m.id, "stat -c %s /zeros").await.1, format!("{}\n", 64 << 20));

    // The pull that needed credentials cannot resume without them (they are never stored): the machine
    // shows the failed pull, a start tries again and says why, and once the image is pulled with
    // credentials the start works.
    let deadline = Instant::now() + Duration::from_secs(30);
    let m = loop {
        let m = c.get_machine(&authed.id).await.unwrap();
        if m.error_message.is_some() {
            break m;
        }
        assert!(Instant::now() < deadline, "no failed pull on the machine: {:?}\n{}", m.image_status, d.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(m.status, MachineStatus::Pending);
    let st = m.image_status.unwrap();
    assert_eq!(st.phase, ImagePhase::Failed, "{st:?}");
    let msg = m.error_message.unwrap();
    assert!(msg.contains("the image pull failed") && msg.contains("refused"), "{msg}");
    let e = c.start_machine(&authed.id).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(403), Some("REGISTRY_UNAUTHORIZED")), "{e}");
    c.pull_image(&PullImage { image: format!("{}/big:v1", private.addr), registry_auth: Some(right) }).await.unwrap();
    let m = c.start_machine(&authed.id).await.unwrap_or_else(|e| panic!("start: {e}\n{}", d.logs()));
    assert_eq!((m.status, m.error_message), (MachineStatus::Running, None));

    // Nothing half-written survived the crash.
    let leftovers = || -> Vec<String> {
        files_under(&images)
            .into_iter()
            .filter(|f| f.contains(".partial") || f.starts_with(&images.join("tmp").display().to_string()))
            .collect()
    };
    // Scratch trees of the good pulls go in the background: give them a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !leftovers().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(leftovers(), Vec::<String>::new());
    for id in [&anon.id, &authed.id] {
        c.delete_machine(id, true).await.unwrap();
    }
}

#[ignore = "needs root: the daemon's host networking"]
#[tokio::test]
async fn the_cli_manages_the_cache_and_the_cap_evicts_the_least_recently_used() {
    let reg = Registry::start(None).await;
    // Three images of about 17 MiB in the cache each (a compressed layer and a sparse root); the cap holds two.
    let image = |seed: u8| Image {
        layers: vec![layer(tar(&[Entry::File("fill", vec![seed; 16 << 20], 0o644)]), Compression::Gzip)],
        config: json!({}),
        docker: false,
    };
    let mut refs = Vec::new();
    for (i, name) in ["one", "two", "three"].into_iter().enumerate() {
        reg.push(name, "v1", &image(u8::try_from(i).unwrap() + 1)).await;
        refs.push(format!("{}/{name}:v1", reg.addr));
    }
    let mut opts = daemon_opts(&reg);
    opts.env.push(("HYPERFLEET_IMAGE_CACHE_MIB".into(), "40".into()));
    let d = Daemon::start(opts).await;
    let cli = |args: &[&str]| {
        let out = d.command().args(args).env("HYPERFLEET_URL", d.url()).env("HYPERFLEET_API_KEY", &d.key).output();
        let out = out.unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code(), stdout.into_owned(), stderr.into_owned())
    };

    // `images pull` prints the digest; `images ls` lists it with its reference.
    let (code, one, err) = cli(&["images", "pull", &refs[0]]);
    assert_eq!(code, Some(0), "{err}");
    let one = one.trim().to_string();
    assert!(one.starts_with("sha256:"), "{one}");
    let (code, two, err) = cli(&["images", "pull", &refs[1]]);
    assert_eq!(code, Some(0), "{err}");
    let two = two.trim().to_string();
    let (_, ls, _) = cli(&["images", "ls"]);
    assert!(ls.contains("DIGEST") && ls.contains(&refs[0]) && ls.contains(&refs[1]), "{ls}");
    let sizes: Vec<u64> = d.client.list_images().await.unwrap().images.iter().map(|i| i.size_bytes).collect();
    assert!(sizes.iter().all(|s| *s > 16 << 20) && sizes.iter().sum::<u64>() <= 40 << 20, "{sizes:?}");

    // Using the first makes the second the least recently used: the third pull evicts the second.
    let m = d.client.create_machine(&CreateMachine { image: Some(refs[0].clone()), ..machine("keeps-one") }).await;
    let m = m.unwrap();
    d.client.delete_machine(&m.id, true).await.unwrap();
    let (code, three, err) = cli(&["images", "pull", &refs[2]]);
    assert_eq!(code, Some(0), "{err}");
    let cached: Vec<String> = d.client.list_images().await.unwrap().images.into_iter().map(|i| i.digest).collect();
    assert!(cached.contains(&one) && cached.contains(&three.trim().to_string()), "{cached:?}");
    assert!(!cached.contains(&two), "the least recently used image was evicted: {cached:?}");

    // `images rm` removes one; a second time it is a 404, which the CLI reports as a failure.
    let (code, _, err) = cli(&["images", "rm", &one]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = cli(&["images", "rm", &one]);
    assert_ne!(code, Some(0));
    assert!(err.contains("not in the cache"), "{err}");
    let (_, ls, _) = cli(&["images", "ls", "--output", "json"]);
    let ls: serde_json::Value = serde_json::from_str(&ls).unwrap_or_else(|e| panic!("{e}: {ls}"));
    assert_eq!(ls["images"].as_array().unwrap().len(), 1, "{ls}");
}
