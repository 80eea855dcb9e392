//! Who is calling: the workload (from the kernel) and the principal (from a verified token).
//!
//! The workload identity is derived only from what the kernel reported for the connection:
//! its cgroup id is resolved to a cgroup path ([`resolver`]), the path to a pod UID and
//! container id ([`cgroup`]), and those to the pod's namespace, name and service account
//! through a node-scoped pod store ([`pods`]). Without a cluster, static entries in the
//! config name workloads by cgroup path. Nothing the pod sends can change the result.
//!
//! The principal is the pod's bearer token, verified as an OIDC ID token ([`oidc`]) or by
//! the API server ([`tokenreview`]); see [`principal`].

pub mod cgroup;
mod error;
pub mod oidc;
pub mod pods;
pub mod principal;
pub mod resolver;
pub mod tokenreview;

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

pub use self::{
    error::{IdentityError, TokenError},
    oidc::{OidcIssuerConfig, OidcVerifier},
    pods::{PodEvent, PodSource, PodStore},
    principal::{Principal, PrincipalKind, PrincipalVerifier},
    resolver::{CgroupResolver, ResolverLimits},
    tokenreview::{KubeTokenReviewer, TokenReviewer},
};
use crate::{ebpf::ConnectionOrigin, recorder::schema::WorkloadRecord};

/// The `identity:` section of the gateway config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityConfig {
    /// Watch this node's pods through the API server to name workloads.
    #[serde(default)]
    pub watch_pods: bool,
    /// Workloads named by cgroup path (the demo, workstations without a cluster); they take
    /// precedence over pods.
    #[serde(default)]
    pub workloads: Vec<StaticWorkload>,
    /// Trusted OIDC issuers for bearer tokens.
    #[serde(default)]
    pub oidc: Vec<OidcIssuerConfig>,
    /// Review tokens that are not from an OIDC issuer with the API server (TokenReview).
    #[serde(default)]
    pub token_review: bool,
    /// Audiences sent with TokenReviews (empty: the API server's own).
    #[serde(default)]
    pub token_review_audiences: Vec<String>,
    /// How long a token verdict is cached.
    #[serde(default = "default_token_cache_ttl", with = "crate::config::duration")]
    pub token_cache_ttl: Duration,
    /// The shortest time between two cgroup rescans caused by unknown cgroup ids.
    #[serde(default = "default_rescan_interval", with = "crate::config::duration")]
    pub cgroup_rescan_interval: Duration,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            watch_pods: false,
            workloads: Vec::new(),
            oidc: Vec::new(),
            token_review: false,
            token_review_audiences: Vec::new(),
            token_cache_ttl: default_token_cache_ttl(),
            cgroup_rescan_interval: default_rescan_interval(),
        }
    }
}

fn default_token_cache_ttl() -> Duration {
    Duration::from_secs(10)
}

fn default_rescan_interval() -> Duration {
    Duration::from_millis(500)
}

impl IdentityConfig {
    /// The cgroup2 mount, when static workloads need it to read absolute paths.
    fn cgroup2_mount(&self) -> Option<PathBuf> {
        let absolute = self
            .workloads
            .iter()
            .any(|w| w.cgroup.starts_with(CGROUP_FS_ROOT));
        absolute
            .then(|| crate::ebpf::cgroup2_mount().ok())
            .flatten()
    }

    /// The static workloads with their cgroup paths relative to the cgroup2 mount.
    fn relative_workloads(&self) -> Result<Vec<StaticWorkload>, IdentityError> {
        let mount = self.cgroup2_mount();
        self.workloads
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let cgroup = w
                    .relative_cgroup(&format!("identity.workloads[{i}]"), mount.as_deref())?
                    .to_owned();
                Ok(StaticWorkload {
                    cgroup,
                    ..w.clone()
                })
            })
            .collect()
    }

    /// Checks every entry; errors name the field (`identity.workloads[1].cgroup`).
    pub fn validate(&self) -> Result<(), IdentityError> {
        let mount = self.cgroup2_mount();
        for (i, w) in self.workloads.iter().enumerate() {
            w.validate(&format!("identity.workloads[{i}]"), mount.as_deref())?;
        }
        for (i, o) in self.oidc.iter().enumerate() {
            o.validate(&format!("identity.oidc[{i}]"))?;
        }
        Ok(())
    }
}

/// How a static workload's cgroup path is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CgroupMatch {
    /// The cgroup path equals the configured one.
    #[default]
    Exact,
    /// The cgroup is the configured one or below it.
    Prefix,
}

/// A workload named by its cgroup path rather than by a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticWorkload {
    /// The cgroup path relative to the cgroup2 mount (leading `/` optional).
    pub cgroup: String,
    /// Exact or prefix match.
    #[serde(default, rename = "match")]
    pub match_: CgroupMatch,
    /// The namespace to report.
    pub namespace: String,
    /// The pod name to report.
    pub pod: String,
    /// The service account to report.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// The container name to report.
    #[serde(default)]
    pub container: Option<String>,
    /// Labels, for policies that select workloads by label.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_service_account() -> String {
    "default".to_owned()
}

/// Where cgroup file systems are mounted on Linux; a configured cgroup starting with it is a
/// file system path, not a path relative to the cgroup2 mount.
const CGROUP_FS_ROOT: &str = "/sys/fs/cgroup";

impl StaticWorkload {
    /// The configured cgroup relative to the cgroup2 mount: as given (leading `/`
    /// optional), or an absolute file system path below `mount` made relative. An
    /// absolute path elsewhere (a cgroup v1 hierarchy, a wrong mount) would never match:
    /// it is refused with the fix.
    fn relative_cgroup<'a>(
        &'a self,
        at: &str,
        mount: Option<&std::path::Path>,
    ) -> Result<&'a str, IdentityError> {
        if !self.cgroup.starts_with(CGROUP_FS_ROOT) {
            return Ok(normalize(&self.cgroup));
        }
        let refuse = |message: String| IdentityError::Config {
            field: format!("{at}.cgroup"),
            message,
        };
        let Some(mount) = mount else {
            return Err(refuse(format!(
                "{} is a file system path, but no cgroup2 mount was found to read it against; give the path relative to the cgroup2 mount",
                self.cgroup
            )));
        };
        match std::path::Path::new(&self.cgroup)
            .strip_prefix(mount)
            .ok()
            .and_then(|rest| rest.to_str())
        {
            Some(rest) if !normalize(rest).is_empty() => Ok(normalize(rest)),
            _ => Err(refuse(format!(
                "{} is not below the cgroup2 mount {}: write the cgroup's path relative to that mount (e.g. kubepods.slice/...), or its full path below {}",
                self.cgroup,
                mount.display(),
                mount.display()
            ))),
        }
    }

    fn validate(&self, at: &str, mount: Option<&std::path::Path>) -> Result<(), IdentityError> {
        let invalid = |field: &str, message: &str| IdentityError::Config {
            field: format!("{at}.{field}"),
            message: message.to_owned(),
        };
        self.relative_cgroup(at, mount)?;
        if normalize(&self.cgroup).is_empty() {
            return Err(invalid(
                "cgroup",
                "must name a cgroup below the mount, not the root",
            ));
        }
        if self.cgroup.split('/').any(|s| s == "..") {
            return Err(invalid("cgroup", "must not contain '..'"));
        }
        if self.namespace.is_empty() {
            return Err(invalid("namespace", "must not be empty"));
        }
        if self.pod.is_empty() {
            return Err(invalid("pod", "must not be empty"));
        }
        Ok(())
    }

    fn matches(&self, path: &str) -> bool {
        let want = normalize(&self.cgroup);
        match self.match_ {
            CgroupMatch::Exact => path == want,
            CgroupMatch::Prefix => {
                path == want
                    || path
                        .strip_prefix(want)
                        .is_some_and(|rest| rest.starts_with('/'))
            }
        }
    }
}

fn normalize(path: &str) -> &str {
    path.trim_matches('/')
}

/// The identity of the workload behind a connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkloadIdentity {
    /// The node the gateway runs on.
    pub node: String,
    /// Pod namespace.
    pub namespace: Option<String>,
    /// Pod name.
    pub pod: Option<String>,
    /// Pod UID.
    pub pod_uid: Option<String>,
    /// The pod's service account.
    pub service_account: Option<String>,
    /// Container name (None for a sandbox, conmon, or a container not yet in the status).
    pub container: Option<String>,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Pod annotations.
    pub annotations: BTreeMap<String, String>,
    /// The cgroup v2 id the kernel reported.
    pub cgroup_id: u64,
    /// The cgroup path relative to the cgroup2 mount, when resolved.
    pub cgroup_path: Option<String>,
}

impl WorkloadIdentity {
    /// Whether a pod (or static workload) was found.
    pub fn is_known(&self) -> bool {
        self.namespace.is_some() && self.pod.is_some()
    }

    /// The recording's `workload` column for this identity and connection.
    pub fn record(&self, origin: &ConnectionOrigin) -> WorkloadRecord {
        WorkloadRecord {
            cgroup_id: i64::try_from(origin.cgroup_id).unwrap_or(i64::MAX),
            netns_cookie: i64::try_from(origin.netns_cookie).unwrap_or(i64::MAX),
            pid: i64::from(origin.pid),
            command: Some(origin.command.clone()),
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
            pod_uid: self.pod_uid.clone(),
            service_account: self.service_account.clone(),
            container: self.container.clone(),
        }
    }
}

/// Resolves connections to workload identities from caches.
#[derive(Debug)]
pub struct Identity {
    node: String,
    resolver: Option<CgroupResolver>,
    pods: PodStore,
    workloads: Vec<StaticWorkload>,
}

impl Identity {
    /// Builds the resolver chain: `resolver` maps cgroup ids to paths (None: nothing
    /// resolves, e.g. no cgroup2), `pods` is fed by a [`PodSource`] the caller runs.
    pub fn new(
        config: &IdentityConfig,
        node: impl Into<String>,
        resolver: Option<CgroupResolver>,
        pods: PodStore,
    ) -> Result<Self, IdentityError> {
        config.validate()?;
        Ok(Self {
            node: node.into(),
            resolver,
            pods,
            workloads: config.relative_workloads()?,
        })
    }

    /// The pod store (to hand to a [`PodSource`]).
    pub fn pods(&self) -> &PodStore {
        &self.pods
    }

    /// The cgroup resolver, if any (for a periodic [`CgroupResolver::rescan`]).
    pub fn resolver(&self) -> Option<&CgroupResolver> {
        self.resolver.as_ref()
    }

    /// The workload behind a redirected connection. Synchronous and cache-backed; an unknown
    /// cgroup id costs at most one bounded, rate-limited rescan.
    pub fn resolve(&self, origin: &ConnectionOrigin) -> WorkloadIdentity {
        self.resolve_cgroup(origin.cgroup_id)
    }

    /// The workload in cgroup `cgroup_id`.
    pub fn resolve_cgroup(&self, cgroup_id: u64) -> WorkloadIdentity {
        let path = self.resolver.as_ref().and_then(|r| r.resolve(cgroup_id));
        let mut identity = match &path {
            Some(path) => self.resolve_path(path),
            None => WorkloadIdentity::default(),
        };
        identity.node.clone_from(&self.node);
        identity.cgroup_id = cgroup_id;
        identity.cgroup_path = path;
        identity
    }

    /// The workload for a cgroup path relative to the cgroup2 mount.
    pub fn resolve_path(&self, path: &str) -> WorkloadIdentity {
        let path = normalize(path);
        let mut identity = WorkloadIdentity {
            node: self.node.clone(),
            cgroup_path: Some(path.to_owned()),
            ..WorkloadIdentity::default()
        };
        // Exact entries win over prefixes, longer prefixes over shorter ones.
        let fixed = self
            .workloads
            .iter()
            .filter(|w| w.matches(path))
            .max_by_key(|w| (w.match_ == CgroupMatch::Exact, normalize(&w.cgroup).len()));
        if let Some(w) = fixed {
            identity.namespace = Some(w.namespace.clone());
            identity.pod = Some(w.pod.clone());
            identity.service_account = Some(w.service_account.clone());
            identity.container.clone_from(&w.container);
            identity.labels.clone_from(&w.labels);
            return identity;
        }
        let Some(parsed) = cgroup::parse_pod_cgroup(path) else {
            return identity;
        };
        let container_id = match &parsed.container {
            cgroup::ContainerCgroup::Container { id, .. }
            | cgroup::ContainerCgroup::Conmon { id } => Some(id.as_str()),
            _ => None,
        };
        identity.pod_uid = Some(parsed.pod_uid.clone());
        let Some((pod, container)) = self.pods.lookup(&parsed.pod_uid, container_id) else {
            return identity;
        };
        identity.namespace = Some(pod.namespace.clone());
        identity.pod = Some(pod.name.clone());
        identity.pod_uid = Some(pod.uid.clone());
        identity.service_account = Some(pod.service_account.clone());
        // conmon shares the container's id but is the runtime's process, not the container.
        identity.container = match parsed.container {
            cgroup::ContainerCgroup::Container { .. } => container,
            _ => None,
        };
        identity.labels.clone_from(&pod.labels);
        identity.annotations.clone_from(&pod.annotations);
        identity
    }
}

#[cfg(test)]
mod tests;
