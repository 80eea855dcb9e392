//! Real kubectl (v1.32, `/usr/bin/kubectl`) against the Kubernetes API test server.
//!
//! Each test starts its own server on 127.0.0.1 and writes a kubeconfig (server URL, CA
//! file, bearer token) plus a fresh discovery cache directory, so nothing is shared with
//! other tests or the user's `~/.kube`.
//!
//! Which kubectl commands work against the test server (and so in the demo):
//! * `get` (tables, `-o wide/json/yaml/name`, `-w`, `-A`, `-l`), `api-resources`,
//!   `version`, `patch` (merge, json, strategic), `delete`, `label`/`annotate`;
//! * `create -f FILE`, `apply -f FILE` (client-side) and `apply --server-side -f FILE`,
//!   with or without `--validate=false` (the server publishes just enough OpenAPI v3 for
//!   kubectl to leave validation to the server; it does not reject unknown fields);
//! * not: typed-client commands that send protobuf bodies (`create configmap|secret|
//!   namespace ...`): the server answers 415, as tested below.

use std::{path::PathBuf, process::Output, time::Duration};

use chaperone_testkit::apiserver::{ApiServerConfig, TestApiServer};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::Command,
};

const KUBECTL: &str = "/usr/bin/kubectl";
const TOKEN: &str = "test-token-0123456789";

struct Cluster {
    server: TestApiServer,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        let server = TestApiServer::start(ApiServerConfig::with_tokens([TOKEN]))
            .await
            .unwrap_or_else(|e| panic!("start test API server: {e}"));
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let cluster = Cluster { server, dir };
        cluster.write_kubeconfig("kubeconfig", TOKEN);
        cluster
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write_kubeconfig(&self, name: &str, token: &str) {
        let ca = self.path("ca.crt");
        std::fs::write(&ca, self.server.ca_pem()).unwrap_or_else(|e| panic!("write ca: {e}"));
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: test\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: default\ncurrent-context: test\n",
            self.server.url(),
            ca.display()
        );
        std::fs::write(self.path(name), kubeconfig)
            .unwrap_or_else(|e| panic!("write kubeconfig: {e}"));
    }

    fn command(&self, kubeconfig: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(KUBECTL);
        cmd.arg("--kubeconfig")
            .arg(self.path(kubeconfig))
            .arg("--cache-dir")
            .arg(self.path("cache"))
            .args(args)
            .env_clear()
            .env("HOME", self.dir.path())
            .env("PATH", "/usr/bin:/bin")
            .kill_on_drop(true);
        cmd
    }

    async fn run_with(&self, kubeconfig: &str, args: &[&str]) -> Output {
        let run = self.command(kubeconfig, args).output();
        match tokio::time::timeout(Duration::from_secs(60), run).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => panic!("run kubectl {args:?}: {e}"),
            Err(_) => panic!("kubectl {args:?} did not finish within 60 s"),
        }
    }

    async fn kubectl(&self, args: &[&str]) -> Output {
        self.run_with("kubeconfig", args).await
    }

    /// Runs kubectl and requires success, returning stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args).await;
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\nstderr: {}",
            out.status,
            stderr(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn write(&self, name: &str, content: &str) -> String {
        let path = self.path(name);
        std::fs::write(&path, content).unwrap_or_else(|e| panic!("write {name}: {e}"));
        path.display().to_string()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

fn seed_pod(server: &TestApiServer, name: &str) {
    server
        .seed(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "nginx"}]},
            "status": {"phase": "Running", "podIP": "10.1.2.3", "containerStatuses": [
                {"name": "c", "ready": true, "restartCount": 0, "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}}}
            ]}
        }))
        .unwrap_or_else(|e| panic!("seed pod: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_pods_prints_the_server_side_table() {
    let c = Cluster::start().await;
    seed_pod(&c.server, "web-0");

    let out = c.ok(&["get", "pods"]).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        words(lines[0]),
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        "{out}"
    );
    assert_eq!(
        words(lines[1])[..4],
        ["web-0", "1/1", "Running", "0"],
        "{out}"
    );
    assert_eq!(lines.len(), 2, "{out}");

    let wide = c.ok(&["get", "pods", "-o", "wide"]).await;
    let lines: Vec<&str> = wide.lines().collect();
    assert_eq!(
        words(lines[0]),
        [
            "NAME",
            "READY",
            "STATUS",
            "RESTARTS",
            "AGE",
            "IP",
            "NODE",
            "NOMINATED",
            "NODE",
            "READINESS",
            "GATES"
        ],
        "{wide}"
    );
    let row = words(lines[1]);
    assert_eq!(
        (row[5], row[6], row[7], row[8]),
        ("10.1.2.3", "node-1", "<none>", "<none>"),
        "{wide}"
    );

    // kubectl asked for a Table, over HTTP/2, with the token, as kubectl/v1.32.
    let seen = c.server.requests();
    let list = seen
        .iter()
        .find(|r| {
            r.path_and_query
                .starts_with("/api/v1/namespaces/default/pods?")
        })
        .unwrap_or_else(|| panic!("no pod list in {seen:#?}"));
    assert!(
        list.accept
            .as_deref()
            .is_some_and(|a| a.starts_with("application/json;as=Table;v=v1;g=meta.k8s.io")),
        "{list:?}"
    );
    assert!(list.path_and_query.contains("limit=500"), "{list:?}");
    assert_eq!(
        list.authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert!(
        list.user_agent
            .as_deref()
            .is_some_and(|ua| ua.starts_with("kubectl/v1.32")),
        "{list:?}"
    );
    assert_eq!(list.http_version, "HTTP/2.0");

    let none = c.ok(&["get", "pods", "-n", "kube-system"]).await;
    assert_eq!(none, "", "an empty table prints nothing on stdout");
    c.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_namespace_as_json_and_namespaces_table() {
    let c = Cluster::start().await;
    let out = c.ok(&["get", "ns", "default", "-o", "json"]).await;
    let ns: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("kubectl output is not JSON ({e}): {out}"));
    assert_eq!(ns["kind"], "Namespace");
    assert_eq!(ns["apiVersion"], "v1");
    assert_eq!(ns["metadata"]["name"], "default");
    assert_eq!(ns["status"]["phase"], "Active");
    assert!(
        ns["metadata"]["resourceVersion"]
            .as_str()
            .is_some_and(|rv| !rv.is_empty()),
        "{ns}"
    );

    let table = c.ok(&["get", "namespaces"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(words(lines[0]), ["NAME", "STATUS", "AGE"], "{table}");
    let names: Vec<&str> = lines[1..].iter().map(|l| words(l)[0]).collect();
    assert_eq!(
        names,
        ["default", "kube-node-lease", "kube-public", "kube-system"],
        "{table}"
    );
    assert!(
        lines[1..].iter().all(|l| words(l)[1] == "Active"),
        "{table}"
    );

    let missing = c.kubectl(&["get", "ns", "nope"]).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("Error from server (NotFound): namespaces \"nope\" not found"),
        "{}",
        stderr(&missing)
    );
    c.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_lifecycle() {
    let c = Cluster::start().await;

    // The typed client sends a protobuf body, which the server does not decode (yet).
    let typed = c
        .kubectl(&["create", "configmap", "x", "--from-literal=a=b"])
        .await;
    assert_eq!(typed.status.code(), Some(1), "{}", stderr(&typed));
    assert!(
        stderr(&typed).contains("error: failed to create configmap: the body of the request was in an unknown format (application/vnd.kubernetes.protobuf)"),
        "{}",
        stderr(&typed)
    );
    let post = c
        .server
        .requests()
        .into_iter()
        .rfind(|r| r.method == "POST")
        .unwrap_or_else(|| panic!("no POST seen"));
    assert_eq!(
        post.content_type.as_deref(),
        Some("application/vnd.kubernetes.protobuf")
    );

    let file = c.write("cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  labels:\n    app: demo\ndata:\n  a: b\n");
    let created = c.ok(&["create", "-f", &file, "--validate=false"]).await;
    assert_eq!(created.trim(), "configmap/x created");

    let again = c
        .kubectl(&["create", "-f", &file, "--validate=false"])
        .await;
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("Error from server (AlreadyExists): error when creating"),
        "{}",
        stderr(&again)
    );
    assert!(
        stderr(&again).contains("configmaps \"x\" already exists"),
        "{}",
        stderr(&again)
    );

    let yaml = c.ok(&["get", "cm", "x", "-o", "yaml"]).await;
    let cm: Value =
        serde_norway::from_str(&yaml).unwrap_or_else(|e| panic!("not YAML ({e}): {yaml}"));
    assert_eq!(
        (cm["kind"].as_str(), cm["data"]["a"].as_str()),
        (Some("ConfigMap"), Some("b")),
        "{yaml}"
    );
    assert_eq!(cm["metadata"]["namespace"], "default");
    assert!(
        cm["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty()),
        "{yaml}"
    );

    let table = c.ok(&["get", "configmaps", "-l", "app=demo"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(words(lines[0]), ["NAME", "DATA", "AGE"], "{table}");
    assert_eq!(words(lines[1])[..2], ["x", "1"], "{table}");

    let patched = c
        .ok(&[
            "patch",
            "cm",
            "x",
            "--type=merge",
            "-p",
            r#"{"data":{"a":"c","d":"e"}}"#,
        ])
        .await;
    assert_eq!(patched.trim(), "configmap/x patched");
    let json_patched = c
        .ok(&[
            "patch",
            "cm",
            "x",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/data/d"}]"#,
        ])
        .await;
    assert_eq!(json_patched.trim(), "configmap/x patched");
    let data = c.ok(&["get", "cm", "x", "-o", "jsonpath={.data}"]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&data).ok(),
        Some(json!({"a": "c"})),
        "{data}"
    );

    let applied_file = c.write(
        "cm2.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  z: \"1\"\n",
    );
    let applied = c
        .ok(&[
            "apply",
            "--server-side",
            "--validate=false",
            "-f",
            &applied_file,
        ])
        .await;
    assert_eq!(applied.trim(), "configmap/x serverside-applied");
    let data = c.ok(&["get", "cm", "x", "-o", "jsonpath={.data}"]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&data).ok(),
        Some(json!({"a": "c", "z": "1"})),
        "{data}"
    );
    let apply_req = c
        .server
        .requests()
        .into_iter()
        .rfind(|r| r.method == "PATCH")
        .unwrap_or_else(|| panic!("no PATCH"));
    assert_eq!(
        apply_req.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert!(
        apply_req.path_and_query.contains("fieldManager=kubectl"),
        "{apply_req:?}"
    );

    let deleted = c.ok(&["delete", "cm", "x"]).await;
    assert_eq!(deleted.trim(), "configmap \"x\" deleted");
    let gone = c.kubectl(&["get", "cm", "x"]).await;
    assert_eq!(gone.status.code(), Some(1));
    assert!(
        stderr(&gone).contains("Error from server (NotFound): configmaps \"x\" not found"),
        "{}",
        stderr(&gone)
    );

    // Server-side apply creates what is missing.
    let created = c
        .ok(&[
            "apply",
            "--server-side",
            "--validate=false",
            "-f",
            &applied_file,
        ])
        .await;
    assert_eq!(created.trim(), "configmap/x serverside-applied");
    assert!(c.server.object("configmaps", "default", "x").is_some());
    c.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_pods_watch_sees_a_pod_created_meanwhile() {
    let c = Cluster::start().await;
    seed_pod(&c.server, "first");
    let mut child = c
        .command("kubeconfig", &["get", "pods", "-w"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn kubectl: {e}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let read = async {
        // Header and the existing pod come from the list.
        while seen.len() < 2 {
            match lines.next_line().await {
                Ok(Some(line)) => seen.push(line),
                other => panic!("kubectl output ended early: {other:?} after {seen:?}"),
            }
        }
        // Wait until kubectl's watch reached the server, then create a pod.
        while !c
            .server
            .requests()
            .iter()
            .any(|r| r.path_and_query.contains("watch=true"))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seed_pod(&c.server, "second");
        match lines.next_line().await {
            Ok(Some(line)) => seen.push(line),
            other => panic!("no watch line: {other:?} after {seen:?}"),
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .unwrap_or_else(|_| panic!("timed out; saw {seen:?}"));
    // The process is killed on drop; stop it explicitly to reap it.
    let _ = child.kill().await;
    assert_eq!(
        words(&seen[0]),
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        "{seen:?}"
    );
    assert_eq!(
        words(&seen[1])[..3],
        ["first", "1/1", "Running"],
        "{seen:?}"
    );
    assert_eq!(
        words(&seen[2])[..3],
        ["second", "1/1", "Running"],
        "{seen:?}"
    );
    let watch = c
        .server
        .requests()
        .into_iter()
        .find(|r| r.path_and_query.contains("watch=true"))
        .unwrap_or_else(|| panic!("no watch"));
    assert!(
        watch.path_and_query.contains("resourceVersion="),
        "kubectl watches from the list RV: {watch:?}"
    );
    c.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_resources_and_version() {
    let c = Cluster::start().await;
    let out = c.ok(&["api-resources"]).await;
    let rows: Vec<Vec<&str>> = out.lines().map(words).collect();
    assert_eq!(
        rows[0],
        ["NAME", "SHORTNAMES", "APIVERSION", "NAMESPACED", "KIND"],
        "{out}"
    );
    for want in [
        vec!["configmaps", "cm", "v1", "true", "ConfigMap"],
        vec!["namespaces", "ns", "v1", "false", "Namespace"],
        vec!["pods", "po", "v1", "true", "Pod"],
        vec!["secrets", "v1", "true", "Secret"],
        vec!["serviceaccounts", "sa", "v1", "true", "ServiceAccount"],
        vec!["deployments", "deploy", "apps/v1", "true", "Deployment"],
    ] {
        assert!(rows.contains(&want), "missing {want:?} in\n{out}");
    }
    // Aggregated discovery was used: no per-group-version requests.
    let seen = c.server.requests();
    assert!(
        !seen.iter().any(|r| r.path_and_query == "/api/v1"),
        "{seen:#?}"
    );

    let version = c.ok(&["version", "-o", "json"]).await;
    let v: Value =
        serde_json::from_str(&version).unwrap_or_else(|e| panic!("not JSON ({e}): {version}"));
    assert_eq!(v["serverVersion"]["gitVersion"], "v1.32.0", "{version}");
    assert_eq!(v["serverVersion"]["minor"], "32");
    let plain = c.ok(&["version"]).await;
    assert!(plain.contains("Server Version: v1.32.0"), "{plain}");

    let all = c.ok(&["get", "all"]).await;
    assert_eq!(all.trim(), "", "no pods or deployments yet: {all}");
    c.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_is_unauthorized_and_every_request_is_recorded() {
    let c = Cluster::start().await;
    c.write_kubeconfig("bad-kubeconfig", "wrong-token");
    // With nothing cached, discovery fails first; client-go words that 401 itself (this is
    // also what kubectl prints against a real API server).
    let out = c.run_with("bad-kubeconfig", &["get", "pods"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.lines().any(|l| l == "error: You must be logged in to the server (the server has asked for the client to provide credentials)"),
        "{err}"
    );
    let seen = c.server.requests();
    assert!(!seen.is_empty());
    assert!(
        seen.iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer wrong-token")),
        "{seen:#?}"
    );

    // With discovery cached (same cache directory), the list itself gets the 401 Status,
    // whose message kubectl prints.
    c.ok(&["get", "pods"]).await;
    let out = c.run_with("bad-kubeconfig", &["get", "pods"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.lines()
            .any(|l| l == "error: You must be logged in to the server (Unauthorized)"),
        "{err}"
    );
    let raw = c
        .run_with(
            "bad-kubeconfig",
            &["get", "--raw", "/api/v1/namespaces/default/pods"],
        )
        .await;
    assert_eq!(raw.status.code(), Some(1));
    assert!(
        stderr(&raw)
            .lines()
            .any(|l| l == "error: You must be logged in to the server (Unauthorized)"),
        "{}",
        stderr(&raw)
    );

    c.server.clear_requests();
    c.ok(&[
        "get",
        "pods",
        "--as",
        "alice",
        "--as-group",
        "devs",
        "--as-group",
        "ops",
    ])
    .await;
    let seen = c.server.requests();
    let list = seen
        .iter()
        .find(|r| r.path_and_query.contains("/pods"))
        .unwrap_or_else(|| panic!("{seen:#?}"));
    // client-go keeps headers in a Go map, so their order on the wire varies.
    let mut impersonation = list.impersonation.clone();
    impersonation.sort();
    assert_eq!(
        impersonation,
        [
            ("impersonate-group".to_owned(), "devs".to_owned()),
            ("impersonate-group".to_owned(), "ops".to_owned()),
            ("impersonate-user".to_owned(), "alice".to_owned()),
        ]
    );
    c.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_and_client_side_apply_with_default_validation() {
    let c = Cluster::start().await;
    let file = c.write(
        "v.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: v\ndata:\n  a: b\n",
    );
    assert_eq!(
        c.ok(&["create", "-f", &file]).await.trim(),
        "configmap/v created"
    );
    // kubectl checked the OpenAPI v3 document for fieldValidation support, then left
    // validation to the server.
    let post = c
        .server
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap_or_else(|| panic!("no POST"));
    assert!(
        post.path_and_query.contains("fieldValidation=Strict"),
        "{post:?}"
    );
    assert_eq!(post.content_type.as_deref(), Some("application/json"));

    let first = c.write(
        "w1.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: w\ndata:\n  a: b\n",
    );
    assert_eq!(
        c.ok(&["apply", "-f", &first]).await.trim(),
        "configmap/w created"
    );
    assert_eq!(
        c.ok(&["apply", "-f", &first]).await.trim(),
        "configmap/w unchanged"
    );
    let second = c.write(
        "w2.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: w\ndata:\n  a: c\n",
    );
    assert_eq!(
        c.ok(&["apply", "-f", &second]).await.trim(),
        "configmap/w configured"
    );
    let stored = c
        .server
        .object("configmaps", "default", "w")
        .unwrap_or_else(|| panic!("w not stored"));
    assert_eq!(stored["data"], json!({"a": "c"}));
    assert!(
        stored["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .is_string(),
        "{stored}"
    );
    let patch = c
        .server
        .requests()
        .into_iter()
        .rfind(|r| r.method == "PATCH")
        .unwrap_or_else(|| panic!("no PATCH"));
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/strategic-merge-patch+json")
    );
    c.server.shutdown().await;
}
