//! A `mask` policy through real clients: kubectl (YAML, jsonpath piped into `base64 -d`,
//! the default Table, a live watch, a deployment's env, a gzip-sized list) and the
//! official Python client all receive the placeholders, never the original values; the
//! recordings (read back and queried with DuckDB) hold none of them either.

use std::{process::Stdio, time::Duration};

use base64::Engine as _;
use chaperone_e2e::{
    clients::{kubectl_in_pod, run, text},
    privileged,
};
use chaperone_testkit::stack::{Stack, StackOptions};
use gateway_userspace::{
    masking::objects::{PLACEHOLDER_BASE64, PLACEHOLDER_TEXT},
    recorder,
};
use serde_json::{Value, json};
use tokio::{io::AsyncReadExt as _, process::Command};

/// The values that must never reach the agent or a recording.
const SECRET_VALUE: &str = "orig-db-password-7f3a";
const ENV_VALUE: &str = "orig-env-password-91c2";
const WATCHED_VALUE: &str = "orig-watched-token-55e0";
const BULK_PREFIX: &str = "orig-bulk-value-";
/// An AWS access key id in a ConfigMap: found by the `aws-access-key` detector.
const AWS_KEY_ID: &str = "AKIAQ3EGRT7NWZ5KXP4M";

const POLICY: &str = r#"apiVersion: chaperone.dev/v1alpha1
kind: Policy
default: allow
rules:
  - name: mask-secrets
    action: mask
    verbs: ["*"]
    apiGroups: [""]
    resources: [secrets]
  - name: mask-workloads
    action: mask
    verbs: ["*"]
    apiGroups: [apps]
    resources: ["*"]
  - name: mask-configmaps
    action: mask
    verbs: ["*"]
    apiGroups: [""]
    resources: [configmaps]
"#;

/// A `get(path, headers)` for the Python scripts: the official client's `call_api` with
/// the pod's kubeconfig, returning `(status, content type, body bytes)` for any status,
/// whichever generation of the client is installed.
const PY_GET: &str = r#"
from kubernetes import client, config
from kubernetes.client.rest import ApiException
config.load_kube_config()
api = client.ApiClient()

def get(path, headers):
    try:
        if hasattr(api, "param_serialize"):  # clients generated since v31
            req = api.param_serialize("GET", path, header_params=headers,
                                      auth_settings=["BearerToken"])
            resp = api.call_api(*req)
            resp.read()
            status, ctype, data = resp.status, resp.getheader("Content-Type"), resp.data
        else:
            resp, status, hdrs = api.call_api(
                path, "GET", header_params=headers, auth_settings=["BearerToken"],
                _preload_content=False, _return_http_data_only=False)
            ctype, data = hdrs.get("Content-Type"), resp.data
    except ApiException as e:
        status, ctype, data = e.status, None, e.body or b""
    if isinstance(data, str):
        data = data.encode()
    return status, ctype, data
"#;

/// The sandbox with the masking policy and the seeded objects.
async fn masking_stack() -> Stack {
    Stack::start(StackOptions {
        policy_yaml: Some(POLICY.to_owned()),
        recordings_dir: None,
        seed: seed(),
        ..Default::default()
    })
    .await
    .expect("start the stack")
}

/// Runs a Python script in the agent pod and returns what it printed; it must succeed.
async fn python_stdout(stack: &Stack, script: &str, what: &str) -> String {
    let out = run(
        chaperone_e2e::clients::python_in_pod(stack, script),
        None,
        what,
    )
    .await;
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed: {stdout}\n{}",
        text(&out.stderr)
    );
    stdout
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn originals() -> Vec<String> {
    let mut all = vec![
        SECRET_VALUE.to_owned(),
        b64(SECRET_VALUE),
        ENV_VALUE.to_owned(),
        WATCHED_VALUE.to_owned(),
        b64(WATCHED_VALUE),
        BULK_PREFIX.to_owned(),
        AWS_KEY_ID.to_owned(),
    ];
    // 15 bytes: a whole number of base64 groups, so it prefixes every bulk value's base64.
    all.push(b64("orig-bulk-value"));
    all
}

fn secret(name: &str, value: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": name, "namespace": "default", "labels": {"app": "db"}},
           "type": "Opaque", "data": {"password": b64(value)}})
}

fn seed() -> Vec<Value> {
    let mut db = secret("db-creds", SECRET_VALUE);
    db["metadata"]["annotations"] = json!({
        "kubectl.kubernetes.io/last-applied-configuration": secret("db-creds", SECRET_VALUE).to_string()
    });
    let mut objects = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
        db,
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "api", "namespace": "default"},
               "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "api"}},
                        "template": {"metadata": {"labels": {"app": "api"}},
                                     "spec": {"containers": [{"name": "api", "image": "api:1",
                                        "env": [{"name": "DB_PASSWORD", "value": ENV_VALUE},
                                                {"name": "LOG_LEVEL", "value": "debug"}]}]}}}}),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "app-config", "namespace": "default"},
               "data": {"aws.conf": format!("[default]\naws_access_key_id = {AWS_KEY_ID}\nregion = eu-west-1\n"),
                        "log-level": "debug"}}),
    ];
    // Enough secrets that the list passes the API server's 128 KiB gzip threshold.
    for i in 0..48 {
        let value = format!("{BULK_PREFIX}{i}-{}", "x".repeat(3000));
        objects.push(secret(&format!("bulk-{i:02}"), &value));
    }
    objects
}

fn assert_clean(what: &str, out: &str) {
    for original in originals() {
        assert!(
            !out.contains(&original),
            "{what}: an original value reached the client ({original})"
        );
    }
}

async fn kubectl(stack: &Stack, args: &[&str]) -> String {
    let (cmd, _cache) = kubectl_in_pod(stack, args, &[]);
    let out = run(cmd, None, &format!("kubectl {args:?}")).await;
    assert!(
        out.status.success(),
        "kubectl {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert_clean(&format!("kubectl {args:?}"), &stdout);
    assert_clean(&format!("kubectl {args:?} stderr"), &text(&out.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_and_python_receive_masked_objects_and_recordings_hold_no_original() {
    if !privileged("kubectl_and_python_receive_masked_objects_and_recordings_hold_no_original") {
        return;
    }
    let stack = masking_stack().await;

    // -o yaml: keys, type and metadata kept; the value is the placeholder.
    let yaml = kubectl(&stack, &["get", "secret", "db-creds", "-o", "yaml"]).await;
    assert!(
        yaml.contains(&format!("password: {PLACEHOLDER_BASE64}")),
        "{yaml}"
    );
    assert!(
        yaml.contains("type: Opaque") && yaml.contains("app: db"),
        "{yaml}"
    );
    assert!(yaml.contains("last-applied-configuration"), "{yaml}");

    // jsonpath | base64 -d prints the placeholder's text.
    let b = kubectl(
        &stack,
        &[
            "get",
            "secret",
            "db-creds",
            "-o",
            "jsonpath={.data.password}",
        ],
    )
    .await;
    let mut decode = Command::new("base64");
    decode
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = decode.spawn().expect("spawn base64 -d");
    {
        use tokio::io::AsyncWriteExt as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b.as_bytes()).await.expect("feed base64 -d");
    }
    let decoded = child.wait_with_output().await.expect("base64 -d");
    assert!(
        decoded.status.success(),
        "base64 -d refused the placeholder {b:?}"
    );
    assert_eq!(text(&decoded.stdout), PLACEHOLDER_TEXT);

    // The default Table output works.
    let table = kubectl(&stack, &["get", "secrets"]).await;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("db-creds ") && l.contains("Opaque")),
        "{table}"
    );

    // A deployment's env var named like a password.
    let deploy = kubectl(&stack, &["get", "deploy", "api", "-o", "yaml"]).await;
    assert!(deploy.contains(PLACEHOLDER_TEXT), "{deploy}");
    assert!(
        deploy.contains("value: debug"),
        "other env values stay: {deploy}"
    );

    // A ConfigMap holding an AWS access key id: the detector replaces the key, and only
    // the key, in what kubectl prints.
    let cm = kubectl(&stack, &["get", "cm", "app-config", "-o", "yaml"]).await;
    assert!(
        cm.contains("aws_access_key_id = **masked:aws-access-key**"),
        "{cm}"
    );
    assert!(
        cm.contains("region = eu-west-1") && cm.contains("log-level: debug"),
        "the rest of the ConfigMap stays: {cm}"
    );

    // A list over 128 KiB: the API server gzips it, the gateway masks it.
    let list: Value =
        serde_json::from_str(&kubectl(&stack, &["get", "secrets", "-o", "json"]).await)
            .expect("kubectl -o json");
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 49);
    assert!(
        items
            .iter()
            .all(|s| s["data"]["password"] == PLACEHOLDER_BASE64)
    );
    let direct_size = serde_json::to_vec(&stack.apiserver.object("secrets", "default", "bulk-00"))
        .map_or(0, |v| v.len());
    assert!(
        direct_size * 48 > 128 * 1024,
        "the list must pass the gzip threshold"
    );

    // A live watch: an event for a secret created while it runs arrives masked.
    let (mut cmd, _cache) = kubectl_in_pod(
        &stack,
        &[
            "get",
            "secrets",
            "-w",
            "-o",
            "json",
            "--output-watch-events",
        ],
        &[],
    );
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl get -w");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    let mut seeded = false;
    let got = tokio::time::timeout(Duration::from_secs(40), async {
        loop {
            if !seeded && text(&seen).contains("bulk-47") {
                stack
                    .apiserver
                    .seed(secret("watched", WATCHED_VALUE))
                    .expect("create a secret during the watch");
                seeded = true;
            }
            if seeded
                && text(&seen).contains("\"watched\"")
                && text(&seen).trim_end().ends_with('}')
            {
                return true;
            }
            let n = stdout.read(&mut buf).await.expect("read kubectl -w");
            if n == 0 {
                return false;
            }
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let _ = child.kill().await;
    let watched = text(&seen);
    assert_eq!(
        got,
        Ok(true),
        "the watch never showed the new secret: {watched}"
    );
    assert_clean("kubectl get -w", &watched);
    assert!(watched.contains(PLACEHOLDER_BASE64), "{watched}");

    // The official Python client.
    let script = r#"
import os
from kubernetes import client, config
config.load_kube_config(config_file=os.environ["KUBECONFIG"])
s = client.CoreV1Api().read_namespaced_secret("db-creds", "default")
print(s.data["password"])
"#;
    let mut py = Command::from(stack.pod.command("python3"));
    py.arg("-c")
        .arg(script)
        .env("KUBECONFIG", stack.kubeconfig())
        .env("HOME", stack.dir())
        .current_dir(stack.dir())
        .kill_on_drop(true);
    let out = run(py, None, "python read_namespaced_secret").await;
    assert!(out.status.success(), "python failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), PLACEHOLDER_BASE64);

    let stopped = stack.stop().await.expect("stop the stack");
    let rows = recorder::read_dir(&stopped.recordings).expect("read recordings");
    assert!(!rows.is_empty());
    for row in &rows {
        let debug = format!("{row:?}");
        for original in originals() {
            assert!(
                !debug.contains(&original),
                "{} {}: the recording holds an original value",
                row.verb,
                row.request_uri
            );
        }
    }
    let masked_rows = rows
        .iter()
        .filter(|r| {
            r.masked
                .as_deref()
                .is_some_and(|m| m.contains("\"mask-secrets\""))
        })
        .count();
    assert!(masked_rows >= 5, "rows with a masked report: {masked_rows}");
    assert!(rows.iter().any(|r| r.masked.as_deref().is_some_and(|m| {
        m.contains("\"rule\":\"mask-workloads\"") && m.contains("\"kind\":\"env\"")
    })));

    // As an analyst would: DuckDB over the Parquet files.
    let like = originals()
        .iter()
        .map(|o| format!("contains(t::VARCHAR, '{o}')"))
        .collect::<Vec<_>>()
        .join(" OR ");
    let query = format!(
        "import duckdb; print(duckdb.connect().execute(\"SELECT count(*) FILTER ({like}), count(*) FILTER (decision = 'mask' AND masked IS NOT NULL) \
         FROM read_parquet('{}/table=requests/**/*.parquet', hive_partitioning=true) t\").fetchone())",
        stopped.recordings.display()
    );
    let duck = std::process::Command::new("python3")
        .args(["-c", &query])
        .output()
        .expect("run python3");
    assert!(
        duck.status.success(),
        "duckdb query failed: {}",
        text(&duck.stderr)
    );
    let result = text(&duck.stdout);
    let counts: Vec<i64> = result
        .trim()
        .trim_matches(['(', ')'])
        .split(',')
        .map(|n| n.trim().parse().unwrap_or(-1))
        .collect();
    assert_eq!(counts[0], 0, "rows holding an original value: {result}");
    assert!(counts[1] >= 5, "mask rows with a report: {result}");
}

/// A client that asks for protobuf (client-go's typed clients send
/// `application/vnd.kubernetes.protobuf, application/json`; a protobuf-only client sends
/// the first alone) still receives the masked object: the gateway asks the API server for
/// JSON when the response must be masked, and the client decodes by the response's
/// Content-Type. Sent with the official Python client's `call_api`, raw.
#[tokio::test(flavor = "multi_thread")]
async fn protobuf_accepting_clients_receive_masked_json() {
    if !privileged("protobuf_accepting_clients_receive_masked_json") {
        return;
    }
    let stack = masking_stack().await;
    let script = format!(
        "{PY_GET}{}",
        r#"
for accept in ["application/vnd.kubernetes.protobuf",
               "application/vnd.kubernetes.protobuf, application/json"]:
    for path in ["/api/v1/namespaces/default/secrets/db-creds",
                 "/api/v1/namespaces/default/secrets"]:
        status, ctype, data = get(path, {"Accept": accept})
        print("RESULT", status, ctype, accept, path)
        print(data.decode("latin-1"))
"#
    );
    let stdout = python_stdout(&stack, &script, "python call_api with protobuf accept").await;
    assert_clean("python protobuf accept", &stdout);
    let results: Vec<&str> = stdout.lines().filter(|l| l.starts_with("RESULT")).collect();
    assert_eq!(results.len(), 4, "{stdout}");
    for line in &results {
        assert!(
            line.starts_with("RESULT 200 application/json "),
            "masked JSON answered: {line}"
        );
    }
    assert!(
        stdout.matches(PLACEHOLDER_BASE64).count() >= 4,
        "the placeholder in every answer: {stdout}"
    );
    let stopped = stack.stop().await.expect("stop the stack");
    let rows = recorder::read_dir(&stopped.recordings).expect("read recordings");
    let masked: Vec<_> = rows
        .iter()
        .filter(|r| r.object_ref.resource == "secrets" && r.verb == "get")
        .collect();
    assert!(!masked.is_empty(), "the gets are recorded");
}

/// Upgrade headers on a request that is not an exec, attach, port-forward or proxy do not
/// take it down the upgrade path, where the answer would be relayed unmasked: the gateway
/// refuses it (the API server itself would answer the `get` with the Secret).
#[tokio::test]
async fn upgrade_headers_on_a_masked_get_are_refused_not_relayed() {
    if !privileged("upgrade_headers_on_a_masked_get_are_refused_not_relayed") {
        return;
    }
    let stack = masking_stack().await;
    let script = format!(
        "{PY_GET}{}",
        r#"
for upgrade in ["websocket", "SPDY/3.1"]:
    headers = {"Accept": "application/json", "Connection": "Upgrade", "Upgrade": upgrade}
    status, _, data = get("/api/v1/namespaces/default/secrets/db-creds", headers)
    print("RESULT", status, upgrade)
    print(data.decode("latin-1"))
"#
    );
    let stdout = python_stdout(&stack, &script, "python get with upgrade headers").await;
    assert_clean("get with upgrade headers", &stdout);
    let results: Vec<&str> = stdout.lines().filter(|l| l.starts_with("RESULT")).collect();
    assert_eq!(
        results,
        ["RESULT 400 websocket", "RESULT 400 SPDY/3.1"],
        "{stdout}"
    );
    assert!(
        stdout.contains("a protocol upgrade (WebSocket or SPDY) is accepted only for"),
        "the refusal says why: {stdout}"
    );
    let stopped = stack.stop().await.expect("stop the stack");
    let rows = recorder::read_dir(&stopped.recordings).expect("read recordings");
    let refused = rows
        .iter()
        .filter(|r| {
            r.object_ref.resource == "secrets"
                && r.response_code == 400
                && r.reason
                    .as_deref()
                    .is_some_and(|w| w.contains("protocol upgrade"))
        })
        .count();
    assert_eq!(refused, 2, "both refusals are recorded");
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_to_masked_objects_answer_masked_and_json_patches_cannot_copy_values_out() {
    if !privileged("writes_to_masked_objects_answer_masked_and_json_patches_cannot_copy_values_out")
    {
        return;
    }
    let stack = masking_stack().await;
    // A write answers with the object it wrote: masked too (a dry run writes nothing).
    let patched = kubectl(
        &stack,
        &[
            "patch",
            "secret",
            "db-creds",
            "--type=merge",
            "-p",
            r#"{"metadata":{"labels":{"touched":"yes"}}}"#,
            "--dry-run=server",
            "-o",
            "json",
        ],
    )
    .await;
    let patched: Value = serde_json::from_str(&patched).expect("kubectl prints the patched secret");
    assert_eq!(patched["metadata"]["labels"]["touched"], "yes");
    assert_eq!(patched["data"]["password"], PLACEHOLDER_BASE64);

    // A JSON patch that copies a value where masking does not look is refused.
    let copy = r#"[{"op":"add","path":"/metadata/annotations/x","value":""},{"op":"copy","from":"/data/password","path":"/metadata/annotations/x"}]"#;
    let (cmd, _cache) = kubectl_in_pod(
        &stack,
        &[
            "patch",
            "secret",
            "db-creds",
            "--type=json",
            "-p",
            copy,
            "--dry-run=server",
            "-o",
            "json",
        ],
        &[],
    );
    let out = run(cmd, None, "kubectl patch --type=json copy").await;
    assert!(!out.status.success(), "the copy must be refused");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("Forbidden") && stderr.contains("operation 1 is `copy`"),
        "kubectl shows why: {stderr}"
    );
    assert_clean("refused json patch", &text(&out.stdout));
    assert_clean("refused json patch stderr", &stderr);

    let stopped = stack.stop().await.expect("stop the stack");
    let rows = recorder::read_dir(&stopped.recordings).expect("read recordings");
    assert!(
        rows.iter().any(|r| r.object_ref.resource == "secrets"
            && r.response_code == 403
            && r.reason
                .as_deref()
                .is_some_and(|w| w.contains("JSON patch"))),
        "the refusal is recorded"
    );
}

/// A followed log (`kubectl logs -f`, a `get` that never ends) is a long-lived stream: a
/// policy reload that masks it ends it, so the client's reconnect is masked, instead of
/// the stream going on in clear under the new policy.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_masks_a_followed_log_ends_it() {
    if !privileged("a_reload_that_masks_a_followed_log_ends_it") {
        return;
    }
    let policy = "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules: []\n";
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": "default"},
        "spec": {"nodeName": "sandbox-node", "containers": [{"name": "web", "image": "nginx:1.27"}]},
        "status": {"phase": "Running"}
    });
    let stack = Stack::start(StackOptions {
        policy_yaml: Some(policy.to_owned()),
        seed: vec![pod],
        ..Default::default()
    })
    .await
    .expect("start the stack");
    stack
        .apiserver
        .append_pod_log("default", "web-0", "booted\n");
    let (mut cmd, _cache) = kubectl_in_pod(&stack, &["logs", "-f", "web-0"], &[]);
    let mut follow = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl logs -f");
    let mut stdout = follow.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let started = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 1024];
        while !text(&seen).contains("booted") {
            let n = stdout.read(&mut buf).await.expect("read logs -f");
            assert!(n > 0, "logs -f ended early: {}", text(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(started.is_ok(), "logs -f did not start: {}", text(&seen));

    let masked = policy.replace(
        "rules: []\n",
        "rules:\n  - name: mask-logs\n    action: mask\n    verbs: [get]\n    resources: [pods/log]\n",
    );
    std::fs::write(stack.dir().join("policy.yaml"), masked).expect("rewrite the policy");
    let ended = tokio::time::timeout(Duration::from_secs(30), follow.wait()).await;
    assert!(
        ended.is_ok(),
        "the followed log was not ended by the reload that masks it: {}",
        text(&seen)
    );
}
