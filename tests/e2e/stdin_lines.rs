//! Stdin line rules on allowed exec sessions, with real `kubectl exec -i` in a sandbox
//! pod through the gateway, over WebSocket (kubectl's default) and SPDY: a line typed
//! after a harmless one runs, a line matching `exec.stdinLines.deny` never reaches the
//! shell, kubectl shows the reason on stderr and exits non-zero, and the request's row
//! holds the reason.

use std::{process::Stdio, time::Duration};

use chaperone_e2e::{
    clients::{kubectl_env, kubectl_in_pod, text},
    privileged,
};
use chaperone_testkit::stack::{Stack, StackOptions};
use gateway_userspace::recorder;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const POD: &str = "shell-0";
/// Forces kubectl exec onto SPDY (kubectl 1.32 defaults to WebSocket).
const SPDY: (&str, &str) = ("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false");

const POLICY: &str = r#"
apiVersion: chaperone.dev/v1alpha1
kind: Policy
default: allow
rules:
  - name: shells-without-deletes
    action: allow
    verbs: [create, get]
    resources: [pods/exec]
    exec:
      stdinLines:
        deny: ['\brm\s+-[a-zA-Z]*[rR]']
        message: recursive deletes are not allowed
"#;

#[tokio::test(flavor = "multi_thread")]
async fn stdin_lines_close_sessions_that_type_a_denied_line() {
    if !privileged("stdin_lines_close_sessions_that_type_a_denied_line") {
        return;
    }
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": POD, "namespace": "default"},
        "spec": {"nodeName": "sandbox-node", "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running", "podIP": "10.244.0.41",
                   "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0,
                                          "image": "app:1", "imageID": "", "started": true,
                                          "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}
    });
    let stack = Stack::start(StackOptions {
        policy_yaml: Some(POLICY.to_owned()),
        recordings_dir: None,
        seed: vec![pod],
        ..Default::default()
    })
    .await
    .expect("start the stack");
    let dir = stack
        .apiserver
        .pod_dir("default", POD)
        .expect("pod directory");
    std::fs::create_dir_all(dir.join("victim")).expect("victim dir");
    std::fs::write(dir.join("victim/keep.txt"), "keep me\n").expect("victim file");

    for (transport, env) in [("WebSocket", &[][..]), ("SPDY", &[SPDY][..])] {
        // A harmless session passes untouched.
        let out = kubectl_env(
            &stack,
            &["exec", "-i", POD, "--", "sh"],
            env,
            Some(b"echo fine-$((20+22))\nexit 0\n"),
        )
        .await;
        assert!(
            out.status.success(),
            "{transport}: harmless session: {out:?}"
        );
        assert_eq!(text(&out.stdout), "fine-42\n", "{transport}");

        // Typed one line at a time: the first runs, the second is refused.
        let (mut cmd, _cache) = kubectl_in_pod(&stack, &["exec", "-i", POD, "--", "sh"], env);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl exec -i");
        let mut stdin = child.stdin.take().expect("stdin");
        let mut stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        stdin
            .write_all(b"echo first-$((1+1))\n")
            .await
            .expect("type the first line");
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        tokio::time::timeout(Duration::from_secs(30), async {
            while !text(&seen).contains("first-2\n") {
                let n = stdout.read(&mut buf).await.expect("read stdout");
                assert!(n > 0, "{transport}: stdout ended early: {}", text(&seen));
                seen.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{transport}: the first line did not run: {}", text(&seen)));
        stdin
            .write_all(b"rm -rf victim; echo removed\n")
            .await
            .expect("type the second line");
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .unwrap_or_else(|_| panic!("{transport}: kubectl did not end after the denied line"))
            .expect("wait for kubectl");
        drop(stdin);
        let mut rest = Vec::new();
        stdout.read_to_end(&mut rest).await.expect("read stdout");
        seen.extend_from_slice(&rest);
        let mut err = Vec::new();
        stderr.read_to_end(&mut err).await.expect("read stderr");
        let (out, err) = (text(&seen), text(&err));
        assert!(
            !status.success(),
            "{transport}: kubectl must fail, stdout: {out} stderr: {err}"
        );
        assert_eq!(status.code(), Some(1), "{transport}: {err}");
        assert!(!out.contains("removed"), "{transport}: the line ran: {out}");
        let reason = "stream closed by Chaperone policy rule \"shells-without-deletes\": a stdin line matched stdinLines.deny[0]";
        assert!(
            err.contains(&format!("chaperone: {reason}"))
                && err.contains("recursive deletes are not allowed"),
            "{transport}: the reason on stderr, got: {err}"
        );
        assert!(
            err.contains("error: chaperone: stream closed"),
            "{transport}: kubectl's error line, got: {err}"
        );
        assert!(
            dir.join("victim/keep.txt").exists(),
            "{transport}: the denied line reached the shell"
        );
    }

    let stopped = stack.stop().await.expect("stop the stack");
    let rows = recorder::read_dir(&stopped.recordings).expect("read recordings");
    let reasons: Vec<Option<String>> = rows
        .iter()
        .filter(|r| r.object_ref.subresource == "exec")
        .map(|r| r.reason.clone())
        .collect();
    assert_eq!(reasons.len(), 4, "four exec rows: {reasons:?}");
    let closed: Vec<&String> = reasons
        .iter()
        .flatten()
        .filter(|r| r.contains("stdinLines.deny[0]"))
        .collect();
    assert_eq!(
        closed.len(),
        2,
        "both refused sessions record the reason: {reasons:?}"
    );
    assert!(
        closed
            .iter()
            .all(|r| r.contains("shells-without-deletes") && r.contains("recursive deletes")),
        "{closed:?}"
    );
}
