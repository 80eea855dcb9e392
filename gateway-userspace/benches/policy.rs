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
//!
//! The `decide_identity` group adds who is calling: the same mix with four in five rules
//! conditioned on the workload (namespace, service account, labels) or the principal
//! (groups), probed as an agent pod with an OIDC principal; and a worst case where every
//! rule has the request's shape and differs only by the calling workload's namespace, so
//! every rule passes the index and the verb check and is rejected by the identity check.
//!
//! The `decide_cel` group puts a content condition (CEL over the pod template) on the
//! deciding rule of the same mix and probes a pod create whose body is known: the cost of
//! building the CEL variables from the object and evaluating the condition, once true
//! (denied) and once false (falls through to the default). The `decide_exec` group puts
//! an exec selector on one rule in ten and probes an exec request.
//!
//! Criterion reports means and medians; the design target is a p99. `cargo bench -p
//! gateway-userspace --bench policy -- latency` (a filter no criterion benchmark matches)
//! instead times 200,000 decisions of each probe at 1,000 rules one by one and prints
//! their p50, p90, p99, p99.9 and maximum (see [`decide_latency_percentiles`]).
//! The `decide_approve` group turns one rule in ten of the base mix into `action: approve`
//! (with an `approval` block) and probes the same requests as `decide`: requests that need
//! no approval must cost what they cost without approve rules.

/// The product's allocator (gateway-userspace/src/main.rs): figures with glibc's malloc
/// would not be the gateway's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{fmt::Write as _, hint::black_box};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use gateway_userspace::{
    identity::{
        WorkloadIdentity,
        principal::{Principal, PrincipalKind},
    },
    policy::{Action, Content, Policy, RequestContext, decide},
    request::{ExecRequest, RequestInfo},
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
    policy_text_with(n, |_| "")
}

/// The identity condition rule `i` of the identity mix carries.
fn identity_condition(i: usize) -> String {
    match i % 5 {
        0 => format!("    workloads: {{namespaces: [team-{i}]}}\n"),
        1 => format!("    workloads: {{serviceAccounts: [team-{i}/agent, \"ci-{i}/*\"]}}\n"),
        2 => format!("    principals: {{groups: [group-{i}]}}\n"),
        3 => format!(
            "    workloads: {{labels: {{team: t{i}}}}}\n    principals: {{kinds: [oidc]}}\n"
        ),
        _ => String::new(),
    }
}

/// [`policy_text`] with identity conditions on four in five rules, and a final resource
/// rule that only applies to agents in namespace `ai-agents`.
fn identity_policy_text(n: usize) -> String {
    let mut y = policy_text_with(n, identity_condition);
    y = y.replace(
        "  - name: protect-prod-pods\n",
        "  - name: protect-prod-pods\n    workloads: {namespaces: [ai-agents], labels: {app: agent}}\n",
    );
    y
}

/// `n` rules of one shape (delete pods in prod), one per team namespace; the last applies
/// to `ai-agents`.
fn same_shape_policy_text(n: usize) -> String {
    let mut y =
        String::from("apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules:\n");
    for i in 0..n - 1 {
        let _ = writeln!(
            y,
            "  - name: team-{i}\n    action: deny\n    verbs: [delete]\n    resources: [pods]\n    namespaces: [prod]\n    workloads: {{namespaces: [team-{i}]}}"
        );
    }
    y.push_str("  - name: protect-prod-pods\n    action: deny\n    verbs: [delete]\n    resources: [pods]\n    namespaces: [prod]\n    workloads: {namespaces: [ai-agents]}\n");
    y
}

/// The base mix; `extra(i)` is appended to rule `i` (before the final two rules).
fn policy_text_with<S: AsRef<str>>(n: usize, extra: impl Fn(usize) -> S) -> String {
    let mut y =
        String::from("apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules:\n");
    for i in 0..n - 2 {
        let action = if i % 3 == 0 { "allow" } else { "deny" };
        let _ = write!(y, "  - name: rule-{i}\n    action: {action}\n");
        y.push_str(extra(i).as_ref());
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
    // 10,000 rules: how the index scales past any policy seen in practice.
    for n in [10, 100, 1_000, 10_000] {
        let loading = std::time::Instant::now();
        let policy = Policy::from_yaml(&policy_text(n), "bench.yaml")
            .unwrap_or_else(|e| panic!("bench policy of {n} rules must load: {e}"));
        assert_eq!(policy.rule_count(), n);
        // What a reload of this policy costs (parse, validate, index), once.
        eprintln!("decide: loading {n} rules took {:?}", loading.elapsed());
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

/// The base mix with one rule in ten (`rule-1`, `rule-11`, ...) asking for approval.
fn approve_policy_text(n: usize) -> String {
    let mut y = policy_text(n);
    for i in (1..n.saturating_sub(2)).step_by(10) {
        for action in ["allow", "deny"] {
            y = y.replace(
                &format!("  - name: rule-{i}\n    action: {action}\n"),
                &format!(
                    "  - name: rule-{i}\n    action: approve\n    approval: {{approvers: {{groups: [sre]}}, timeout: 5m}}\n"
                ),
            );
        }
    }
    y
}

fn bench_decide_approve(c: &mut Criterion) {
    let matching = request(Method::DELETE, "/api/v1/namespaces/prod/pods/web-0");
    let unmatched = request(
        Method::PATCH,
        "/apis/apps/v1/namespaces/prod/deployments/web",
    );
    let mut group = c.benchmark_group("decide_approve");
    for n in [10, 100, 1_000] {
        let policy = Policy::from_yaml(&approve_policy_text(n), "bench.yaml")
            .unwrap_or_else(|e| panic!("approve bench policy of {n} rules must load: {e}"));
        assert!(
            approve_policy_text(n).matches("action: approve").count() >= n / 10 - 1,
            "n={n}: approve rules missing"
        );
        let d = decide(&policy, &RequestContext::new(&matching));
        assert_eq!(
            (d.action, d.rule.as_deref()),
            (Action::Deny, Some("protect-prod-pods")),
            "n={n}"
        );
        assert_eq!(
            decide(&policy, &RequestContext::new(&unmatched)).action,
            Action::Allow,
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

fn agent() -> WorkloadIdentity {
    WorkloadIdentity {
        node: "node-1".to_owned(),
        namespace: Some("ai-agents".to_owned()),
        pod: Some("cursor-0".to_owned()),
        pod_uid: Some("8d5e2c4a-0f9b-4f7e-9d0c-3b1a2e6f7c8d".to_owned()),
        service_account: Some("cursor".to_owned()),
        container: Some("agent".to_owned()),
        labels: [
            ("app", "agent"),
            ("app.kubernetes.io/name", "cursor"),
            ("pod-template-hash", "5d9c7b8f6d"),
            ("team", "ml"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        cgroup_id: 4242,
        ..WorkloadIdentity::default()
    }
}

fn alice() -> Principal {
    Principal {
        kind: PrincipalKind::Oidc,
        subject: Some("oidc:alice@example.com".to_owned()),
        groups: ["developers", "ml", "on-call", "sre"]
            .into_iter()
            .map(str::to_owned)
            .collect(),
        uid: None,
        reason: None,
        mismatch: None,
    }
}

/// A request from the agent pod, with an OIDC principal.
fn as_agent<'a>(
    req: &'a RequestInfo,
    agent: &'a WorkloadIdentity,
    alice: &'a Principal,
) -> RequestContext<'a> {
    RequestContext::new(req)
        .with_workload(agent)
        .with_principal(alice)
}

fn bench_decide_identity(c: &mut Criterion) {
    let matching = request(Method::DELETE, "/api/v1/namespaces/prod/pods/web-0");
    let unmatched = request(
        Method::PATCH,
        "/apis/apps/v1/namespaces/prod/deployments/web",
    );
    let (agent, alice) = (agent(), alice());
    let mut ops = agent.clone();
    ops.namespace = Some("ops".to_owned());
    let mut group = c.benchmark_group("decide_identity");
    for n in [10, 100, 1_000] {
        let policy = Policy::from_yaml(&identity_policy_text(n), "bench.yaml")
            .unwrap_or_else(|e| panic!("identity bench policy of {n} rules must load: {e}"));
        let same_shape = Policy::from_yaml(&same_shape_policy_text(n), "bench.yaml")
            .unwrap_or_else(|e| panic!("same-shape bench policy of {n} rules must load: {e}"));
        assert_eq!((policy.rule_count(), same_shape.rule_count()), (n, n));
        for (p, label) in [(&policy, "mix"), (&same_shape, "same-shape")] {
            let d = decide(p, &as_agent(&matching, &agent, &alice));
            assert_eq!(
                (d.action, d.rule.as_deref()),
                (Action::Deny, Some("protect-prod-pods")),
                "{label} n={n}"
            );
            let from_ops = RequestContext::new(&matching).with_workload(&ops);
            assert_eq!(decide(p, &from_ops).rule, None, "{label} n={n} from ops");
        }
        let d = decide(&policy, &as_agent(&unmatched, &agent, &alice));
        assert_eq!(
            (d.action, d.rule.as_deref()),
            (Action::Allow, None),
            "n={n}"
        );

        group.bench_with_input(
            BenchmarkId::new("match_near_end", n),
            &matching,
            |b, req| {
                b.iter(|| {
                    decide(
                        black_box(&policy),
                        &as_agent(black_box(req), &agent, &alice),
                    )
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("no_match", n), &unmatched, |b, req| {
            b.iter(|| {
                decide(
                    black_box(&policy),
                    &as_agent(black_box(req), &agent, &alice),
                )
            })
        });
        group.bench_with_input(
            BenchmarkId::new("same_shape_match_last", n),
            &matching,
            |b, req| {
                b.iter(|| {
                    decide(
                        black_box(&same_shape),
                        &as_agent(black_box(req), &agent, &alice),
                    )
                })
            },
        );
    }
    group.finish();
}

/// The mix with a content condition on the deciding rule, and pod creates in `prod`.
fn cel_policy_text(n: usize) -> String {
    policy_text(n).replace(
        "    verbs: [delete, deletecollection]\n    apiGroups: [\"\"]\n    resources: [pods]\n    namespaces: [prod]\n",
        "    verbs: [create, update, delete, deletecollection]\n    apiGroups: [\"\"]\n    resources: [pods]\n    namespaces: [prod]\n    when:\n      - >-\n        podSpec == null || podSpec.containers.exists(c, has(c.securityContext) &&\n        has(c.securityContext.privileged) && c.securityContext.privileged)\n",
    )
}

fn pod_object(privileged: bool) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": "prod", "labels": {"app": "web", "tier": "frontend"}},
        "spec": {"containers": [
            {"name": "web", "image": "registry.example.com/web:1.2.3",
             "ports": [{"containerPort": 8080}],
             "env": [{"name": "MODE", "value": "prod"}, {"name": "LOG", "value": "info"}],
             "resources": {"limits": {"cpu": "1", "memory": "512Mi"}}},
            {"name": "sidecar", "image": "registry.example.com/proxy:2",
             "securityContext": {"privileged": privileged, "runAsNonRoot": true}}
        ]}
    })
}

fn bench_decide_cel(c: &mut Criterion) {
    let create = request(Method::POST, "/api/v1/namespaces/prod/pods");
    let (bad, good) = (pod_object(true), pod_object(false));
    let mut group = c.benchmark_group("decide_cel");
    for n in [10, 100, 1_000] {
        let policy = Policy::from_yaml(&cel_policy_text(n), "bench.yaml")
            .unwrap_or_else(|e| panic!("cel bench policy of {n} rules must load: {e}"));
        fn ctx<'a>(info: &'a RequestInfo, obj: &'a serde_json::Value) -> RequestContext<'a> {
            RequestContext::new(info).with_content(Content::Known(obj), Content::Absent)
        }
        let d = decide(&policy, &ctx(&create, &bad));
        assert_eq!(
            (d.action, d.rule.as_deref()),
            (Action::Deny, Some("protect-prod-pods")),
            "n={n}"
        );
        let d = decide(&policy, &ctx(&create, &good));
        assert_eq!(
            (d.action, d.rule.as_deref()),
            (Action::Allow, None),
            "n={n}"
        );
        group.bench_with_input(BenchmarkId::new("condition_true", n), &bad, |b, obj| {
            b.iter(|| decide(black_box(&policy), &ctx(&create, black_box(obj))))
        });
        group.bench_with_input(BenchmarkId::new("condition_false", n), &good, |b, obj| {
            b.iter(|| decide(black_box(&policy), &ctx(&create, black_box(obj))))
        });
    }
    group.finish();
}

/// The mix with one rule in ten replaced by an exec rule of a namespace, in front.
fn exec_policy_text(n: usize) -> String {
    let mix = policy_text(n - n / 10);
    let (head, rules) = mix.split_once("rules:\n").expect("rules");
    let mut y = format!("{head}rules:\n");
    for k in 0..n / 10 {
        let _ = write!(
            y,
            "  - name: exec-{k}\n    action: deny\n    verbs: [create, get]\n    resources: [pods/exec]\n    namespaces: [team-{k}]\n    exec: {{commands: [\"rm -rf *\", \"cmd-{k} *\"], interactive: false}}\n"
        );
    }
    y.push_str(rules);
    y
}

fn bench_decide_exec(c: &mut Criterion) {
    let uri = Uri::from_static(
        "/api/v1/namespaces/team-3/pods/web-0/exec?command=ls&command=-la&container=app&stdout=true",
    );
    let info = RequestInfo::parse(&Method::POST, &uri).expect("exec request");
    let exec = ExecRequest::from_uri(&uri);
    let mut group = c.benchmark_group("decide_exec");
    for n in [10, 100, 1_000] {
        let text = exec_policy_text(n);
        let Ok(policy) = Policy::from_yaml(&text, "bench.yaml") else {
            // The mix places exec selectors only on rules whose resources allow them.
            panic!(
                "exec bench policy of {n} rules must load: {:?}",
                Policy::from_yaml(&text, "bench.yaml").err()
            );
        };
        group.bench_with_input(BenchmarkId::new("exec_selectors", n), &exec, |b, exec| {
            b.iter(|| {
                decide(
                    black_box(&policy),
                    &RequestContext::new(&info).with_exec(Some(black_box(exec)), false),
                )
            })
        });
    }
    group.finish();
}

/// Times `f` `n` times one call at a time (after a warm-up) and prints percentiles. The
/// clock reads cost ~20-40 ns per call and are included.
fn percentiles(label: &str, n: usize, mut f: impl FnMut()) {
    for _ in 0..n / 10 {
        f();
    }
    let mut samples: Vec<u64> = Vec::with_capacity(n);
    for _ in 0..n {
        let t = std::time::Instant::now();
        f();
        samples.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{label:<40} p50 {:>7.2} us  p90 {:>7.2} us  p99 {:>7.2} us  p99.9 {:>7.2} us  max {:>8.2} us",
        at(0.50) as f64 / 1000.0,
        at(0.90) as f64 / 1000.0,
        at(0.99) as f64 / 1000.0,
        at(0.999) as f64 / 1000.0,
        samples[samples.len() - 1] as f64 / 1000.0,
    );
}

/// The p99 the design target is about (run with the filter `latency`; see the module docs).
fn decide_latency_percentiles(_: &mut Criterion) {
    if !std::env::args().skip(1).any(|a| a == "latency") {
        return;
    }
    const N: usize = 200_000;
    let n = 1_000;
    let plain = Policy::from_yaml(&policy_text(n), "bench.yaml").expect("bench policy");
    let matching = request(Method::DELETE, "/api/v1/namespaces/prod/pods/web-0");
    let unmatched = request(
        Method::PATCH,
        "/apis/apps/v1/namespaces/prod/deployments/web",
    );
    percentiles("decide/match_near_end/1000", N, || {
        black_box(decide(
            black_box(&plain),
            &RequestContext::new(black_box(&matching)),
        ));
    });
    percentiles("decide/no_match/1000", N, || {
        black_box(decide(
            black_box(&plain),
            &RequestContext::new(black_box(&unmatched)),
        ));
    });
    let cel = Policy::from_yaml(&cel_policy_text(n), "bench.yaml").expect("cel bench policy");
    let create = request(Method::POST, "/api/v1/namespaces/prod/pods");
    let (bad, good) = (pod_object(true), pod_object(false));
    for (label, obj, want) in [
        ("decide_cel/condition_true/1000", &bad, Action::Deny),
        ("decide_cel/condition_false/1000", &good, Action::Allow),
    ] {
        let ctx =
            || RequestContext::new(&create).with_content(Content::Known(obj), Content::Absent);
        assert_eq!(decide(&cel, &ctx()).action, want, "{label}");
        percentiles(label, N, || {
            black_box(decide(black_box(&cel), &ctx()));
        });
    }
    let uri = Uri::from_static(
        "/api/v1/namespaces/team-3/pods/web-0/exec?command=ls&command=-la&container=app&stdout=true",
    );
    let info = RequestInfo::parse(&Method::POST, &uri).expect("exec request");
    let exec = ExecRequest::from_uri(&uri);
    let exec_policy = Policy::from_yaml(&exec_policy_text(n), "bench.yaml").expect("exec policy");
    percentiles("decide_exec/exec_selectors/1000", N, || {
        black_box(decide(
            black_box(&exec_policy),
            &RequestContext::new(&info).with_exec(Some(black_box(&exec)), false),
        ));
    });
}

criterion_group!(
    benches,
    decide_latency_percentiles,
    bench_decide,
    bench_decide_identity,
    bench_decide_cel,
    bench_decide_exec,
    bench_decide_approve,
    bench_parse
);
criterion_main!(benches);
