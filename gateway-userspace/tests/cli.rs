//! The `chaperone` binary's contract: exit codes (0 ok, 1 failure, 2 usage error) and
//! errors that name the file, line and field at fault. Also checks that the shipped
//! example policy and config parse.

use std::process::{Command, Output};

fn chaperone(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chaperone"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap_or_else(|e| panic!("run chaperone {args:?}: {e}"))
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_shipped_example_policy_checks_clean() {
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/config/policy.yaml");
    let out = chaperone(&["check", "--policy", policy]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("ok (3 rules)"), "{stdout}");
}

#[test]
fn a_bad_policy_fails_with_file_line_and_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.yaml");
    std::fs::write(
        &path,
        "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules:\n  - name: r\n    action: deny\n    verbs: [remove]\n    resources: [pods]\n",
    )
    .expect("write policy");
    let out = chaperone(&["check", "--policy", path.to_str().expect("utf-8 path")]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("policy.yaml:7:")
            && stderr.contains("rules[0].verbs[0]")
            && stderr.contains("remove"),
        "{stderr}"
    );
}

#[test]
fn a_bad_config_fails_naming_the_key_and_usage_errors_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("chaperone.yaml");
    std::fs::write(&path, "listen:\n  adress: 127.0.0.1:1\n").expect("write config");
    let out = chaperone(&["run", "--config", path.to_str().expect("utf-8 path")]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("chaperone.yaml:") && stderr.contains("listen.adress"),
        "{stderr}"
    );

    let out = chaperone(&["run", "--config", "/nonexistent/chaperone.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).1.contains("/nonexistent/chaperone.yaml"),
        "{:?}",
        text(&out)
    );

    for usage in [
        &["frobnicate"][..],
        &["run"],
        &["status", "--admin", "not-an-address"],
    ] {
        let out = chaperone(usage);
        assert_eq!(out.status.code(), Some(2), "{usage:?}: {:?}", text(&out));
    }
}

#[test]
fn status_without_a_daemon_says_so() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let out = chaperone(&["status", "--admin", &format!("127.0.0.1:{port}")]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is chaperone running?"), "{stderr}");
}

/// `chaperone demo` is the README's main command: it must run end to end and clean up.
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
    let out = chaperone(&[
        "demo",
        "--recordings",
        recordings.to_str().expect("utf-8 path"),
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for expected in [
        "agent-pod$ kubectl get pods",
        "web-0",
        "Error from server (Forbidden): namespaces \"production\" is forbidden",
        "0 with the pod's token",
        "agents/cursor-agent-0",
        "protect-namespaces",
    ] {
        assert!(
            stdout.contains(expected),
            "demo output lacks {expected:?}:\n{stdout}"
        );
    }
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
