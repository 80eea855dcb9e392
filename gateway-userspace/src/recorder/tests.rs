use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arrow_array::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;

use super::*;
use crate::{drain, policy::Action, request::Verb};

pub(super) fn ts(text: &str) -> jiff::Timestamp {
    text.parse()
        .unwrap_or_else(|e| panic!("bad timestamp {text}: {e}"))
}

/// A row with every optional field set.
pub(super) fn full_row(i: i64, request_time: jiff::Timestamp) -> RequestRecord {
    RequestRecord {
        request_time,
        response_time: Some(request_time + jiff::SignedDuration::from_micros(1500 + i)),
        latency_us: 1500 + i,
        audit_id: format!("0190a6b2-7c1d-7e3f-8a9b-{i:012}"),
        node: "node-a".into(),
        cluster: "prod-eu".into(),
        workload: WorkloadRecord {
            cgroup_id: 4_000_000_000 + i,
            netns_cookie: i64::MAX - i,
            pid: 4242 + i,
            command: Some("kubectl".into()),
            namespace: Some("agents".into()),
            pod: Some(format!("agent-{i}")),
            pod_uid: Some("6f1c7e0a-3b52-4a57-9a8e-2f9d0c1b2a3e".into()),
            service_account: Some("agent-sa".into()),
            container: Some("main".into()),
        }
        .into(),
        source_addr: "10.244.1.7:51234".into(),
        original_dst: Some("192.0.2.1:443".into()),
        user_agent: Some("kubectl/v1.32.0 (linux/amd64) kubernetes/abcdef".into()),
        kubectl_command: Some("kubectl get".into()),
        kubectl_session: Some("c0ffee-session".into()),
        verb: Verb::Get,
        request_uri: format!("/api/v1/namespaces/agents/pods/agent-{i}"),
        object_ref: ObjectRef {
            api_group: "apps".into(),
            api_version: "v1".into(),
            resource: "deployments".into(),
            subresource: "scale".into(),
            namespace: "agents".into(),
            name: format!("web-{i}").into(),
        },
        decision: Some(Action::Allow),
        outcome: Outcome::Forwarded,
        policy_rule: Some("read-only".into()),
        reason: Some("matched rule read-only".into()),
        response_code: 200,
        request_bytes: 0,
        response_bytes: 12_345 + i,
        error: None,
        principal: PrincipalRecord {
            kind: "oidc".into(),
            subject: Some("https://issuer#alice".into()),
            groups: vec!["dev".into(), "agents".into()],
            reason: None,
            mismatch: Some("token names sa default/x".into()),
        }
        .into(),
        impersonated_user: Some("system:serviceaccount:agents:cursor".into()),
        request_content_type: Some("application/vnd.kubernetes.protobuf".into()),
        request_object: Some(format!(r#"{{"kind":"Scale","spec":{{"replicas":{i}}}}}"#)),
        request_object_truncated: i % 2 == 0,
        masked_fields: 2,
        response_object: Some(format!(r#"{{"kind":"Scale","status":{{"replicas":{i}}}}}"#)),
        response_object_truncated: i % 3 == 0,
        masked: Some(format!(
            r#"[{{"rule":"mask-secrets","kind":"secretData","count":{i}}}]"#
        )),
        approval_outcome: Some("approved".into()),
        access_request: Some(format!("agent-0-{i}")),
        approval_decided_by: Some("alice".into()),
        approval_wait_ms: Some(1200 + i),
    }
}

/// A row with every optional field unset (a request that failed before any response).
pub(super) fn sparse_row(i: i64, request_time: jiff::Timestamp) -> RequestRecord {
    RequestRecord {
        request_time,
        response_time: None,
        latency_us: -1,
        audit_id: format!("sparse-{i}"),
        node: "node-a".into(),
        cluster: "".into(),
        workload: WorkloadRecord {
            cgroup_id: -5,
            netns_cookie: 0,
            pid: 0,
            ..Default::default()
        }
        .into(),
        source_addr: "[::1]:40000".into(),
        verb: Verb::List,
        request_uri: "/api/v1/pods?limit=500".into(),
        decision: None,
        outcome: Outcome::UpstreamFailed,
        response_code: i32::MIN,
        request_bytes: i64::MIN,
        response_bytes: 0,
        error: Some("upstream unreachable: connection refused".into()),
        ..Default::default()
    }
}

fn config(dir: &Path) -> RecorderConfig {
    RecorderConfig {
        queue_capacity: 4,
        ..RecorderConfig::new(dir, "node-a")
    }
}

fn start(cfg: RecorderConfig) -> (Recorder, RecorderHandle, drain::DrainTrigger) {
    let (trigger, watcher) = drain::channel();
    let (recorder, handle) =
        Recorder::start(cfg, watcher).unwrap_or_else(|e| panic!("recorder should start: {e}"));
    (recorder, handle, trigger)
}

async fn record_all(handle: &RecorderHandle, rows: &[RequestRecord]) {
    for row in rows {
        handle
            .record(row.clone())
            .await
            .unwrap_or_else(|e| panic!("record {}: {e}", row.audit_id));
    }
}

/// Decodes a batch with the reader the tools use (it shares no code with
/// `to_record_batch`).
fn decode(batch: &RecordBatch) -> Vec<RequestRecord> {
    let mut rows = Vec::new();
    super::reader::decode_batch(batch, &mut rows, "node-a")
        .unwrap_or_else(|e| panic!("decode: {e}"));
    rows
}

/// Records `rows` with a recorder started on `cfg`, then stops it and returns its stats.
async fn record_and_stop(cfg: RecorderConfig, rows: &[RequestRecord]) -> RecorderStats {
    let (recorder, handle, _trigger) = start(cfg);
    record_all(&handle, rows).await;
    drop(handle);
    recorder
        .join()
        .await
        .unwrap_or_else(|e| panic!("join: {e}"))
}

fn open_reader(path: &Path) -> ParquetRecordBatchReaderBuilder<File> {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn read_rows(path: &Path) -> Vec<RequestRecord> {
    let reader = open_reader(path)
        .build()
        .unwrap_or_else(|e| panic!("reader {}: {e}", path.display()));
    reader
        .flat_map(|batch| {
            decode(&batch.unwrap_or_else(|e| panic!("batch in {}: {e}", path.display())))
        })
        .collect()
}

/// Every file under `dir`, hidden ones included, sorted.
fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in
            std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read_dir {}: {e}", d.display()))
        {
            let path = entry.unwrap_or_else(|e| panic!("dir entry: {e}")).path();
            if path.is_dir() {
                stack.push(path)
            } else {
                out.push(path)
            }
        }
    }
    out.sort();
    out
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn is_visible_parquet(path: &Path) -> bool {
    let name = file_name(path);
    !name.starts_with('.') && name.ends_with(".parquet")
}

async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn every_field_round_trips_including_nulls_and_structs() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let t0 = ts("2025-03-04T10:00:00.123456Z");
    let rows = vec![
        full_row(1, t0),
        sparse_row(2, t0 + Duration::from_micros(1)),
        RequestRecord {
            user_agent: None,
            policy_rule: None,
            workload: WorkloadRecord {
                pod: None,
                ..WorkloadRecord::clone(&full_row(3, t0).workload)
            }
            .into(),
            ..full_row(3, t0 + Duration::from_millis(5))
        },
    ];
    let (recorder, handle, _trigger) = start(config(dir.path()));
    record_all(&handle, &rows).await;
    let files = handle
        .flush()
        .await
        .unwrap_or_else(|e| panic!("flush: {e}"));
    assert_eq!(files.len(), 1, "one file expected: {files:?}");
    assert_eq!(read_rows(&files[0]), rows);

    let builder = open_reader(&files[0]);
    assert_eq!(
        builder.schema().fields(),
        requests_schema().fields(),
        "a reader must see the declared Arrow schema (timestamps with UTC, structs)"
    );
    let metadata = builder.metadata();
    for row_group in metadata.row_groups() {
        for column in row_group.columns() {
            assert!(
                matches!(column.compression(), Compression::ZSTD(_)),
                "column {} is {:?}, want zstd",
                column.column_path(),
                column.compression()
            );
        }
    }

    drop(handle);
    let stats = recorder
        .join()
        .await
        .unwrap_or_else(|e| panic!("join: {e}"));
    assert_eq!(
        stats,
        RecorderStats {
            rows: 3,
            files,
            ..RecorderStats::default()
        }
    );
}

#[tokio::test]
async fn rotates_by_row_count_and_keeps_order() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let cfg = RecorderConfig {
        max_rows_per_file: 10,
        row_group_rows: 4,
        queue_capacity: 1,
        ..config(dir.path())
    };
    let t0 = ts("2025-03-04T10:00:00Z");
    let rows: Vec<_> = (0..25)
        .map(|i| full_row(i, t0 + Duration::from_millis(i as u64)))
        .collect();
    let stats = record_and_stop(cfg, &rows).await;

    let per_file: Vec<usize> = stats.files.iter().map(|f| read_rows(f).len()).collect();
    assert_eq!(per_file, vec![10, 10, 5], "files: {:?}", stats.files);
    let row_groups: Vec<usize> = stats
        .files
        .iter()
        .map(|f| open_reader(f).metadata().num_row_groups())
        .collect();
    assert_eq!(row_groups, vec![3, 3, 2], "row groups of at most 4 rows");
    let read_back: Vec<_> = stats.files.iter().flat_map(|f| read_rows(f)).collect();
    assert_eq!(read_back, rows, "no row lost, duplicated or reordered");
    assert_eq!(stats.rows, 25);
    let mut names = stats.files.clone();
    names.sort();
    assert_eq!(names, stats.files, "uuidv7 file names sort in write order");
}

/// Row groups carry a minimum and maximum on the columns analysts filter on (so a query
/// by time, audit id, namespace or pod skips row groups), and none on the others.
#[tokio::test]
async fn row_groups_keep_statistics_on_the_columns_analysts_filter_on() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let t0 = ts("2025-03-04T10:00:00Z");
    let rows: Vec<_> = (0..5)
        .map(|i| full_row(i, t0 + Duration::from_millis(i as u64)))
        .collect();
    let stats = record_and_stop(config(dir.path()), &rows).await;
    let metadata = open_reader(&stats.files[0]).metadata().clone();
    let group = metadata.row_group(0);
    let has_statistics = |path: &str| {
        group
            .columns()
            .iter()
            .find(|c| c.column_path().string() == path)
            .unwrap_or_else(|| panic!("no column {path}"))
            .statistics()
            .is_some_and(|s| s.min_bytes_opt().is_some() && s.max_bytes_opt().is_some())
    };
    for path in [
        "request_time",
        "audit_id",
        "verb",
        "workload.namespace",
        "workload.pod",
        "object_ref.resource",
        "object_ref.name",
    ] {
        assert!(has_statistics(path), "{path} has no minimum and maximum");
    }
    for path in [
        "request_uri",
        "user_agent",
        "response_object",
        "source_addr",
    ] {
        assert!(!has_statistics(path), "{path} has statistics");
    }
}

#[tokio::test]
async fn hive_layout_partitions_by_request_date_and_node() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let cases = [
        ("2025-03-04T23:59:59.999999Z", "2025-03-04"),
        ("2025-03-05T00:00:00Z", "2025-03-05"),
        // A long request recorded after midnight still lands in its own day.
        ("2025-03-04T23:00:00Z", "2025-03-04"),
        ("2025-03-05T12:00:00Z", "2025-03-05"),
    ];
    let rows: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, (t, _))| full_row(i as i64, ts(t)))
        .collect();
    let (recorder, handle, _trigger) = start(config(dir.path()));
    record_all(&handle, &rows).await;
    let files = handle
        .flush()
        .await
        .unwrap_or_else(|e| panic!("flush: {e}"));
    assert_eq!(files.len(), 2, "one file per date: {files:?}");

    for file in &files {
        let relative = file
            .strip_prefix(dir.path())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let parts: Vec<String> = relative
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        assert_eq!(parts.len(), 4, "table/date/node/file: {parts:?}");
        assert_eq!(parts[0], "table=requests");
        assert_eq!(parts[2], "node=node-a");
        let id = parts[3]
            .strip_prefix("part-")
            .and_then(|rest| rest.strip_suffix(".parquet"))
            .unwrap_or_else(|| panic!("file name {} is not part-<uuid>.parquet", parts[3]));
        let id = uuid::Uuid::parse_str(id).unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(id.get_version_num(), 7, "{id} is not a uuid v7");
        let date = parts[1]
            .strip_prefix("date=")
            .unwrap_or_else(|| panic!("{} is not date=", parts[1]));
        let in_file = read_rows(file);
        let expected: Vec<_> = rows
            .iter()
            .zip(cases)
            .filter(|(_, (_, day))| *day == date)
            .map(|(row, _)| row.clone())
            .collect();
        let mut expected_sorted = expected.clone();
        expected_sorted.sort_by_key(|r| r.request_time);
        assert_eq!(
            in_file, expected_sorted,
            "rows in {date}, sorted by request_time"
        );
    }
    drop(handle);
    recorder
        .join()
        .await
        .unwrap_or_else(|e| panic!("join: {e}"));
}

#[tokio::test]
async fn files_in_progress_are_hidden_until_closed() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    // Batches of 2 rows reach the writer at once, so a file is open on disk mid-test.
    let cfg = RecorderConfig {
        row_group_rows: 2,
        ..config(dir.path())
    };
    let (recorder, handle, _trigger) = start(cfg);
    let t0 = ts("2025-03-04T10:00:00Z");
    let rows: Vec<_> = (0..5)
        .map(|i| full_row(i, t0 + Duration::from_secs(i as u64)))
        .collect();
    record_all(&handle, &rows).await;

    let in_progress = |dir: &Path| {
        all_files(dir)
            .into_iter()
            .filter(|f| file_name(f).ends_with(".parquet.inprogress"))
            .count()
    };
    wait_for("an in-progress file", || in_progress(dir.path()) == 1).await;
    for file in all_files(dir.path()) {
        let name = file_name(&file);
        assert!(
            name.starts_with('.'),
            "{name} is visible before the file is closed"
        );
        assert!(
            !is_visible_parquet(&file),
            "{name} would be picked up by *.parquet globs"
        );
    }

    let files = handle
        .flush()
        .await
        .unwrap_or_else(|e| panic!("flush: {e}"));
    assert_eq!(in_progress(dir.path()), 0, "temporary file left behind");
    // (The manifest that lists it is not a data file.)
    let data_files: Vec<PathBuf> = all_files(dir.path())
        .into_iter()
        .filter(|f| !f.starts_with(dir.path().join(manifest::MANIFEST_DIR)))
        .collect();
    assert_eq!(data_files, files, "only the published file remains");
    assert_eq!(read_rows(&files[0]), rows);
    drop(handle);
    recorder
        .join()
        .await
        .unwrap_or_else(|e| panic!("join: {e}"));
}

#[tokio::test]
async fn drain_writes_queued_rows_and_refuses_new_ones() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (recorder, handle, trigger) = start(config(dir.path()));
    let t0 = ts("2025-03-04T10:00:00Z");
    let rows: Vec<_> = (0..100)
        .map(|i| full_row(i, t0 + Duration::from_millis(i as u64)))
        .collect();
    record_all(&handle, &rows).await;

    // The handle is still held: the drain alone must stop the recorder and release it.
    let outcome = trigger.drain(Duration::from_secs(10)).await;
    assert_eq!(
        outcome,
        drain::DrainOutcome::Complete,
        "recorder held the drain"
    );
    let stats = recorder
        .join()
        .await
        .unwrap_or_else(|e| panic!("join: {e}"));
    assert_eq!(stats.rows, 100);
    let read_back: Vec<_> = stats.files.iter().flat_map(|f| read_rows(f)).collect();
    assert_eq!(read_back, rows);

    match handle.record(full_row(1000, t0)).await {
        Err(RecorderError::Stopped) => {}
        other => panic!("record after drain should fail with Stopped, got {other:?}"),
    }
    assert!(
        matches!(handle.flush().await, Err(RecorderError::Stopped)),
        "flush after drain should fail"
    );
}

#[tokio::test]
async fn dropping_every_handle_flushes_and_stops() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    // An age too large for Instant arithmetic must mean "never", not a panic.
    let cfg = RecorderConfig {
        max_file_age: Duration::MAX,
        ..config(dir.path())
    };
    let (recorder, handle, _trigger) = start(cfg);
    let clone = handle.clone();
    let t0 = ts("2025-03-04T10:00:00Z");
    record_all(&handle, &[full_row(1, t0)]).await;
    record_all(&clone, &[sparse_row(2, t0 + Duration::from_secs(1))]).await;
    drop(handle);
    drop(clone);
    let stats = tokio::time::timeout(Duration::from_secs(10), recorder.join())
        .await
        .unwrap_or_else(|_| panic!("recorder did not stop after its handles were dropped"))
        .unwrap_or_else(|e| panic!("join: {e}"));
    assert_eq!(stats.files.len(), 1);
    assert_eq!(
        read_rows(&stats.files[0]),
        vec![full_row(1, t0), sparse_row(2, t0 + Duration::from_secs(1))]
    );
}

#[tokio::test]
async fn old_files_are_rotated_without_a_flush() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let cfg = RecorderConfig {
        max_file_age: Duration::from_millis(100),
        ..config(dir.path())
    };
    let (recorder, handle, _trigger) = start(cfg);
    let t0 = ts("2025-03-04T10:00:00Z");
    record_all(&handle, &[full_row(1, t0)]).await;
    wait_for("an age-rotated file", || {
        all_files(dir.path()).iter().any(|f| is_visible_parquet(f))
    })
    .await;
    let published: Vec<_> = all_files(dir.path())
        .into_iter()
        .filter(|f| is_visible_parquet(f))
        .collect();
    assert_eq!(read_rows(&published[0]), vec![full_row(1, t0)]);
    drop(handle);
    let stats = recorder
        .join()
        .await
        .unwrap_or_else(|e| panic!("join: {e}"));
    assert_eq!(stats.files, published);
}

#[tokio::test]
async fn flush_with_nothing_recorded_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (recorder, handle, _trigger) = start(config(dir.path()));
    assert_eq!(
        handle
            .flush()
            .await
            .unwrap_or_else(|e| panic!("flush: {e}")),
        Vec::<PathBuf>::new()
    );
    drop(handle);
    assert_eq!(
        recorder
            .join()
            .await
            .unwrap_or_else(|e| panic!("join: {e}")),
        RecorderStats::default()
    );
    assert_eq!(
        all_files(dir.path()),
        Vec::<PathBuf>::new(),
        "no stray files (e.g. the write probe)"
    );
}

#[tokio::test]
async fn bad_config_and_unusable_directory_fail_at_start() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let regular_file = dir.path().join("not-a-dir");
    std::fs::write(&regular_file, b"x").unwrap_or_else(|e| panic!("write: {e}"));
    let base = config(dir.path());
    let cases: Vec<(&str, RecorderConfig, &str)> = vec![
        (
            "empty node",
            RecorderConfig {
                node: String::new(),
                ..base.clone()
            },
            "recorder config: node",
        ),
        (
            "slash in node",
            RecorderConfig {
                node: "a/../b".into(),
                ..base.clone()
            },
            "recorder config: node",
        ),
        (
            "equals in node",
            RecorderConfig {
                node: "a=b".into(),
                ..base.clone()
            },
            "recorder config: node",
        ),
        (
            "zero rows",
            RecorderConfig {
                max_rows_per_file: 0,
                ..base.clone()
            },
            "max_rows_per_file",
        ),
        (
            "zero age",
            RecorderConfig {
                max_file_age: Duration::ZERO,
                ..base.clone()
            },
            "max_file_age",
        ),
        (
            "zero queue",
            RecorderConfig {
                queue_capacity: 0,
                ..base.clone()
            },
            "queue_capacity",
        ),
        (
            "zero row group",
            RecorderConfig {
                row_group_rows: 0,
                ..base.clone()
            },
            "row_group_rows",
        ),
        (
            "empty dir",
            RecorderConfig {
                dir: PathBuf::new(),
                ..base.clone()
            },
            "recorder config: dir",
        ),
        (
            "dir under a regular file",
            RecorderConfig {
                dir: regular_file.join("rec"),
                ..base.clone()
            },
            "not-a-dir/rec/table=requests: cannot create: Not a directory",
        ),
    ];
    for (name, cfg, want) in cases {
        let (_trigger, watcher) = drain::channel();
        match Recorder::start(cfg, watcher) {
            Ok(_) => panic!("{name}: start should fail"),
            Err(e) => assert!(
                e.to_string().contains(want),
                "{name}: error {e:?} should contain {want:?}"
            ),
        }
    }
}

#[test]
fn start_outside_a_runtime_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (_trigger, watcher) = drain::channel();
    assert!(matches!(
        Recorder::start(config(dir.path()), watcher),
        Err(RecorderError::NoRuntime)
    ));
}

#[tokio::test]
async fn a_write_failure_takes_recording_down_and_it_recovers_when_the_disk_does() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (recorder, handle, _trigger) = start(config(dir.path()));
    record_all(&handle, &[full_row(0, ts("2025-03-04T09:59:59Z"))]).await;
    let before = handle
        .flush()
        .await
        .unwrap_or_else(|e| panic!("flush: {e}"));
    assert_eq!(before.len(), 1);
    assert!(handle.health().is_ok());

    // Break the table directory after start-up: the date partition can no longer be created.
    let table = dir.path().join("table=requests");
    let moved = dir.path().join("moved-away");
    std::fs::rename(&table, &moved).unwrap_or_else(|e| panic!("move {}: {e}", table.display()));
    std::fs::write(&table, b"not a directory").unwrap_or_else(|e| panic!("write: {e}"));

    handle
        .record(full_row(1, ts("2025-03-04T10:00:00Z")))
        .await
        .unwrap_or_else(|e| panic!("queued: {e}"));
    let flush_error = match handle.flush().await {
        Ok(files) => panic!("flush should fail, wrote {files:?}"),
        Err(e) => e.to_string(),
    };
    assert!(
        flush_error.contains("recording: create directory")
            && flush_error.contains("table=requests/date=2025-03-04")
            && flush_error.contains("Not a directory"),
        "flush error names the path and cause: {flush_error}"
    );
    let down = handle.health_report();
    assert!(!down.up, "{down:?}");
    assert_eq!(down.outages, 1);
    assert_eq!(down.rows_lost, 1);
    assert!(
        down.cause
            .as_deref()
            .is_some_and(|c| c.contains("Not a directory")),
        "{down:?}"
    );
    // While down, rows are refused at once with the cause, not queued to be lost later.
    match handle.record(full_row(2, ts("2025-03-04T10:00:01Z"))).await {
        Err(e) => assert!(e.to_string().contains("Not a directory"), "{e}"),
        Ok(()) => panic!("record while down should fail"),
    }
    assert_eq!(handle.health_report().rows_lost, 2);

    // The recording's directory comes back but the write-ahead log's cannot take a new
    // segment: still down (up, the next mutation would take it down again).
    let wal_dir = dir.path().join(DEFAULT_WAL_DIR);
    let wal_moved = dir.path().join("wal-moved-away");
    std::fs::rename(&wal_dir, &wal_moved).unwrap_or_else(|e| panic!("move the log: {e}"));
    std::fs::write(&wal_dir, b"not a directory").unwrap_or_else(|e| panic!("write: {e}"));
    std::fs::remove_file(&table).unwrap_or_else(|e| panic!("remove: {e}"));
    std::fs::rename(&moved, &table).unwrap_or_else(|e| panic!("restore: {e}"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let still = handle.health_report();
    assert!(
        !still.up
            && still
                .cause
                .as_deref()
                .is_some_and(|c| c.contains(DEFAULT_WAL_DIR)),
        "the probe covers the log's directory: {still:?}"
    );

    // The disk comes back: the recorder notices by itself and records again.
    std::fs::remove_file(&wal_dir).unwrap_or_else(|e| panic!("remove: {e}"));
    std::fs::rename(&wal_moved, &wal_dir).unwrap_or_else(|e| panic!("restore the log: {e}"));
    wait_for("recording to recover", || handle.health().is_ok()).await;
    record_all(&handle, &[full_row(3, ts("2025-03-04T10:00:02Z"))]).await;
    let after = handle
        .flush()
        .await
        .unwrap_or_else(|e| panic!("flush after recovery: {e}"));
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(
        before.iter().all(|f| f.exists()),
        "published files are kept"
    );
    let ids: Vec<String> = after
        .iter()
        .flat_map(|f| read_rows(f))
        .map(|r| r.audit_id)
        .collect();
    assert_eq!(
        ids,
        [
            full_row(0, ts("2025-03-04T09:59:59Z")).audit_id,
            full_row(3, ts("2025-03-04T10:00:02Z")).audit_id
        ]
    );
    drop(handle);
    let stats = recorder
        .join()
        .await
        .unwrap_or_else(|e| panic!("join after recovery: {e}"));
    assert_eq!((stats.rows, stats.rows_lost, stats.outages), (2, 2, 1));
}

/// A file the writer cannot complete is kept aside (hidden), never deleted.
#[tokio::test]
async fn a_file_that_cannot_be_completed_is_kept_aside() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    // One-row batches: the row reaches the writer's open file at once.
    let (recorder, handle, _trigger) = start(RecorderConfig {
        row_group_rows: 1,
        ..config(dir.path())
    });
    record_all(&handle, &[full_row(1, ts("2025-03-04T10:00:00Z"))]).await;
    let partition = dir
        .path()
        .join("table=requests/date=2025-03-04/node=node-a");
    let mut inprogress = None;
    wait_for("the in-progress file", || {
        inprogress = std::fs::read_dir(&partition)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(Result::ok)
            .map(|e| e.path());
        inprogress.is_some()
    })
    .await;
    let inprogress = inprogress.unwrap_or_else(|| panic!("no in-progress file"));
    // A directory where the finished file should go: the rename into place fails.
    let name = file_name(&inprogress);
    let published = name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(".inprogress"))
        .unwrap_or_else(|| panic!("unexpected in-progress name {name}"));
    std::fs::create_dir(partition.join(published)).unwrap_or_else(|e| panic!("block: {e}"));

    let error = match handle.flush().await {
        Ok(files) => panic!("flush should fail, published {files:?}"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("rename into place"), "{error}");
    assert_eq!(handle.health_report().outages, 1);
    // The row the file held never reached a published file: counted as lost.
    assert_eq!(handle.health_report().rows_lost, 1);
    let kept = partition.join(format!(".{published}.failed"));
    let bytes = std::fs::metadata(&kept)
        .unwrap_or_else(|e| panic!("{} should be kept: {e}", kept.display()))
        .len();
    assert!(bytes > 0, "the kept file holds what was written");
    drop(handle);
    assert!(recorder.join().await.is_ok());
}

/// What analysts will do: DuckDB and pyarrow over the directory, no configuration.
#[tokio::test]
async fn duckdb_and_pyarrow_read_the_directory_as_is() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import duckdb, pyarrow"])
        .output();
    let missing = match &probe {
        Ok(out) if out.status.success() => None,
        // The last line of the traceback names the missing module.
        Ok(out) => Some(
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .lines()
                .last()
                .unwrap_or("")
                .to_string(),
        ),
        Err(e) => Some(format!("python3: {e}")),
    };
    if let Some(reason) = missing {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have python3 with duckdb and pyarrow: {reason}"
        );
        println!(
            "SKIP duckdb_and_pyarrow_read_the_directory_as_is: {reason} (pip install duckdb pyarrow)"
        );
        return;
    }

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let rows = vec![
        full_row(1, ts("2025-03-04T23:59:59.999999Z")),
        sparse_row(2, ts("2025-03-05T00:00:00.000001Z")),
        full_row(3, ts("2025-03-05T08:30:00Z")),
    ];
    let stats = record_and_stop(config(dir.path()), &rows).await;
    assert_eq!(stats.files.len(), 2);

    let script = r#"
import json, sys, duckdb, pyarrow.dataset as ds
root = sys.argv[1]
con = duckdb.connect()
rows = con.execute("""
    SELECT CAST(date AS VARCHAR), node, audit_id, epoch_us(request_time), epoch_us(response_time),
           latency_us, workload.cgroup_id, workload.pod, workload.command, object_ref.resource,
           object_ref.name, user_agent, decision, outcome, response_code, request_bytes, error,
           typeof(request_time), typeof(workload.netns_cookie), typeof(response_code)
    FROM read_parquet(? || '/table=requests/**/*.parquet', hive_partitioning = true)
    ORDER BY request_time
""", [root]).fetchall()
table = ds.dataset(root + "/table=requests", format="parquet", partitioning="hive").to_table()
print(json.dumps({"duckdb": rows, "pyarrow_rows": table.num_rows,
                  "pyarrow_columns": table.column_names}, default=str))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("run python3: {e}"));
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON {e}: {}", String::from_utf8_lossy(&out.stdout)));
    let micros = |r: &RequestRecord| r.request_time.as_microsecond();
    let expected = serde_json::json!({
        "duckdb": [
            ["2025-03-04", "node-a", rows[0].audit_id, micros(&rows[0]), micros(&rows[0]) + 1501, 1501,
             4_000_000_001_i64, "agent-1", "kubectl", "deployments", "web-1",
             "kubectl/v1.32.0 (linux/amd64) kubernetes/abcdef", "allow", "forwarded", 200, 0, null,
             "TIMESTAMP WITH TIME ZONE", "BIGINT", "INTEGER"],
            ["2025-03-05", "node-a", "sparse-2", micros(&rows[1]), null, -1,
             -5, null, null, "", "", null, "none", "upstream_failed", i32::MIN, i64::MIN,
             "upstream unreachable: connection refused",
             "TIMESTAMP WITH TIME ZONE", "BIGINT", "INTEGER"],
            ["2025-03-05", "node-a", rows[2].audit_id, micros(&rows[2]), micros(&rows[2]) + 1503, 1503,
             4_000_000_003_i64, "agent-3", "kubectl", "deployments", "web-3",
             "kubectl/v1.32.0 (linux/amd64) kubernetes/abcdef", "allow", "forwarded", 200, 0, null,
             "TIMESTAMP WITH TIME ZONE", "BIGINT", "INTEGER"],
        ],
        "pyarrow_rows": 3,
    });
    assert_eq!(
        got["duckdb"], expected["duckdb"],
        "DuckDB view of the recording"
    );
    assert_eq!(
        got["pyarrow_rows"], expected["pyarrow_rows"],
        "pyarrow.dataset row count"
    );
    let columns = got["pyarrow_columns"]
        .as_array()
        .unwrap_or_else(|| panic!("no columns: {got}"));
    for name in requests_schema()
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .chain(["date"])
    {
        assert!(
            columns.iter().any(|c| c == name),
            "pyarrow is missing column {name}: {columns:?}"
        );
    }
}

/// The writer thread gone (a panic drops its end of the command channel without a
/// result): recording is down at once, so the proxy refuses what must be recorded and
/// /readyz says why, instead of forwarding requests whose rows go nowhere.
#[tokio::test]
async fn a_lost_writer_thread_marks_recording_down() {
    let dir = tempfile::tempdir().expect("temp dir");
    let shared = Arc::new(Shared::default());
    let (command_tx, command_rx) = mpsc::channel(4);
    let (done_tx, done_rx) = oneshot::channel();
    // What a panicking writer leaves behind: no receiver, no result.
    drop(command_rx);
    drop(done_tx);
    let coordinator = Coordinator {
        shared: Arc::clone(&shared),
        cfg: config(dir.path()),
        batch_rows: 16,
        open: BTreeMap::new(),
        commands: command_tx,
    };
    let (_queue, rows) = mpsc::channel(4);
    let (_trigger, drain) = drain::channel();
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        coordinator.run(rows, drain, done_rx),
    )
    .await
    .expect("the coordinator notices the writer is gone");
    assert!(
        matches!(result, Err(RecorderError::TaskLost(_))),
        "{result:?}"
    );
    assert!(
        shared.is_down(),
        "recording must be down without its writer"
    );
    assert!(
        shared
            .current_error()
            .is_some_and(|e| e.to_string().contains("writer thread")),
        "{:?}",
        shared.current_error()
    );
}

/// Rows waiting for room in a full queue are bounded: past the limit recording is
/// behind (requests that must be recorded are refused and /readyz says why), twice past
/// it new rows are shed, and once half the limit is left it is up again.
#[tokio::test]
async fn rows_piling_up_behind_a_slow_writer_make_recording_behind() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (recorder, handle, _trigger) = start(config(dir.path()));
    let limit = MIN_BACKLOG_LIMIT;
    assert!(handle.health().is_ok());
    handle.backlog_add(limit);
    assert!(handle.health().is_ok(), "up to the limit may wait");
    handle.backlog_add(1);
    let why = handle
        .health()
        .expect_err("behind past the limit")
        .to_string();
    assert!(why.contains("recording is behind"), "{why}");
    let report = handle.health_report();
    assert!(!report.up && report.cause.is_some_and(|c| c.contains("behind")));
    assert_eq!(report.outages, 1);
    assert!(!handle.overloaded());
    handle.backlog_add(limit);
    assert!(handle.overloaded(), "twice the limit: new rows are shed");
    handle.shed(&full_row(1, ts("2025-03-04T10:00:00Z")));
    assert_eq!(handle.health_report().rows_lost, 1);
    handle.backlog_done(limit + 1);
    assert!(
        handle.health().is_err(),
        "still behind above half the limit"
    );
    handle.backlog_done(limit / 2);
    assert!(handle.health().is_ok(), "caught up");
    // Rows are still recorded while behind: being behind is not being down.
    handle.backlog_add(2 * limit);
    record_all(&handle, &[full_row(2, ts("2025-03-04T10:00:01Z"))]).await;
    handle.backlog_done(2 * limit);
    let files = handle.flush().await.expect("flush");
    let rows: Vec<_> = files.iter().flat_map(|f| read_rows(f)).collect();
    assert_eq!(rows.len(), 1);
    drop(handle);
    assert!(recorder.join().await.is_ok());
}

#[test]
fn a_part_gone_for_good_keeps_recording_down_whatever_the_probes_say() {
    let shared = Shared::default();
    shared.set_down(RecorderError::Stopped);
    shared.set_up();
    assert!(
        shared.current_error().is_none(),
        "a passing probe brings it up"
    );
    // The write-ahead log's thread panicked: the disk is fine, the log is not.
    shared.set_broken(RecorderError::TaskLost("the write-ahead log's thread"));
    shared.set_up();
    let error = shared.current_error().expect("still down");
    assert!(error.to_string().contains("write-ahead log"), "{error}");
}
