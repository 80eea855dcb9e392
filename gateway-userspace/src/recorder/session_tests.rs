use std::sync::Arc;

use tokio::sync::mpsc;

use super::*;
use crate::drain;
use crate::recorder::{Recorder, RecorderConfig, read_exec_frames};

fn start(cfg: RecorderConfig) -> (Recorder, RecorderHandle, drain::DrainTrigger) {
    let (trigger, watcher) = drain::channel();
    let (recorder, handle) =
        Recorder::start(cfg, watcher).unwrap_or_else(|e| panic!("recorder should start: {e}"));
    (recorder, handle, trigger)
}

/// (event, stream, data, size) of a row.
type Event<'a> = (&'a str, Option<&'a str>, Option<&'a [u8]>, i64);

fn events(rows: &[ExecFrameRecord]) -> Vec<Event<'_>> {
    rows.iter()
        .map(|r| {
            (
                r.event.as_str(),
                r.stream.as_deref(),
                r.data.as_deref(),
                r.size,
            )
        })
        .collect()
}

#[tokio::test]
async fn exec_session_frames_exit_and_end_are_written_in_order() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (recorder, handle, _trigger) = start(RecorderConfig::new(dir.path(), "node-a"));
    let mut session = handle.session("0190a6b2-aaaa", SessionKind::Exec);
    let status = br#"{"metadata":{},"status":"Failure","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#;
    for (dir, stream, payload) in [
        ("to_server", "resize", &br#"{"Width":80,"Height":24}"#[..]),
        ("to_server", "stdin", b"echo hi\n"),
        ("to_client", "stdout", b"hi\n"),
        ("to_client", "stderr", b"\xff\xfe not utf-8\n"),
        ("to_client", "error", status),
    ] {
        session
            .frame(dir, stream, payload)
            .unwrap_or_else(|e| panic!("frame: {e}"));
    }
    assert_eq!(session.exit_code(), Some(3));
    session
        .finish(None)
        .await
        .unwrap_or_else(|e| panic!("finish: {e}"));
    drop(handle);
    recorder
        .join()
        .await
        .unwrap_or_else(|e| panic!("join: {e}"));

    let rows = read_exec_frames(dir.path()).unwrap_or_else(|e| panic!("read: {e}"));
    assert_eq!(
        events(&rows),
        vec![
            (
                "frame",
                Some("resize"),
                Some(&br#"{"Width":80,"Height":24}"#[..]),
                24
            ),
            ("frame", Some("stdin"), Some(&b"echo hi\n"[..]), 8),
            ("frame", Some("stdout"), Some(&b"hi\n"[..]), 3),
            (
                "frame",
                Some("stderr"),
                Some(&b"\xff\xfe not utf-8\n"[..]),
                13
            ),
            (
                "frame",
                Some("error"),
                Some(&status[..]),
                status.len() as i64
            ),
            ("exit", Some("error"), None, 0),
            ("end", None, None, 24 + 8 + 3 + 13 + status.len() as i64),
        ]
    );
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (0..7).collect::<Vec<_>>());
    assert!(
        rows.iter()
            .all(|r| r.session_id == "0190a6b2-aaaa" && r.audit_id == "0190a6b2-aaaa")
    );
    assert!(rows.windows(2).all(|w| w[0].offset_us <= w[1].offset_us));
    assert_eq!(rows[5].exit_code, Some(3));
    assert_eq!(rows[6].exit_code, Some(3));
    let detail: serde_json::Value = serde_json::from_str(rows[6].detail.as_deref().unwrap_or(""))
        .unwrap_or_else(|e| panic!("end detail: {e}"));
    assert_eq!(detail["frames"], 5);
    assert_eq!(detail["bytes_not_stored"], 0);
    assert!(
        dir.path().join("table=exec_frames").is_dir(),
        "exec_frames lives in its own table directory"
    );
}

#[tokio::test]
async fn the_cap_stores_a_prefix_and_marks_the_truncation_once() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let cfg = RecorderConfig {
        max_session_bytes: 10,
        ..RecorderConfig::new(dir.path(), "node-a")
    };
    let (recorder, handle, _trigger) = start(cfg);
    let mut session = handle.session("s-cap", SessionKind::Exec);
    for payload in [&b"012345"[..], b"6789ab", b"cdefgh"] {
        session
            .frame("to_client", "stdout", payload)
            .unwrap_or_else(|e| panic!("a capped session goes on: {e}"));
    }
    session
        .finish(None)
        .await
        .unwrap_or_else(|e| panic!("finish: {e}"));
    drop(handle);
    recorder
        .join()
        .await
        .unwrap_or_else(|e| panic!("join: {e}"));
    let rows = read_exec_frames(dir.path()).unwrap_or_else(|e| panic!("read: {e}"));
    assert_eq!(
        events(&rows),
        vec![
            ("frame", Some("stdout"), Some(&b"012345"[..]), 6),
            ("frame", Some("stdout"), Some(&b"6789"[..]), 6),
            ("truncated", None, None, 0),
            ("end", None, None, 18),
        ]
    );
    let detail: serde_json::Value = serde_json::from_str(rows[3].detail.as_deref().unwrap_or(""))
        .unwrap_or_else(|e| panic!("end detail: {e}"));
    assert_eq!(detail["bytes_stored"], 10);
    assert_eq!(detail["bytes_not_stored"], 8);
}

#[tokio::test]
async fn port_forward_records_counts_not_payloads() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (recorder, handle, _trigger) = start(RecorderConfig::new(dir.path(), "node-a"));
    let mut session = handle.session("s-pf", SessionKind::PortForward);
    for (dir, payload) in [
        ("to_server", &b"GET / HTTP/1.1\r\n\r\n"[..]),
        ("to_client", b"HTTP/1.1 200 OK\r\n"),
        ("to_client", b"secret body"),
    ] {
        session
            .frame(dir, "portforward-data:8080", payload)
            .unwrap_or_else(|e| panic!("frame: {e}"));
    }
    session
        .finish(None)
        .await
        .unwrap_or_else(|e| panic!("finish: {e}"));
    drop(handle);
    recorder
        .join()
        .await
        .unwrap_or_else(|e| panic!("join: {e}"));
    let rows = read_exec_frames(dir.path()).unwrap_or_else(|e| panic!("read: {e}"));
    assert!(
        rows.iter().all(|r| r.data.is_none()),
        "no payloads: {rows:?}"
    );
    let bytes: Vec<_> = rows
        .iter()
        .filter(|r| r.event == FrameEventKind::Bytes)
        .map(|r| (r.direction, r.stream.as_deref(), r.size))
        .collect();
    assert_eq!(
        bytes,
        vec![
            (Some("to_server"), Some("portforward-data:8080"), 18),
            (Some("to_client"), Some("portforward-data:8080"), 28),
        ]
    );
    assert_eq!(rows.last().map(|r| r.event), Some(FrameEventKind::End));
}

/// A handle whose queue holds one message and is never read: the first chunk fits, the
/// rest waits. The receiver and runtime must outlive the handle.
fn stuck_handle() -> (
    RecorderHandle,
    mpsc::Receiver<crate::recorder::Message>,
    tokio::runtime::Runtime,
) {
    let (queue, rows) = mpsc::channel(1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let handle = RecorderHandle {
        queue,
        shared: Arc::default(),
        wal: None,
        replayed: 0,
        max_session_bytes: u64::MAX,
        runtime: runtime.handle().clone(),
    };
    (handle, rows, runtime)
}

#[test]
fn a_full_queue_ends_the_session_once_the_bound_is_reached() {
    let (handle, _rows, _runtime) = stuck_handle();
    let mut session = handle.session("s-full", SessionKind::Exec);
    let payload = vec![b'x'; 64 * 1024];
    let mut failed_at = None;
    for i in 0..1000 {
        if let Err(why) = session.frame("to_client", "stdout", &payload) {
            assert!(why.contains("cannot keep up"), "{why}");
            failed_at = Some(i);
            break;
        }
    }
    let failed_at = failed_at.unwrap_or_else(|| panic!("the session never failed"));
    let held = failed_at * payload.len();
    assert!(
        held <= MAX_WAITING_BYTES + CHUNK_BYTES + 2 * payload.len(),
        "memory held before failing is bounded: {held}"
    );
    assert!(session.failure().is_some());
    assert!(
        session.frame("to_client", "stdout", b"more").is_err(),
        "a failed session stays failed"
    );
}

#[test]
fn a_flood_of_empty_frames_reaches_the_bound_too() {
    // Each empty frame is a row (an empty stdin frame means something); rows cost memory
    // whatever their payload.
    let (handle, _rows, _runtime) = stuck_handle();
    let mut session = handle.session("s-empty", SessionKind::Exec);
    let failed_at = (0..1_000_000)
        .find(|_| session.frame("to_server", "stdin", b"").is_err())
        .unwrap_or_else(|| panic!("a million empty frames were held"));
    assert!(
        failed_at * ROW_OVERHEAD <= MAX_WAITING_BYTES + CHUNK_BYTES + ROW_OVERHEAD,
        "rows held before failing are bounded: {failed_at}"
    );
}

#[tokio::test]
async fn a_stopped_recorder_ends_the_session() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (recorder, handle, trigger) = start(RecorderConfig::new(dir.path(), "node-a"));
    let mut session = handle.session("s-stop", SessionKind::Exec);
    trigger.drain(std::time::Duration::from_secs(5)).await;
    let _ = recorder.join().await;
    let mut result = Ok(());
    for _ in 0..=CHUNK_ROWS {
        result = session.frame("to_client", "stdout", b"x");
        if result.is_err() {
            break;
        }
    }
    let why = result
        .err()
        .unwrap_or_else(|| panic!("the session should fail"));
    assert!(why.contains("cannot be recorded"), "{why}");
}
