//! Turns a create request into a [`MachineSpec`] or a message naming the field that is wrong. Messages
//! keep the wording the API's users know ("vcpu_count must be at least 1"). Blocking (it resolves paths):
//! call it off the async workers.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use hyperfleet_types::{CreateMachine, EgressPolicy, MachineNetwork, MachineSpec, SpawnLimits, SpawnRequest};

use super::Policy;
use crate::runtime::assets;

pub(super) const MIN_MEM_MIB: i64 = 4;
/// Firecracker's limit of vCPUs per microVM.
pub(super) const MAX_VCPUS: i64 = 32;
const MAX_KERNEL_ARGS: usize = 2048;
const MAX_DNS: usize = 3;
/// Most environment variables a machine may set, and the longest name and value.
const MAX_ENV: usize = 128;
const MAX_ENV_NAME: usize = 256;
const MAX_ENV_VALUE: usize = 32 * 1024;
/// Most labels a machine may carry, and the longest label name (after the prefix), prefix and value.
const MAX_LABELS: usize = 64;
const MAX_LABEL_NAME: usize = 63;
const MAX_LABEL_PREFIX: usize = 253;
/// Longest lifecycle timer: a year.
const MAX_TIMER_SECS: u64 = 365 * 24 * 3600;
/// Most ports one machine may expose: enough for any service, small enough that a machine's JSON stays small.
pub(super) const MAX_EXPOSED_PORTS: usize = 64;

const MAX_IMAGE_REF: usize = 512;
const MIN_IMAGE_MIB: u32 = 64;
const MAX_IMAGE_MIB: u32 = 1 << 20;
const MAX_ARGS: usize = 256;
const MAX_ARG: usize = 32 * 1024;

/// `entrypoint` / `cmd`: an argument vector, bounded, without NUL bytes.
fn argv(field: &str, args: Option<&[String]>) -> Result<(), String> {
    let Some(args) = args else { return Ok(()) };
    if args.len() > MAX_ARGS {
        return Err(format!("{field} has {} arguments; at most {MAX_ARGS} are allowed", args.len()));
    }
    if args.iter().any(|a| a.len() > MAX_ARG || a.contains('\0')) {
        return Err(format!("{field}: each argument must be at most {MAX_ARG} bytes with no NUL byte"));
    }
    Ok(())
}

pub(super) fn name(n: &str) -> Result<(), String> {
    let b = n.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok && looks_like_an_id(n) {
        // Machines are addressed by id or name: a name that could be an id could name another machine.
        return Err(format!(
            "name '{n}' is invalid: 16 lowercase letters and digits is the shape of a machine id; add a '-' or change its length"
        ));
    }
    if ok {
        Ok(())
    } else {
        Err(format!(
            "name '{n}' is invalid: use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit"
        ))
    }
}

/// Whether `s` has the shape of a machine id ([`crate::store::random_id`]).
fn looks_like_an_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

pub(super) fn ports(field: &str, list: &[i64]) -> Result<Vec<u16>, String> {
    if list.len() > MAX_EXPOSED_PORTS {
        return Err(format!("{field} lists {} ports; at most {MAX_EXPOSED_PORTS} are allowed", list.len()));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(list.len());
    for &p in list {
        let port =
            u16::try_from(p).ok().filter(|p| *p >= 1).ok_or_else(|| format!("{field}: {p} is not a port (1-65535)"))?;
        if !seen.insert(port) {
            return Err(format!("{field}: port {port} is listed twice"));
        }
        out.push(port);
    }
    Ok(out)
}

/// Environment variables: POSIX-portable names (letters, digits, '_', not starting with a digit), values
/// without NUL bytes, bounded in count and size.
pub(super) fn env(field: &str, vars: &BTreeMap<String, String>) -> Result<(), String> {
    if vars.len() > MAX_ENV {
        return Err(format!("{field} sets {} variables; at most {MAX_ENV} are allowed", vars.len()));
    }
    for (k, v) in vars {
        let b = k.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_ENV_NAME
            && !b[0].is_ascii_digit()
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
        if !ok {
            let shown: String = k.chars().take(64).collect();
            return Err(format!(
                "{field}: '{shown}' is not a variable name (letters, digits and '_', not starting with a digit, at most {MAX_ENV_NAME})"
            ));
        }
        if v.len() > MAX_ENV_VALUE || v.contains('\0') {
            return Err(format!("{field}.{k} must be at most {MAX_ENV_VALUE} bytes with no NUL byte"));
        }
    }
    Ok(())
}

/// Most volumes one machine may mount.
pub(super) const MAX_VOLUMES: usize = 8;
/// Largest disk or volume: 1 TiB.
pub(super) const MAX_DISK_MIB: i64 = crate::runtime::volume::MAX_FS_MIB as i64;

/// A volume's mount path: absolute, plain characters (it travels on the kernel command line of a Firecracker
/// guest), no `.`/`..` components, and not where the guest's own system lives.
pub(super) fn mount_path(field: &str, p: &str) -> Result<(), String> {
    let plain = p.bytes().all(|c| c.is_ascii_alphanumeric() || b"/._-".contains(&c));
    let parts: Vec<&str> = p.split('/').skip(1).collect();
    let clean = p.starts_with('/') && p.len() <= 256 && parts.iter().all(|c| !c.is_empty() && *c != "." && *c != "..");
    if !plain || !clean || p == "/" {
        return Err(format!(
            "{field} must be an absolute path of letters, digits and '/._-' (no '.' or '..' parts), got '{p}'"
        ));
    }
    if ["proc", "sys", "dev", "run"].contains(&parts[0])
        || (parts.len() == 1 && ["sbin", "bin", "etc", "lib", "usr"].contains(&parts[0]))
    {
        return Err(format!("{field}: '{p}' is where the guest's system lives; mount volumes elsewhere (e.g. /data)"));
    }
    Ok(())
}

/// Checks a machine's volume list (count, paths, duplicates); names are resolved to ids by the caller.
pub(super) fn volumes(list: &[hyperfleet_types::VolumeMount]) -> Result<(), String> {
    if list.len() > MAX_VOLUMES {
        return Err(format!("volumes lists {} volumes; at most {MAX_VOLUMES} are allowed", list.len()));
    }
    let (mut names, mut paths) = (HashSet::new(), HashSet::new());
    for (i, v) in list.iter().enumerate() {
        if v.volume.is_empty() {
            return Err(format!("volumes[{i}].volume is required"));
        }
        // Ids and names are both lowercase letters, digits and '-' (see `name`): anything else names no volume.
        if v.volume.len() > 63 || !v.volume.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-') {
            return Err(format!("volumes[{i}].volume '{}' is not a volume's id or name", v.volume.escape_debug()));
        }
        mount_path(&format!("volumes[{i}].mount_path"), &v.mount_path)?;
        if !names.insert(v.volume.as_str()) {
            return Err(format!("volumes[{i}]: volume '{}' is listed twice", v.volume));
        }
        if !paths.insert(v.mount_path.trim_end_matches('/')) {
            return Err(format!("volumes[{i}]: mount_path '{}' is used twice", v.mount_path));
        }
    }
    Ok(())
}

/// A label name or value: alphanumeric at both ends, `-`, `_`, `.` between (Kubernetes' rule).
fn label_word(w: &str) -> bool {
    let b = w.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LABEL_NAME
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A label value: empty, or a [`label_word`].
pub(super) fn label_value(v: &str) -> bool {
    v.is_empty() || label_word(v)
}

/// A label key as Kubernetes has them: `name` or `prefix/name`, the prefix a DNS subdomain.
pub(super) fn label_key(k: &str) -> bool {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        p.len() <= MAX_LABEL_PREFIX
            && p.split('.').all(|part| {
                let b = part.as_bytes();
                !b.is_empty()
                    && b.len() <= 63
                    && b[0].is_ascii_alphanumeric()
                    && b[b.len() - 1].is_ascii_alphanumeric()
                    && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            })
    });
    prefix_ok && label_word(name)
}

pub(super) fn labels(field: &str, labels: &BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("{field} has {} labels; at most {MAX_LABELS} are allowed", labels.len()));
    }
    for (k, v) in labels {
        if !label_key(k) {
            let shown: String = k.chars().take(64).collect();
            return Err(format!(
                "{field}: '{shown}' is not a label key ([prefix/]name: a name of 1-63 letters, digits, '-', '_', '.', \
                 alphanumeric at both ends; a prefix a lowercase DNS subdomain)"
            ));
        }
        if !label_value(v) {
            return Err(format!(
                "{field}.{k} must be empty or 1-63 letters, digits, '-', '_', '.', alphanumeric at both ends"
            ));
        }
    }
    Ok(())
}

/// A size in MiB for a disk or volume, within `min..=MAX_DISK_MIB`.
pub(super) fn size_mib(field: &str, v: i64, min: i64) -> Result<u32, String> {
    if !(min..=MAX_DISK_MIB).contains(&v) {
        return Err(format!("{field} must be between {min} and {MAX_DISK_MIB}"));
    }
    u32::try_from(v).map_err(|_| format!("{field} must be between {min} and {MAX_DISK_MIB}"))
}

/// A timer in seconds: 0 (or absent) is none.
pub(super) fn timer(field: &str, secs: Option<u64>) -> Result<Option<u64>, String> {
    match secs {
        None | Some(0) => Ok(None),
        Some(s) if s > MAX_TIMER_SECS => Err(format!("{field} must be at most {MAX_TIMER_SECS} seconds (a year)")),
        Some(s) => Ok(Some(s)),
    }
}

/// Secrets: named like variables, and no name both a secret and an `env` variable (which one would win is
/// not obvious to a reader of the machine).
pub(super) fn secrets(
    secrets: &BTreeMap<String, String>,
    env_vars: &BTreeMap<String, String>,
) -> Result<Vec<String>, String> {
    // The messages of `env` name the variable, never its value.
    env("secrets", secrets)?;
    if let Some(both) = secrets.keys().find(|k| env_vars.contains_key(*k)) {
        return Err(format!("secrets.{both} is also set in env; set it in one of them"));
    }
    Ok(secrets.keys().cloned().collect())
}

/// An asset path must name a regular file inside the assets directory, reached without any symlink. The
/// path is stored as given (made absolute); a start opens it again the same way.
pub(super) fn asset(field: &str, given: Option<&str>, default: &Path, assets_dir: &Path) -> Result<String, String> {
    let raw = match given {
        Some(p) if p.trim().is_empty() => return Err(format!("{field} must not be empty")),
        Some(p) if p.contains('\0') => return Err(format!("{field} must not contain NUL bytes")),
        Some(p) => PathBuf::from(p),
        None => default.to_path_buf(),
    };
    let abs = crate::config::absolute(&raw);
    assets::open_beneath(assets_dir, &abs).map_err(|e| format!("{field} {e}"))?;
    Ok(abs.display().to_string())
}

/// Most children one machine may have at once.
pub(super) const MAX_CHILDREN: i64 = 64;

/// `spawn`: every quota given, each at least 1 (memory at least [`MIN_MEM_MIB`]), and none past what one
/// host could give (`max_children` at most [`MAX_CHILDREN`]).
pub(super) fn spawn(req: Option<&SpawnRequest>, limits: &Policy) -> Result<Option<SpawnLimits>, String> {
    let Some(req) = req else { return Ok(None) };
    let field = |name: &str, v: Option<i64>, min: i64, max: i64| -> Result<u32, String> {
        let v = v.ok_or_else(|| format!("spawn.{name} is required"))?;
        u32::try_from(v)
            .ok()
            .filter(|_| (min..=max).contains(&v))
            .ok_or_else(|| format!("spawn.{name} must be between {min} and {max}, got {v}"))
    };
    let cpus = i64::from(limits.capacity.cpus.max(1));
    let mem = i64::try_from(limits.capacity.mem_mib).unwrap_or(i64::MAX).max(MIN_MEM_MIB);
    Ok(Some(SpawnLimits {
        max_children: field("max_children", req.max_children, 1, MAX_CHILDREN)?,
        max_vcpu: field("max_vcpu", req.max_vcpu, 1, cpus * MAX_CHILDREN)?,
        max_mem_mib: field("max_mem_mib", req.max_mem_mib, MIN_MEM_MIB, (mem * MAX_CHILDREN).min(i64::from(u32::MAX)))?,
    }))
}

pub(crate) fn create(req: &CreateMachine, limits: &Policy) -> Result<MachineSpec, String> {
    let name_val = req.name.as_deref().ok_or("name is required")?;
    name(name_val)?;
    let vcpus = req.vcpu_count.ok_or("vcpu_count is required")?;
    if vcpus < 1 {
        return Err("vcpu_count must be at least 1".into());
    }
    let host_cpus = limits.capacity.cpus;
    let max_vcpus = MAX_VCPUS.min(i64::from(host_cpus.max(1)));
    if vcpus > max_vcpus {
        return Err(format!("vcpu_count must be at most {max_vcpus} (this host has {host_cpus} CPUs)"));
    }
    let mem = req.mem_size_mib.ok_or("mem_size_mib is required")?;
    if mem < MIN_MEM_MIB {
        return Err(format!("mem_size_mib must be at least {MIN_MEM_MIB}"));
    }
    let mem_mib = u32::try_from(mem)
        .ok()
        .filter(|m| u64::from(*m) <= limits.capacity.mem_mib)
        .ok_or_else(|| format!("mem_size_mib must be at most {} (the host's memory)", limits.capacity.mem_mib))?;
    let vcpu_count = u32::try_from(vcpus).map_err(|_| format!("vcpu_count must be at most {max_vcpus}"))?;
    let kernel_args = req.kernel_args.clone().unwrap_or_else(|| limits.default_kernel_args.clone());
    if kernel_args.len() > MAX_KERNEL_ARGS || kernel_args.contains(['\n', '\r', '\0']) {
        return Err(format!("kernel_args must be one line of at most {MAX_KERNEL_ARGS} characters"));
    }
    if kernel_args.split_whitespace().any(|a| a.starts_with("ip=")) {
        return Err("kernel_args must not set ip=: Hyperfleet configures the guest network".into());
    }
    let exposed_ports = ports("exposed_ports", req.exposed_ports.as_deref().unwrap_or(&[]))?;
    let network = req.network.clone().unwrap_or_default();
    let dns = match network.dns {
        Some(list) if list.is_empty() => {
            return Err("network.dns must list at least one address".into());
        }
        Some(list) if list.len() > MAX_DNS => {
            return Err(format!("network.dns takes at most {MAX_DNS} addresses"));
        }
        Some(list) => list,
        None => limits.default_dns.clone(),
    };
    let egress = network.egress.unwrap_or(EgressPolicy::Allow);
    let env_vars = req.env.clone().unwrap_or_default();
    env("env", &env_vars)?;
    let image = match req.image.as_deref() {
        None => None,
        Some(_) if req.rootfs_path.is_some() => {
            return Err("image and rootfs_path are mutually exclusive: a machine boots one or the other".into());
        }
        Some(i)
            if i.is_empty() || i.len() > MAX_IMAGE_REF || i.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            return Err(format!("image must be an image reference of 1-{MAX_IMAGE_REF} characters without spaces"));
        }
        Some(i) => Some(i.to_string()),
    };
    if image.is_none() && (req.image_size_mib.is_some() || req.registry_auth.is_some()) {
        return Err("image_size_mib and registry_auth need an image".into());
    }
    let image_size_mib = match req.image_size_mib {
        None => None,
        Some(n) => Some(
            u32::try_from(n)
                .ok()
                .filter(|n| (MIN_IMAGE_MIB..=MAX_IMAGE_MIB).contains(n))
                .ok_or_else(|| format!("image_size_mib must be between {MIN_IMAGE_MIB} and {MAX_IMAGE_MIB}"))?,
        ),
    };
    argv("entrypoint", req.entrypoint.as_deref())?;
    argv("cmd", req.cmd.as_deref())?;
    let volume_list = req.volumes.clone().unwrap_or_default();
    volumes(&volume_list)?;
    // An image machine's root image is set once the image is resolved (it lives in the image cache), and
    // its size is known only then: `disk_size_mib` 0 means the converted image's size.
    let (rootfs_path, disk_size_mib) = if image.is_some() {
        let want = req.disk_size_mib.map(|v| size_mib("disk_size_mib", v, 1)).transpose()?;
        (String::new(), want.unwrap_or(0))
    } else {
        let rootfs_path = asset("rootfs_path", req.rootfs_path.as_deref(), &limits.default_rootfs, &limits.assets_dir)?;
        let image_bytes = assets::open_beneath(&limits.assets_dir, Path::new(&rootfs_path))
            .map_err(|e| format!("rootfs_path {e}"))?
            .metadata()
            .map_err(|e| format!("rootfs_path: {e}"))?
            .len();
        let image_mib = u32::try_from(image_bytes.div_ceil(1 << 20)).unwrap_or(u32::MAX);
        let disk_size_mib = match req.disk_size_mib {
            None => image_mib,
            Some(v) => {
                let want = size_mib("disk_size_mib", v, 1)?;
                if want < image_mib {
                    return Err(format!(
                        "disk_size_mib must be at least the image's size ({image_mib} MiB), got {want}"
                    ));
                }
                want
            }
        };
        (rootfs_path, disk_size_mib)
    };
    let secret_names = secrets(req.secrets.as_ref().unwrap_or(&BTreeMap::new()), &env_vars)?;
    let label_map = req.labels.clone().unwrap_or_default();
    labels("labels", &label_map)?;
    Ok(MachineSpec {
        name: name_val.to_string(),
        runtime: req.runtime.unwrap_or(limits.default_runtime),
        vcpu_count,
        mem_size_mib: mem_mib,
        kernel_image_path: asset(
            "kernel_image_path",
            req.kernel_image_path.as_deref(),
            &limits.default_kernel,
            &limits.assets_dir,
        )?,
        kernel_args,
        rootfs_path,
        exposed_ports,
        network: MachineNetwork { prefix_len: None, gateway: None, dns, egress },
        env: env_vars,
        image,
        image_digest: None,
        image_size_mib,
        entrypoint: req.entrypoint.clone(),
        cmd: req.cmd.clone(),
        restart_policy: req.restart_policy.unwrap_or_default(),
        volumes: volume_list,
        disk_size_mib,
        secret_names,
        labels: label_map,
        ttl_seconds: timer("ttl_seconds", req.ttl_seconds)?,
        on_ttl: req.on_ttl.unwrap_or_default(),
        idle_timeout_seconds: timer("idle_timeout_seconds", req.idle_timeout_seconds)?,
        idle_max_connection_seconds: timer("idle_max_connection_seconds", req.idle_max_connection_seconds)?,
        auto_start: req.auto_start.unwrap_or(false),
        spawn: spawn(req.spawn.as_ref(), limits)?,
        parent_id: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyperfleet_types::RuntimeKind;
    use std::net::Ipv4Addr;

    struct Assets {
        dir: tempfile::TempDir,
        kernel: PathBuf,
        rootfs: PathBuf,
    }

    const DNS: [Ipv4Addr; 1] = [Ipv4Addr::new(10, 0, 0, 53)];

    impl Assets {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let (kernel, rootfs) = (dir.path().join("vmlinux"), dir.path().join("rootfs.ext4"));
            std::fs::write(&kernel, b"k").unwrap();
            std::fs::write(&rootfs, b"r").unwrap();
            std::fs::create_dir(dir.path().join("sub")).unwrap();
            Self { dir, kernel, rootfs }
        }
        fn limits(&self) -> Policy {
            Policy {
                assets_dir: self.dir.path().to_path_buf(),
                default_kernel: self.kernel.clone(),
                default_rootfs: self.rootfs.clone(),
                default_kernel_args: "console=ttyS0".into(),
                default_runtime: RuntimeKind::Container,
                default_dns: DNS.to_vec(),
                capacity: crate::runtime::host::HostCapacity { cpus: 2, mem_mib: 1024 },
                file_max_size: 1 << 20,
                file_transfer_timeout: std::time::Duration::from_secs(5),
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
            }
        }
    }

    fn req(json: serde_json::Value) -> CreateMachine {
        serde_json::from_value(json).unwrap()
    }

    fn err(a: &Assets, json: serde_json::Value) -> String {
        create(&req(json), &a.limits()).unwrap_err()
    }

    #[test]
    fn messages_keep_the_documented_wording() {
        let a = Assets::new();
        assert_eq!(err(&a, serde_json::json!({"vcpu_count": 1, "mem_size_mib": 64})), "name is required");
        assert_eq!(
            err(&a, serde_json::json!({"name": "a", "vcpu_count": 0, "mem_size_mib": 64})),
            "vcpu_count must be at least 1"
        );
        assert_eq!(err(&a, serde_json::json!({"name": "a", "vcpu_count": 1})), "mem_size_mib is required");
        assert_eq!(
            err(&a, serde_json::json!({"name": "a", "vcpu_count": 1, "mem_size_mib": 3})),
            "mem_size_mib must be at least 4"
        );
        assert!(err(&a, serde_json::json!({"name": "a", "vcpu_count": 3, "mem_size_mib": 64})).contains("at most 2"));
        assert!(
            err(&a, serde_json::json!({"name": "a", "vcpu_count": 1, "mem_size_mib": 4096})).contains("at most 1024")
        );
        assert!(
            err(&a, serde_json::json!({"name": "Bad_Name", "vcpu_count": 1, "mem_size_mib": 64}))
                .contains("name 'Bad_Name'")
        );
        // A name shaped like an id would make lookups by that string ambiguous.
        assert!(
            err(&a, serde_json::json!({"name": "abcdefgh12345678", "vcpu_count": 1, "mem_size_mib": 64}))
                .contains("shape of a machine id")
        );
        for fine in ["abcdefgh-1234567", "abcdefgh1234567", "abcdefgh123456789"] {
            assert!(name(fine).is_ok(), "{fine}");
        }
    }

    #[test]
    fn ports_are_checked() {
        let a = Assets::new();
        let base = |p: serde_json::Value| serde_json::json!({"name": "a", "vcpu_count": 1, "mem_size_mib": 64, "exposed_ports": p});
        assert!(err(&a, base(serde_json::json!([0]))).contains("0 is not a port"));
        assert!(err(&a, base(serde_json::json!([70000]))).contains("70000 is not a port"));
        assert!(err(&a, base(serde_json::json!([80, 80]))).contains("listed twice"));
        let all: Vec<i64> = (1..=65535).collect();
        assert!(err(&a, base(serde_json::json!(all))).contains("at most 64"));
        let most: Vec<i64> = (1..=64).collect();
        assert!(create(&req(base(serde_json::json!(most))), &a.limits()).is_ok());
        let ok = create(&req(base(serde_json::json!([80, 443]))), &a.limits()).unwrap();
        assert_eq!(ok.exposed_ports, vec![80, 443]);
        assert_eq!(ok.network.dns, vec![Ipv4Addr::new(10, 0, 0, 53)]);
        assert_eq!(ok.runtime, RuntimeKind::Container);
    }

    #[test]
    fn env_names_and_sizes_are_checked() {
        let a = Assets::new();
        let with =
            |e: serde_json::Value| serde_json::json!({"name": "a", "vcpu_count": 1, "mem_size_mib": 64, "env": e});
        assert!(err(&a, with(serde_json::json!({"1X": "v"}))).contains("'1X' is not a variable name"));
        assert!(err(&a, with(serde_json::json!({"A=B": "v"}))).contains("is not a variable name"));
        assert!(err(&a, with(serde_json::json!({"": "v"}))).contains("is not a variable name"));
        assert!(err(&a, with(serde_json::json!({"A": "x\u{0}y"}))).contains("env.A must be"));
        let many: serde_json::Map<String, serde_json::Value> =
            (0..=MAX_ENV).map(|i| (format!("V{i}"), serde_json::json!("x"))).collect();
        assert!(err(&a, with(serde_json::Value::Object(many))).contains("at most 128"));
        let ok = create(&req(with(serde_json::json!({"LANG": "C.UTF-8", "_x1": ""}))), &a.limits()).unwrap();
        assert_eq!(ok.env.get("LANG").map(String::as_str), Some("C.UTF-8"));
    }

    #[test]
    fn spawn_quotas_are_checked() {
        let a = Assets::new();
        let with = |spawn: serde_json::Value| serde_json::json!({"name": "a", "vcpu_count": 1, "mem_size_mib": 64, "spawn": spawn});
        let ok =
            create(&req(with(serde_json::json!({"max_children": 4, "max_vcpu": 4, "max_mem_mib": 2048}))), &a.limits())
                .unwrap();
        assert_eq!(ok.spawn, Some(SpawnLimits { max_children: 4, max_vcpu: 4, max_mem_mib: 2048 }));
        assert_eq!(ok.parent_id, None);
        for (bad, msg) in [
            (serde_json::json!({"max_vcpu": 1, "max_mem_mib": 64}), "spawn.max_children is required"),
            (
                serde_json::json!({"max_children": 0, "max_vcpu": 1, "max_mem_mib": 64}),
                "spawn.max_children must be between 1 and 64",
            ),
            (
                serde_json::json!({"max_children": 65, "max_vcpu": 1, "max_mem_mib": 64}),
                "spawn.max_children must be between 1 and 64",
            ),
            (
                serde_json::json!({"max_children": 1, "max_vcpu": -1, "max_mem_mib": 64}),
                "spawn.max_vcpu must be between 1",
            ),
            (
                serde_json::json!({"max_children": 1, "max_vcpu": 1, "max_mem_mib": 3}),
                "spawn.max_mem_mib must be between 4",
            ),
            (
                serde_json::json!({"max_children": 1, "max_vcpu": 1, "max_mem_mib": 1i64 << 40}),
                "spawn.max_mem_mib must be between 4",
            ),
        ] {
            let e = err(&a, with(bad.clone()));
            assert!(e.starts_with(msg), "{bad}: {e}");
        }
        let no_spawn =
            create(&req(serde_json::json!({"name": "a", "vcpu_count": 1, "mem_size_mib": 64})), &a.limits()).unwrap();
        assert_eq!(no_spawn.spawn, None);
    }

    #[test]
    fn labels_secrets_and_timers_are_checked() {
        let a = Assets::new();
        let with = |extra: serde_json::Value| {
            let mut base = serde_json::json!({"name": "a", "vcpu_count": 1, "mem_size_mib": 64});
            base.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            base
        };
        for bad in ["", "-a", "a-", "UPPER/x", "a..b/x", "x/", "/x", "a b", &"n".repeat(64)] {
            assert!(err(&a, with(serde_json::json!({"labels": {bad: "v"}}))).contains("is not a label key"), "{bad:?}");
        }
        assert!(err(&a, with(serde_json::json!({"labels": {"team": "-ml"}}))).contains("labels.team must"));
        for bad in ["a\0b", "Data", "x".repeat(64).as_str()] {
            let volumes = serde_json::json!({"volumes": [{"volume": bad, "mount_path": "/data"}]});
            assert!(err(&a, with(volumes)).contains("is not a volume's id or name"), "{bad:?}");
        }
        let ok = create(
            &req(with(serde_json::json!({"labels": {"team": "ml", "example.com/tier": "Gold_1", "flag": ""}}))),
            &a.limits(),
        )
        .unwrap();
        assert_eq!(ok.labels.len(), 3);
        let many: serde_json::Map<String, serde_json::Value> =
            (0..=MAX_LABELS).map(|i| (format!("l{i}"), serde_json::json!("x"))).collect();
        assert!(err(&a, with(serde_json::json!({"labels": many}))).contains("at most 64"));
        let e = err(&a, with(serde_json::json!({"secrets": {"TOKEN": "s3cr3t-value"}, "env": {"TOKEN": "x"}})));
        assert!(e.contains("also set in env") && !e.contains("s3cr3t"), "{e}");
        let e = err(&a, with(serde_json::json!({"secrets": {"BAD NAME": "s3cr3t-value"}})));
        assert!(e.contains("secrets: 'BAD NAME'") && !e.contains("s3cr3t"), "{e}");
        let ok = create(&req(with(serde_json::json!({"secrets": {"TOKEN": "v"}}))), &a.limits()).unwrap();
        assert_eq!(ok.secret_names, vec!["TOKEN"]);
        assert!(err(&a, with(serde_json::json!({"ttl_seconds": MAX_TIMER_SECS + 1}))).contains("ttl_seconds"));
        let ok = create(
            &req(with(serde_json::json!({"ttl_seconds": 0, "idle_timeout_seconds": 1, "on_ttl": "delete"}))),
            &a.limits(),
        )
        .unwrap();
        assert_eq!((ok.ttl_seconds, ok.idle_timeout_seconds), (None, Some(1)));
        assert_eq!(ok.on_ttl, hyperfleet_types::TtlAction::Delete);
    }

    #[test]
    fn assets_must_be_regular_files_inside_the_assets_dir() {
        let a = Assets::new();
        let dir = a.dir.path().display().to_string();
        let with =
            |k: &str| serde_json::json!({"name": "a", "vcpu_count": 1, "mem_size_mib": 64, "kernel_image_path": k});
        assert_eq!(err(&a, with(&format!("{dir}/missing"))), "kernel_image_path does not exist");
        assert_eq!(err(&a, with(&format!("{dir}/sub/../vmlinux"))), "kernel_image_path must not contain '..'");
        assert_eq!(err(&a, with(&format!("{dir}/sub"))), "kernel_image_path must be a regular file");
        assert!(err(&a, with("/etc/passwd")).contains("inside the assets directory"));
        assert!(err(&a, with("/dev/null")).contains("inside the assets directory"));
        std::os::unix::fs::symlink("/etc/passwd", a.dir.path().join("escape")).unwrap();
        assert!(err(&a, with(&format!("{dir}/escape"))).contains("symbolic link"));
        // Even a link to a file inside is refused: what a link names can change between create and start.
        std::os::unix::fs::symlink(a.dir.path().join("vmlinux"), a.dir.path().join("alias")).unwrap();
        assert!(err(&a, with(&format!("{dir}/alias"))).contains("symbolic link"));
        let ok = create(&req(with(&format!("{dir}/vmlinux"))), &a.limits()).unwrap();
        assert_eq!(ok.kernel_image_path, format!("{dir}/vmlinux"));
    }
}
