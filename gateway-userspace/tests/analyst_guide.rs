//! The analysts' side of the recording, checked against files the recorder writes:
//!
//! * every ```sql block of docs/analyst-guide.md runs in DuckDB and returns rows;
//! * pandas `read_parquet`, `pyarrow.parquet.read_table` and pyarrow datasets read both
//!   tables' directory trees with their partitions (`date`, `node`);
//! * docs/recording-schema.md lists exactly the columns and types of the files, and every
//!   file carries the schema version in its metadata.

use std::{
    fs::File,
    path::{Path, PathBuf},
    time::Duration,
};

use arrow_schema::{DataType, Field, TimeUnit};
use gateway_userspace::{
    drain,
    policy::Action,
    recorder::{
        self, ObjectRef, Outcome, PrincipalRecord, Recorder, RecorderConfig, RequestRecord,
        SessionKind, WorkloadRecord, schema::SCHEMA_VERSION,
    },
    request::Verb,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn docs(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn python_has(modules: &str) -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have python3 with {modules}"
        );
        println!("SKIP: python3 lacks {modules} (cargo xtask setup installs them)");
    }
    ok
}

fn request(i: usize, pod: &str, verb: Verb, resource: &str) -> RequestRecord {
    let now = jiff::Timestamp::now();
    RequestRecord {
        request_time: now - jiff::SignedDuration::from_secs(60 - i as i64),
        response_time: Some(now - jiff::SignedDuration::from_secs(60 - i as i64)),
        latency_us: 900 + i as i64,
        audit_id: format!("0190a6b2-7c1d-7e3f-8a9b-{i:012}"),
        node: "node-a".into(),
        cluster: "prod".into(),
        workload: WorkloadRecord {
            cgroup_id: 4242,
            namespace: Some("agents".into()),
            pod: Some(pod.into()),
            pod_uid: Some(format!("uid-{pod}")),
            service_account: Some("cursor".into()),
            command: Some("kubectl".into()),
            ..WorkloadRecord::default()
        }
        .into(),
        source_addr: "10.244.0.9:40000".into(),
        verb,
        request_uri: format!("/api/v1/namespaces/default/{resource}"),
        object_ref: ObjectRef {
            api_version: "v1".into(),
            resource: resource.into(),
            namespace: "default".into(),
            name: format!("obj-{i}").into(),
            ..ObjectRef::default()
        },
        decision: Some(Action::Allow),
        response_code: 200,
        outcome: Outcome::Forwarded,
        principal: PrincipalRecord {
            kind: "serviceaccount".into(),
            subject: Some("system:serviceaccount:agents:cursor".into()),
            ..PrincipalRecord::default()
        }
        .into(),
        ..RequestRecord::default()
    }
}

/// A recording with something for every query in the guide; returns its directory.
async fn write_recording(dir: &Path) {
    let (_trigger, watcher) = drain::channel();
    let (recorder, handle) =
        Recorder::start(RecorderConfig::new(dir, "node-a"), watcher).expect("recorder");
    let mut rows = vec![
        request(1, "cursor-agent-0", Verb::Create, "configmaps"),
        request(2, "cursor-agent-0", Verb::Delete, "pods"),
        request(3, "cursor-agent-0", Verb::Get, "secrets"),
        request(4, "cursor-agent-1", Verb::List, "secrets"),
        request(5, "other-agent", Verb::Get, "pods"),
        request(6, "other-agent", Verb::Create, "configmaps"),
        request(7, "cursor-agent-0", Verb::Get, "pods"),
        request(8, "cursor-agent-0", Verb::Get, "pods"),
    ];
    rows[1].decision = Some(Action::Deny);
    rows[1].outcome = Outcome::Denied;
    rows[1].response_code = 403;
    rows[1].policy_rule = Some("no-deletes".into());
    rows[1].reason = Some("agents may not delete pods".into());
    rows[2].decision = Some(Action::Mask);
    rows[2].masked = Some(r#"[{"rule":"mask-secrets","kind":"secretData","count":2}]"#.into());
    rows[3].decision = Some(Action::Mask);
    rows[3].masked = Some(r#"[{"rule":"mask-secrets","kind":"secretData","count":5}]"#.into());
    // A create that waited for a person's approval.
    rows[0].decision = Some(Action::Approve);
    rows[0].policy_rule = Some("approve-configmap-writes".into());
    rows[0].approval_outcome = Some("approved".into());
    rows[0].access_request = Some("ar-cursor-agent-0-7f3a".into());
    rows[0].approval_decided_by = Some("alice@example.com".into());
    rows[0].approval_wait_ms = Some(41_250);
    rows[0].response_code = 201;
    rows[5].outcome = Outcome::RecordingDown;
    rows[5].response_code = 503;
    rows[5].error = Some("recording is down".into());
    std::sync::Arc::make_mut(&mut rows[4].principal).mismatch =
        Some("token names agents:other".into());
    // An exec with a masked credential in its output, and a port-forward.
    rows[6].verb = Verb::Get;
    rows[6].object_ref.subresource = "exec".into();
    rows[6].object_ref.resource = "pods".into();
    rows[6].object_ref.name = "web".into();
    rows[6].request_uri = "/api/v1/namespaces/default/pods/web/exec?command=sh&command=-c&command=cat+env.sh&stdin=true&stdout=true".into();
    rows[6].response_code = 101;
    rows[6].masked_fields = 1;
    rows[7].object_ref.subresource = "portforward".into();
    rows[7].object_ref.name = "db".into();
    rows[7].request_uri = "/api/v1/namespaces/default/pods/db/portforward?ports=5432".into();
    rows[7].response_code = 101;

    let mut exec = handle.session(&rows[6].audit_id, SessionKind::Exec);
    for (dir, stream, data) in [
        ("to_server", "stdin", &b"cat env.sh\n"[..]),
        (
            "to_client",
            "stdout",
            b"export GITHUB_TOKEN=**masked:github-token**\n",
        ),
        ("to_client", "error", br#"{"status":"Success"}"#),
    ] {
        exec.frame(dir, stream, data).expect("frame");
    }
    exec.finish(None).await.expect("finish exec");
    let mut forward = handle.session(&rows[7].audit_id, SessionKind::PortForward);
    forward
        .frame("to_server", "portforward-data:5432", b"startup")
        .expect("frame");
    forward
        .frame("to_client", "portforward-data:5432", b"ready for query")
        .expect("frame");
    forward.finish(None).await.expect("finish port-forward");
    for row in rows {
        handle.record(row).await.expect("record");
    }
    drop(handle);
    let stats = tokio::time::timeout(Duration::from_secs(20), recorder.join())
        .await
        .expect("recorder did not stop")
        .expect("recorder");
    assert_eq!(stats.rows, 8);
    assert!(stats.exec_frame_rows >= 8, "{stats:?}");
}

/// The ```sql blocks of a markdown text, with the heading above each.
fn sql_blocks(markdown: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut heading = String::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            Some(block) if line.trim_start().starts_with("```") => {
                blocks.push((heading.clone(), std::mem::take(block)));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None if line.trim_start().starts_with("```sql") => current = Some(String::new()),
            None if line.starts_with('#') => {
                heading = line.trim_start_matches('#').trim().to_owned()
            }
            None => {}
        }
    }
    assert!(current.is_none(), "an unterminated ```sql block");
    blocks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_in_the_analyst_guide_runs_and_returns_rows() {
    if !python_has("duckdb") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    write_recording(dir.path()).await;
    let blocks = sql_blocks(&docs("analyst-guide.md"));
    assert!(
        blocks.len() >= 13,
        "a dozen queries and the setup: {}",
        blocks.len()
    );
    let (setup_heading, setup) = &blocks[0];
    assert!(
        setup.contains("CREATE OR REPLACE VIEW"),
        "{setup_heading}: {setup}"
    );
    let setup = setup.replace(
        "/var/lib/chaperone/recordings",
        dir.path().to_str().expect("utf-8 path"),
    );
    let queries: Vec<serde_json::Value> = blocks[1..]
        .iter()
        .map(|(h, q)| serde_json::json!([h, q]))
        .collect();
    let script = r#"
import duckdb, json, sys
setup, queries = json.loads(sys.argv[1]), json.loads(sys.argv[2])
con = duckdb.connect()
con.execute(setup)
results = []
for heading, query in queries:
    try:
        rows = con.execute(query).fetchall()
        results.append([heading, len(rows), None, repr(rows[:2])])
    except Exception as e:
        results.append([heading, 0, str(e), ""])
print(json.dumps(results))
"#;
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            &serde_json::to_string(&setup).expect("json"),
            &serde_json::to_string(&queries).expect("json"),
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<(String, usize, Option<String>, String)> =
        serde_json::from_slice(&out.stdout).expect("results");
    assert_eq!(results.len(), blocks.len() - 1);
    for (heading, rows, error, sample) in &results {
        assert_eq!(error, &None, "query {heading:?} failed");
        assert!(*rows > 0, "query {heading:?} returned no rows");
        println!("{heading}: {rows} rows, e.g. {sample}");
    }
    // A few answers checked, not only counted.
    let sample = |h: &str| {
        results
            .iter()
            .find(|r| r.0 == h)
            .map(|r| r.3.clone())
            .unwrap_or_else(|| panic!("no query {h:?}"))
    };
    assert!(sample("Every exec command").contains("sh -c cat env.sh"));
    assert!(sample("The output of an exec session").contains("**masked:github-token**"));
    assert!(sample("Port-forward traffic per session").contains("portforward-data:5432"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pandas_and_pyarrow_read_the_tree_with_its_partitions() {
    if !python_has("pandas, pyarrow") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    write_recording(dir.path()).await;
    let script = r#"
import json, sys
import pandas as pd, pyarrow.parquet as pq, pyarrow.dataset as ds
root = sys.argv[1]
out = {}
for table in ["requests", "exec_frames"]:
    path = root + "/table=" + table
    df = pd.read_parquet(path)
    t = pq.read_table(path)
    d = ds.dataset(path, format="parquet", partitioning="hive").to_table()
    out[table] = {
        "pandas_rows": len(df),
        "pandas_nodes": sorted(set(str(n) for n in df["node"])),
        "pandas_dates": len(set(str(n) for n in df["date"])),
        "read_table_rows": t.num_rows,
        "dataset_rows": d.num_rows,
        "dataset_columns": d.column_names,
    }
print(json.dumps(out))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(dir.path())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "pandas/pyarrow: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let frames = recorder::read_exec_frames(dir.path()).expect("read exec_frames");
    for (table, rows) in [("requests", 8), ("exec_frames", frames.len())] {
        let t = &got[table];
        assert_eq!(t["pandas_rows"], rows, "{table}: {t}");
        assert_eq!(t["read_table_rows"], rows, "{table}: {t}");
        assert_eq!(t["dataset_rows"], rows, "{table}: {t}");
        assert_eq!(
            t["pandas_nodes"],
            serde_json::json!(["node-a"]),
            "{table}: {t}"
        );
        assert_eq!(t["pandas_dates"], 1, "{table}: {t}");
        let columns = t["dataset_columns"].as_array().expect("columns");
        let nodes = columns.iter().filter(|c| *c == "node").count();
        assert_eq!(nodes, 1, "{table}: node appears once: {columns:?}");
    }
}

/// The doc's spelling of an Arrow type.
fn doc_type(t: &DataType) -> String {
    match t {
        DataType::Utf8 => "string".into(),
        DataType::Int64 => "int64".into(),
        DataType::Int32 => "int32".into(),
        DataType::Boolean => "bool".into(),
        DataType::Binary => "binary".into(),
        DataType::Timestamp(TimeUnit::Microsecond, Some(tz)) => format!("timestamp[us, {tz}]"),
        DataType::Struct(_) => "struct".into(),
        DataType::List(item) => format!("list<{}>", doc_type(item.data_type())),
        other => format!("{other:?}"),
    }
}

/// (name, type, nullable) rows of the first markdown table after `marker`.
fn doc_table(markdown: &str, marker: &str, name_cell: usize) -> Vec<(String, String, bool)> {
    let start = markdown
        .find(marker)
        .unwrap_or_else(|| panic!("recording-schema.md has no {marker:?}"));
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in markdown[start..].lines().skip(1) {
        let is_row = line.starts_with('|');
        if !is_row && in_table {
            break;
        }
        if !is_row || line.starts_with("| ---") || line.contains("| Type |") {
            in_table |= is_row;
            continue;
        }
        in_table = true;
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = cells[name_cell].trim_matches('`').to_owned();
        let ty = cells[name_cell + 1].to_owned();
        let nullable = match cells[name_cell + 2] {
            "yes" => true,
            "no" => false,
            other => panic!("{marker}: {name}: nullable is {other:?}"),
        };
        rows.push((name, ty, nullable));
    }
    rows
}

fn actual(fields: &[std::sync::Arc<Field>]) -> Vec<(String, String, bool)> {
    fields
        .iter()
        .map(|f| (f.name().clone(), doc_type(f.data_type()), f.is_nullable()))
        .collect()
}

fn first_file(dir: &Path, table: &str) -> PathBuf {
    recorder::list_table_files(dir, table)
        .expect("list")
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no {table} file"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_doc_matches_the_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_recording(dir.path()).await;
    let doc = docs("recording-schema.md");
    for (table, marker) in [
        ("requests", "## Table `requests`"),
        ("exec_frames", "## Table `exec_frames`"),
    ] {
        let file = first_file(dir.path(), table);
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&file).expect("open"))
            .expect("parquet");
        let metadata: Vec<(String, Option<String>)> = reader
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .map(|kv| {
                kv.iter()
                    .map(|k| (k.key.clone(), k.value.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (key, value) in [
            ("chaperone.schema_version", SCHEMA_VERSION.to_string()),
            ("chaperone.table", table.to_owned()),
            ("chaperone.node", "node-a".to_owned()),
        ] {
            assert!(
                metadata.contains(&(key.to_owned(), Some(value.clone()))),
                "{table}: metadata {key}={value} missing: {metadata:?}"
            );
        }
        let schema = reader.schema().clone();
        assert_eq!(
            doc_table(&doc, marker, 2),
            actual(schema.fields()),
            "docs/recording-schema.md, {marker}, differs from the {table} files"
        );
        for field in schema.fields() {
            if let DataType::Struct(children) = field.data_type() {
                let marker = format!("`{}` (struct)", field.name());
                assert_eq!(
                    doc_table(&doc, &marker, 1),
                    actual(children),
                    "docs/recording-schema.md, {marker}, differs from the files"
                );
            }
        }
    }
    assert!(
        doc.contains(&format!("Schema version {SCHEMA_VERSION}")),
        "recording-schema.md names the current schema version"
    );
}
