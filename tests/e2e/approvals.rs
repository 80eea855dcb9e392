//! The approvals API with a real intercepted pod: an agent in the sandbox pod that holds a
//! valid approver token still cannot approve (its connection comes from an intercepted
//! workload), while the same call from the node is served and writes a sealed decision.

use chaperone_e2e::privileged;
use chaperone_testkit::{
    apiserver::UserInfo,
    stack::{APPROVAL_NAMESPACE, APPROVALS_PORT, Stack, StackOptions},
};
use gateway_userspace::approval::{
    resource::AccessRequest,
    seal::{SPEC_SEAL_ANNOTATION, SealKey},
};

/// A pending AccessRequest as a gateway creates it: its spec sealed with `key`.
fn access_request(key: &SealKey) -> serde_json::Value {
    let now = jiff::Timestamp::now();
    let mut request = serde_json::json!({
        "apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessRequest",
        "metadata": {"name": "ar-e2e", "namespace": APPROVAL_NAMESPACE},
        "spec": {
            "requester": {"workload": {"namespace": "agents", "pod": "cursor-agent-0", "serviceAccount": "cursor"}},
            "request": {"verb": "delete", "resource": "namespaces", "name": "prod",
                        "path": "/api/v1/namespaces/prod", "summary": "delete namespace prod"},
            "fingerprint": "fp", "rule": "deletes", "approvers": {"groups": ["sre"]},
            "grant": {}, "node": "sandbox-node",
            "createdAt": now.to_string(),
            "expiresAt": (now + jiff::SignedDuration::from_mins(5)).to_string()
        }
    });
    let typed: AccessRequest = serde_json::from_value(request.clone()).expect("an AccessRequest");
    let seal = key.seal_spec(&typed).expect("seal the spec");
    request["metadata"]["annotations"] = serde_json::json!({ SPEC_SEAL_ANNOTATION: seal });
    request
}

fn curl_args(stack: &Stack, host: std::net::Ipv4Addr) -> Vec<String> {
    [
        "-sS",
        "--cacert",
        &stack.ca_file().display().to_string(),
        "-H",
        "Authorization: Bearer alice-token",
        "-H",
        "Content-Type: application/json",
        "-X",
        "POST",
        "-d",
        r#"{"comment":"from e2e"}"#,
        &format!("https://{host}:{APPROVALS_PORT}/v1/accessrequests/ar-e2e/approve"),
    ]
    .map(str::to_owned)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_pod_cannot_approve_even_with_an_approver_token() {
    if !privileged("an_agent_pod_cannot_approve_even_with_an_approver_token") {
        return;
    }
    let stack = Stack::start(StackOptions {
        approval: true,
        approvals_api: true,
        token_users: vec![("alice-token".to_owned(), UserInfo::new("alice", ["sre"]))],
        ..Default::default()
    })
    .await
    .expect("start the stack");
    stack
        .apiserver
        .seed(access_request(stack.seal_key().expect("seal key")))
        .expect("seed the AccessRequest");
    let host = stack.pod.host_ip();

    // From inside the intercepted pod: refused by address, before the token counts.
    let mut cmd = stack.pod.command("curl");
    cmd.args(curl_args(&stack, host));
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run curl in the pod");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("intercepted workloads may not use the approvals API")
            && body.contains("\"code\":403"),
        "curl in the pod printed: {body} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // From the node: served.
    let args = curl_args(&stack, host);
    let out =
        tokio::task::spawn_blocking(move || std::process::Command::new("curl").args(args).output())
            .await
            .expect("join")
            .expect("run curl on the node");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("\"phase\":\"Approved\""),
        "curl on the node printed: {body}"
    );

    let stored: AccessRequest = serde_json::from_value(
        stack
            .apiserver
            .object("accessrequests", APPROVAL_NAMESPACE, "ar-e2e")
            .expect("the AccessRequest"),
    )
    .expect("an AccessRequest");
    let status = stored.status.clone().expect("a status");
    assert_eq!(status.decided_by.as_deref(), Some("alice"));
    let key: &SealKey = stack.seal_key().expect("seal key");
    assert_eq!(key.verify(&stored, &status), Ok(()));
    stack.stop().await.expect("stop");
}
