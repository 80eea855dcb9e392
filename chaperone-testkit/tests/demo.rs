//! The README's main command, `cargo xtask demo`, runs the `chaperone-demo` binary: it
//! must tell its story end to end and remove everything it created.

use std::process::{Command, Output};

fn demo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chaperone-demo"))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .unwrap_or_else(|e| panic!("run chaperone-demo {args:?}: {e}"))
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `chaperone-demo` (what `cargo xtask demo` runs) is the README's main command: it must run end to end and clean up.
#[test]
fn demo_runs_end_to_end_and_removes_what_it_created() {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "the demo needs root, and CI is set: it must run in CI"
        );
        eprintln!("SKIPPED demo_runs_end_to_end_and_removes_what_it_created: needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let recordings = dir.path().join("recordings");
    let out = demo(&["--recordings", recordings.to_str().expect("utf-8 path")]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for expected in [
        "agent-pod$ kubectl get pods",
        "web-0",
        "Error from server (Forbidden): namespaces \"production\" is forbidden",
        "no-destructive-deletes",
        "KiptYXNrZWQgYnkgY2hhcGVyb25lKio=",
        "the real password never reached the pod",
        "no-privileged-workloads",
        "privileged containers are not allowed",
        "0 with the pod's token",
        "agents/cursor-agent-0",
        // Just-in-time approval: held, approved through node B, completed; then expired.
        "nothing was sent upstream, replicas are still 3",
        "approved\n  deployment.apps/web scaled",
        "replicas are now 0",
        "expired waiting for approval: nobody decided on AccessRequest",
        "the ConfigMap is still there",
    ] {
        assert!(
            stdout.contains(expected),
            "demo output lacks {expected:?}:\n{stdout}"
        );
    }
    // The Secret's value ("s3cr3t-Passw0rd", base64 czNjcjN0LVBhc3N3MHJk) is nowhere.
    assert!(
        !stdout.contains("czNjcjN0LVBhc3N3MHJk") && !stdout.contains("s3cr3t-Passw0rd"),
        "the demo shows the secret:\n{stdout}"
    );
    // The story is not interrupted by log lines; the gateway's log is in the file it names.
    assert!(
        !stdout.contains(" INFO ") && !stdout.contains(" WARN "),
        "log lines in the story:\n{stdout}"
    );
    let log = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("gateway log: "))
        .unwrap_or_else(|| panic!("the demo names no log file:\n{stdout}"));
    let log_text = std::fs::read_to_string(log).unwrap_or_else(|e| panic!("{log}: {e}"));
    assert!(
        log_text.contains("chaperone is ready"),
        "{log}:\n{log_text}"
    );
    let _ = std::fs::remove_file(log);
    assert!(
        recordings.join("table=requests").is_dir(),
        "no recordings in {}",
        recordings.display()
    );
    let netns = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip")
            .stdout,
    )
    .into_owned();
    let demo_netns = stdout
        .split_whitespace()
        .find(|w| w.starts_with("chp-"))
        .map(|w| w.trim_end_matches(','))
        .expect("the demo names its network namespace");
    assert!(
        !netns.contains(demo_netns),
        "the demo left {demo_netns} behind: {netns}"
    );
}
