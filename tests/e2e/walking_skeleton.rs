//! The whole data path with real kubectl in a sandbox pod: intercepted by eBPF, policed,
//! forwarded with the gateway's credential, recorded to Parquet, and cleaned up after.

use std::process::Command;

use chaperone_e2e::privileged;
use chaperone_testkit::{
    demo::{DEMO_POLICY, demo_objects},
    sandbox::TEST_PIN_PREFIX,
    stack::{SANDBOX_NAMESPACE, SANDBOX_POD, SANDBOX_SERVICE_ACCOUNT, Stack, StackOptions},
};
use gateway_userspace::recorder;

/// A GET against the admin endpoint that must succeed: its body.
async fn admin_get(addr: std::net::SocketAddr, path: &str) -> String {
    let (code, body) = chaperone_e2e::admin_get(addr, path).await;
    assert_eq!(code, 200, "{path}: {body}");
    body
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_in_pod_is_intercepted_policed_forwarded_with_gateway_token_and_recorded() {
    if !privileged(
        "kubectl_in_pod_is_intercepted_policed_forwarded_with_gateway_token_and_recorded",
    ) {
        return;
    }
    let stack = Stack::start(StackOptions {
        policy_yaml: Some(DEMO_POLICY.to_owned()),
        recordings_dir: None,
        seed: demo_objects(),
        approval: false,
        ..Default::default()
    })
    .await
    .expect("start the stack");
    let cgroup_id = stack.pod.cgroup_id().expect("pod cgroup id") as i64;
    let virtual_api = stack.pod.virtual_api_server().to_string();
    let netns = stack.pod.netns().to_owned();
    let cgroup_path = stack.pod.cgroup_path().to_owned();

    let get = stack
        .kubectl(&["get", "pods"])
        .await
        .expect("run kubectl get pods");
    let (stdout, stderr) = (text(&get.stdout), text(&get.stderr));
    assert!(get.status.success(), "kubectl get pods failed: {stderr}");
    assert!(
        stdout.starts_with("NAME"),
        "expected a table, got: {stdout}"
    );
    assert!(
        stdout.contains("web-0") && stdout.contains("web-1"),
        "pods missing: {stdout}"
    );
    assert!(
        stdout.contains("Running"),
        "status column missing: {stdout}"
    );

    // A connection made to the gateway's own address is not redirected, so the kernel
    // recorded no origin for it: refused, never served as a request from an unknown pod.
    let direct = format!(
        "https://{}/api/v1/namespaces/default/pods",
        stack.app.local_addr()
    );
    let mut curl = stack.pod.command("curl");
    curl.args([
        "-sk",
        "-H",
        &format!("Authorization: Bearer {}", stack.pod_token),
        &direct,
    ]);
    let out = tokio::task::spawn_blocking(move || curl.output())
        .await
        .expect("join")
        .expect("run curl in the pod");
    let body = text(&out.stdout);
    assert!(
        body.contains("\"code\":403") && body.contains("did not come through the node's redirect"),
        "a direct connection to the gateway was served: {body} {}",
        text(&out.stderr)
    );

    let delete = stack
        .kubectl(&["delete", "namespace", "production"])
        .await
        .expect("run kubectl delete");
    let stderr = text(&delete.stderr);
    assert_eq!(
        delete.status.code(),
        Some(1),
        "kubectl delete namespace should fail: {stderr}"
    );
    assert!(
        stderr.contains("Error from server (Forbidden): namespaces \"production\" is forbidden:")
            && stderr.contains("protect-namespaces")
            && stderr.contains("agents may not delete namespaces"),
        "kubectl did not print the policy's reason: {stderr}"
    );

    // The admin endpoint reports the kernel side (what `chaperone status` prints) and the
    // connect-path counters.
    let status: serde_json::Value =
        serde_json::from_str(&admin_get(stack.app.admin_addr(), "/status").await)
            .expect("status JSON");
    let interception = &status["interception"];
    assert_eq!(
        interception["programs"].as_array().map(Vec::len),
        Some(7),
        "{status}"
    );
    assert_eq!(interception["targets"][0], virtual_api, "{status}");
    assert!(
        interception["counters"]["redirected"]
            .as_u64()
            .is_some_and(|n| n >= 2),
        "{status}"
    );
    let metrics = admin_get(stack.app.admin_addr(), "/metrics").await;
    assert!(
        metrics.contains("chaperone_redirect_connects_total"),
        "{metrics}"
    );
    // The namespace deletion and the direct connection's request.
    assert!(
        metrics.contains("chaperone_requests_total{decision=\"deny\",outcome=\"denied\"} 2"),
        "{metrics}"
    );

    let stopped = stack.stop().await.expect("stop the gateway");
    let seen = stopped.apiserver.requests();
    assert!(!seen.is_empty(), "nothing reached the API server");
    let gateway_auth = format!("Bearer {}", stopped.gateway_token);
    for r in &seen {
        assert_eq!(
            r.authorization.as_deref(),
            Some(gateway_auth.as_str()),
            "{} {} carried the wrong credential",
            r.method,
            r.path_and_query
        );
        assert!(
            r.impersonation.is_empty(),
            "impersonation reached upstream: {r:?}"
        );
    }
    assert!(
        !seen.iter().any(|r| r.method == "DELETE"),
        "the denied delete reached the API server: {seen:?}"
    );
    assert!(
        seen.iter().any(|r| r.method == "GET"
            && r.path_and_query
                .starts_with("/api/v1/namespaces/default/pods")),
        "the pod list never reached the API server: {seen:?}"
    );

    // One row per request, read back with the parquet crate.
    let rows = recorder::read_dir(&stopped.recordings).expect("read recordings");
    let denied: Vec<_> = rows
        .iter()
        .filter(|r| recorder::decision_str(r.decision) == "deny")
        .collect();
    assert_eq!(
        rows.len(),
        seen.len() + denied.len(),
        "rows: {rows:#?}\nupstream saw: {seen:#?}"
    );
    // The direct connection's request is recorded, refused, and attributed to nobody.
    let (direct, rows): (Vec<_>, Vec<_>) = rows.iter().partition(|r| {
        r.reason
            .as_deref()
            .is_some_and(|w| w.contains("did not come through the node's redirect"))
    });
    assert_eq!(direct.len(), 1, "{direct:?}");
    assert_eq!(direct[0].response_code, 403);
    assert_eq!(direct[0].workload.cgroup_id, 0, "{direct:?}");
    for row in &rows {
        assert_eq!(
            row.workload.cgroup_id, cgroup_id,
            "row not attributed to the pod: {row:?}"
        );
        assert_eq!(row.workload.command.as_deref(), Some("kubectl"), "{row:?}");
        // Named from the Pod object whose container the kernel-reported cgroup belongs to.
        assert_eq!(
            row.workload.namespace.as_deref(),
            Some(SANDBOX_NAMESPACE),
            "{row:?}"
        );
        assert_eq!(row.workload.pod.as_deref(), Some(SANDBOX_POD), "{row:?}");
        assert_eq!(
            row.workload.service_account.as_deref(),
            Some(SANDBOX_SERVICE_ACCOUNT),
            "{row:?}"
        );
        assert_eq!(row.workload.container.as_deref(), Some("agent"), "{row:?}");
        // The pod's token is verified, never trusted: with no issuer or TokenReview
        // configured it is recorded as an invalid principal with the reason.
        assert_eq!(row.principal.kind, "invalid", "{row:?}");
        assert!(
            row.principal
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("TokenReview")),
            "{row:?}"
        );
        assert_eq!(
            row.original_dst.as_deref(),
            Some(virtual_api.as_str()),
            "{row:?}"
        );
        assert!(row.response_time.is_some() && row.latency_us > 0, "{row:?}");
        assert!(
            !format!("{row:?}").contains(&stopped.pod_token),
            "the pod token was recorded"
        );
        assert!(
            !format!("{row:?}").contains(&stopped.gateway_token),
            "the gateway token was recorded"
        );
    }
    let delete_row = denied
        .iter()
        .find(|r| r.verb == "delete" && r.object_ref.resource == "namespaces")
        .expect("no row for the denied delete");
    assert_eq!(delete_row.object_ref.name, "production");
    assert_eq!(
        delete_row.policy_rule.as_deref(),
        Some("protect-namespaces")
    );
    assert_eq!(delete_row.response_code, 403);
    let list_row = rows
        .iter()
        .find(|r| r.verb == "list" && r.object_ref.resource == "pods")
        .expect("no row for the pod list");
    assert_eq!(
        (
            recorder::decision_str(list_row.decision),
            list_row.outcome.as_str(),
            list_row.response_code
        ),
        ("allow", "forwarded", 200)
    );
    assert_eq!(list_row.object_ref.namespace, "default");
    assert_eq!(list_row.kubectl_command.as_deref(), Some("kubectl get"));

    // And by DuckDB, as an analyst would.
    let query = format!(
        "import duckdb; print(duckdb.connect().execute(\"SELECT count(*), count(*) FILTER (decision = 'deny' AND object_ref.name = 'production'), \
         min(workload.cgroup_id), max(workload.cgroup_id), min(workload.pod) FROM read_parquet('{}/table=requests/**/*.parquet', hive_partitioning=true) \
         WHERE node = 'sandbox-node' AND workload.pod IS NOT NULL\").fetchone())",
        stopped.recordings.display()
    );
    let duck = Command::new("python3")
        .args(["-c", &query])
        .output()
        .expect("run python3");
    assert!(
        duck.status.success(),
        "duckdb query failed: {}",
        text(&duck.stderr)
    );
    assert_eq!(
        text(&duck.stdout).trim(),
        format!(
            "({}, 1, {cgroup_id}, {cgroup_id}, '{SANDBOX_POD}')",
            rows.len()
        ),
        "DuckDB sees different rows"
    );

    // Nothing is left behind.
    drop(stopped);
    let netns_list = text(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns")
            .stdout,
    );
    assert!(
        !netns_list.contains(&netns),
        "network namespace {netns} left behind"
    );
    assert!(
        !cgroup_path.exists(),
        "cgroup {} left behind",
        cgroup_path.display()
    );
    let ours = format!("{TEST_PIN_PREFIX}{}-", std::process::id());
    let pins: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
        .expect("read bpffs")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&ours))
        .collect();
    assert!(pins.is_empty(), "eBPF pins left behind: {pins:?}");
}
