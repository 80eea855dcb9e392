//! `chaperone demo`: the whole data path on one machine, narrated.
//!
//! A sandbox pod (own cgroup, network namespace and veth, no default route) runs the real
//! `kubectl` with an in-cluster-style kubeconfig pointing at a virtual API server address.
//! The eBPF redirect sends its connections to the gateway, which attributes them to the
//! pod's cgroup and decides with the shipped baseline policy (deploy/config/policy.yaml):
//! `kubectl get pods` is allowed, a Secret is read masked, a privileged pod and
//! `kubectl delete namespace` are denied. Allowed requests go to the Kubernetes API test
//! server (labelled as such) with the gateway's own credential, and every request is
//! recorded to Parquet. Two risky requests need a person's approval: scaling production
//! to zero is held until an approver runs `chaperone approve` (through a second gateway's
//! approvals API), then completes; deleting a ConfigMap nobody approves expires into a
//! recorded denial.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::json;

use gateway_userspace::{
    masking::objects::{PLACEHOLDER_BASE64, PLACEHOLDER_TEXT},
    recorder,
};

use crate::stack::{Stack, StackOptions};

/// The shipped baseline policy, with the agent namespace placeholder (`ai-sandbox`) set
/// to `default`, where the demo's objects live.
pub fn demo_policy() -> String {
    include_str!("../../deploy/config/policy.yaml").replace("ai-sandbox", "default")
}

/// The demo's approval rules, placed before the baseline's: scaling in `production` waits
/// for an SRE (the demo's approver authenticates as `system:admin`, in `system:masters`),
/// deleting a ConfigMap in `default` waits 3 s for anyone and then expires.
pub const DEMO_APPROVAL_RULES: &str = r#"  - name: scale-production
    action: approve
    verbs: [patch, update]
    apiGroups: [apps]
    resources: [deployments/scale]
    namespaces: [production]
    approval: {approvers: {groups: [sre, "system:masters"]}, timeout: 2m}
  - name: delete-config
    action: approve
    verbs: [delete]
    apiGroups: [""]
    resources: [configmaps]
    approval: {approvers: {groups: [sre]}, timeout: 3s}
"#;

/// The baseline with [`DEMO_APPROVAL_RULES`] first.
pub fn demo_policy_with_approvals() -> String {
    demo_policy().replacen("\nrules:\n", &format!("\nrules:\n{DEMO_APPROVAL_RULES}"), 1)
}

/// A smaller policy (deny namespace deletion and secret reads), for tests that need only
/// an allow and a deny.
pub const DEMO_POLICY: &str = r#"apiVersion: chaperone.dev/v1alpha1
kind: Policy
default: allow
rules:
  - name: protect-namespaces
    action: deny
    message: agents may not delete namespaces
    verbs: [delete, deletecollection]
    apiGroups: [""]
    resources: [namespaces]
  - name: no-secret-reads
    action: deny
    message: agents may not read secrets
    verbs: [get, list, watch]
    apiGroups: [""]
    resources: [secrets]
"#;

/// Objects the API test server starts with, so `kubectl get pods` shows something.
pub fn demo_objects() -> Vec<serde_json::Value> {
    let pod = |name: &str, ip: &str| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
            "spec": {"nodeName": "sandbox-node", "containers": [{"name": "web", "image": "nginx:1.27"}]},
            "status": {"phase": "Running", "podIP": ip,
                       "containerStatuses": [{"name": "web", "ready": true, "restartCount": 0,
                                              "image": "nginx:1.27", "imageID": "", "started": true,
                                              "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}
        })
    };
    vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "production"}}),
        pod("web-0", "10.244.0.10"),
        pod("web-1", "10.244.0.11"),
    ]
}

/// Runs the demo; Ctrl-C tears everything down. `log` is where the caller sends the
/// gateway's log (named in the story).
pub async fn run(recordings: Option<PathBuf>, log: &Path) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates cgroups, network namespaces and eBPF programs: run it as root");
    }
    let recordings = match recordings {
        Some(dir) => dir,
        None => {
            std::env::temp_dir().join(format!("chaperone-demo-{}", uuid::Uuid::now_v7().simple()))
        }
    };
    tokio::select! {
        result = narrate(recordings, log) => result,
        _ = tokio::signal::ctrl_c() => {
            // Dropping the stack removed the pod, its namespace, veth, cgroup and programs.
            bail!("interrupted; everything the demo created has been removed")
        }
    }
}

async fn narrate(recordings: PathBuf, log: &Path) -> anyhow::Result<()> {
    println!("Chaperone demo\n");
    let mut seed = demo_objects();
    seed.push(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "db-credentials", "namespace": "default"},
        // "s3cr3t-Passw0rd"
        "data": {"username": "YXBw", "password": "czNjcjN0LVBhc3N3MHJk"}
    }));
    seed.push(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "production"},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}}}
    }));
    seed.push(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "feature-flags", "namespace": "default"},
        "data": {"checkout": "on"}
    }));
    let stack = Stack::start(StackOptions {
        policy_yaml: Some(demo_policy_with_approvals()),
        recordings_dir: Some(recordings.clone()),
        seed,
        approval: true,
        ..Default::default()
    })
    .await
    .context("starting the demo stack")?;
    let pod = &stack.pod;
    println!(
        "  upstream:   Kubernetes API test server (a stand-in for kube-apiserver) at {}",
        stack.apiserver.url()
    );
    println!(
        "  agent pod:  cgroup {} (id {}), network namespace {}, address {}",
        pod.cgroup_path().display(),
        pod.cgroup_id()?,
        pod.netns(),
        pod.pod_ip()
    );
    println!(
        "  redirect:   eBPF sends the pod's connections to https://{} to the gateway at {}",
        pod.virtual_api_server(),
        stack.app.local_addr()
    );
    println!(
        "  identity:   the pod's cgroup belongs to Pod {}/{} (service account {}), from the pod store",
        super::stack::SANDBOX_NAMESPACE,
        super::stack::SANDBOX_POD,
        super::stack::SANDBOX_SERVICE_ACCOUNT
    );
    println!(
        "  policy:     the shipped baseline (deploy/config/policy.yaml): reads masked, writes in 'default' only, no privileged pods, no namespace deletion"
    );
    println!("  gateway log: {}\n", log.display());

    for args in [
        &["get", "pods"][..],
        &[
            "get",
            "secret",
            "db-credentials",
            "-o",
            "jsonpath={.data.password}{\"\\n\"}",
        ],
        &[
            "run",
            "rootkit",
            "--image=registry.example.com/tools:1",
            "--privileged",
        ],
        &["delete", "namespace", "production"],
    ] {
        println!("agent-pod$ kubectl {}", args.join(" "));
        let out = stack
            .kubectl(args)
            .await
            .with_context(|| format!("running kubectl {args:?}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        print!("{}", indent(&stdout));
        if stdout.trim() == PLACEHOLDER_BASE64 {
            println!(
                "  (that is base64 of \"{PLACEHOLDER_TEXT}\": the real password never reached the pod)"
            );
        }
        print!("{}", indent(&String::from_utf8_lossy(&out.stderr)));
        println!("  (exit code {})\n", out.status.code().unwrap_or(-1));
    }

    approvals(&stack).await?;

    let stopped = stack.stop().await.context("stopping the gateway")?;
    let seen = stopped.apiserver.requests();
    let with_gateway = seen
        .iter()
        .filter(|r| {
            r.authorization.as_deref() == Some(format!("Bearer {}", stopped.gateway_token).as_str())
        })
        .count();
    let with_pod = seen
        .iter()
        .filter(|r| {
            r.authorization
                .as_deref()
                .is_some_and(|a| a.contains(&stopped.pod_token))
        })
        .count();
    println!(
        "The API server received {} requests: {with_gateway} with the gateway's credential, {with_pod} with the pod's token.",
        seen.len()
    );
    println!("\nRecordings: {}", recordings.display());
    for file in &stopped.stats.files {
        println!(
            "  {}",
            file.strip_prefix(&recordings).unwrap_or(file).display()
        );
    }
    println!();
    print!("{}", summary(&recordings)?);
    println!(
        "\nQuery them, e.g.:\n  duckdb -c \"SELECT workload.command, verb, object_ref.resource, decision, response_code \
         FROM read_parquet('{}/table=requests/**/*.parquet', hive_partitioning=true) ORDER BY request_time\"",
        recordings.display()
    );
    Ok(())
}

/// Scaling production to zero waits for a person, who approves it through the approvals
/// API of a second gateway; a ConfigMap deletion nobody approves expires.
async fn approvals(stack: &Stack) -> anyhow::Result<()> {
    println!("Just-in-time approval: two requests need a person.\n");
    let node_b = stack
        .second_gateway()
        .await
        .context("starting a second gateway (node B) with the approvals API")?;
    let api_b = node_b
        .approvals_addr()
        .context("node B serves no approvals API")?;
    let replicas = || {
        stack
            .apiserver
            .object("deployments", "production", "web")
            .and_then(|d| {
                d.pointer("/spec/replicas")
                    .and_then(serde_json::Value::as_i64)
            })
            .unwrap_or(-1)
    };
    let args = [
        "scale",
        "deployment",
        "web",
        "-n",
        "production",
        "--replicas=0",
    ];
    println!("agent-pod$ kubectl {}", args.join(" "));
    let scale = {
        let (cmd, cache) = (stack.pod.command("kubectl"), stack.dir().to_owned());
        let kubeconfig = stack.kubeconfig();
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.arg("--cache-dir")
            .arg(cache.join("kubectl-cache-approval"))
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("HOME", &cache)
            .kill_on_drop(true);
        tokio::spawn(async move {
            tokio::time::timeout(std::time::Duration::from_secs(120), cmd.output()).await
        })
    };
    let name = stack
        .wait_for_access_requests(1)
        .await
        .context("waiting for the AccessRequest")?;
    let held = stack.access_requests().pop().unwrap_or_default();
    println!(
        "  (held: AccessRequest {}/{name} asks for \"{}\"; nothing was sent upstream, replicas are still {})",
        crate::stack::APPROVAL_NAMESPACE,
        held.pointer("/spec/request/summary")
            .and_then(serde_json::Value::as_str)
            .unwrap_or(""),
        replicas()
    );
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    println!(
        "sre$ chaperone approve {name} --comment \"planned maintenance\"   # via node B's approvals API"
    );
    let conn = gateway_userspace::approval::client::Connection {
        kubeconfig: Some(stack.admin_kubeconfig()?),
        namespace: Some(crate::stack::APPROVAL_NAMESPACE.to_owned()),
        server: Some(format!("https://{api_b}")),
        certificate_authority: Some(stack.ca_file()),
        ..Default::default()
    };
    print!("  ");
    gateway_userspace::approval::client::decide(
        &conn,
        &name,
        true,
        None,
        Some("planned maintenance".to_owned()),
    )
    .await
    .context("approving through node B")?;
    let out = scale
        .await
        .context("the held kubectl")?
        .context("kubectl was not released within 2 minutes")?
        .context("running kubectl")?;
    print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));
    print!("{}", indent(&String::from_utf8_lossy(&out.stderr)));
    println!(
        "  (exit code {}; replicas are now {})\n",
        out.status.code().unwrap_or(-1),
        replicas()
    );

    let args = ["delete", "configmap", "feature-flags"];
    println!(
        "agent-pod$ kubectl {}   # nobody answers within the rule's 3 s",
        args.join(" ")
    );
    let out = stack
        .kubectl(&args)
        .await
        .context("running kubectl delete")?;
    print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));
    print!("{}", indent(&String::from_utf8_lossy(&out.stderr)));
    println!(
        "  (exit code {}; the ConfigMap is {})\n",
        out.status.code().unwrap_or(-1),
        if stack
            .apiserver
            .object("configmaps", "default", "feature-flags")
            .is_some()
        {
            "still there"
        } else {
            "gone"
        }
    );
    node_b.shutdown().await.context("stopping node B")?;
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// A readable table of every recorded request under `dir`.
pub fn summary(dir: &Path) -> anyhow::Result<String> {
    let rows = recorder::read_dir(dir)
        .with_context(|| format!("reading recordings in {}", dir.display()))?;
    let mut table = vec![
        [
            "TIME",
            "COMMAND",
            "CGROUP",
            "POD",
            "VERB",
            "RESOURCE/PATH",
            "NAMESPACE",
            "NAME",
            "DECISION",
            "OUTCOME",
            "CODE",
            "RULE",
            "APPROVAL",
        ]
        .map(str::to_owned),
    ];
    for r in rows {
        let target = if r.object_ref.resource.is_empty() {
            r.request_uri
                .split('?')
                .next()
                .unwrap_or_default()
                .to_owned()
        } else if r.object_ref.subresource.is_empty() {
            r.object_ref.resource.to_string()
        } else {
            format!("{}/{}", r.object_ref.resource, r.object_ref.subresource)
        };
        table.push([
            r.request_time.strftime("%H:%M:%S").to_string(),
            r.workload.command.clone().unwrap_or_else(|| "-".to_owned()),
            r.workload.cgroup_id.to_string(),
            match (&r.workload.namespace, &r.workload.pod) {
                (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
                _ => "-".to_owned(),
            },
            r.verb.to_string(),
            target,
            r.object_ref.namespace.into_string(),
            r.object_ref.name.into_string(),
            recorder::decision_str(r.decision).to_owned(),
            r.outcome.to_string(),
            r.response_code.to_string(),
            r.policy_rule.unwrap_or_default(),
            match (
                &r.approval_outcome,
                &r.approval_decided_by,
                r.approval_wait_ms,
            ) {
                (Some(o), Some(by), Some(ms)) => format!("{o} by {by} after {ms} ms"),
                (Some(o), _, _) => o.clone(),
                _ => String::new(),
            },
        ]);
    }
    let mut widths = [0usize; 13];
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_userspace::policy::Policy;

    #[test]
    fn the_demo_policy_puts_its_approval_rules_first() {
        let base = Policy::from_yaml(&demo_policy(), "baseline").expect("baseline loads");
        let with = Policy::from_yaml(&demo_policy_with_approvals(), "demo").expect("demo loads");
        assert_eq!(with.rule_count(), base.rule_count() + 2);
    }
}
