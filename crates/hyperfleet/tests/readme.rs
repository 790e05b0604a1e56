//! The README's curl examples, run as written (only `localhost:4000` becomes the test proxy's port) against a
//! live daemon, in order. A block marked `<!-- readme-test expect="…" -->` must exit 0 and print the text.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Daemon, Options};

struct Example {
    script: String,
    expect: Option<String>,
}

fn examples(readme: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(marker) = line.trim().strip_prefix("<!-- readme-test") else {
            continue;
        };
        let expect = marker
            .split_once("expect=\"")
            .map(|(_, rest)| rest.rsplit_once("\" -->").map_or(rest, |(e, _)| e).replace("\\\"", "\""));
        assert_eq!(lines.next().map(str::trim), Some("```bash"), "a readme-test marker must precede a bash block");
        let script: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        out.push(Example { script: script.join("\n"), expect });
    }
    out
}

#[ignore = "needs root: the README's examples start runc containers"]
#[tokio::test]
async fn readme_examples_run_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let examples = examples(&readme);
    assert!(examples.len() >= 6, "found only {} examples", examples.len());
    let d = Daemon::start(Options::default()).await;
    for ex in &examples {
        let script = ex.script.replace("localhost:4000", &format!("127.0.0.1:{}", d.proxy_port));
        let out = std::process::Command::new("bash")
            // Examples run from the checkout's root, as a reader would (`scripts/…`).
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .args(["-euo", "pipefail", "-c", &script])
            .env("HF", d.url())
            .env("KEY", &d.key)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "README example failed:\n{script}\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(want) = &ex.expect {
            assert!(stdout.contains(want.as_str()), "README example did not print {want:?}:\n{script}\n{stdout}");
        }
    }
    // The tour ends by deleting its machine: nothing is left.
    assert_eq!(d.client.list_machines(&Default::default()).await.unwrap().total, 0);
    assert!(d.host_links().is_empty());
}
