//! Content-aware policy with real clients in a sandbox pod: CEL conditions over what the
//! API server would store (create bodies, and the dry-run result of strategic, JSON and
//! server-side-apply patches) and exec rules over the command and its stdin/tty. Each
//! case asserts on what kubectl or the Python client printed, on what the API server
//! stored, and on the recording.

use chaperone_e2e::{
    clients::{kubectl, kubectl_env, ok, python_in_pod, run, text},
    privileged,
};
use chaperone_testkit::{
    demo::demo_objects,
    stack::{Stack, StackOptions},
};
use gateway_userspace::{policy::Action, recorder};
use serde_json::json;

/// The rules under test: the workload rules of the shipped baseline, on a default-allow
/// policy so that everything else passes.
const POLICY: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: Policy
default: allow
rules:
  - name: no-privileged
    action: deny
    message: privileged containers are not allowed
    verbs: [create, update, patch]
    apiGroups: ["", apps, batch]
    resources: [pods, deployments, replicasets, statefulsets, daemonsets, jobs, cronjobs]
    when:
      - >-
        podSpec != null && (podSpec.containers.exists(c, has(c.securityContext) &&
        has(c.securityContext.privileged) && c.securityContext.privileged) ||
        (has(podSpec.initContainers) && podSpec.initContainers.exists(c,
        has(c.securityContext) && has(c.securityContext.privileged) &&
        c.securityContext.privileged)))
  - name: no-host-access
    action: deny
    message: host namespaces and hostPath volumes are not allowed
    verbs: [create, update, patch]
    apiGroups: ["", apps, batch]
    resources: [pods, deployments, replicasets, statefulsets, daemonsets, jobs, cronjobs]
    when:
      - >-
        podSpec != null && ((has(podSpec.hostNetwork) && podSpec.hostNetwork) ||
        (has(podSpec.hostPID) && podSpec.hostPID) || (has(podSpec.hostIPC) && podSpec.hostIPC) ||
        (has(podSpec.volumes) && podSpec.volumes.exists(v, has(v.hostPath))))
  - name: no-secret-mounts
    action: deny
    message: workloads may not mount Secrets
    verbs: [create, update, patch]
    apiGroups: ["", apps, batch]
    resources: [pods, deployments, replicasets, statefulsets, daemonsets, jobs, cronjobs]
    when:
      - >-
        podSpec != null && ((has(podSpec.volumes) && podSpec.volumes.exists(v, has(v.secret))) ||
        podSpec.containers.exists(c, (has(c.envFrom) && c.envFrom.exists(e, has(e.secretRef))) ||
        (has(c.env) && c.env.exists(e, has(e.valueFrom) && has(e.valueFrom.secretKeyRef)))))
  - name: trusted-registry
    action: deny
    message: images must come from registry.example.com
    verbs: [create, update, patch]
    apiGroups: ["", apps, batch]
    resources: [pods, deployments, replicasets, statefulsets, daemonsets, jobs, cronjobs]
    when:
      - >-
        podSpec != null &&
        !podSpec.containers.all(c, c.image.startsWith('registry.example.com/'))
  - name: no-rm-rf
    action: deny
    message: recursive deletes are not allowed
    verbs: [create, get]
    resources: [pods/exec]
    exec: {commands: ["rm -rf *", "rm -fr *"]}
  - name: no-interactive-shells
    action: deny
    message: interactive sessions are not allowed
    verbs: [create, get]
    resources: [pods/exec, pods/attach]
    exec: {interactive: true}
"#;

/// A pod manifest with the given spec fragment merged into a harmless one.
fn pod(name: &str, extra: serde_json::Value) -> String {
    let mut spec = json!({"containers": [{"name": "app", "image": "registry.example.com/app:1"}]});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default"}, "spec": spec})
    .to_string()
}

fn deployment(privileged: bool) -> String {
    let mut container = json!({"name": "web", "image": "registry.example.com/web:1"});
    if privileged {
        container["securityContext"] = json!({"privileged": true});
    }
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": "web", "namespace": "default"},
           "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"}},
                                 "spec": {"containers": [container]}}}})
    .to_string()
}

/// Runs kubectl with a manifest on stdin; returns (success, stdout + stderr).
async fn with_stdin(stack: &Stack, args: &[&str], manifest: &str) -> (bool, String) {
    let out = kubectl_env(stack, args, &[], Some(manifest.as_bytes())).await;
    (
        out.status.success(),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

/// Each rule's message, as the client must show it: a denial for another reason (a
/// condition that failed to evaluate) names the rule too, but not with its message.
const MESSAGES: &[(&str, &str)] = &[
    ("no-privileged", "privileged containers are not allowed"),
    (
        "no-host-access",
        "host namespaces and hostPath volumes are not allowed",
    ),
    ("no-secret-mounts", "workloads may not mount Secrets"),
    (
        "trusted-registry",
        "images must come from registry.example.com",
    ),
    ("no-rm-rf", "recursive deletes are not allowed"),
    (
        "no-interactive-shells",
        "interactive sessions are not allowed",
    ),
];

/// Asserts that a kubectl run was refused by the named rule, as the client shows it.
fn assert_denied(what: &str, (success, output): &(bool, String), rule: &str) {
    assert!(!success, "{what} must be refused, kubectl said: {output}");
    let message = MESSAGES
        .iter()
        .find(|(r, _)| *r == rule)
        .map(|(_, m)| *m)
        .expect("a known rule");
    assert!(
        output.contains("Forbidden") && output.contains(&format!("rule \"{rule}\": {message}")),
        "{what}: kubectl must show the 403 of rule {rule} with its message, got: {output}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn content_and_exec_rules_hold_with_real_clients() {
    if !privileged("content_and_exec_rules_hold_with_real_clients") {
        return;
    }
    let stack = Stack::start(StackOptions {
        policy_yaml: Some(POLICY.to_owned()),
        recordings_dir: None,
        seed: demo_objects(),
        approval: false,
        ..Default::default()
    })
    .await
    .expect("start the stack");
    let create = ["create", "-f", "-"];

    // Pods: each way to escape the sandbox or read a Secret is refused before it is stored.
    let cases = [
        (
            "privileged",
            json!({"containers": [{"name": "app", "image": "registry.example.com/app:1", "securityContext": {"privileged": true}}]}),
            "no-privileged",
        ),
        (
            "privileged-init",
            json!({"initContainers": [{"name": "init", "image": "registry.example.com/app:1", "securityContext": {"privileged": true}}]}),
            "no-privileged",
        ),
        (
            "host-network",
            json!({"hostNetwork": true}),
            "no-host-access",
        ),
        ("host-pid", json!({"hostPID": true}), "no-host-access"),
        (
            "host-path",
            json!({"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}),
            "no-host-access",
        ),
        (
            "secret-volume",
            json!({"volumes": [{"name": "s", "secret": {"secretName": "db"}}]}),
            "no-secret-mounts",
        ),
        (
            "secret-env-from",
            json!({"containers": [{"name": "app", "image": "registry.example.com/app:1", "envFrom": [{"secretRef": {"name": "db"}}]}]}),
            "no-secret-mounts",
        ),
        (
            "secret-env",
            json!({"containers": [{"name": "app", "image": "registry.example.com/app:1", "env": [{"name": "P", "valueFrom": {"secretKeyRef": {"name": "db", "key": "p"}}}]}]}),
            "no-secret-mounts",
        ),
        (
            "foreign-image",
            json!({"containers": [{"name": "app", "image": "docker.io/library/busybox"}]}),
            "trusted-registry",
        ),
    ];
    for (name, extra, rule) in &cases {
        let result = with_stdin(&stack, &create, &pod(name, extra.clone())).await;
        assert_denied(&format!("pod {name}"), &result, rule);
        assert!(
            stack.apiserver.object("pods", "default", name).is_none(),
            "pod {name} must not be stored"
        );
    }
    let plain = with_stdin(&stack, &create, &pod("plain", json!({}))).await;
    assert!(plain.0, "a plain pod is created: {}", plain.1);

    // A privileged Deployment (a workload template) is refused; a plain one is created.
    assert_denied(
        "privileged deployment",
        &with_stdin(&stack, &create, &deployment(true)).await,
        "no-privileged",
    );
    let created = with_stdin(&stack, &["apply", "-f", "-"], &deployment(false)).await;
    assert!(created.0, "a plain deployment is applied: {}", created.1);

    // Patches are judged on what they would store: the dry-run result.
    let strategic = r#"{"spec":{"template":{"spec":{"containers":[{"name":"web","securityContext":{"privileged":true}}]}}}}"#;
    let out = kubectl(
        &stack,
        &[
            "patch",
            "deployment",
            "web",
            "--type=strategic",
            "-p",
            strategic,
        ],
    )
    .await;
    assert_denied(
        "strategic patch adding privileged",
        &(
            out.status.success(),
            format!("{}{}", text(&out.stdout), text(&out.stderr)),
        ),
        "no-privileged",
    );
    let json_patch = r#"[{"op":"add","path":"/spec/template/spec/containers/0/securityContext","value":{"privileged":true}}]"#;
    let out = kubectl(
        &stack,
        &[
            "patch",
            "deployment",
            "web",
            "--type=json",
            "-p",
            json_patch,
        ],
    )
    .await;
    assert_denied(
        "JSON patch adding privileged",
        &(
            out.status.success(),
            format!("{}{}", text(&out.stdout), text(&out.stderr)),
        ),
        "no-privileged",
    );
    assert_denied(
        "server-side apply of a privileged deployment",
        &with_stdin(
            &stack,
            &["apply", "--server-side", "--field-manager=agent", "-f", "-"],
            &deployment(true),
        )
        .await,
        "no-privileged",
    );
    let stored = stack
        .apiserver
        .object("deployments", "default", "web")
        .expect("the deployment is stored");
    assert!(
        !stored.to_string().contains("privileged"),
        "no denied patch reached the store: {stored}"
    );
    // A JSON patch that tests a value is never dry-run: the dry run's answer (a 422 or
    // not) would tell whether a guess is the stored value, whatever masking hides. A right
    // and a wrong guess get the same refusal.
    let dry_runs = |stack: &Stack| {
        stack
            .apiserver
            .requests()
            .iter()
            .filter(|r| r.path_and_query.contains("dryRun=All"))
            .count()
    };
    let dry_runs_before = dry_runs(&stack);
    for guess in ["registry.example.com/web:1", "nginx:wrong"] {
        let test_patch = format!(
            r#"[{{"op":"test","path":"/spec/template/spec/containers/0/image","value":"{guess}"}}]"#
        );
        let out = kubectl(
            &stack,
            &[
                "patch",
                "deployment",
                "web",
                "--type=json",
                "-p",
                &test_patch,
            ],
        )
        .await;
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(
            !out.status.success() && said.contains("not tried on the API server"),
            "a test operation ({guess}) must be refused without a dry run: {said}"
        );
    }
    let dry_runs_after = dry_runs(&stack);
    assert_eq!(
        dry_runs_before, dry_runs_after,
        "no dry run of a test operation"
    );
    // A harmless patch passes (its dry run is allowed, then the real request goes through).
    ok(
        &stack,
        &[
            "patch",
            "deployment",
            "web",
            "--type=merge",
            "-p",
            r#"{"spec":{"replicas":2}}"#,
        ],
    )
    .await;
    let stored = stack
        .apiserver
        .object("deployments", "default", "web")
        .expect("the deployment is stored");
    assert_eq!(stored["spec"]["replicas"], 2, "the allowed patch applied");

    // Exec: a recursive delete is refused whatever its spelling; ls passes; an
    // interactive shell is refused.
    for argv in [
        &["rm", "-rf", "/nonexistent-chaperone-e2e"][..],
        &["/bin/rm", "-fr", "/nonexistent-chaperone-e2e"],
        &["sh", "-c", "rm -rf /nonexistent-chaperone-e2e"],
    ] {
        let mut args = vec!["exec", "web-0", "--"];
        args.extend_from_slice(argv);
        let out = kubectl(&stack, &args).await;
        assert_denied(
            &format!("exec {argv:?}"),
            &(
                out.status.success(),
                format!("{}{}", text(&out.stdout), text(&out.stderr)),
            ),
            "no-rm-rf",
        );
    }
    let listed = ok(&stack, &["exec", "web-0", "--", "echo", "hello-from-exec"]).await;
    assert!(listed.contains("hello-from-exec"), "{listed}");
    let out = kubectl_env(
        &stack,
        &["exec", "-i", "web-0", "--", "sh"],
        &[],
        Some(b"echo hi\nexit\n"),
    )
    .await;
    assert_denied(
        "interactive shell",
        &(
            out.status.success(),
            format!("{}{}", text(&out.stdout), text(&out.stderr)),
        ),
        "no-interactive-shells",
    );

    // The official Python client gets the same 403.
    let script = r#"
from kubernetes import client, config
from kubernetes.client.rest import ApiException
config.load_kube_config()
pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "py-priv"},
       "spec": {"containers": [{"name": "a", "image": "registry.example.com/a:1",
                                "securityContext": {"privileged": True}}]}}
try:
    client.CoreV1Api().create_namespaced_pod("default", pod)
    print("CREATED")
except ApiException as e:
    print("STATUS", e.status, e.reason)
    print(e.body)
"#;
    let out = run(
        python_in_pod(&stack, script),
        None,
        "python create privileged",
    )
    .await;
    let said = text(&out.stdout);
    assert!(
        said.contains("STATUS 403") && said.contains("privileged containers are not allowed"),
        "the Python client must see the 403: {said}{}",
        text(&out.stderr)
    );

    // Hot reload: an open watch the new policy denies is closed, and the client's attempt
    // to watch again is refused; the old policy stayed in force until the new one settled.
    let watcher = r#"
import sys
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException
config.load_kube_config()
print("WATCHING", flush=True)
try:
    for ev in watch.Watch().stream(client.CoreV1Api().list_namespaced_config_map, "default"):
        print("EVENT", ev["type"], flush=True)
except ApiException as e:
    print("STATUS", e.status, flush=True)
    print(e.body, flush=True)
"#;
    ok(
        &stack,
        &["create", "configmap", "reload-probe", "--from-literal=a=b"],
    )
    .await;
    let mut cmd = python_in_pod(&stack, watcher);
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the python watch");
    let mut out = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let read_until =
        async |out: &mut tokio::process::ChildStdout, seen: &mut Vec<u8>, want: &str| {
            use tokio::io::AsyncReadExt as _;
            let mut buf = [0u8; 4096];
            while !text(seen).contains(want) {
                let n = out.read(&mut buf).await.expect("read the watch");
                assert!(n > 0, "the watch ended before {want:?}: {}", text(seen));
                seen.extend_from_slice(&buf[..n]);
            }
        };
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        read_until(&mut out, &mut seen, "EVENT ADDED"),
    )
    .await
    .unwrap_or_else(|_| panic!("the watch did not start: {}", text(&seen)));
    let reloaded = POLICY.replacen(
        "rules:\n",
        "rules:\n  - name: no-configmap-watches\n    action: deny\n    message: configmap watches are closed\n    verbs: [watch, list]\n    resources: [configmaps]\n",
        1,
    );
    std::fs::write(stack.dir().join("policy.yaml"), reloaded).expect("rewrite the policy");
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        read_until(&mut out, &mut seen, "configmap watches are closed"),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the open watch was not closed by the reload: {}",
            text(&seen)
        )
    });
    assert!(text(&seen).contains("STATUS 403"), "{}", text(&seen));
    let _ = child.kill().await;

    let stopped = stack.stop().await.expect("stop the stack");
    let rows = recorder::read_dir(&stopped.recordings).expect("read recordings");
    let denied: Vec<_> = rows
        .iter()
        .filter(|r| r.decision == Some(Action::Deny))
        .filter_map(|r| r.policy_rule.clone())
        .collect();
    for rule in [
        "no-configmap-watches",
        "no-privileged",
        "no-host-access",
        "no-secret-mounts",
        "trusted-registry",
        "no-rm-rf",
        "no-interactive-shells",
    ] {
        assert!(
            denied.iter().any(|r| r == rule),
            "a denial by {rule} is recorded; denied rows: {denied:?}"
        );
    }
    // Dry runs the gateway sent are its own: none is recorded as a request of the pod, and
    // none stored anything (checked above); the upstream saw them with dryRun=All.
    let seen = stopped.apiserver.requests();
    assert!(
        seen.iter()
            .any(|r| r.method == "PATCH" && r.path_and_query.contains("dryRun=All")),
        "patches were dry-run upstream"
    );
    assert!(
        !rows.iter().any(|r| r.request_uri.contains("dryRun=All")),
        "the gateway's dry runs are not the pod's requests"
    );
}
