//! Recording throughput: rows per second into zstd Parquet (target >= 200k rows/s per core).
//!
//! `encode_write` is the single-threaded cost per row (Arrow encoding, zstd, file write);
//! `pipeline` goes through the public async API (queue, coordinator, writer thread, fsync
//! and rename). Run with `cargo bench -p gateway-userspace --bench recorder`; criterion
//! prints the figure as `thrpt: ... Kelem/s` (one element = one row).

/// The product's allocator (gateway-userspace/src/main.rs): figures with glibc's malloc
/// would not be the gateway's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::fs::File;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use gateway_userspace::drain;
use gateway_userspace::policy::Action;
use gateway_userspace::recorder::{
    DEFAULT_ROW_GROUP_ROWS, ObjectRef, Outcome, PrincipalRecord, Recorder, RecorderConfig,
    RequestRecord, WorkloadRecord, requests_schema, to_record_batch, writer_properties,
};
use gateway_userspace::request::Verb;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

const ROWS: usize = 100_000;
const BATCH: usize = 4096;

/// Rows shaped like a busy node: a few dozen agent pods, a realistic verb/resource mix,
/// unique audit ids and URIs, a few failures and denials.
fn realistic_rows(n: usize) -> Vec<RequestRecord> {
    let start: jiff::Timestamp = "2025-03-04T10:00:00Z"
        .parse()
        .unwrap_or_else(|e| panic!("timestamp: {e}"));
    let verbs = ["get", "list", "watch", "create", "patch", "delete"];
    let resources = [
        ("", "v1", "pods"),
        ("apps", "v1", "deployments"),
        ("", "v1", "configmaps"),
        ("batch", "v1", "jobs"),
    ];
    (0..n)
        .map(|i| {
            let pod = i % 40;
            let verb = verbs[i % verbs.len()];
            let (group, version, resource) = resources[i % resources.len()];
            let request_time = start + Duration::from_micros(i as u64 * 7);
            let latency_us = 300 + (i as i64 * 37) % 5000;
            let denied = i % 17 == 0;
            let failed = i % 101 == 0;
            let prefix = if group.is_empty() {
                format!("/api/{version}")
            } else {
                format!("/apis/{group}/{version}")
            };
            RequestRecord {
                request_time,
                response_time: (!failed)
                    .then(|| request_time + Duration::from_micros(latency_us as u64)),
                latency_us,
                audit_id: uuid::Uuid::now_v7().to_string(),
                node: "worker-3.eu-west-1.compute.internal".into(),
                cluster: "prod-eu".into(),
                workload: WorkloadRecord {
                    cgroup_id: 10_000 + pod as i64,
                    netns_cookie: 4_096 + pod as i64,
                    pid: 20_000 + (i % 500) as i64,
                    command: Some(if i % 3 == 0 { "python3" } else { "kubectl" }.into()),
                    namespace: Some(format!("agents-{}", pod % 5)),
                    pod: Some(format!("agent-{pod}-7f9c8b6d5-x2k4q")),
                    pod_uid: Some(format!("6f1c7e0a-3b52-4a57-9a8e-2f9d0c1b2a{pod:02}")),
                    service_account: Some("agent".into()),
                    container: Some("main".into()),
                }
                .into(),
                source_addr: format!("10.244.{}.{}:{}", pod % 4, pod, 40_000 + i % 20_000).into(),
                original_dst: Some("192.0.2.1:443".into()),
                user_agent: Some("kubectl/v1.32.0 (linux/amd64) kubernetes/70d3cc9".into()),
                kubectl_command: Some(format!("kubectl {verb}")),
                kubectl_session: Some(format!("{:08x}-session", i / 8)),
                verb: Verb::parse(verb).unwrap_or_default(),
                request_uri: format!(
                    "{prefix}/namespaces/agents-{}/{resource}/obj-{}?timeout=32s",
                    pod % 5,
                    i % 1000
                ),
                object_ref: ObjectRef {
                    api_group: group.into(),
                    api_version: version.into(),
                    resource: resource.into(),
                    subresource: Default::default(),
                    namespace: format!("agents-{}", pod % 5).into(),
                    name: format!("obj-{}", i % 1000).into(),
                },
                decision: Some(if denied { Action::Deny } else { Action::Allow }),
                outcome: if failed {
                    Outcome::UpstreamFailed
                } else if denied {
                    Outcome::Denied
                } else {
                    Outcome::Forwarded
                },
                policy_rule: Some(if denied { "no-deletes" } else { "read-mostly" }.into()),
                reason: denied.then(|| "verb delete is not allowed for agents".into()),
                response_code: if failed {
                    502
                } else if denied {
                    403
                } else {
                    200
                },
                request_bytes: if verb == "create" || verb == "patch" {
                    850
                } else {
                    0
                },
                response_bytes: 1_200 + (i as i64 * 13) % 30_000,
                error: failed.then(|| "upstream unreachable: connection refused".into()),
                principal: PrincipalRecord {
                    kind: "serviceAccount".into(),
                    subject: Some("system:serviceaccount:agents:cursor".into()),
                    groups: vec![
                        "system:serviceaccounts".into(),
                        "system:serviceaccounts:agents".into(),
                    ],
                    reason: None,
                    mismatch: None,
                }
                .into(),
                impersonated_user: Some("system:serviceaccount:agents:cursor".into()),
                masked: None,
                approval_outcome: None,
                access_request: None,
                approval_decided_by: None,
                approval_wait_ms: None,
                request_content_type: (verb == "create" || verb == "patch")
                    .then(|| "application/json".into()),
                request_object: (verb == "create" || verb == "patch").then(|| {
                    format!(
                        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"obj-{}","namespace":"agents-{}"}},"data":{{"mode":"fast","replicas":"{}"}}}}"#,
                        i % 1000,
                        pod % 5,
                        i % 7
                    )
                }),
                request_object_truncated: false,
                masked_fields: 0,
                // A typical small object, as a GET of one ConfigMap returns it.
                response_object: (!denied && !failed).then(|| {
                    format!(
                        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"obj-{}","namespace":"agents-{}","uid":"6f1c7e0a-3b52-4a57-9a8e-{:012}","resourceVersion":"{}","creationTimestamp":"2026-11-23T17:00:00Z","labels":{{"app":"agent","team":"platform"}}}},"data":{{"mode":"fast","endpoint":"https://example.invalid/v1","retries":"3","timeout":"30s"}}}}"#,
                        i % 1000,
                        pod % 5,
                        i,
                        100_000 + i
                    )
                }),
                response_object_truncated: false,
            }
        })
        .collect()
}

/// Arrow encoding, zstd and the file write on one thread, with the recorder's Parquet
/// settings and, for comparison, with the parquet crate's defaults (dictionary and page
/// statistics on every column).
fn encode_write(c: &mut Criterion, rows: &[RequestRecord]) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let level = ZstdLevel::try_new(3).unwrap_or_else(|e| panic!("zstd level: {e}"));
    let defaults = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .build();
    let product =
        writer_properties(DEFAULT_ROW_GROUP_ROWS).unwrap_or_else(|e| panic!("properties: {e}"));
    let mut group = c.benchmark_group("recorder");
    group.throughput(Throughput::Elements(rows.len() as u64));
    group.sample_size(10);
    for (name, props) in [
        ("encode_write_100k_rows_single_thread", product),
        ("encode_write_100k_rows_parquet_defaults", defaults),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let file = File::create(dir.path().join("bench.parquet"))
                    .unwrap_or_else(|e| panic!("create: {e}"));
                let mut writer = ArrowWriter::try_new(file, requests_schema(), Some(props.clone()))
                    .unwrap_or_else(|e| panic!("writer: {e}"));
                for chunk in rows.chunks(BATCH) {
                    let batch = to_record_batch(chunk).unwrap_or_else(|e| panic!("encode: {e}"));
                    writer
                        .write(&batch)
                        .unwrap_or_else(|e| panic!("write: {e}"));
                }
                black_box(writer.close().unwrap_or_else(|e| panic!("close: {e}")));
            })
        });
        let size = std::fs::metadata(dir.path().join("bench.parquet")).map_or(0, |m| m.len());
        eprintln!("recorder/{name}: file of {} rows, {size} bytes", rows.len());
    }
    group.finish();
}

fn pipeline(c: &mut Criterion, rows: &[RequestRecord]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let mut group = c.benchmark_group("recorder");
    group.throughput(Throughput::Elements(rows.len() as u64));
    group.sample_size(10);
    group.bench_function("pipeline_100k_rows_record_to_published_file", |b| {
        b.iter_batched(
            || {
                (
                    rows.to_vec(),
                    tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}")),
                )
            },
            |(rows, dir)| {
                runtime.block_on(async {
                    let (_trigger, watcher) = drain::channel();
                    let (recorder, handle) =
                        Recorder::start(RecorderConfig::new(dir.path(), "bench-node"), watcher)
                            .unwrap_or_else(|e| panic!("start: {e}"));
                    for row in rows {
                        handle
                            .record(row)
                            .await
                            .unwrap_or_else(|e| panic!("record: {e}"));
                    }
                    drop(handle);
                    let stats = recorder
                        .join()
                        .await
                        .unwrap_or_else(|e| panic!("join: {e}"));
                    assert_eq!(stats.rows, ROWS as u64, "every row written");
                });
                dir
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let rows = realistic_rows(ROWS);
    encode_write(c, &rows);
    pipeline(c, &rows);
}

criterion_group!(recorder, benches);
criterion_main!(recorder);
