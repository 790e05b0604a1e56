//! OCI images, knowing nothing above them: references and registries (`HYPERFLEET_REGISTRY_MIRROR`,
//! `HYPERFLEET_INSECURE_REGISTRIES`), pulling (`pull.rs`), applying layers safely (`layer.rs`), and turning
//! the unpacked root into an ext4 image with the Hyperfleet agent injected (`rootfs.rs`).

pub(crate) mod layer;
pub(crate) mod pull;
pub(crate) mod rootfs;

use std::path::Path;

use serde::Deserialize;

/// Where images come from: plain-HTTP registries and a mirror for docker.io.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registries {
    /// `host[:port]` names reached over plain HTTP (like Docker's `insecure-registries`).
    pub insecure: Vec<String>,
    /// `host[:port]` that serves docker.io's repositories.
    pub mirror: Option<String>,
    /// When set, the only registries images may come from (`host[:port]`, as references name them).
    pub allowed: Option<Vec<String>>,
}

/// Registry credentials for one pull: kept in memory only, never stored, echoed or logged.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Credentials {
    Basic { username: String, password: String },
    Token(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum OciError {
    #[error("{0}")]
    Reference(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Registry(String),
    #[error("{0}")]
    Layer(#[from] layer::LayerError),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    #[error("{0}")]
    NoSpace(String),
    #[error("the pull ended before every layer arrived")]
    Interrupted,
    #[error("mkfs.ext4: {0}")]
    Mkfs(String),
}

impl OciError {
    /// Whether the filesystem ran out of space (or inodes) while pulling or converting.
    pub(crate) fn is_no_space(&self) -> bool {
        let enospc = |e: &std::io::Error| e.raw_os_error() == Some(libc::ENOSPC);
        match self {
            Self::Io { source, .. } => enospc(source),
            Self::Layer(layer::LayerError::Io { source, .. }) => enospc(source),
            Self::NoSpace(_) => true,
            Self::Mkfs(m) => m.contains("No space left"),
            _ => false,
        }
    }

    pub(crate) fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io { what, path: path.display().to_string(), source }
    }
}

/// What the image's config says its process is.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
pub(crate) struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

impl ImageConfig {
    /// The `config` object of an image config blob (OCI and Docker spell it the same way).
    pub(crate) fn parse(json: &str) -> Result<Self, OciError> {
        #[derive(Deserialize, Default)]
        #[serde(rename_all = "PascalCase")]
        struct Inner {
            entrypoint: Option<Vec<String>>,
            cmd: Option<Vec<String>>,
            env: Option<Vec<String>>,
            working_dir: Option<String>,
            user: Option<String>,
        }
        #[derive(Deserialize)]
        struct Outer {
            #[serde(default)]
            config: Option<Inner>,
        }
        let outer: Outer =
            serde_json::from_str(json).map_err(|e| OciError::Registry(format!("unreadable image config: {e}")))?;
        let c = outer.config.unwrap_or_default();
        Ok(Self {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_config_reads_docker_and_oci_fields() {
        let c = ImageConfig::parse(
            r#"{"architecture":"amd64","config":{"Entrypoint":["/bin/sh"],"Cmd":["-c","x"],"Env":["A=1"],"WorkingDir":"/w","User":"1000:1000"}}"#,
        )
        .unwrap();
        assert_eq!(c.entrypoint, ["/bin/sh"]);
        assert_eq!(c.cmd, ["-c", "x"]);
        assert_eq!(c.env, ["A=1"]);
        assert_eq!((c.working_dir.as_str(), c.user.as_str()), ("/w", "1000:1000"));
        assert_eq!(ImageConfig::parse(r#"{"rootfs":{}}"#).unwrap(), ImageConfig::default());
    }
}
