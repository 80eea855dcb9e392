//! The `approval:` section of the gateway config: where AccessRequests live, the seal key,
//! the approvals API listener and the notifiers.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::notify::NotifyConfig;

/// Default port of the approvals API.
pub const DEFAULT_API_PORT: u16 = 15444;

/// The `approval:` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApprovalConfig {
    /// The namespace AccessRequests are created in (the gateway's own).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The HMAC key that seals decisions (a Secret only the gateways mount), at least 32
    /// bytes.
    pub seal_key_file: PathBuf,
    /// The approvals API; absent: this gateway takes no decisions (it still holds and
    /// releases requests).
    #[serde(default)]
    pub api: Option<ApprovalApiConfig>,
    /// Who is told about new AccessRequests.
    #[serde(default)]
    pub notify: NotifyConfig,
    /// Most AccessRequests pending at once for one workload; a request over it is refused
    /// (503) instead of held.
    #[serde(default = "default_max_pending")]
    pub max_pending_per_workload: usize,
    /// Most requests of one workload held on one gateway at once (identical requests
    /// share an AccessRequest but each waits, its body in memory); a request over it is
    /// refused (429, `Retry-After`) instead of held.
    #[serde(default = "default_max_waiting")]
    pub max_waiting_per_workload: usize,
    /// How long an AccessRequest is kept after its expiry (and its grant window) ended;
    /// then the gateway of the node that created it deletes it. At least 25 hours (a
    /// `once` approval stays usable for up to a day).
    #[serde(default = "default_retention", with = "crate::config::duration")]
    pub retention: Duration,
}

/// Default of `approval.retention`: a week.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Shortest `approval.retention`: longer than a `once` approval stays usable.
pub const MIN_RETENTION: Duration = Duration::from_secs(25 * 3600);

fn default_retention() -> Duration {
    DEFAULT_RETENTION
}

fn default_max_pending() -> usize {
    super::holder::DEFAULT_MAX_PENDING_PER_WORKLOAD
}

fn default_max_waiting() -> usize {
    super::holder::DEFAULT_MAX_WAITING_PER_WORKLOAD
}

fn default_namespace() -> String {
    "chaperone-system".to_owned()
}

/// The approvals API listener (`approval.api`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApprovalApiConfig {
    /// Where the HTTPS listener binds (the DaemonSet passes `0.0.0.0:15444`; a Service in
    /// front of the DaemonSet selects it).
    pub listen: SocketAddr,
    /// A serving certificate chain (PEM); absent: one is minted from the gateway's CA
    /// (`tls.caCertFile`) for `serverNames` and `serverIps`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// The serving certificate's key (PEM), with `certFile`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// DNS names of a minted certificate (the Service's names).
    #[serde(default = "default_api_names")]
    pub server_names: Vec<String>,
    /// IP addresses of a minted certificate (the Service's ClusterIP, the node address).
    #[serde(default)]
    pub server_ips: Vec<IpAddr>,
    /// A connection with no call in progress (a watch is one) for this long is closed, so
    /// connections left open cannot hold the API's connection slots.
    #[serde(default = "default_api_idle_timeout", with = "crate::config::duration")]
    pub idle_timeout: Duration,
}

/// Default of `approval.api.idleTimeout`.
pub const DEFAULT_API_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

fn default_api_idle_timeout() -> Duration {
    DEFAULT_API_IDLE_TIMEOUT
}

/// The names of the `chaperone-approvals` Service shipped in deploy/.
pub fn default_api_names() -> Vec<String> {
    [
        "chaperone-approvals",
        "chaperone-approvals.chaperone-system",
        "chaperone-approvals.chaperone-system.svc",
        "chaperone-approvals.chaperone-system.svc.cluster.local",
        "localhost",
    ]
    .map(str::to_owned)
    .to_vec()
}

impl ApprovalConfig {
    /// Checks the values; the error names the key (`approval.api.certFile`).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.namespace.is_empty() {
            return Err(("approval.namespace", "must not be empty".to_owned()));
        }
        if self.max_pending_per_workload == 0 {
            return Err((
                "approval.maxPendingPerWorkload",
                "must be at least 1 (0 would refuse every request needing approval)".to_owned(),
            ));
        }
        if self.max_waiting_per_workload == 0 {
            return Err((
                "approval.maxWaitingPerWorkload",
                "must be at least 1 (0 would refuse every request needing approval)".to_owned(),
            ));
        }
        if self.retention < MIN_RETENTION {
            return Err((
                "approval.retention",
                "must be at least 25h (a once approval stays usable for up to a day after its decision)".to_owned(),
            ));
        }
        if let Err(e) = std::fs::metadata(&self.seal_key_file) {
            return Err((
                "approval.sealKeyFile",
                format!("{}: {e}", self.seal_key_file.display()),
            ));
        }
        if let Some(api) = &self.api {
            if api.cert_file.is_some() != api.key_file.is_some() {
                return Err((
                    "approval.api.certFile",
                    "certFile and keyFile go together".to_owned(),
                ));
            }
            for (key, file) in [
                ("approval.api.certFile", &api.cert_file),
                ("approval.api.keyFile", &api.key_file),
            ] {
                if let Some(file) = file
                    && let Err(e) = std::fs::metadata(file)
                {
                    return Err((key, format!("{}: {e}", file.display())));
                }
            }
            if api.idle_timeout.is_zero() {
                return Err((
                    "approval.api.idleTimeout",
                    "must be above 0 (0 would close every connection at once)".to_owned(),
                ));
            }
            if api.cert_file.is_none() && api.server_names.is_empty() && api.server_ips.is_empty() {
                return Err((
                    "approval.api.serverNames",
                    "a minted certificate needs at least one name or IP (serverNames, serverIps)"
                        .to_owned(),
                ));
            }
        }
        self.notify.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(api: &str, seal: &std::path::Path) -> Result<ApprovalConfig, String> {
        let text = format!(
            "sealKeyFile: {}\napi:\n  listen: 127.0.0.1:15444\n{api}",
            seal.display()
        );
        serde_norway::from_str(&text).map_err(|e| e.to_string())
    }

    #[test]
    fn the_api_idle_timeout_defaults_parses_and_must_be_above_zero() {
        let seal = tempfile::NamedTempFile::new().expect("seal file");
        let api = |c: &ApprovalConfig| c.api.clone().expect("api");
        let default = parse("", seal.path()).expect("default");
        assert_eq!(api(&default).idle_timeout, DEFAULT_API_IDLE_TIMEOUT);
        assert_eq!(default.validate(), Ok(()));
        let set = parse("  idleTimeout: 5m\n", seal.path()).expect("5m");
        assert_eq!(api(&set).idle_timeout, Duration::from_secs(300));
        let zero = parse("  idleTimeout: 0s\n", seal.path()).expect("0s parses");
        assert_eq!(
            zero.validate().map_err(|(key, _)| key),
            Err("approval.api.idleTimeout")
        );
        let negative = parse("  idleTimeout: -1s\n", seal.path()).expect_err("-1s");
        assert!(negative.contains("must not be negative"), "{negative}");
        parse("  idleTimeout: soon\n", seal.path()).expect_err("not a duration");
    }

    #[test]
    fn the_caps_and_the_retention_default_and_refuse_what_would_break_approvals() {
        let seal = tempfile::NamedTempFile::new().expect("seal file");
        let with = |top: &str| {
            let text = format!("sealKeyFile: {}\n{top}", seal.path().display());
            serde_norway::from_str::<ApprovalConfig>(&text).expect("parses")
        };
        let default = with("");
        assert_eq!(default.max_waiting_per_workload, 32);
        assert_eq!(default.retention, DEFAULT_RETENTION);
        assert_eq!(with("retention: 48h\n").validate(), Ok(()));
        for (top, key) in [
            (
                "maxPendingPerWorkload: 0\n",
                "approval.maxPendingPerWorkload",
            ),
            (
                "maxWaitingPerWorkload: 0\n",
                "approval.maxWaitingPerWorkload",
            ),
            ("retention: 24h\n", "approval.retention"),
        ] {
            assert_eq!(with(top).validate().map_err(|(k, _)| k), Err(key), "{top}");
        }
    }
}
