//! Real clients in a sandbox pod behave through the gateway exactly as they would against
//! the API server directly: kubectl (reads, watch, apply, patch, scale, delete, exec, cp,
//! logs, port-forward, api-resources, explain, auth can-i) and the official Python client (list,
//! watch, exec over WebSocket). Every request is intercepted by eBPF, attributed to the pod,
//! forwarded with the gateway's credential and recorded.
//!
//! kubectl 1.32's typed clients (`create configmap|secret|deployment|namespace`, `auth
//! can-i`, `auth whoami`) send protobuf bodies. The test server answers protobuf with a 415,
//! so these pass only because the gateway transcodes the bodies to JSON: they are not
//! compared with direct runs, and the test checks the API server received JSON.

use std::{collections::BTreeSet, process::Stdio, time::Duration};

use chaperone_e2e::{
    LIMIT,
    clients::{kubectl, kubectl_env, kubectl_in_pod, ok, python, python_in_pod, run, text},
    privileged,
};
use chaperone_testkit::{
    apiserver::{Authorizer, Denial, DenialTarget},
    demo::demo_objects,
    stack::{SANDBOX_NAMESPACE, SANDBOX_POD, Stack, StackOptions, Stopped},
};
use gateway_userspace::recorder::{self, RequestRecord};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpListener,
    process::{Child, Command},
};

/// Forces kubectl exec/cp onto SPDY (kubectl 1.32 defaults to WebSocket).
const SPDY: (&str, &str) = ("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false");

fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

async fn start() -> Stack {
    Stack::start(StackOptions {
        policy_yaml: None,
        recordings_dir: None,
        seed: demo_objects(),
        approval: false,
        ..Default::default()
    })
    .await
    .expect("start the stack")
}

fn pod_json(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
        "spec": {"nodeName": "sandbox-node", "containers": [{"name": "web", "image": "nginx:1.27"}]},
        "status": {"phase": "Running", "podIP": "10.244.0.12",
                   "containerStatuses": [{"name": "web", "ready": true, "restartCount": 0,
                                          "image": "nginx:1.27", "imageID": "", "started": true,
                                          "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}
    })
}

/// The same kubectl on the node, straight to the API server with the gateway's token: what
/// the pod would see without the gateway in between.
fn kubectl_direct(stack: &Stack, args: &[&str]) -> (Command, tempfile::TempDir) {
    let kubeconfig = stack.dir().join("direct-kubeconfig");
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: direct\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
         users:\n- name: direct\n  user:\n    token: {}\ncontexts:\n- name: direct\n  context:\n    cluster: direct\n    user: direct\n    namespace: default\n\
         current-context: direct\n",
        stack.apiserver.url(),
        stack.dir().join("cluster-ca.crt").display(),
        stack.gateway_token
    );
    std::fs::write(&kubeconfig, config).expect("write the direct kubeconfig");
    let cache = tempfile::tempdir_in(stack.dir()).expect("kubectl cache dir");
    let mut cmd = Command::new("kubectl");
    cmd.arg("--cache-dir")
        .arg(cache.path())
        .args(args)
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", stack.dir())
        .current_dir(stack.dir())
        .kill_on_drop(true);
    (cmd, cache)
}

/// Parses YAML with PyYAML (a dependency of the Python client; this crate has no YAML
/// parser of its own).
async fn yaml_to_json(yaml: &str) -> Value {
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))",
    ])
    .kill_on_drop(true);
    let out = run(cmd, Some(yaml.as_bytes()), "python3 yaml.safe_load").await;
    assert!(out.status.success(), "not YAML ({out:?}): {yaml}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("PyYAML printed no JSON ({e}): {out:?}"))
}

/// Decodes one `application/x-www-form-urlencoded` value (ASCII is all these tests need).
fn form_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(
                    u8::from_str_radix(hex, 16)
                        .unwrap_or_else(|e| panic!("bad escape in {value:?}: {e}")),
                );
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits until the API server has received a request matching `pred`.
async fn wait_for_request(stack: &Stack, what: &str, pred: impl Fn(&str, &str) -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while !stack
            .apiserver
            .requests()
            .iter()
            .any(|r| pred(&r.method, &r.path_and_query))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "{what} never reached the API server: {:#?}",
        stack.apiserver.requests()
    );
}

/// Appends a child's stdout to `seen` until it contains `want` (30 s at most).
async fn read_until(child: &mut Child, seen: &mut Vec<u8>, want: &str, what: &str) {
    let stdout = child
        .stdout
        .as_mut()
        .unwrap_or_else(|| panic!("{what}: stdout not piped"));
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        while !text(seen).contains(want) {
            let n = stdout
                .read(&mut buf)
                .await
                .unwrap_or_else(|e| panic!("{what}: read stdout: {e}"));
            if n == 0 {
                return false;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        true
    })
    .await;
    assert!(
        got == Ok(true),
        "{what}: {want:?} never appeared; output so far: {}",
        text(seen)
    );
}

/// What every client test asserts on the recordings and on what the API server saw.
struct Expect<'a> {
    cgroup_id: i64,
    virtual_api: String,
    /// The processes that made requests (`comm`).
    commands: &'a [&'a str],
    /// (verb, resource, subresource, response code) that must each have a row.
    rows: &'a [(&'a str, &'a str, &'a str, i32)],
    /// Requests the test itself sent straight to the API server (not recorded).
    direct_requests: usize,
}

fn check_recordings(stopped: &Stopped, expect: &Expect<'_>) -> Vec<RequestRecord> {
    let seen = stopped.apiserver.requests();
    assert!(!seen.is_empty(), "nothing reached the API server");
    let gateway_auth = format!("Bearer {}", stopped.gateway_token);
    for r in &seen {
        assert_eq!(
            r.authorization.as_deref(),
            Some(gateway_auth.as_str()),
            "{} {} reached the API server without the gateway token",
            r.method,
            r.path_and_query
        );
        assert!(r.impersonation.is_empty(), "impersonation upstream: {r:?}");
    }
    let rows = recorder::read_dir(&stopped.recordings).expect("read recordings");
    assert_eq!(
        rows.len(),
        seen.len() - expect.direct_requests,
        "one row per request through the gateway expected\nrows: {:#?}\nupstream saw: {seen:#?}",
        rows.iter()
            .map(|r| format!("{} {} {}", r.verb, r.request_uri, r.response_code))
            .collect::<Vec<_>>()
    );
    for row in &rows {
        let what = format!("{} {} ({})", row.verb, row.request_uri, row.response_code);
        assert_eq!(row.workload.cgroup_id, expect.cgroup_id, "{what}: cgroup");
        assert_eq!(
            row.workload.namespace.as_deref(),
            Some(SANDBOX_NAMESPACE),
            "{what}: workload namespace"
        );
        assert_eq!(
            row.workload.pod.as_deref(),
            Some(SANDBOX_POD),
            "{what}: workload pod"
        );
        assert!(
            row.workload
                .command
                .as_deref()
                .is_some_and(|c| expect.commands.contains(&c)),
            "{what}: command {:?} not one of {:?}",
            row.workload.command,
            expect.commands
        );
        assert_eq!(
            row.original_dst.as_deref(),
            Some(expect.virtual_api.as_str()),
            "{what}: original destination"
        );
        assert_eq!(recorder::decision_str(row.decision), "allow", "{what}");
        let debug = format!("{row:?}");
        assert!(
            !debug.contains(&stopped.pod_token) && !debug.contains(&stopped.gateway_token),
            "{what}: a token was recorded"
        );
    }
    for (verb, resource, subresource, code) in expect.rows {
        assert!(
            rows.iter().any(|r| r.verb == *verb
                && r.object_ref.resource == *resource
                && r.object_ref.subresource == *subresource
                && r.response_code == *code),
            "no row for {verb} {resource}/{subresource} -> {code}; rows:\n{}",
            rows.iter()
                .map(|r| format!(
                    "{} {}/{} {} {}",
                    r.verb,
                    r.object_ref.resource,
                    r.object_ref.subresource,
                    r.response_code,
                    r.request_uri
                ))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    rows
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_reads_writes_and_watches_through_the_gateway_as_directly() {
    if !privileged("kubectl_reads_writes_and_watches_through_the_gateway_as_directly") {
        return;
    }
    let stack = start().await;
    let cgroup_id = stack.pod.cgroup_id().expect("pod cgroup id") as i64;
    let virtual_api = stack.pod.virtual_api_server().to_string();

    // Read-only commands print exactly the same through the gateway as directly. The
    // direct runs reach the API server too; count them to match rows with requests later.
    let mut direct_requests = 0;
    for args in [
        &["get", "pods", "-o", "yaml"][..],
        &["api-resources"],
        &["explain", "pods"],
    ] {
        let before = stack.apiserver.requests().len();
        let (cmd, _cache) = kubectl_direct(&stack, args);
        let direct = run(cmd, None, &format!("direct kubectl {args:?}")).await;
        direct_requests += stack.apiserver.requests().len() - before;
        let gw = kubectl(&stack, args).await;
        assert_eq!(
            (gw.status.code(), text(&gw.stdout), text(&gw.stderr)),
            (
                direct.status.code(),
                text(&direct.stdout),
                text(&direct.stderr)
            ),
            "kubectl {args:?}: through the gateway (left) differs from direct (right)"
        );
    }

    // get pods -o yaml
    let yaml = ok(&stack, &["get", "pods", "-o", "yaml"]).await;
    let list = yaml_to_json(&yaml).await;
    assert_eq!(list["kind"], "List", "{yaml}");
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items: {yaml}"))
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["web-0", "web-1"], "{yaml}");
    assert_eq!(list["items"][0]["status"]["phase"], "Running", "{yaml}");
    assert_eq!(list["items"][0]["kind"], "Pod", "{yaml}");

    // api-resources
    let out = ok(&stack, &["api-resources"]).await;
    let table: Vec<Vec<&str>> = out.lines().map(words).collect();
    assert_eq!(
        table[0],
        ["NAME", "SHORTNAMES", "APIVERSION", "NAMESPACED", "KIND"],
        "{out}"
    );
    for want in [
        vec!["configmaps", "cm", "v1", "true", "ConfigMap"],
        vec!["pods", "po", "v1", "true", "Pod"],
        vec!["deployments", "deploy", "apps/v1", "true", "Deployment"],
    ] {
        assert!(table.contains(&want), "missing {want:?} in\n{out}");
    }

    // explain: the field documentation from the server's OpenAPI v3 schemas.
    let containers = ok(&stack, &["explain", "pods.spec.containers"]).await;
    let lines: Vec<&str> = containers.lines().collect();
    assert_eq!(
        lines.iter().take(4).map(|l| words(l)).collect::<Vec<_>>(),
        [
            vec!["KIND:", "Pod"],
            vec!["VERSION:", "v1"],
            vec![],
            vec!["FIELD:", "containers", "<[]Container>"]
        ],
        "{containers}"
    );
    for want in [
        "List of containers belonging to the pod.",
        "A single application container that you want to run within a pod.",
    ] {
        assert!(containers.contains(want), "{want:?} not in\n{containers}");
    }
    for field in [
        ["image", "<string>"],
        ["name", "<string>"],
        ["ports", "<[]ContainerPort>"],
        ["resources", "<ResourceRequirements>"],
    ] {
        assert!(
            lines.iter().any(|l| words(l).starts_with(&field)),
            "no field {field:?} in\n{containers}"
        );
    }
    let replicas = ok(&stack, &["explain", "deployments.spec.replicas"]).await;
    assert!(
        replicas.contains("FIELD: replicas <integer>")
            && replicas.contains("Number of desired pods."),
        "{replicas}"
    );
    let recursive = ok(&stack, &["explain", "configmaps", "--recursive"]).await;
    for want in [
        "data\t<map[string]string>",
        "  metadata\t<ObjectMeta>",
        "    labels\t<map[string]string>",
    ] {
        assert!(recursive.contains(want), "{want:?} not in\n{recursive}");
    }
    let missing = kubectl(&stack, &["explain", "pods.spec.nope"]).await;
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    assert_eq!(
        text(&missing.stderr).trim(),
        "error: field \"nope\" does not exist"
    );
    assert!(
        stack.apiserver.requests().iter().any(|r| r
            .path_and_query
            .starts_with("/openapi/v3/apis/apps/v1?hash=")),
        "explain did not fetch the apps/v1 OpenAPI document"
    );

    // Typed clients: protobuf bodies the gateway transcodes (the server refuses protobuf).
    let can_i = ok(&stack, &["auth", "can-i", "get", "pods"]).await;
    assert_eq!(can_i.trim(), "yes");
    stack.apiserver.set_authorizer(Authorizer::allow_all().deny(
        Denial::anyone("delete", DenialTarget::resource("configmaps")).because("read-only agents"),
    ));
    let cannot = kubectl(&stack, &["auth", "can-i", "delete", "configmaps"]).await;
    assert_eq!(cannot.status.code(), Some(1), "{cannot:?}");
    assert_eq!(
        text(&cannot.stdout).trim(),
        "no - read-only agents",
        "{cannot:?}"
    );
    stack.apiserver.set_authorizer(Authorizer::allow_all());
    let list = ok(&stack, &["auth", "can-i", "--list"]).await;
    assert_eq!(
        words(list.lines().next().unwrap_or_default()),
        [
            "Resources",
            "Non-Resource",
            "URLs",
            "Resource",
            "Names",
            "Verbs"
        ],
        "{list}"
    );
    let whoami = yaml_to_json(&ok(&stack, &["auth", "whoami", "-o", "json"]).await).await;
    assert_eq!(whoami["kind"], "SelfSubjectReview", "{whoami}");
    assert_eq!(
        whoami["status"]["userInfo"]["username"], "system:admin",
        "the API server sees the gateway's identity: {whoami}"
    );
    assert_eq!(
        ok(
            &stack,
            &["create", "configmap", "typed", "--from-literal=mode=fast"]
        )
        .await
        .trim(),
        "configmap/typed created"
    );
    assert_eq!(
        ok(
            &stack,
            &[
                "create",
                "secret",
                "generic",
                "db",
                "--from-literal=password=hunter2"
            ]
        )
        .await
        .trim(),
        "secret/db created"
    );
    assert_eq!(
        ok(
            &stack,
            &[
                "create",
                "deployment",
                "web",
                "--image=nginx:1.27",
                "--replicas=2"
            ]
        )
        .await
        .trim(),
        "deployment.apps/web created"
    );
    let cm = stack
        .apiserver
        .object("configmaps", "default", "typed")
        .expect("typed configmap stored");
    assert_eq!(cm["data"], json!({"mode": "fast"}), "{cm}");
    let secret = stack
        .apiserver
        .object("secrets", "default", "db")
        .expect("secret stored");
    assert_eq!(
        secret["data"],
        json!({"password": "aHVudGVyMg=="}),
        "{secret}"
    );
    let deployment = stack
        .apiserver
        .object("deployments", "default", "web")
        .expect("deployment stored");
    assert_eq!(deployment["spec"]["replicas"], 2, "{deployment}");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"], "nginx:1.27",
        "{deployment}"
    );
    let typed: Vec<_> = stack
        .apiserver
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert!(typed.len() >= 6, "{typed:#?}");
    for r in &typed {
        assert_eq!(
            r.content_type.as_deref(),
            Some("application/json"),
            "{} {} reached the API server without being transcoded",
            r.method,
            r.path_and_query
        );
    }

    // scale: a merge patch of the Scale; with --current-replicas a GET of the Scale, then a
    // PUT of it (client-go's scale client: JSON, no Content-Type on the PUT).
    assert_eq!(
        ok(&stack, &["scale", "deployment", "web", "--replicas=3"])
            .await
            .trim(),
        "deployment.apps/web scaled"
    );
    let scaled = stack
        .apiserver
        .object("deployments", "default", "web")
        .expect("deployment stored");
    assert_eq!(scaled["spec"]["replicas"], 3, "{scaled}");
    assert_eq!(scaled["metadata"]["generation"], 2, "{scaled}");
    let patch = stack
        .apiserver
        .requests()
        .into_iter()
        .rfind(|r| r.method == "PATCH")
        .expect("no PATCH for kubectl scale");
    assert_eq!(
        (patch.path_and_query.as_str(), patch.content_type.as_deref()),
        (
            "/apis/apps/v1/namespaces/default/deployments/web/scale",
            Some("application/merge-patch+json")
        ),
        "{patch:?}"
    );
    assert_eq!(
        ok(
            &stack,
            &[
                "scale",
                "deployment",
                "web",
                "--current-replicas=3",
                "--replicas=1"
            ]
        )
        .await
        .trim(),
        "deployment.apps/web scaled"
    );
    let scaled = stack
        .apiserver
        .object("deployments", "default", "web")
        .expect("deployment stored");
    assert_eq!(scaled["spec"]["replicas"], 1, "{scaled}");
    let stale = kubectl(
        &stack,
        &[
            "scale",
            "deployment",
            "web",
            "--current-replicas=3",
            "--replicas=2",
        ],
    )
    .await;
    assert_eq!(stale.status.code(), Some(1), "{stale:?}");
    assert_eq!(
        text(&stale.stderr).trim(),
        "error: Expected replicas to be 3, was 1",
        "{stale:?}"
    );
    let missing = kubectl(&stack, &["scale", "statefulset", "nope", "--replicas=2"]).await;
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    assert_eq!(
        text(&missing.stderr).trim(),
        "error: no objects passed to scale statefulsets.apps \"nope\" not found",
        "{missing:?}"
    );

    // get pods -w: the list, then a pod created meanwhile.
    let (mut cmd, _cache) = kubectl_in_pod(&stack, &["get", "pods", "-w"], &[]);
    let mut watch = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl get pods -w");
    let stdout = watch.stdout.take().expect("watch stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let read = async {
        while seen.len() < 3 {
            match lines.next_line().await {
                Ok(Some(line)) => seen.push(line),
                other => panic!("kubectl get -w ended early: {other:?} after {seen:?}"),
            }
        }
        wait_for_request(&stack, "kubectl's pod watch", |_, p| {
            p.starts_with("/api/v1/namespaces/default/pods?") && p.contains("watch=true")
        })
        .await;
        stack.apiserver.seed(pod_json("web-2")).expect("seed web-2");
        match lines.next_line().await {
            Ok(Some(line)) => seen.push(line),
            other => panic!("no watch event line: {other:?} after {seen:?}"),
        }
    };
    let done = tokio::time::timeout(Duration::from_secs(30), read).await;
    let _ = watch.kill().await;
    assert!(done.is_ok(), "kubectl get pods -w timed out; saw {seen:?}");
    assert_eq!(
        words(&seen[0]),
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        "{seen:?}"
    );
    assert_eq!(
        words(&seen[1])[..3],
        ["web-0", "1/1", "Running"],
        "{seen:?}"
    );
    assert_eq!(
        words(&seen[2])[..3],
        ["web-1", "1/1", "Running"],
        "{seen:?}"
    );
    assert_eq!(
        words(&seen[3])[..3],
        ["web-2", "1/1", "Running"],
        "{seen:?}"
    );

    // Client-side apply: create, unchanged, configure.
    let file = stack.dir().join("app-cm.yaml");
    let write_cm = |value: &str| {
        std::fs::write(
            &file,
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\ndata:\n  a: \"{value}\"\n"
            ),
        )
        .expect("write the manifest");
    };
    let file_arg = file.display().to_string();
    write_cm("1");
    assert_eq!(
        ok(&stack, &["apply", "-f", &file_arg]).await.trim(),
        "configmap/app created"
    );
    assert_eq!(
        ok(&stack, &["apply", "-f", &file_arg]).await.trim(),
        "configmap/app unchanged"
    );
    write_cm("2");
    assert_eq!(
        ok(&stack, &["apply", "-f", &file_arg]).await.trim(),
        "configmap/app configured"
    );
    let stored = stack
        .apiserver
        .object("configmaps", "default", "app")
        .expect("app not stored");
    assert_eq!(stored["data"], json!({"a": "2"}));
    assert!(
        stored["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .is_string(),
        "{stored}"
    );

    // Server-side apply.
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\ndata:\n  a: \"2\"\n  s: ssa\n",
    )
    .expect("write the manifest");
    assert_eq!(
        ok(&stack, &["apply", "--server-side", "-f", &file_arg])
            .await
            .trim(),
        "configmap/app serverside-applied"
    );
    let ssa = stack
        .apiserver
        .requests()
        .into_iter()
        .rfind(|r| r.method == "PATCH")
        .expect("no PATCH for server-side apply");
    assert_eq!(
        ssa.content_type.as_deref(),
        Some("application/apply-patch+yaml"),
        "{ssa:?}"
    );

    // Merge patch.
    assert_eq!(
        ok(
            &stack,
            &[
                "patch",
                "configmap",
                "app",
                "--type=merge",
                "-p",
                r#"{"data":{"m":"merged"}}"#
            ]
        )
        .await
        .trim(),
        "configmap/app patched"
    );
    let stored = stack
        .apiserver
        .object("configmaps", "default", "app")
        .expect("app not stored");
    assert_eq!(
        stored["data"],
        json!({"a": "2", "s": "ssa", "m": "merged"}),
        "{stored}"
    );

    // Delete, then it is gone.
    assert_eq!(
        ok(&stack, &["delete", "configmap", "app"]).await.trim(),
        "configmap \"app\" deleted"
    );
    assert!(
        stack
            .apiserver
            .object("configmaps", "default", "app")
            .is_none()
    );
    let gone = kubectl(&stack, &["get", "configmap", "app"]).await;
    assert_eq!(gone.status.code(), Some(1), "{gone:?}");
    assert_eq!(
        text(&gone.stderr).trim(),
        "Error from server (NotFound): configmaps \"app\" not found"
    );

    let stopped = stack.stop().await.expect("stop the stack");
    let rows = check_recordings(
        &stopped,
        &Expect {
            cgroup_id,
            virtual_api,
            commands: &["kubectl"],
            rows: &[
                ("list", "pods", "", 200),
                ("watch", "pods", "", 200),
                ("create", "selfsubjectaccessreviews", "", 201),
                ("create", "selfsubjectrulesreviews", "", 201),
                ("create", "selfsubjectreviews", "", 201),
                ("create", "secrets", "", 201),
                ("create", "deployments", "", 201),
                ("patch", "deployments", "scale", 200),
                ("get", "deployments", "scale", 200),
                ("update", "deployments", "scale", 200),
                ("get", "configmaps", "", 404),
                ("create", "configmaps", "", 201),
                ("patch", "configmaps", "", 200),
                ("delete", "configmaps", "", 200),
            ],
            direct_requests,
        },
    );
    // The typed clients' protobuf bodies are recorded as the objects they carry, the
    // Secret's value masked in the request and in the response.
    let secret_row = rows
        .iter()
        .find(|r| r.verb == "create" && r.object_ref.resource == "secrets")
        .expect("secret row");
    assert_eq!(
        secret_row.request_content_type.as_deref(),
        Some("application/vnd.kubernetes.protobuf")
    );
    for object in [&secret_row.request_object, &secret_row.response_object] {
        let object = object.as_deref().expect("secret object recorded");
        assert!(object.contains("\"password\":\"**masked**\""), "{object}");
        assert!(!object.contains("aHVudGVyMg"), "{object}");
    }
    let deployment_row = rows
        .iter()
        .find(|r| r.verb == "create" && r.object_ref.resource == "deployments")
        .expect("deployment row");
    let recorded: Value = serde_json::from_str(
        deployment_row
            .request_object
            .as_deref()
            .expect("deployment recorded"),
    )
    .expect("recorded object is JSON");
    assert_eq!(recorded["spec"]["replicas"], 2, "{recorded}");

    // Client-side configure, server-side apply (plus kubectl's update of the client-side
    // last-applied annotation, as it does for objects that have one) and the merge patch.
    let managers: Vec<&str> = rows
        .iter()
        .filter(|r| r.verb == "patch" && r.object_ref.resource == "configmaps")
        .filter_map(|r| r.request_uri.split("fieldManager=").nth(1))
        .filter_map(|q| q.split('&').next())
        .collect();
    assert_eq!(
        managers,
        [
            "kubectl-client-side-apply",
            "kubectl",
            "kubectl-last-applied",
            "kubectl-patch"
        ],
        "patch rows"
    );
    let kubectl_commands: BTreeSet<&str> = rows
        .iter()
        .filter_map(|r| r.kubectl_command.as_deref())
        .collect();
    for want in [
        "kubectl get",
        "kubectl apply",
        "kubectl patch",
        "kubectl delete",
        "kubectl explain",
        "kubectl scale",
        "kubectl auth can-i",
        "kubectl api-resources",
    ] {
        assert!(
            kubectl_commands.contains(want),
            "no row with kubectl_command {want:?}: {kubectl_commands:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_exec_cp_logs_and_port_forward_through_the_gateway() {
    if !privileged("kubectl_exec_cp_logs_and_port_forward_through_the_gateway") {
        return;
    }
    let stack = start().await;
    let cgroup_id = stack.pod.cgroup_id().expect("pod cgroup id") as i64;
    let virtual_api = stack.pod.virtual_api_server().to_string();
    let pod_dir = stack
        .apiserver
        .pod_dir("default", "web-0")
        .expect("web-0's directory");

    for (transport, env) in [("WebSocket", &[][..]), ("SPDY", &[SPDY][..])] {
        // exec -i with stdin
        let input = b"first line\nsecond line\n".repeat(1000);
        let out = kubectl_env(
            &stack,
            &["exec", "-i", "web-0", "--", "cat"],
            env,
            Some(&input),
        )
        .await;
        assert!(out.status.success(), "{transport}: exec -i cat: {out:?}");
        assert!(
            out.stdout == input,
            "{transport}: stdin did not round-trip ({} of {} bytes back)",
            out.stdout.len(),
            input.len()
        );

        // Non-interactive exec propagates the exit code and keeps the streams apart.
        let out = kubectl_env(
            &stack,
            &[
                "exec",
                "web-0",
                "--",
                "sh",
                "-c",
                "echo out; echo err >&2; exit 7",
            ],
            env,
            None,
        )
        .await;
        assert_eq!(out.status.code(), Some(7), "{transport}: {out:?}");
        assert_eq!(text(&out.stdout), "out\n", "{transport}");
        assert_eq!(
            text(&out.stderr),
            "err\ncommand terminated with exit code 7\n",
            "{transport}"
        );

        // cp both ways (tar over exec).
        let content = format!("copied over {transport}\n").repeat(300);
        let up = stack.dir().join("up.txt");
        std::fs::write(&up, &content).expect("write up.txt");
        let remote = format!("web-0:up-{transport}.txt");
        let out = kubectl_env(
            &stack,
            &["cp", &up.display().to_string(), &remote],
            env,
            None,
        )
        .await;
        assert!(out.status.success(), "{transport}: cp up: {out:?}");
        assert_eq!(
            std::fs::read_to_string(pod_dir.join(format!("up-{transport}.txt")))
                .expect("uploaded file"),
            content,
            "{transport}: cp up"
        );
        let down = stack.dir().join(format!("down-{transport}.txt"));
        let out = kubectl_env(
            &stack,
            &["cp", &remote, &down.display().to_string()],
            env,
            None,
        )
        .await;
        assert!(out.status.success(), "{transport}: cp down: {out:?}");
        assert_eq!(
            std::fs::read_to_string(&down).expect("downloaded file"),
            content,
            "{transport}: cp down"
        );
    }

    // logs, then logs -f seeing a line appended meanwhile.
    stack
        .apiserver
        .append_pod_log("default", "web-0", "booted\n");
    assert_eq!(ok(&stack, &["logs", "web-0"]).await, "booted\n");
    let (mut cmd, _cache) = kubectl_in_pod(&stack, &["logs", "-f", "web-0"], &[]);
    let mut follow = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl logs -f");
    let mut seen = Vec::new();
    read_until(&mut follow, &mut seen, "booted\n", "logs -f").await;
    stack
        .apiserver
        .append_pod_log("default", "web-0", "serving\n");
    read_until(&mut follow, &mut seen, "serving\n", "logs -f").await;
    let _ = follow.kill().await;
    assert_eq!(text(&seen), "booted\nserving\n");

    // port-forward to an echo listener on the node's 127.0.0.1 (the test server's
    // "kubelet" dials it there); kubectl's local port is inside the pod's namespace, so
    // the client connecting to it runs in the pod too.
    let target = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let remote = target.local_addr().expect("echo addr").port();
    let echo = tokio::spawn(async move {
        while let Ok((mut conn, _)) = target.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let (mut cmd, _cache) = kubectl_in_pod(
        &stack,
        &["port-forward", "web-0", &format!(":{remote}")],
        &[],
    );
    let mut forward = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl port-forward");
    let mut seen = Vec::new();
    read_until(&mut forward, &mut seen, "\n", "port-forward").await;
    // "Forwarding from 127.0.0.1:41234 -> 40000"
    let banner = text(&seen);
    let local: u16 = banner
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("Forwarding from 127.0.0.1:"))
        .and_then(|l| l.split_once(" -> "))
        .filter(|(_, r)| *r == remote.to_string())
        .and_then(|(l, _)| l.parse().ok())
        .unwrap_or_else(|| panic!("unexpected port-forward banner: {banner:?}"));
    let script = format!(
        "import socket\n\
         for i in range(2):\n\
         \x20   s = socket.create_connection(('127.0.0.1', {local}), timeout=10)\n\
         \x20   msg = b'ping %d through the gateway' % i\n\
         \x20   s.sendall(msg)\n\
         \x20   got = b''\n\
         \x20   while len(got) < len(msg):\n\
         \x20       chunk = s.recv(4096)\n\
         \x20       assert chunk, 'connection closed after %r' % got\n\
         \x20       got += chunk\n\
         \x20   print(got.decode())\n\
         \x20   s.close()\n"
    );
    let echoed = python(&stack, &script, "port-forward client in the pod").await;
    let _ = forward.kill().await;
    echo.abort();
    assert_eq!(
        echoed,
        "ping 0 through the gateway\nping 1 through the gateway\n"
    );

    let stopped = stack.stop().await.expect("stop the stack");
    let rows = check_recordings(
        &stopped,
        &Expect {
            cgroup_id,
            virtual_api,
            // The port-forward client is Python, and it never talks to the API server.
            commands: &["kubectl"],
            rows: &[
                ("get", "pods", "exec", 101),
                ("create", "pods", "exec", 101),
                ("get", "pods", "log", 200),
                ("get", "pods", "portforward", 101),
            ],
            direct_requests: 0,
        },
    );
    // Per transport (WebSocket GET, SPDY POST): exec -i cat, the exit-7 command, `cp` up
    // (tar extracting stdin), `cp` down (tar writing stdout).
    // `cp` up first asks whether the destination is a directory, then untars stdin.
    let execs: Vec<(&str, String)> = rows
        .iter()
        .filter(|r| r.object_ref.subresource == "exec")
        .inspect(|r| {
            assert_eq!(
                (r.object_ref.namespace.as_str(), r.object_ref.name.as_str()),
                ("default", "web-0"),
                "{r:?}"
            );
            // Bytes flowed back (the stream protocol's status at least); `cp` down sends
            // no stdin, so request bytes may be zero.
            assert!(
                r.response_code == 101 && r.response_bytes > 0 && r.error.is_none(),
                "{r:?}"
            );
        })
        .map(|r| {
            let argv: Vec<String> = r
                .request_uri
                .split(['?', '&'])
                .filter_map(|kv| kv.strip_prefix("command="))
                .map(form_decode)
                .collect();
            (r.verb.as_str(), argv.join(" "))
        })
        .collect();
    let mut want = Vec::new();
    for (verb, transport) in [("get", "WebSocket"), ("create", "SPDY")] {
        want.extend([
            (verb, "cat".to_owned()),
            (verb, "sh -c echo out; echo err >&2; exit 7".to_owned()),
            (verb, format!("test -d up-{transport}.txt")),
            (verb, "tar -xmf - -C .".to_owned()),
            (verb, format!("tar cf - up-{transport}.txt")),
        ]);
    }
    assert_eq!(execs, want, "exec rows (verb, command)");
}

#[tokio::test(flavor = "multi_thread")]
async fn python_client_lists_watches_and_execs_through_the_gateway() {
    if !privileged("python_client_lists_watches_and_execs_through_the_gateway") {
        return;
    }
    let stack = start().await;
    let cgroup_id = stack.pod.cgroup_id().expect("pod cgroup id") as i64;
    let virtual_api = stack.pod.virtual_api_server().to_string();

    let script = r#"
import os
from kubernetes import client, config, watch
from kubernetes.stream import stream

# The kubeconfig an in-cluster agent would have: virtual API address, cluster CA, own token.
config.load_kube_config(config_file=os.environ["KUBECONFIG"])
v1 = client.CoreV1Api()

pods = v1.list_namespaced_pod("default")
print("pods", ",".join(sorted(p.metadata.name for p in pods.items)))

w = watch.Watch()
for ev in w.stream(v1.list_namespaced_config_map, "default", timeout_seconds=30):
    obj = ev["object"]
    print("event", ev["type"], obj.metadata.name, obj.data.get("k"))
    if obj.metadata.name == "from-test":
        w.stop()

resp = stream(
    v1.connect_get_namespaced_pod_exec, "web-0", "default",
    command=["sh", "-c", "echo hi; exit 3"],
    stderr=True, stdin=False, stdout=True, tty=False, _preload_content=False,
)
resp.run_forever(timeout=20)
print("stdout", repr(resp.read_stdout()))
print("returncode", resp.returncode)
resp.close()
"#;
    let mut cmd = python_in_pod(&stack, script);
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3 in the pod");
    wait_for_request(&stack, "the Python client's configmap watch", |_, p| {
        // The Python client spells booleans the Python way: watch=True.
        p.starts_with("/api/v1/namespaces/default/configmaps?")
            && p.to_ascii_lowercase().contains("watch=true")
    })
    .await;
    stack
        .apiserver
        .seed(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "from-test", "namespace": "default"},
            "data": {"k": "v"}
        }))
        .expect("seed the configmap");
    let out = match tokio::time::timeout(LIMIT, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("python3: {e}"),
        Err(_) => panic!("the Python client did not finish within {LIMIT:?}"),
    };
    assert!(
        out.status.success(),
        "python3 failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(
        text(&out.stdout),
        "pods web-0,web-1\nevent ADDED from-test v\nstdout 'hi\\n'\nreturncode 3\n",
        "stderr: {}",
        text(&out.stderr)
    );

    let stopped = stack.stop().await.expect("stop the stack");
    let rows = check_recordings(
        &stopped,
        &Expect {
            cgroup_id,
            virtual_api,
            commands: &["python3"],
            rows: &[
                ("list", "pods", "", 200),
                ("watch", "configmaps", "", 200),
                ("get", "pods", "exec", 101),
            ],
            direct_requests: 0,
        },
    );
    assert_eq!(rows.len(), 3, "exactly list, watch and exec");
    let upstream = stopped.apiserver.requests();
    for row in &rows {
        // The REST calls carry the generated client's User-Agent; the WebSocket library the
        // exec goes through sends none. Either way the gateway records what it got and
        // passes it on unchanged.
        let seen = upstream
            .iter()
            .find(|r| r.path_and_query == row.request_uri)
            .unwrap_or_else(|| panic!("{} never reached the API server", row.request_uri));
        assert_eq!(row.user_agent, seen.user_agent, "{row:?}");
        if row.object_ref.subresource.is_empty() {
            assert!(
                row.user_agent
                    .as_deref()
                    .is_some_and(|ua| ua.starts_with("OpenAPI-Generator/")),
                "{row:?}"
            );
        }
        assert_eq!(row.kubectl_command, None, "{row:?}");
    }
}

/// `curl` from the sandbox pod to the API server's virtual address: (HTTP code, body).
async fn curl_in_pod(stack: &Stack, path: &str) -> (String, String) {
    let url = format!("https://{}{path}", stack.pod.virtual_api_server());
    let mut curl = stack.pod.command("curl");
    curl.args([
        "-sk",
        "-w",
        "\n%{http_code}",
        "-H",
        &format!("Authorization: Bearer {}", stack.pod_token),
        &url,
    ]);
    let out = tokio::task::spawn_blocking(move || curl.output())
        .await
        .expect("join")
        .expect("run curl in the pod");
    let stdout = text(&out.stdout);
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    (code.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_not_listed_yet_or_missed_by_a_failing_watch_is_never_decided_as_unknown() {
    if !privileged("a_pod_not_listed_yet_or_missed_by_a_failing_watch_is_never_decided_as_unknown")
    {
        return;
    }
    let stack = start().await;
    let pods = stack.app.identity().pods().clone();
    // As right after a start: a watch feeds the store and has not listed this node's pods.
    pods.expect_list();
    pods.delete(&stack.pod_object);
    let path = "/api/v1/namespaces/default/pods";
    let (code, body) = curl_in_pod(&stack, path).await;
    assert_eq!(code, "503", "{body}");
    assert!(
        body.contains("\"kind\":\"Status\"") && body.contains("pods are not listed yet"),
        "{body}"
    );
    // The list arrives while a connection waits for it: the pod is named and served.
    let listed = pods.clone();
    let pod = stack.pod_object.clone();
    let list = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        listed.resync(&[pod]);
    });
    let (code, body) = curl_in_pod(&stack, path).await;
    list.await.expect("the list task");
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("web-0"), "{body}");
    let admin = stack.app.admin_addr();
    assert_eq!(chaperone_e2e::admin_get(admin, "/readyz").await.0, 200);

    // Listed, then the watch fails: a pod it does not know may be one it has not
    // delivered, so it is not decided as an unknown workload either.
    pods.watch_failed("the watch of pods answered 500");
    pods.delete(&stack.pod_object);
    let (code, body) = curl_in_pod(&stack, path).await;
    assert_eq!(code, "503", "{body}");
    assert!(
        body.contains("watch of this node's pods is failing (the watch of pods answered 500)"),
        "{body}"
    );
    // The state shows in /readyz and /status (what `chaperone status` prints).
    let (code, ready) = chaperone_e2e::admin_get(admin, "/readyz").await;
    assert_eq!(code, 503, "{ready}");
    assert!(ready.contains("answered 500"), "{ready}");
    let (_, status) = chaperone_e2e::admin_get(admin, "/status").await;
    let status: Value = serde_json::from_str(&status).expect("status JSON");
    assert_eq!(status["pods"]["listed"], true, "{status}");
    assert_eq!(
        status["pods"]["watch_error"], "the watch of pods answered 500",
        "{status}"
    );
    // The watch delivers the pod again: it is named and served.
    pods.watch_ok();
    pods.apply(&stack.pod_object);
    let (code, body) = curl_in_pod(&stack, path).await;
    assert_eq!(code, "200", "{body}");
    assert_eq!(chaperone_e2e::admin_get(admin, "/readyz").await.0, 200);

    // Every request is recorded: the refusals with no pod named, the answers with it.
    let stopped = stack.stop().await.expect("stop the stack");
    let rows = recorder::read_dir(&stopped.recordings).expect("read recordings");
    assert_eq!(rows.len(), 4, "{rows:#?}");
    let failing = &rows[2];
    assert_eq!(failing.response_code, 503, "{failing:#?}");
    assert!(failing.workload.pod.is_none(), "{failing:#?}");
    assert_eq!(rows[3].workload.pod.as_deref(), Some(SANDBOX_POD));
    let (refused, served) = (&rows[0], &rows[1]);
    assert_eq!(refused.response_code, 503, "{refused:#?}");
    assert!(
        refused
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("not listed yet"),
        "{refused:#?}"
    );
    assert_eq!(served.response_code, 200, "{served:#?}");
    assert_eq!(
        served.workload.pod.as_deref(),
        Some(SANDBOX_POD),
        "{served:#?}"
    );
}
