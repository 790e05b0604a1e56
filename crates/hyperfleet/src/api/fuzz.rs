//! Property tests for every JSON request body the API accepts: arbitrary bytes, arbitrary JSON, and valid
//! bodies with one field replaced by an arbitrary value must give a parsed request or a 400 with the error
//! envelope — never a panic — and a parsed create request must validate or name what is wrong.

use hyperfleet_types::{CreateApiKey, CreateMachine, ExecRequest, FileUpload, UpdateMachine};
use proptest::prelude::*;
use serde_json::Value;

use super::extract::parse_json;

/// Arbitrary JSON, a few levels deep.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,16}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every body the API parses, with a valid example of each.
fn bodies() -> Vec<(&'static str, Value)> {
    vec![
        (
            "create",
            serde_json::json!({"name": "web", "vcpu_count": 1, "mem_size_mib": 64, "exposed_ports": [80],
            "network": {"dns": ["10.0.0.53"], "egress": ["10.0.0.0/8"]}}),
        ),
        ("update", serde_json::json!({"exposed_ports": [80, 443]})),
        (
            "exec",
            serde_json::json!({"command": ["sh", "-c", "true"], "timeout": 5, "env": {"A": "b"}, "cwd": "/", "stdin": "x"}),
        ),
        ("upload", serde_json::json!({"path": "/root/f", "content": "aGk=", "mode": 420})),
        ("key", serde_json::json!({"name": "ci", "scopes": ["machines:read"], "expires_at": "2030-01-01T00:00:00Z"})),
    ]
}

/// Parses `bytes` as the body `kind`; asserts any refusal is a 400 VALIDATION_ERROR.
fn parse_as(kind: &str, bytes: &[u8]) {
    let refused = match kind {
        "create" => parse_json::<CreateMachine>(bytes).map(|req| validates(&req)).err(),
        "update" => parse_json::<UpdateMachine>(bytes).err(),
        "exec" => parse_json::<ExecRequest>(bytes).err(),
        "upload" => parse_json::<FileUpload>(bytes).err(),
        _ => parse_json::<CreateApiKey>(bytes).err(),
    };
    if let Some(e) = refused {
        assert_eq!((e.status.as_u16(), e.code), (400, "VALIDATION_ERROR"), "{kind}: {}", e.message);
        assert!(!e.message.is_empty());
    }
}

/// A parsed create request either validates or names what is wrong (no panic on any value).
fn validates(req: &CreateMachine) {
    let dir = std::env::temp_dir();
    let policy = crate::machines::Policy {
        assets_dir: dir.clone(),
        default_kernel: dir.join("hf-fuzz-vmlinux"),
        default_rootfs: dir.join("hf-fuzz-rootfs"),
        default_kernel_args: String::new(),
        default_runtime: hyperfleet_types::RuntimeKind::Container,
        default_dns: vec![],
        capacity: crate::runtime::host::HostCapacity { cpus: 2, mem_mib: 1024 },
        file_max_size: 1 << 20,
        file_transfer_timeout: std::time::Duration::from_secs(1),
        max_execs_per_machine: 1,
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
    if let Err(msg) = crate::machines::validate_create(req, &policy) {
        assert!(!msg.is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_refused_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        for (kind, _) in bodies() {
            parse_as(kind, &bytes);
        }
    }

    #[test]
    fn arbitrary_json_is_refused_cleanly(value in json()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        for (kind, _) in bodies() {
            parse_as(kind, &bytes);
        }
    }

    #[test]
    fn one_field_of_a_valid_body_replaced(value in json(), pick in any::<prop::sample::Index>()) {
        for (kind, valid) in bodies() {
            let mut body = valid.clone();
            if let Value::Object(map) = &mut body {
                let keys: Vec<String> = map.keys().cloned().collect();
                let key = &keys[pick.index(keys.len())];
                map.insert(key.clone(), value.clone());
            }
            parse_as(kind, &serde_json::to_vec(&body).unwrap());
        }
    }
}

#[test]
fn the_valid_examples_parse() {
    for (kind, valid) in bodies() {
        let bytes = serde_json::to_vec(&valid).unwrap();
        let ok = match kind {
            "create" => parse_json::<CreateMachine>(&bytes).is_ok(),
            "update" => parse_json::<UpdateMachine>(&bytes).is_ok(),
            "exec" => parse_json::<ExecRequest>(&bytes).is_ok(),
            "upload" => parse_json::<FileUpload>(&bytes).is_ok(),
            _ => parse_json::<CreateApiKey>(&bytes).is_ok(),
        };
        assert!(ok, "{kind}");
    }
}
