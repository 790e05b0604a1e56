//! The OpenAPI document is the contract: schemathesis generates requests from /docs/json (valid and
//! invalid ones, and sequences that follow the links between operations), sends them to the real daemon
//! (container runtime), and checks every answer against the document. Any failed check fails the test with
//! schemathesis' report.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, Options};
use hyperfleet_client::types::{CreateMachine, EgressPolicy, NetworkOptions};

/// The checks the contract is held to.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
    response_schema_conformance,negative_data_rejection,use_after_free,ignored_auth";
/// Test cases per operation and phase, and the wall-clock budget of the whole run (2 cores).
const MAX_EXAMPLES: &str = "25";
const MAX_TIME_SECS: u64 = 120;

/// The `st` of the virtualenv scripts/test.sh makes (HYPERFLEET_SCHEMATHESIS_VENV).
fn schemathesis() -> PathBuf {
    let venv = std::env::var_os("HYPERFLEET_SCHEMATHESIS_VENV").unwrap_or_else(|| {
        panic!(
            "HYPERFLEET_SCHEMATHESIS_VENV is not set: it names the virtualenv with schemathesis that \
             scripts/test.sh creates (run the tests through scripts/test.sh, or set it to such a venv)"
        )
    });
    let st = PathBuf::from(venv).join("bin/st");
    assert!(st.is_file(), "{} is missing: scripts/test.sh installs schemathesis there", st.display());
    st
}

#[tokio::test]
#[ignore = "needs root: starts the real daemon (TAP/veth, nftables, runc) and runs schemathesis against it"]
async fn the_daemon_keeps_its_openapi_contract() {
    let st = schemathesis();
    let opts = Options {
        // Room for every machine the generated requests create, so IP_POOL_EXHAUSTED stays out of the run.
        prefix_len: 18,
        // Firecracker is off the table: generated creates that ask for it get a 400, not a VM.
        env: vec![
            ("FIRECRACKER_BIN".into(), "/nonexistent/firecracker".into()),
            // Fuzzed image references must never reach a registry off this host: only a closed loopback
            // port is allowed (connection refused, 502).
            ("HYPERFLEET_ALLOWED_REGISTRIES".into(), "127.0.0.1:1".into()),
        ],
        ..Options::default()
    };
    let d = Daemon::start(opts).await;
    // The machine that exec and file requests go to (see schemathesis.toml), cut off from the outside.
    let network = NetworkOptions { egress: Some(EgressPolicy::Deny), dns: None };
    let machine = common::running(&d, CreateMachine { network: Some(network), ..common::machine("contract") }).await;
    let own = d.client.list_api_keys().await.unwrap().api_keys;
    let own_id = &own.iter().find(|k| k.name == "test-admin").expect("the harness' key").id;

    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/contract");
    let report = d.dir.path().join("schemathesis");
    let started = Instant::now();
    let out = Command::new(&st)
        .arg("--config-file")
        .arg(here.join("schemathesis.toml"))
        .args(["run", &format!("{}/docs/json", d.url()), "--checks", CHECKS])
        .args(["--header", &format!("Authorization: Bearer {}", d.key)])
        .args(["--max-examples", MAX_EXAMPLES, "--max-time", &MAX_TIME_SECS.to_string()])
        .args(["--no-color", "--report", "junit", "--report-dir"])
        .arg(&report)
        .current_dir(d.dir.path())
        .env("SCHEMATHESIS_HOOKS", here.join("hooks.py"))
        .env("HYPERFLEET_CONTRACT_KEY_ID", own_id)
        .env("HYPERFLEET_CONTRACT_MACHINE_ID", &machine.id)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", st.display()));
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("schemathesis took {:.0} s", took.as_secs_f64());
    let mut problems = Vec::new();
    if !out.status.success() {
        problems.push(format!(
            "schemathesis found the daemon breaking its OpenAPI contract ({}):\n{stdout}\n{stderr}",
            out.status
        ));
    } else {
        println!("{stdout}");
    }
    if took >= Duration::from_secs(MAX_TIME_SECS + 60) {
        problems.push(format!("schemathesis overran its budget: {took:?}"));
    }
    // A run that never got past the front door would pass too: the guest must have been reached.
    let log = d.logs();
    let answered = answers(&log);
    let mut tally = std::collections::BTreeMap::<&(String, String), usize>::new();
    for a in answered.iter().filter(|(w, _)| w.contains("/contract")) {
        *tally.entry(a).or_default() += 1;
    }
    println!("answers to requests for the running machine:");
    for ((what, status), n) in tally {
        println!("  {n:5} x {status} {what}");
    }
    for op in ["POST /machines/contract/exec", "POST /machines/contract/exec/stream", "POST /machines/contract/files"] {
        if !answered.iter().any(|(w, s)| w == op && s.starts_with('2')) {
            problems.push(format!("no 2xx answer to {op}"));
        }
    }
    if !problems.is_empty() {
        // The findings go last, where a truncated CI log still shows them: the daemon is stopped (its log
        // printed, shortened) before the test fails rather than by the unwinding after it.
        drop(d);
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(150)..].join("\n");
        eprintln!("---- daemon log (last 150 of {} lines) ----\n{tail}\n---- end ----", lines.len());
        panic!("{}", problems.join("\n"));
    }
}

/// (method and path, status) of every request the daemon answered, from its log.
fn answers(log: &str) -> Vec<(String, String)> {
    let field = |line: &str, name: &str| {
        let at = line.find(&format!("{name}="))? + name.len() + 1;
        line[at..].split(|c: char| c.is_whitespace() || c == '}').next().map(str::to_string)
    };
    log.lines()
        .filter(|l| l.contains("request done"))
        .map(strip_colours)
        .filter_map(|l| Some((format!("{} {}", field(&l, "method")?, field(&l, "path")?), field(&l, "status")?)))
        .collect()
}

fn strip_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}
