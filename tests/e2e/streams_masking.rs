//! Credentials in pod logs and exec output are masked before they reach the agent: real
//! kubectl in a sandbox pod, through the gateway, with stream masking on.
//!
//! * `kubectl logs -f` of a container that prints a PEM private key and then a GitHub
//!   token shows both masked, each line as soon as it is logged (the stream never ends);
//! * `kubectl exec -- cat` of a file holding a GitHub token shows it masked, over
//!   WebSocket (kubectl's default) and SPDY; a binary file comes back byte for byte;
//! * the recording holds the masked form only (the frames the tap records, and the rows'
//!   masked counts), and the `exec_frames` table, read with DuckDB, holds each session's
//!   stdout as kubectl printed it, masked, with its exit status.

use std::{
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use chaperone_e2e::{
    clients::{kubectl_env, kubectl_in_pod, text},
    privileged,
};
use chaperone_testkit::stack::{Stack, StackOptions};
use gateway_userspace::{
    proxy::upgrade::{Direction, FrameEvent, FrameSink},
    recorder,
};
use serde_json::json;
use tokio::{io::AsyncReadExt as _, process::Child};

const POD: &str = "keys-0";
/// Forces kubectl exec onto SPDY (kubectl 1.32 defaults to WebSocket).
const SPDY: (&str, &str) = ("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false");

/// A random GitHub token (valid nowhere), assembled so this file trips no scanner.
fn github_token() -> String {
    ["gh", "p_u8jzPde0IgxLd6GncfBAepfJBd0Kh8oOOL8d"].concat()
}

/// A PKCS#1 key's shape (random base64 lines).
fn pem_key() -> String {
    [
        "-----BEGIN RSA ",
        "PRIVATE KEY-----\n",
        "ml15Hx3ZfP76d3p7TxUkGr9XvUN61LEphAU08/OHXCWwi+oGwodM+qTdF7LYQoRd\n",
        "6CpbxTmIiseAVKI5nM/J/MLaMc490Wa9zTozhH5buwf9B8pHeEIxsZr0WHLO77n8\n",
        "WfT5XRQ4Gjp4MlY0e5/85pzXAHrop1jMpBXVqR7oY8i2wDN64y1vyqJVFs3y+Lhl\n",
        "-----END RSA PRIVATE KEY-----\n",
    ]
    .concat()
}

/// The stdout payloads the gateway's tap decoded on their way to the client.
#[derive(Default)]
struct Frames(Mutex<Vec<u8>>);

impl FrameSink for Frames {
    fn frame(&self, e: &FrameEvent<'_>) {
        if e.direction == Direction::ToClient && e.channel.name() == "stdout" {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(e.payload);
        }
    }
}

/// Reads the child's stdout until `want` shows up (30 s at most).
async fn read_until(child: &mut Child, seen: &mut Vec<u8>, want: &str) {
    let stdout = child.stdout.as_mut().expect("stdout piped");
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        while !text(seen).contains(want) {
            match stdout.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    assert!(
        found == Ok(true),
        "{want:?} never appeared; kubectl printed so far: {}",
        text(seen)
    );
}

/// Every read, log and exec is masked with the built-in detectors.
const MASK_POLICY: &str = "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules:\n  - name: mask-everything\n    action: mask\n    verbs: [\"*\"]\n    resources: [\"*\", \"*/*\"]\n";

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_logs_and_exec_show_credentials_masked() {
    if !privileged("kubectl_logs_and_exec_show_credentials_masked") {
        return;
    }
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": POD, "namespace": "default"},
        "spec": {"nodeName": "sandbox-node", "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running", "podIP": "10.244.0.40",
                   "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0,
                                          "image": "app:1", "imageID": "", "started": true,
                                          "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}
    });
    let stack = Stack::start(StackOptions {
        policy_yaml: Some(MASK_POLICY.to_owned()),
        recordings_dir: None,
        seed: vec![pod],
        approval: false,
        ..Default::default()
    })
    .await
    .expect("start the stack");
    let frames = Arc::new(Frames::default());
    stack.app.proxy().set_frame_sink(frames.clone());
    let token = github_token();

    // logs -f: the key printed before kubectl attached, the token while it follows.
    stack
        .apiserver
        .append_pod_log("default", POD, &format!("booting\n{}ready\n", pem_key()));
    let (mut cmd, _cache) = kubectl_in_pod(&stack, &["logs", "-f", POD], &[]);
    let mut follow = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl logs -f");
    let mut seen = Vec::new();
    read_until(&mut follow, &mut seen, "ready\n").await;
    assert_eq!(text(&seen), "booting\n**masked:pem-private-key**\nready\n");
    stack.apiserver.append_pod_log(
        "default",
        POD,
        &format!("cloning with GITHUB_TOKEN={token}\nstill running\n"),
    );
    // The stream is still open: the lines arrive while it goes on.
    read_until(&mut follow, &mut seen, "still running\n").await;
    let _ = follow.kill().await;
    assert_eq!(
        text(&seen),
        "booting\n**masked:pem-private-key**\nready\ncloning with GITHUB_TOKEN=**masked:github-token**\nstill running\n"
    );

    // exec -- cat of a file with a token, over both transports.
    let dir = stack
        .apiserver
        .pod_dir("default", POD)
        .expect("pod directory");
    std::fs::write(
        dir.join("env.sh"),
        format!("export GITHUB_TOKEN={token}\nexport MODE=fast\n"),
    )
    .expect("write env.sh");
    let blob: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("blob.bin"), &blob).expect("write blob.bin");
    for (transport, env) in [("WebSocket", &[][..]), ("SPDY", &[SPDY][..])] {
        let out = kubectl_env(&stack, &["exec", POD, "--", "cat", "env.sh"], env, None).await;
        assert!(out.status.success(), "{transport}: exec cat: {out:?}");
        assert_eq!(
            text(&out.stdout),
            "export GITHUB_TOKEN=**masked:github-token**\nexport MODE=fast\n",
            "{transport}: what kubectl printed"
        );
        let out = kubectl_env(&stack, &["exec", POD, "--", "cat", "blob.bin"], env, None).await;
        assert!(out.status.success(), "{transport}: exec cat blob: {out:?}");
        assert!(
            out.stdout == blob,
            "{transport}: binary output changed ({} of {} bytes)",
            out.stdout.len(),
            blob.len()
        );
    }

    // What was recorded is what the agent saw.
    let recorded = frames.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let recorded_text = text(&recorded);
    assert!(
        !recorded_text.contains(&token) && !recorded_text.contains("ml15Hx3ZfP76"),
        "the frame recording holds a credential"
    );
    assert_eq!(
        recorded_text
            .matches("export GITHUB_TOKEN=**masked:github-token**\n")
            .count(),
        2,
        "both exec sessions' stdout recorded masked"
    );
    let stopped = stack.stop().await.expect("stop the stack");
    let rows = recorder::read_dir(&stopped.recordings).expect("read recordings");
    let log_rows: Vec<_> = rows
        .iter()
        .filter(|r| r.object_ref.subresource == "log")
        .collect();
    assert_eq!(log_rows.len(), 1, "one logs -f row");
    assert_eq!(log_rows[0].masked_fields, 2, "the key and the token");
    assert!(
        log_rows[0].response_object.is_none(),
        "log text is not kept"
    );
    let exec_masks: Vec<i32> = rows
        .iter()
        .filter(|r| r.object_ref.subresource == "exec")
        .map(|r| r.masked_fields)
        .collect();
    assert_eq!(exec_masks.len(), 4, "four exec rows");
    assert_eq!(
        exec_masks.iter().sum::<i32>(),
        2,
        "one token in each env.sh"
    );

    // The exec_frames table, as an analyst reads it with DuckDB: each `cat env.sh`
    // session's stdout (joined with its request row) is what kubectl printed, masked; the
    // token is in no recorded frame; every session recorded its exit status and its end.
    let script = format!(
        r#"
import duckdb, json
d = {dir:?}
con = duckdb.connect()
con.execute(f"CREATE VIEW requests AS SELECT * FROM read_parquet('{{d}}/table=requests/**/*.parquet', hive_partitioning=true)")
con.execute(f"CREATE VIEW exec_frames AS SELECT * FROM read_parquet('{{d}}/table=exec_frames/**/*.parquet', hive_partitioning=true)")
outputs = con.execute('''
  SELECT string_agg(decode(f.data), '' ORDER BY f.seq)
  FROM exec_frames f JOIN requests r ON r.audit_id = f.audit_id
  WHERE f.event = 'frame' AND f.stream = 'stdout' AND r.request_uri LIKE '%env.sh%'
  GROUP BY f.session_id ORDER BY 1''').fetchall()
leaks = con.execute("SELECT count(*) FROM exec_frames WHERE contains(CAST(data AS VARCHAR), ?)", [{token:?}]).fetchone()[0]
exits = con.execute("SELECT count(*) FROM exec_frames WHERE event = 'exit' AND exit_code = 0").fetchone()[0]
ends = con.execute("SELECT count(DISTINCT session_id) FROM exec_frames WHERE event = 'end'").fetchone()[0]
print(json.dumps({{"outputs": [o[0] for o in outputs], "leaks": leaks, "exits": exits, "ends": ends}}))
"#,
        dir = stopped.recordings.display().to_string(),
        token = token,
    );
    let duck = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("run python3");
    assert!(
        duck.status.success(),
        "duckdb query failed: {}",
        text(&duck.stderr)
    );
    let result: serde_json::Value =
        serde_json::from_slice(&duck.stdout).unwrap_or_else(|e| panic!("duckdb output: {e}"));
    let masked = "export GITHUB_TOKEN=**masked:github-token**\nexport MODE=fast\n";
    assert_eq!(
        result,
        json!({"outputs": [masked, masked], "leaks": 0, "exits": 4, "ends": 4}),
        "exec_frames as DuckDB reads it"
    );
}
