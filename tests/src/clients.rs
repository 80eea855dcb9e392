//! Real clients (kubectl, the official Python client) run inside the sandbox pod, with
//! time limits, for the end-to-end tests.

use std::process::{Output, Stdio};

use chaperone_testkit::stack::Stack;
use tokio::{io::AsyncWriteExt as _, process::Command};

use crate::LIMIT;

/// Lossy UTF-8 of a client's output.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A kubectl command inside the pod, with its own discovery cache (kept alive by the
/// returned directory) and the pod's kubeconfig.
pub fn kubectl_in_pod(
    stack: &Stack,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Command, tempfile::TempDir) {
    let cache = tempfile::tempdir_in(stack.dir()).expect("kubectl cache dir");
    let mut cmd = Command::from(stack.pod.command("kubectl"));
    // The flag goes first: after `exec ... --` everything belongs to the remote command.
    cmd.arg("--cache-dir")
        .arg(cache.path())
        .args(args)
        .env("KUBECONFIG", stack.kubeconfig())
        .env("HOME", stack.dir())
        .current_dir(stack.dir())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    (cmd, cache)
}

/// Runs a command to completion (stdin fed and closed), within [`LIMIT`].
pub async fn run(mut cmd: Command, stdin: Option<&[u8]>, what: &str) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(data)
            .await
            .unwrap_or_else(|e| panic!("{what}: write stdin: {e}"));
        drop(pipe);
    }
    match tokio::time::timeout(LIMIT, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what} did not finish within {LIMIT:?}"),
    }
}

/// kubectl in the pod; returns its output whatever the exit code.
pub async fn kubectl(stack: &Stack, args: &[&str]) -> Output {
    kubectl_env(stack, args, &[], None).await
}

/// [`kubectl`] with extra environment and optional stdin.
pub async fn kubectl_env(
    stack: &Stack,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&[u8]>,
) -> Output {
    let (cmd, _cache) = kubectl_in_pod(stack, args, env);
    run(
        cmd,
        stdin,
        &format!("kubectl {args:?} (env {env:?}) in the pod"),
    )
    .await
}

/// Runs kubectl in the pod, requires exit code 0 and returns stdout.
pub async fn ok(stack: &Stack, args: &[&str]) -> String {
    let out = kubectl(stack, args).await;
    assert!(
        out.status.success(),
        "kubectl {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs a Python script inside the pod with the pod's kubeconfig.
pub fn python_in_pod(stack: &Stack, script: &str) -> Command {
    let mut cmd = Command::from(stack.pod.command("python3"));
    cmd.arg("-c")
        .arg(script)
        .env("KUBECONFIG", stack.kubeconfig())
        .env("HOME", stack.dir())
        .env("PYTHONUNBUFFERED", "1")
        .current_dir(stack.dir())
        .kill_on_drop(true);
    cmd
}

/// Runs a Python script in the pod; requires exit code 0 and returns stdout.
pub async fn python(stack: &Stack, script: &str, what: &str) -> String {
    let out = run(python_in_pod(stack, script), None, what).await;
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}
