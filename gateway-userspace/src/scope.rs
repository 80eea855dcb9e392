//! Which workloads are intercepted: the classification that feeds the kernel's bypass and
//! fail-open maps.
//!
//! The kernel intercepts every pod by default (so a pod's first connection, made before
//! the gateway has seen it, is never missed). This control-plane loop then walks the known
//! cgroups, resolves each to a workload, and puts out-of-scope workloads into the bypass
//! map (they connect directly from then on) and workloads in fail-open namespaces into the
//! fail-open map. A connection that was redirected before its pod was classified out of
//! scope is relayed at L4 by the proxy, without terminating TLS.

use std::{collections::BTreeMap, collections::HashMap, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    drain::DrainWatcher,
    ebpf::Interceptor,
    identity::{Identity, WorkloadIdentity},
};

/// The `interception.scope` section: what is intercepted. Empty: everything is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScopeConfig {
    /// When not empty, only pods in these namespaces are intercepted (the agents'): every
    /// other named workload connects directly. A pod not named yet stays intercepted until
    /// it is (its early connections are relayed untouched once it is out of scope).
    #[serde(default)]
    pub intercept_namespaces: Vec<String>,
    /// Pods in these namespaces connect to the API server directly.
    #[serde(default)]
    pub bypass_namespaces: Vec<String>,
    /// Pods running as these service accounts (`namespace/name`) connect directly.
    #[serde(default)]
    pub bypass_service_accounts: Vec<String>,
    /// Pods carrying all of these labels connect directly.
    #[serde(default)]
    pub bypass_labels: BTreeMap<String, String>,
    /// Pods in these namespaces connect directly while the daemon is down (opt-in
    /// fail-open); everything else fails closed.
    #[serde(default)]
    pub fail_open_namespaces: Vec<String>,
}

/// How a workload is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classification {
    /// Out of scope: connect directly.
    pub bypass: bool,
    /// Connect directly while the daemon is down.
    pub fail_open: bool,
}

impl ScopeConfig {
    /// Classifies a workload; unknown workloads are always in scope and fail closed.
    pub fn classify(&self, w: &WorkloadIdentity) -> Classification {
        let (Some(ns), true) = (w.namespace.as_deref(), w.is_known()) else {
            return Classification {
                bypass: false,
                fail_open: false,
            };
        };
        let sa = w.service_account.as_deref().map(|sa| format!("{ns}/{sa}"));
        let labelled = !self.bypass_labels.is_empty()
            && self
                .bypass_labels
                .iter()
                .all(|(k, v)| w.labels.get(k) == Some(v));
        let outside = !self.intercept_namespaces.is_empty()
            && !self.intercept_namespaces.iter().any(|n| n == ns);
        Classification {
            bypass: outside
                || self.bypass_namespaces.iter().any(|n| n == ns)
                || sa.is_some_and(|sa| self.bypass_service_accounts.contains(&sa))
                || labelled,
            fail_open: self.fail_open_namespaces.iter().any(|n| n == ns),
        }
    }

    /// Whether nothing is configured (the loop then has nothing to do).
    pub fn is_empty(&self) -> bool {
        self.intercept_namespaces.is_empty()
            && self.bypass_namespaces.is_empty()
            && self.bypass_service_accounts.is_empty()
            && self.bypass_labels.is_empty()
            && self.fail_open_namespaces.is_empty()
    }
}

/// Keeps the kernel's bypass and fail-open maps in line with the classification, every
/// `every`, until the drain starts.
pub async fn classify_loop(
    scope: ScopeConfig,
    identity: Arc<Identity>,
    interceptor: Arc<Interceptor>,
    every: Duration,
    drain: DrainWatcher,
) {
    let mut applied: HashMap<u64, Classification> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = drain.signaled() => return,
            _ = tick.tick() => {}
        }
        let (identity, interceptor, scope, mut state) = (
            identity.clone(),
            interceptor.clone(),
            scope.clone(),
            std::mem::take(&mut applied),
        );
        // Walking the cgroup tree is blocking file-system work.
        applied = tokio::task::spawn_blocking(move || {
            classify_once(&scope, &identity, &interceptor, &mut state);
            state
        })
        .await
        .unwrap_or_default();
    }
}

/// One pass: rescan, classify every known cgroup, update the maps where it changed.
pub fn classify_once(
    scope: &ScopeConfig,
    identity: &Identity,
    interceptor: &Interceptor,
    applied: &mut HashMap<u64, Classification>,
) {
    let Some(resolver) = identity.resolver() else {
        return;
    };
    if let Err(e) = resolver.rescan() {
        tracing::warn!(error = %e, "cgroup rescan failed");
        return;
    }
    let known = resolver.known();
    let live: std::collections::HashSet<u64> = known.iter().map(|(id, _)| *id).collect();
    applied.retain(|id, _| live.contains(id));
    for (id, _) in known {
        let class = scope.classify(&identity.resolve_cgroup(id));
        let before = applied.get(&id).copied().unwrap_or(Classification {
            bypass: false,
            fail_open: false,
        });
        if before == class {
            continue;
        }
        let result = interceptor
            .set_bypass(id, class.bypass)
            .and_then(|()| interceptor.set_fail_open(id, class.fail_open));
        match result {
            Ok(()) => {
                tracing::debug!(
                    cgroup = id,
                    bypass = class.bypass,
                    fail_open = class.fail_open,
                    "classified"
                );
                applied.insert(id, class);
            }
            Err(e) => tracing::warn!(cgroup = id, error = %e, "updating the bypass map failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(ns: &str, sa: &str, labels: &[(&str, &str)]) -> WorkloadIdentity {
        WorkloadIdentity {
            namespace: Some(ns.to_owned()),
            pod: Some("p".to_owned()),
            service_account: Some(sa.to_owned()),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..WorkloadIdentity::default()
        }
    }

    #[test]
    fn only_the_agents_namespaces_are_intercepted_when_listed() {
        let scope = ScopeConfig {
            intercept_namespaces: vec!["ai-agents".into()],
            ..ScopeConfig::default()
        };
        assert!(!scope.is_empty());
        assert!(!scope.classify(&workload("ai-agents", "cursor", &[])).bypass);
        assert!(
            scope
                .classify(&workload("kube-system", "coredns", &[]))
                .bypass
        );
        assert!(
            scope
                .classify(&workload("monitoring", "prometheus", &[]))
                .bypass
        );
        // Not named yet: in scope, failing closed.
        assert!(!scope.classify(&WorkloadIdentity::default()).bypass);
    }

    #[test]
    fn classification_by_namespace_service_account_and_labels() {
        let scope = ScopeConfig {
            bypass_namespaces: vec!["kube-system".into()],
            bypass_service_accounts: vec!["monitoring/prometheus".into()],
            bypass_labels: [("chaperone.dev/intercept".to_owned(), "false".to_owned())].into(),
            fail_open_namespaces: vec!["ci".into()],
            ..ScopeConfig::default()
        };
        let cases = [
            (workload("kube-system", "default", &[]), true, false),
            (workload("monitoring", "prometheus", &[]), true, false),
            (workload("monitoring", "grafana", &[]), false, false),
            (
                workload("agents", "cursor", &[("chaperone.dev/intercept", "false")]),
                true,
                false,
            ),
            (
                workload("agents", "cursor", &[("chaperone.dev/intercept", "true")]),
                false,
                false,
            ),
            (workload("ci", "runner", &[]), false, true),
            (WorkloadIdentity::default(), false, false),
        ];
        for (w, bypass, fail_open) in cases {
            assert_eq!(
                scope.classify(&w),
                Classification { bypass, fail_open },
                "{w:?}"
            );
        }
        assert!(ScopeConfig::default().is_empty());
        assert!(!scope.is_empty());
    }
}
