//! Policy decision and request parsing costs (design target: a decision at 1,000 rules in
//! at most 2 microseconds).
//!
//! Policies mix rule shapes an admin writes: resource rules over a dozen resources (a third
//! cluster-wide by object name, the rest per namespace), subresource and `*/exec` rules,
//! `resourceNames`, API groups, `*` catch-alls (per namespace, and cluster-wide by name),
//! and non-resource URLs. Cluster-wide rules are candidates for every request in every
//! namespace, so they are the ones a decision has to step through. The probe that
//! matches is decided by the second-to-last rule; the other probe matches nothing, so every
//! candidate is examined before the default applies.

use std::{fmt::Write as _, hint::black_box};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use gateway_userspace::{
    policy::{Action, Policy, RequestContext, decide},
    request::RequestInfo,
};
use http::{Method, Uri};

const RESOURCES: &[(&str, &str)] = &[
    ("", "pods"),
    ("", "secrets"),
    ("", "configmaps"),
    ("", "services"),
    ("apps", "deployments"),
    ("apps", "statefulsets"),
    ("batch", "jobs"),
    ("", "pods/exec"),
    ("", "pods/log"),
    ("", "serviceaccounts/token"),
    ("networking.k8s.io", "ingresses"),
    ("rbac.authorization.k8s.io", "rolebindings"),
];

const VERB_SETS: &[&str] = &[
    "[get, list, watch]",
    "[create, update, patch]",
    "[delete, deletecollection]",
    "[\"*\"]",
];

/// A policy of `n` rules (n >= 2) whose rule n-2 denies deleting pods in `prod`.
fn policy_text(n: usize) -> String {
    let mut y =
        String::from("apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules:\n");
    for i in 0..n - 2 {
        let action = if i % 3 == 0 { "allow" } else { "deny" };
        let _ = write!(y, "  - name: rule-{i}\n    action: {action}\n");
        let verbs = VERB_SETS[i % VERB_SETS.len()];
        match i % 20 {
            // Cluster-wide catch-all for a few object names: a candidate for every request.
            17 => {
                let _ = writeln!(
                    y,
                    "    verbs: {verbs}\n    resources: [\"*\"]\n    resourceNames: [obj-{i}, other-{i}]"
                );
            }
            // A catch-all scoped to one namespace.
            7 => {
                let _ = writeln!(
                    y,
                    "    verbs: {verbs}\n    resources: [\"*\"]\n    namespaces: [team-{i}]"
                );
            }
            // Exec and attach anywhere in two namespaces.
            8 | 18 => {
                let _ = writeln!(
                    y,
                    "    verbs: {verbs}\n    resources: [\"*/exec\", \"*/attach\"]\n    namespaces: [team-{i}, staging-{i}]"
                );
            }
            9 => {
                let _ = writeln!(
                    y,
                    "    verbs: [get]\n    nonResourceURLs: [\"/debug/{i}/*\", /metrics-{i}]"
                );
            }
            _ => {
                let (group, resource) = RESOURCES[i % RESOURCES.len()];
                let _ = writeln!(
                    y,
                    "    verbs: {verbs}\n    apiGroups: [\"{group}\"]\n    resources: [{resource}]"
                );
                // A third of these are cluster-wide (by object name), the rest per namespace.
                if i % 3 == 0 {
                    let _ = writeln!(y, "    resourceNames: [obj-{i}, other-{i}]");
                } else {
                    let _ = writeln!(y, "    namespaces: [team-{i}]");
                    if i % 4 == 1 {
                        let _ = writeln!(y, "    resourceNames: [obj-{i}, other-{i}]");
                    }
                }
            }
        }
    }
    y.push_str(
        "  - name: protect-prod-pods\n    action: deny\n    message: no deleting prod pods\n    verbs: [delete, deletecollection]\n    apiGroups: [\"\"]\n    resources: [pods]\n    namespaces: [prod]\n",
    );
    y.push_str("  - name: health\n    action: allow\n    verbs: [get]\n    nonResourceURLs: [/healthz, /version]\n");
    y
}

fn request(method: Method, uri: &'static str) -> RequestInfo {
    RequestInfo::parse(&method, &Uri::from_static(uri)).unwrap_or_else(|e| panic!("{uri}: {e}"))
}

fn bench_decide(c: &mut Criterion) {
    let matching = request(Method::DELETE, "/api/v1/namespaces/prod/pods/web-0");
    let unmatched = request(
        Method::PATCH,
        "/apis/apps/v1/namespaces/prod/deployments/web",
    );
    let exec = request(
        Method::POST,
        "/api/v1/namespaces/prod/pods/web-0/exec?command=sh",
    );
    let mut group = c.benchmark_group("decide");
    for n in [10, 100, 1_000] {
        let policy = Policy::from_yaml(&policy_text(n), "bench.yaml")
            .unwrap_or_else(|e| panic!("bench policy of {n} rules must load: {e}"));
        assert_eq!(policy.rule_count(), n);
        let d = decide(&policy, &RequestContext::new(&matching));
        assert_eq!(
            (d.action, d.rule.as_deref()),
            (Action::Deny, Some("protect-prod-pods")),
            "n={n}"
        );
        let d = decide(&policy, &RequestContext::new(&unmatched));
        assert_eq!(
            (d.action, d.rule.as_deref()),
            (Action::Allow, None),
            "n={n}"
        );

        group.bench_with_input(
            BenchmarkId::new("match_near_end", n),
            &matching,
            |b, req| b.iter(|| decide(black_box(&policy), &RequestContext::new(black_box(req)))),
        );
        group.bench_with_input(BenchmarkId::new("no_match", n), &unmatched, |b, req| {
            b.iter(|| decide(black_box(&policy), &RequestContext::new(black_box(req))))
        });
        group.bench_with_input(BenchmarkId::new("exec_no_match", n), &exec, |b, req| {
            b.iter(|| decide(black_box(&policy), &RequestContext::new(black_box(req))))
        });
    }
    group.finish();
}

fn bench_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    for (label, method, uri) in [
        (
            "get_pod",
            Method::GET,
            "/api/v1/namespaces/default/pods/web-0",
        ),
        (
            "list_pods",
            Method::GET,
            "/api/v1/namespaces/default/pods?limit=500",
        ),
        (
            "watch_selector",
            Method::GET,
            "/api/v1/namespaces/default/pods?allowWatchBookmarks=true&fieldSelector=metadata.name%3Dweb-0&resourceVersion=1042&watch=true",
        ),
        (
            "exec",
            Method::GET,
            "/api/v1/namespaces/default/pods/web-0/exec?command=sh&command=-c&command=echo+hi&container=app&stdin=true&stdout=true&tty=true",
        ),
        (
            "patch_deployment",
            Method::PATCH,
            "/apis/apps/v1/namespaces/default/deployments/web?fieldManager=kubectl",
        ),
        ("healthz", Method::GET, "/healthz"),
    ] {
        let uri = Uri::from_static(uri);
        group.bench_function(label, |b| {
            b.iter(|| RequestInfo::parse(black_box(&method), black_box(&uri)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_decide, bench_parse);
criterion_main!(benches);
