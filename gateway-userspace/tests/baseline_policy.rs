//! The shipped baseline policy (deploy/config/policy.yaml) decides what docs/policy-
//! reference.md says it does, rule by rule.

use gateway_userspace::{
    identity::WorkloadIdentity,
    policy::{Action, Content, Policy, RequestContext, decide},
    request::{ExecRequest, RequestInfo},
};
use http::{Method, Uri};
use serde_json::{Value, json};

const BASELINE: &str = include_str!("../../deploy/config/policy.yaml");

fn baseline() -> Policy {
    Policy::from_yaml(BASELINE, "deploy/config/policy.yaml")
        .unwrap_or_else(|e| panic!("the baseline policy must load: {e}"))
}

fn agent() -> WorkloadIdentity {
    WorkloadIdentity {
        namespace: Some("ai-agents".to_owned()),
        pod: Some("cursor-0".to_owned()),
        pod_uid: Some("uid".to_owned()),
        service_account: Some("cursor".to_owned()),
        ..Default::default()
    }
}

/// The decision for `method uri` with an optional body object, as the agent.
fn decided(
    p: &Policy,
    method: &str,
    uri: &str,
    object: Option<&Value>,
) -> (Action, Option<String>) {
    let uri: Uri = uri.parse().expect("uri");
    let info = RequestInfo::parse(
        &Method::from_bytes(method.as_bytes()).expect("method"),
        &uri,
    )
    .expect("request");
    let exec =
        matches!(info.subresource.as_str(), "exec" | "attach").then(|| ExecRequest::from_uri(&uri));
    let w = agent();
    let ctx = RequestContext::new(&info)
        .with_workload(&w)
        .with_exec(exec.as_ref(), false)
        .with_content(
            object.map_or(Content::Absent, Content::Known),
            Content::Absent,
        );
    let d = decide(p, &ctx);
    (d.action, d.rule.map(|r| r.to_string()))
}

/// Method, URI, body, and the expected action and rule.
type Case<'a> = (&'a str, &'a str, Option<&'a Value>, Action, Option<&'a str>);

fn pod(spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec})
}

#[test]
fn the_baseline_denies_escalation_and_allows_agent_work() {
    let p = baseline();
    let plain = pod(json!({"containers": [{"name": "a", "image": "x"}]}));
    let privileged = pod(
        json!({"containers": [{"name": "a", "image": "x", "securityContext": {"privileged": true}}]}),
    );
    let host = pod(json!({"hostPID": true, "containers": [{"name": "a", "image": "x"}]}));
    let secret = pod(
        json!({"containers": [{"name": "a", "image": "x", "envFrom": [{"secretRef": {"name": "db"}}]}]}),
    );
    let init_secret = pod(json!({"initContainers": [{"name": "i", "image": "x",
        "env": [{"name": "P", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}]}],
        "containers": [{"name": "a", "image": "x"}]}));
    let init_secret_from = pod(json!({"initContainers": [{"name": "i", "image": "x",
        "envFrom": [{"secretRef": {"name": "db"}}]}], "containers": [{"name": "a", "image": "x"}]}));
    let init_plain = pod(json!({"initContainers": [{"name": "i", "image": "x",
        "env": [{"name": "P", "value": "1"}]}], "containers": [{"name": "a", "image": "x"}]}));
    // No `kind` (or one the URL contradicts): the API server reads the body as the URL's
    // resource, so the policy must too.
    let without_kind = |mut object: Value| {
        let map = object.as_object_mut().expect("an object");
        map.remove("kind");
        map.remove("apiVersion");
        object
    };
    let privileged_kindless = without_kind(privileged.clone());
    let host_kindless_deployment = json!({"metadata": {"name": "d"}, "spec": {"template":
        {"spec": {"hostNetwork": true, "containers": [{"name": "a", "image": "x"}]}}}});
    let mut privileged_as_configmap = privileged.clone();
    privileged_as_configmap["kind"] = json!("ConfigMap");
    let sandbox_pods = "/api/v1/namespaces/ai-sandbox/pods";
    let external_name = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"},
        "spec": {"type": "ExternalName", "externalName": "kubernetes.default.svc.cluster.local"}});
    let cluster_ip = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}});
    let cases: &[Case<'_>] = &[
        (
            "POST",
            "/api/v1/namespaces/ai-sandbox/serviceaccounts/default/token",
            None,
            Action::Deny,
            Some("no-token-requests"),
        ),
        (
            "POST",
            "/apis/certificates.k8s.io/v1/certificatesigningrequests",
            None,
            Action::Deny,
            Some("no-certificate-requests"),
        ),
        (
            "PUT",
            "/apis/certificates.k8s.io/v1/certificatesigningrequests/x/approval",
            None,
            Action::Deny,
            Some("no-certificate-requests"),
        ),
        (
            "GET",
            "/api/v1/nodes/n1/proxy/configz",
            None,
            Action::Deny,
            Some("no-node-proxy"),
        ),
        (
            "PATCH",
            "/api/v1/namespaces/ai-sandbox/pods/p/ephemeralcontainers",
            None,
            Action::Deny,
            Some("no-ephemeral-containers"),
        ),
        (
            "POST",
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
            None,
            Action::Deny,
            Some("no-rbac-writes"),
        ),
        (
            "POST",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/ai-sandbox/rolebindings",
            None,
            Action::Deny,
            Some("no-rbac-writes"),
        ),
        (
            "DELETE",
            "/api/v1/namespaces/ai-sandbox",
            None,
            Action::Deny,
            Some("no-destructive-deletes"),
        ),
        (
            "DELETE",
            "/api/v1/nodes/n1",
            None,
            Action::Deny,
            Some("no-destructive-deletes"),
        ),
        (
            "DELETE",
            "/api/v1/persistentvolumes/pv1",
            None,
            Action::Deny,
            Some("no-destructive-deletes"),
        ),
        (
            "DELETE",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/x.example.com",
            None,
            Action::Deny,
            Some("no-crd-deletes"),
        ),
        (
            "POST",
            "/api/v1/namespaces/ai-sandbox/endpoints",
            None,
            Action::Deny,
            Some("no-endpoint-writes"),
        ),
        (
            "PATCH",
            "/apis/discovery.k8s.io/v1/namespaces/ai-sandbox/endpointslices/api",
            None,
            Action::Deny,
            Some("no-endpoint-writes"),
        ),
        (
            "POST",
            "/api/v1/namespaces/ai-sandbox/services",
            Some(&external_name),
            Action::Deny,
            Some("no-external-name-services"),
        ),
        (
            "POST",
            "/api/v1/namespaces/ai-sandbox/services",
            Some(&cluster_ip),
            Action::Mask,
            Some("agent-writes"),
        ),
        (
            "POST",
            sandbox_pods,
            Some(&privileged),
            Action::Deny,
            Some("no-privileged-workloads"),
        ),
        (
            "POST",
            sandbox_pods,
            Some(&host),
            Action::Deny,
            Some("no-host-access"),
        ),
        (
            "POST",
            sandbox_pods,
            Some(&privileged_kindless),
            Action::Deny,
            Some("no-privileged-workloads"),
        ),
        (
            "PUT",
            "/api/v1/namespaces/ai-sandbox/pods/p",
            Some(&privileged_as_configmap),
            Action::Deny,
            Some("no-privileged-workloads"),
        ),
        (
            "PUT",
            "/apis/apps/v1/namespaces/ai-sandbox/deployments/d",
            Some(&host_kindless_deployment),
            Action::Deny,
            Some("no-host-access"),
        ),
        (
            "POST",
            sandbox_pods,
            Some(&secret),
            Action::Deny,
            Some("no-secret-mounts"),
        ),
        (
            "POST",
            sandbox_pods,
            Some(&init_secret),
            Action::Deny,
            Some("no-secret-mounts"),
        ),
        (
            "POST",
            sandbox_pods,
            Some(&init_secret_from),
            Action::Deny,
            Some("no-secret-mounts"),
        ),
        (
            "POST",
            sandbox_pods,
            Some(&init_plain),
            Action::Mask,
            Some("agent-writes"),
        ),
        (
            "POST",
            sandbox_pods,
            Some(&plain),
            Action::Mask,
            Some("agent-writes"),
        ),
        (
            "POST",
            "/api/v1/namespaces/production/pods",
            Some(&plain),
            Action::Deny,
            None,
        ),
        (
            "DELETE",
            "/api/v1/namespaces/production/configmaps/c",
            None,
            Action::Deny,
            None,
        ),
        (
            "POST",
            "/api/v1/namespaces/ai-sandbox/pods/p/exec?command=sh&stdin=true&tty=true",
            None,
            Action::Deny,
            Some("no-interactive-exec"),
        ),
        (
            "GET",
            "/api/v1/namespaces/ai-sandbox/pods/p/attach?stdin=true",
            None,
            Action::Deny,
            Some("no-interactive-exec"),
        ),
        (
            "POST",
            "/api/v1/namespaces/ai-sandbox/pods/p/exec?command=rm&command=-rf&command=%2Fdata",
            None,
            Action::Deny,
            Some("no-recursive-deletes-in-exec"),
        ),
        (
            "POST",
            "/api/v1/namespaces/ai-sandbox/pods/p/exec?command=ls&stdout=true",
            None,
            Action::Mask,
            Some("agent-exec"),
        ),
        (
            "POST",
            "/api/v1/namespaces/production/pods/p/exec?command=ls&stdout=true",
            None,
            Action::Deny,
            Some("no-sessions-elsewhere"),
        ),
        // A WebSocket session is a GET, which `reads` ("*", subresources included) would
        // allow anywhere: sessions outside the agent namespaces and proxies are denied
        // before it.
        (
            "GET",
            "/api/v1/namespaces/production/pods/p/exec?command=ls&stdout=true",
            None,
            Action::Deny,
            Some("no-sessions-elsewhere"),
        ),
        (
            "GET",
            "/api/v1/namespaces/production/pods/p/attach?stdout=true",
            None,
            Action::Deny,
            Some("no-sessions-elsewhere"),
        ),
        (
            "GET",
            "/api/v1/namespaces/production/pods/db/portforward?ports=5432",
            None,
            Action::Deny,
            Some("no-sessions-elsewhere"),
        ),
        (
            "GET",
            "/api/v1/namespaces/ai-sandbox/pods/p/portforward?ports=8080",
            None,
            Action::Mask,
            Some("agent-exec"),
        ),
        (
            "GET",
            "/api/v1/namespaces/ai-sandbox/pods/p/proxy/env",
            None,
            Action::Deny,
            Some("no-sessions-elsewhere"),
        ),
        (
            "GET",
            "/api/v1/namespaces/production/services/web:80/proxy/",
            None,
            Action::Deny,
            Some("no-sessions-elsewhere"),
        ),
        (
            "GET",
            "/api/v1/namespaces/production/pods",
            None,
            Action::Mask,
            Some("reads"),
        ),
        (
            "GET",
            "/api/v1/namespaces/production/pods/p/log?follow=true",
            None,
            Action::Mask,
            Some("reads"),
        ),
        (
            "GET",
            "/apis/apps/v1/deployments?watch=true",
            None,
            Action::Mask,
            Some("reads"),
        ),
        (
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            None,
            Action::Mask,
            Some("self-review"),
        ),
        (
            "GET",
            "/apis/apps/v1",
            None,
            Action::Allow,
            Some("discovery"),
        ),
        (
            "GET",
            "/openapi/v3/api/v1",
            None,
            Action::Allow,
            Some("discovery"),
        ),
    ];
    for (method, uri, object, action, rule) in cases {
        assert_eq!(
            decided(&p, method, uri, *object),
            (*action, rule.map(str::to_owned)),
            "{method} {uri}"
        );
    }
}

#[test]
fn the_baseline_is_documented_rule_by_rule() {
    let reference = include_str!("../../docs/policy-reference.md");
    let section = reference
        .split_once("## Baseline policy")
        .expect("docs/policy-reference.md has a '## Baseline policy' section")
        .1;
    let names: Vec<&str> = BASELINE
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- name: "))
        .collect();
    assert!(names.len() > 10, "{names:?}");
    for name in names {
        assert!(
            section.contains(&format!("`{name}`")),
            "rule {name} of the baseline is not documented in the reference's Baseline policy section"
        );
    }
}
