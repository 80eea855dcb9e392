//! The identity subsystem's errors, kept apart from the verifiers that return them so that
//! `oidc`, `tokenreview` and `principal` depend on this module rather than on each other.

use std::path::PathBuf;

/// Errors building the identity subsystem; each names the setting or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A config field is invalid.
    #[error("{field}: {message}")]
    Config {
        /// The field, e.g. `identity.workloads[2].cgroup`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The cgroup2 mount could not be found.
    #[error("finding the cgroup2 mount: {0}")]
    Cgroup2Mount(String),
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TLS setup for an OIDC issuer failed.
    #[error("OIDC issuer TLS: {0}")]
    Tls(String),
    /// The pod watch stream ended (it normally never does).
    #[error("pod watch for node {node} ended")]
    PodWatchEnded {
        /// The node whose pods were watched.
        node: String,
    },
}

/// Why a token could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token is bad (signature, expiry, audience, ...); the verdict is cached.
    #[error("{0}")]
    Invalid(String),
    /// The token could not be checked right now (issuer or API server unreachable, key not
    /// yet known); not cached, the next request tries again.
    #[error("{0}")]
    Unavailable(String),
}
