//! Just-in-time approval with real kubectl in a sandbox pod: a risky request is held (and
//! nothing reaches the API server) until a sealed decision releases it; denied with the
//! approver's comment; expired; async mode and a retry; a grant window; a status set to
//! Approved without a valid seal ignored; the agent refused when it tries to decide
//! itself. Each case asserts on what kubectl printed, on what the API server stored, and on
//! the recording.

use std::time::Duration;

use chaperone_e2e::{
    clients::{kubectl_env, kubectl_in_pod, run, text},
    privileged,
};
use chaperone_testkit::stack::{Decision, Stack, StackOptions};
use gateway_userspace::{approval::resource::Phase, policy::Action, recorder};
use serde_json::json;

const POLICY: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: Policy
default: allow
rules:
  - name: scale-prod
    action: approve
    verbs: [patch, update]
    apiGroups: [apps]
    resources: [deployments/scale]
    namespaces: [prod]
    approval: {approvers: {groups: [sre]}, timeout: 60s}
  - name: frozen-config
    action: deny
    message: this configuration is frozen
    verbs: [patch]
    resources: [configmaps]
    namespaces: [prod]
    when: ["has(oldObject.metadata.labels) && 'frozen' in oldObject.metadata.labels"]
  - name: patch-prod-config
    action: approve
    verbs: [patch]
    resources: [configmaps]
    namespaces: [prod]
    approval: {approvers: {groups: [sre]}, timeout: 60s}
  - name: delete-prod-config
    action: approve
    verbs: [delete]
    resources: [configmaps]
    namespaces: [prod]
    approval: {approvers: {groups: [sre]}, timeout: 2s}
  - name: new-secrets
    action: approve
    verbs: [create]
    resources: [secrets]
    approval: {approvers: {users: [alice]}, mode: async}
  - name: patch-config
    action: approve
    verbs: [patch]
    resources: [configmaps]
    namespaces: [default]
    approval: {approvers: {groups: [sre]}, timeout: 60s, grant: {for: 4s, scope: identical}}
"#;

fn seed() -> Vec<serde_json::Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "web", "namespace": "prod"},
               "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}},
                                     "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}}}}),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "settings", "namespace": "prod"}, "data": {"mode": "live"}}),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "flags", "namespace": "default"}, "data": {"a": "0"}}),
    ]
}

fn replicas(stack: &Stack) -> i64 {
    stack
        .apiserver
        .object("deployments", "prod", "web")
        .and_then(|d| {
            d.pointer("/spec/replicas")
                .and_then(serde_json::Value::as_i64)
        })
        .unwrap_or(-1)
}

/// The sandbox stack with `policy`, the seeded objects and approvals.
async fn approval_stack(policy: String) -> Stack {
    Stack::start(StackOptions {
        policy_yaml: Some(policy),
        seed: seed(),
        approval: true,
        ..Default::default()
    })
    .await
    .expect("start the stack")
}

/// Starts kubectl in the pod without waiting for it.
fn spawn_kubectl(stack: &Stack, args: &[&str]) -> tokio::task::JoinHandle<(bool, String)> {
    let (cmd, cache) = kubectl_in_pod(stack, args, &[]);
    let what = format!("kubectl {args:?}");
    tokio::spawn(async move {
        let out = run(cmd, None, &what).await;
        drop(cache);
        (
            out.status.success(),
            format!("{}{}", text(&out.stdout), text(&out.stderr)),
        )
    })
}

async fn finished(task: tokio::task::JoinHandle<(bool, String)>) -> (bool, String) {
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("kubectl released in time")
        .expect("kubectl task")
}

fn approve(by: &str) -> Decision<'_> {
    Decision {
        phase: Phase::Approved,
        by,
        comment: None,
        grant_for: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn risky_requests_wait_for_a_person() {
    if !privileged("risky_requests_wait_for_a_person") {
        return;
    }
    let stack = approval_stack(POLICY.to_owned()).await;

    // Held, then approved: kubectl prints the normal result, and only then the API server
    // sees the change.
    let scale = spawn_kubectl(
        &stack,
        &["scale", "deployment", "web", "-n", "prod", "--replicas=0"],
    );
    let held = stack
        .wait_for_access_requests(1)
        .await
        .expect("AccessRequest");
    let ar = stack.access_requests().pop().expect("ar");
    assert_eq!(ar["spec"]["rule"], "scale-prod");
    assert_eq!(
        ar["spec"]["requester"]["workload"]["pod"],
        chaperone_testkit::stack::SANDBOX_POD
    );
    assert!(
        ar["spec"]["request"]["summary"]
            .as_str()
            .is_some_and(|s| s.contains("deployments/scale prod/web") && s.contains("replicas=0")),
        "{ar}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!scale.is_finished(), "kubectl returned before any decision");
    assert_eq!(
        replicas(&stack),
        3,
        "the held request reached the API server"
    );
    stack
        .decide(&held, approve("alice"), true)
        .expect("approve");
    let (ok, out) = finished(scale).await;
    assert!(ok && out.contains("deployment.apps/web scaled"), "{out}");
    assert_eq!(replicas(&stack), 0);

    // A status set to Approved directly at the API server (no valid seal) is ignored; a
    // denial carries the approver's comment to the client.
    let scale = spawn_kubectl(
        &stack,
        &["scale", "deployment", "web", "-n", "prod", "--replicas=5"],
    );
    let held = stack
        .wait_for_access_requests(2)
        .await
        .expect("AccessRequest");
    stack
        .decide(&held, approve("mallory"), false)
        .expect("unsealed approval");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !scale.is_finished(),
        "an unsealed approval released the request"
    );
    assert_eq!(replicas(&stack), 0);
    stack
        .decide(
            &held,
            Decision {
                phase: Phase::Denied,
                by: "bob",
                comment: Some("change freeze until Monday"),
                grant_for: None,
            },
            true,
        )
        .expect("deny");
    let (ok, out) = finished(scale).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("Forbidden")
            && out.contains("denied by bob")
            && out.contains("change freeze until Monday"),
        "{out}"
    );
    assert_eq!(replicas(&stack), 0);

    // Silence: after the rule's 2 s the client gets a 403 saying it expired.
    let started = std::time::Instant::now();
    let out = kubectl_env(
        &stack,
        &["delete", "configmap", "settings", "-n", "prod"],
        &[],
        None,
    )
    .await;
    let printed = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{printed}");
    assert!(
        printed.contains("expired waiting for approval"),
        "{printed}"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(
        stack
            .apiserver
            .object("configmaps", "prod", "settings")
            .is_some()
    );
    let expired = stack.access_requests().pop().expect("ar");
    assert_eq!(expired["status"]["phase"], "Expired", "{expired}");

    // Async: answered at once with the AccessRequest's name and how to approve it; the
    // same request passes once approved.
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "api-key", "namespace": "default"},
                        "stringData": {"key": "s3cr3t"}})
    .to_string();
    let first = kubectl_env(&stack, &["create", "-f", "-"], &[], Some(secret.as_bytes())).await;
    let printed = format!("{}{}", text(&first.stdout), text(&first.stderr));
    assert!(!first.status.success(), "{printed}");
    let queued = stack
        .wait_for_access_requests(4)
        .await
        .expect("AccessRequest");
    assert!(
        printed.contains(&format!("kubectl chaperone approve {queued}"))
            && printed.contains("then retry"),
        "{printed}"
    );
    assert!(
        stack
            .apiserver
            .object("secrets", "default", "api-key")
            .is_none()
    );
    stack
        .decide(&queued, approve("alice"), true)
        .expect("approve");
    let retry = kubectl_env(&stack, &["create", "-f", "-"], &[], Some(secret.as_bytes())).await;
    let printed = format!("{}{}", text(&retry.stdout), text(&retry.stderr));
    assert!(
        retry.status.success() && printed.contains("secret/api-key created"),
        "{printed}"
    );

    // A grant window: the identical request passes again without a new AccessRequest
    // until it ends, then asks again.
    let patch = [
        "patch",
        "configmap",
        "flags",
        "-n",
        "default",
        "--type=merge",
        "-p",
        r#"{"data":{"a":"1"}}"#,
    ];
    let first = spawn_kubectl(&stack, &patch);
    let held = stack
        .wait_for_access_requests(5)
        .await
        .expect("AccessRequest");
    stack
        .decide(
            &held,
            Decision {
                phase: Phase::Approved,
                by: "alice",
                comment: None,
                grant_for: Some(Duration::from_secs(4)),
            },
            true,
        )
        .expect("approve with a grant");
    let (ok, out) = finished(first).await;
    assert!(ok && out.contains("configmap/flags patched"), "{out}");
    let again = kubectl_env(&stack, &patch, &[], None).await;
    let printed = format!("{}{}", text(&again.stdout), text(&again.stderr));
    assert!(again.status.success(), "{printed}");
    assert_eq!(
        stack.access_requests().len(),
        5,
        "the grant did not cover the identical request"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = spawn_kubectl(&stack, &patch);
    let held = stack
        .wait_for_access_requests(6)
        .await
        .expect("a new AccessRequest after the window");
    stack
        .decide(
            &held,
            Decision {
                phase: Phase::Denied,
                by: "alice",
                comment: None,
                grant_for: None,
            },
            true,
        )
        .expect("deny");
    let (ok, out) = finished(after).await;
    assert!(!ok && out.contains("denied by alice"), "{out}");

    // Two identical requests held together wait on one AccessRequest; a `once` approval
    // lets one of them through, and the other is refused rather than riding on it.
    let twice = ["scale", "deployment", "web", "-n", "prod", "--replicas=2"];
    let first = spawn_kubectl(&stack, &twice);
    let held = stack
        .wait_for_access_requests(7)
        .await
        .expect("AccessRequest");
    let second = spawn_kubectl(&stack, &twice);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        stack.access_requests().len(),
        7,
        "the identical request waits on the pending AccessRequest"
    );
    assert!(!second.is_finished(), "the identical request was not held");
    stack
        .decide(&held, approve("alice"), true)
        .expect("approve");
    let results = [finished(first).await, finished(second).await];
    assert_eq!(
        results.iter().filter(|(ok, _)| *ok).count(),
        1,
        "one approval, one request: {results:?}"
    );
    let refused = results
        .iter()
        .find(|(ok, _)| !ok)
        .map(|(_, out)| out.as_str())
        .unwrap_or_default();
    assert!(
        refused.contains("Forbidden") && refused.contains("for one request"),
        "{refused}"
    );
    assert_eq!(replicas(&stack), 2);

    // The agent cannot decide for itself: writing an AccessRequest's status, or reaching
    // the approvals API through the API server's service proxy, is refused by the
    // built-in rule (a permissive policy cannot change that).
    let forged = kubectl_env(
        &stack,
        &[
            "patch",
            "accessrequest",
            &held,
            "-n",
            "chaperone-system",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Approved","decidedBy":"agent"}}"#,
        ],
        &[],
        None,
    )
    .await;
    let printed = format!("{}{}", text(&forged.stdout), text(&forged.stderr));
    assert!(!forged.status.success(), "{printed}");
    assert!(
        printed.contains("Forbidden") && printed.contains("builtin.protect-approvals"),
        "{printed}"
    );
    let proxied = kubectl_env(
        &stack,
        &["get", "--raw", "/api/v1/namespaces/chaperone-system/services/https:chaperone-approvals:443/proxy/v1/accessrequests"],
        &[],
        None,
    )
    .await;
    let printed = format!("{}{}", text(&proxied.stdout), text(&proxied.stderr));
    assert!(
        !proxied.status.success() && printed.contains("Forbidden"),
        "{printed}"
    );
    let decided = stack.access_requests().pop().expect("ar");
    assert_eq!(decided["status"]["decidedBy"], "alice", "{decided}");

    // Recorded: the effect, the outcome, the AccessRequest, who decided and the wait.
    let stopped = stack.stop().await.expect("stop the stack");
    let rows = recorder::read_dir(&stopped.recordings).expect("read recordings");
    let approvals: Vec<_> = rows
        .iter()
        .filter(|r| r.decision == Some(Action::Approve) || r.approval_outcome.is_some())
        .collect();
    let outcomes: Vec<(&str, &str)> = approvals
        .iter()
        .map(|r| {
            (
                r.approval_outcome.as_deref().unwrap_or(""),
                r.approval_decided_by.as_deref().unwrap_or(""),
            )
        })
        .collect();
    for want in [
        ("approved", "alice"),
        ("denied", "bob"),
        ("expired", "chaperone"),
        ("pending", ""),
        ("denied", "alice"),
        ("used", "alice"),
    ] {
        assert!(
            outcomes.contains(&want),
            "{want:?} not recorded: {outcomes:?}"
        );
    }
    let scaled = approvals
        .iter()
        .find(|r| {
            r.approval_outcome.as_deref() == Some("approved")
                && r.verb == gateway_userspace::request::Verb::Patch
                && r.object_ref.resource == "deployments"
        })
        .expect("the approved scale");
    assert!(
        scaled.approval_wait_ms.is_some_and(|ms| ms >= 400),
        "{scaled:?}"
    );
    assert!(scaled.access_request.is_some());
    assert_eq!(scaled.decision, Some(Action::Approve));
    assert_eq!(scaled.response_code, 200);
    let refused = rows
        .iter()
        .find(|r| r.policy_rule.as_deref() == Some("builtin.protect-approvals"))
        .expect("the forged status recorded");
    assert_eq!(refused.decision, Some(Action::Deny));
}

/// Two gateways ("nodes") share one API test server: the request held on node A (the
/// sandbox's gateway) is released by an approval taken through node B's approvals API,
/// with the `chaperone approve` client code.
#[tokio::test(flavor = "multi_thread")]
async fn an_approval_on_another_node_releases_the_held_request() {
    if !privileged("an_approval_on_another_node_releases_the_held_request") {
        return;
    }
    let policy = POLICY.replace(
        "approval: {approvers: {groups: [sre]}, timeout: 60s}",
        "approval: {approvers: {groups: [\"system:masters\"]}, timeout: 60s}",
    );
    let stack = approval_stack(policy).await;
    let node_b = stack.second_gateway().await.expect("node B");
    let api_b = node_b.approvals_addr().expect("node B's approvals API");

    let scale = spawn_kubectl(
        &stack,
        &["scale", "deployment", "web", "-n", "prod", "--replicas=1"],
    );
    let held = stack
        .wait_for_access_requests(1)
        .await
        .expect("AccessRequest");
    let ar = stack.access_requests().pop().expect("ar");
    assert_eq!(ar["spec"]["node"], "sandbox-node", "held on node A");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!scale.is_finished());

    let conn = gateway_userspace::approval::client::Connection {
        kubeconfig: Some(stack.admin_kubeconfig().expect("admin kubeconfig")),
        namespace: Some(chaperone_testkit::stack::APPROVAL_NAMESPACE.to_owned()),
        server: Some(format!("https://{api_b}")),
        certificate_authority: Some(stack.ca_file()),
        ..Default::default()
    };
    gateway_userspace::approval::client::decide(
        &conn,
        &held,
        true,
        None,
        Some("ok for the demo".into()),
    )
    .await
    .expect("approve through node B");
    let (ok, out) = finished(scale).await;
    assert!(ok && out.contains("deployment.apps/web scaled"), "{out}");
    assert_eq!(replicas(&stack), 1);
    let decided = stack.access_requests().pop().expect("ar");
    assert_eq!(decided["status"]["decidedBy"], "system:admin", "{decided}");
    node_b.shutdown().await.expect("stop node B");
    let stopped = stack.stop().await.expect("stop the stack");
    let rows = recorder::read_dir(&stopped.recordings).expect("read recordings");
    let row = rows
        .iter()
        .find(|r| r.approval_outcome.as_deref() == Some("approved"))
        .expect("the approved scale recorded on node A");
    assert_eq!(row.approval_decided_by.as_deref(), Some("system:admin"));
    assert_eq!(row.access_request.as_deref(), Some(held.as_str()));
}

/// An AWS access key id in an exec's argv: approvers must not read it.
const AWS_KEY_ID: &str = "AKIAQ3EGRT7NWZ5KXP4M";

/// `kubectl exec` waits for approval too: the AccessRequest shows the command (with the
/// credential in it masked), nothing runs until it is approved, and then kubectl prints
/// the command's output.
#[tokio::test(flavor = "multi_thread")]
async fn an_exec_waits_for_approval_and_then_runs() {
    if !privileged("an_exec_waits_for_approval_and_then_runs") {
        return;
    }
    let policy = r#"
apiVersion: chaperone.dev/v1alpha1
kind: Policy
default: allow
rules:
  - name: exec-needs-approval
    action: approve
    verbs: [create, get]
    resources: [pods/exec]
    approval: {approvers: {groups: [sre]}, timeout: 60s}
"#;
    let stack = Stack::start(StackOptions {
        policy_yaml: Some(policy.to_owned()),
        recordings_dir: None,
        seed: chaperone_testkit::demo::demo_objects(),
        approval: true,
        ..Default::default()
    })
    .await
    .expect("start the stack");
    let marker = stack
        .apiserver
        .pod_dir("default", "web-0")
        .expect("pod dir")
        .join("ran");
    let exec = spawn_kubectl(
        &stack,
        &[
            "exec",
            "web-0",
            "--",
            "sh",
            "-c",
            &format!("touch ran; echo hello-after-approval; : {AWS_KEY_ID}"),
        ],
    );
    let held = stack
        .wait_for_access_requests(1)
        .await
        .expect("AccessRequest");
    let ar = stack.access_requests().pop().expect("ar");
    let summary = ar["spec"]["request"]["summary"].as_str().unwrap_or("");
    assert!(
        summary.contains("pods/exec default/web-0")
            && summary
                .contains("touch ran; echo hello-after-approval; : **masked:aws-access-key**"),
        "{ar}"
    );
    // The key is in neither the summary nor the path (nor anywhere else approvers read).
    assert!(!ar.to_string().contains(AWS_KEY_ID), "{ar}");
    assert!(
        ar["spec"]["request"]["path"]
            .as_str()
            .is_some_and(|p| p.contains("exec")),
        "{ar}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!exec.is_finished());
    assert!(!marker.exists(), "the command ran before the approval");
    stack
        .decide(&held, approve("alice"), true)
        .expect("approve");
    let (ok, out) = finished(exec).await;
    assert!(ok && out.contains("hello-after-approval"), "{out}");
    assert!(marker.exists());
}

/// A client that gives up while its request is held (kubectl's `--request-timeout`
/// resets the stream) leaves a row that says so: the handler's future is dropped with the
/// request, and the row must not go with it.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_the_client_abandons_while_held_is_still_recorded() {
    if !privileged("a_request_the_client_abandons_while_held_is_still_recorded") {
        return;
    }
    let stack = approval_stack(POLICY.to_owned()).await;
    let (ok, out) = finished(spawn_kubectl(
        &stack,
        &[
            "scale",
            "deployment",
            "web",
            "-n",
            "prod",
            "--replicas=7",
            "--request-timeout=1s",
        ],
    ))
    .await;
    assert!(!ok, "kubectl gave up on the held request: {out}");
    assert_eq!(replicas(&stack), 3, "nothing reached the API server");
    let stopped = stack.stop().await.expect("stop the stack");
    let rows = recorder::read_dir(&stopped.recordings).expect("read recordings");
    let abandoned = rows
        .iter()
        .find(|r| r.object_ref.resource == "deployments" && r.object_ref.subresource == "scale")
        .unwrap_or_else(|| panic!("the abandoned scale is recorded: {rows:#?}"));
    assert_eq!(
        abandoned.outcome,
        recorder::Outcome::Cancelled,
        "{abandoned:?}"
    );
    assert_eq!(abandoned.decision, Some(Action::Approve));
    assert!(
        abandoned
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("the client went away")),
        "{abandoned:?}"
    );
}

/// A held write whose decision read the stored object is judged again on what is stored
/// when it is approved (the wait was minutes): it goes bound to that version, so a change
/// made while it waited neither turns it into a conflict nor lets through what the policy
/// now denies.
#[tokio::test(flavor = "multi_thread")]
async fn a_held_write_is_judged_again_on_what_is_stored_when_approved() {
    if !privileged("a_held_write_is_judged_again_on_what_is_stored_when_approved") {
        return;
    }
    let stack = approval_stack(POLICY.to_owned()).await;
    let settings = || {
        stack
            .apiserver
            .object("configmaps", "prod", "settings")
            .expect("settings")
    };
    let label = |labels: serde_json::Value| {
        let mut cm = settings();
        cm["metadata"]["labels"] = labels;
        stack.apiserver.seed(cm).expect("label settings");
    };
    let patch = |mode: &str| {
        spawn_kubectl(
            &stack,
            &[
                "patch",
                "configmap",
                "settings",
                "-n",
                "prod",
                "--type=merge",
                "-p",
                &format!(r#"{{"data":{{"mode":"{mode}"}}}}"#),
            ],
        )
    };

    // Changed (not frozen) while held: approved, it applies to what is stored now.
    let first = patch("maintenance");
    let held = stack
        .wait_for_access_requests(1)
        .await
        .expect("AccessRequest");
    label(json!({"team": "web"}));
    stack
        .decide(&held, approve("alice"), true)
        .expect("approve");
    let (ok, out) = finished(first).await;
    assert!(ok && out.contains("patched"), "{out}");
    assert_eq!(settings()["data"]["mode"], "maintenance");
    assert_eq!(settings()["metadata"]["labels"]["team"], "web");

    // Frozen while held: the approval does not override what the policy now denies.
    let second = patch("off");
    let held = stack
        .wait_for_access_requests(2)
        .await
        .expect("AccessRequest");
    label(json!({"frozen": "yes"}));
    stack
        .decide(&held, approve("alice"), true)
        .expect("approve");
    let (ok, out) = finished(second).await;
    assert!(!ok && out.contains("this configuration is frozen"), "{out}");
    assert_eq!(settings()["data"]["mode"], "maintenance");
}

/// A request held for approval is decided again under the policy in force when it is
/// approved: a rule added meanwhile (a change freeze) stops it, the approval
/// notwithstanding.
#[tokio::test(flavor = "multi_thread")]
async fn a_rule_added_while_a_request_is_held_stops_it_when_approved() {
    if !privileged("a_rule_added_while_a_request_is_held_stops_it_when_approved") {
        return;
    }
    let stack = approval_stack(POLICY.to_owned()).await;
    let scale = spawn_kubectl(
        &stack,
        &["scale", "deployment", "web", "-n", "prod", "--replicas=7"],
    );
    let held = stack
        .wait_for_access_requests(1)
        .await
        .expect("AccessRequest");
    let frozen = POLICY.replacen(
        "rules:\n",
        "rules:\n  - name: change-freeze\n    action: deny\n    message: a change freeze is on\n    verbs: [patch, update]\n    apiGroups: [apps]\n    resources: [deployments/scale]\n",
        1,
    );
    stack.app.set_policy(
        gateway_userspace::policy::Policy::from_yaml(&frozen, "frozen.yaml")
            .expect("the frozen policy"),
    );
    stack
        .decide(&held, approve("alice"), true)
        .expect("approve");
    let (ok, out) = finished(scale).await;
    assert!(!ok && out.contains("a change freeze is on"), "{out}");
    assert_eq!(
        replicas(&stack),
        3,
        "the frozen change reached the API server"
    );
}
