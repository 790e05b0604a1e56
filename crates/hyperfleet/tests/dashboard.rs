//! The web dashboard driven end to end in headless Chromium (Debian `chromium` + `chromium-driver`, through
//! WebDriver): sign in, create a machine, see it turn running live (started elsewhere, learnt from
//! /events), open its page, run a command in the console, stop and delete it. Screenshots of the list and
//! the machine page are saved under the test's target directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, Options};
use fantoccini::{Client, ClientBuilder, Locator};

/// chromedriver on a loopback port, in its own process group (the browsers it starts go with it).
struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Driver {
    fn start() -> Self {
        use std::os::unix::process::CommandExt;
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("chromedriver")
            .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver (Debian chromium-driver) is installed");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port, _profile: tempfile::tempdir().unwrap() }
    }

    async fn browser(&self) -> Client {
        let profile = format!("--user-data-dir={}", self._profile.path().display());
        let caps = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync", "--no-first-run",
                         "--disable-dev-shm-usage", "--window-size=1280,900", profile],
            }
        });
        let caps = caps.as_object().unwrap().clone();
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .unwrap()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.child.id().cast_signed()));
        // Dropped: the group may be gone already.
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Waits until `check` holds, up to 30 s.
async fn until<F: AsyncFn() -> bool>(what: &str, check: F) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn text(b: &Client, css: &str) -> String {
    match b.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn screenshot(b: &Client, name: &str) {
    let png = b.screenshot().await.unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), png).unwrap();
    eprintln!("screenshot: {}", dir.join(name).display());
}

#[ignore = "needs root: runc container on a veth, nftables; and Debian chromium + chromium-driver"]
#[tokio::test]
async fn the_dashboard_signs_in_follows_a_machine_live_and_runs_a_command() {
    let d = Daemon::start(Options::default()).await;
    let driver = Driver::start();
    let b = driver.browser().await;
    let result = drive(&d, &b).await;
    // Closed whatever happened, so the browser does not outlive the test.
    let _ = b.close().await;
    result.unwrap();
}

async fn drive(d: &Daemon, b: &Client) -> Result<(), fantoccini::error::CmdError> {
    b.goto(&format!("{}/ui/", d.url())).await?;
    b.find(Locator::Id("key")).await?.send_keys(&d.key).await?;
    b.find(Locator::Id("signin")).await?.click().await?;
    until("the machine list", async || b.find(Locator::Css("#list-view:not([hidden])")).await.is_ok()).await;
    let url = b.current_url().await?;
    assert!(!url.as_str().contains(&d.key), "the key is never in a URL: {url}");
    until("live updates", async || text(b, "#live").await == "live").await;

    // Create through the form.
    b.find(Locator::Id("create-name")).await?.send_keys("web1").await?;
    b.find(Locator::Id("create-submit")).await?.click().await?;
    let row = "tr[data-name='web1']";
    until("the new machine in the list", async || text(b, &format!("{row} .status")).await == "pending").await;

    // Started by someone else (the SDK): the page learns it from /events alone, without a reload.
    let m = d.client.get_machine("web1").await.unwrap();
    d.client.start_machine(&m.id).await.unwrap();
    until("the machine to show running", async || text(b, &format!("{row} .status")).await == "running").await;
    screenshot(b, "list.png").await;

    // Its page: network facts, a command in the console.
    b.find(Locator::Css(&format!("{row} a.machine-link"))).await?.click().await?;
    until("the machine page", async || text(b, "#m-name").await == "web1").await;
    assert!(text(b, "#m-facts").await.contains(&m.guest_ip.to_string()));
    b.find(Locator::Id("exec-input")).await?.send_keys("echo hello-from-the-dashboard; uname -s").await?;
    b.find(Locator::Id("exec-run")).await?.click().await?;
    until("the command's output", async || {
        let out = text(b, "#exec-output").await;
        out.contains("hello-from-the-dashboard") && out.contains("Linux") && out.contains("[exit 0")
    })
    .await;
    until("a stats reading", async || text(b, "#m-stats-text").await.contains("disk")).await;
    screenshot(b, "machine.png").await;

    // Stop it from its page, then delete it from the list.
    b.find(Locator::Css("#m-actions button[data-action='stop']")).await?.click().await?;
    until("stopped", async || text(b, "#m-status").await == "stopped").await;
    b.find(Locator::Css("a[href='#/']")).await?.click().await?;
    until("the list again", async || text(b, &format!("{row} .status")).await == "stopped").await;
    b.find(Locator::Css(&format!("{row} button[data-action='delete']"))).await?.click().await?;
    b.accept_alert().await?;
    until("the row to go", async || b.find(Locator::Css(row)).await.is_err()).await;
    assert_eq!(d.client.get_machine(&m.id).await.unwrap_err().status(), Some(404));
    Ok(())
}
