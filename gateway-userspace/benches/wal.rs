//! What the write-ahead log adds to a mutating request: one append and fsync before it is
//! forwarded (goal: p50 under 1 ms on the machine's disk), alone and with concurrent
//! requests sharing one fsync (group commit).
//!
//! Run with `cargo bench -p gateway-userspace --bench wal`. The log is written in a
//! temporary directory under the current directory (the package directory under cargo),
//! so the figure is that disk's fsync, not a tmpfs's; set `CHAPERONE_BENCH_DIR` to measure
//! another disk.

/// The product's allocator (gateway-userspace/src/main.rs): figures with glibc's malloc
/// would not be the gateway's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gateway_userspace::policy::Action;
use gateway_userspace::recorder::wal::Wal;
use gateway_userspace::recorder::{ObjectRef, Outcome, RequestRecord, WorkloadRecord};
use gateway_userspace::request::Verb;

/// A `kubectl create configmap` row as the proxy has it before forwarding.
fn create_row(i: u64) -> RequestRecord {
    RequestRecord {
        request_time: jiff::Timestamp::now(),
        audit_id: format!("01936f2e-1d4c-7a3b-9c1e-{i:012}"),
        node: "node-a".into(),
        cluster: "prod".into(),
        workload: WorkloadRecord {
            cgroup_id: 123_456,
            netns_cookie: 4096,
            pid: 4242,
            command: Some("kubectl".into()),
            namespace: Some("agents".into()),
            pod: Some("cursor-agent-0".into()),
            pod_uid: Some("6f1c7e0a-3b52-4a57-9a8e-2f9d0c1b2a3e".into()),
            service_account: Some("cursor".into()),
            container: Some("agent".into()),
        }
        .into(),
        source_addr: "10.244.1.7:51234".into(),
        user_agent: Some("kubectl/v1.32.0 (linux/amd64) kubernetes/abcdef".into()),
        kubectl_command: Some("kubectl create".into()),
        verb: Verb::Create,
        request_uri: "/api/v1/namespaces/agents/configmaps?fieldManager=kubectl-create".into(),
        object_ref: ObjectRef {
            api_version: "v1".into(),
            resource: "configmaps".into(),
            namespace: "agents".into(),
            ..ObjectRef::default()
        },
        decision: Some(Action::Allow),
        outcome: Outcome::Forwarded,
        request_content_type: Some("application/json".into()),
        request_object: Some(format!(
            r#"{{"kind":"ConfigMap","apiVersion":"v1","metadata":{{"name":"settings-{i}","namespace":"agents","labels":{{"app":"web","tier":"frontend"}}}},"data":{{"LOG_LEVEL":"info","FEATURE_FLAGS":"a,b,c,d","ENDPOINT":"https://api.example.internal:8443/v2","TIMEOUT":"30s","RETRIES":"5","CACHE":"enabled","REGION":"eu-west-1"}}}}"#
        )),
        ..RequestRecord::default()
    }
}

fn bench_dir() -> tempfile::TempDir {
    let base = std::env::var_os("CHAPERONE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::current_dir().unwrap_or_else(|e| panic!("cwd: {e}")));
    tempfile::Builder::new()
        .prefix(".wal-bench-")
        .tempdir_in(base)
        .unwrap_or_else(|e| panic!("bench dir: {e}"))
}

fn wal(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let dir = bench_dir();
    let (wal, tracker, _thread) = runtime
        .block_on(async { Wal::start(dir.path(), 1, Arc::new(|e| panic!("the log failed: {e}"))) })
        .unwrap_or_else(|e| panic!("start the log: {e}"));
    let mut group = c.benchmark_group("wal");
    group.measurement_time(Duration::from_secs(5));
    // The disk's own cost in the same run, for comparison: a row-sized write into a
    // zero-filled file and its fdatasync, which is what one begin waits for at least.
    group.throughput(Throughput::Elements(1));
    {
        let path = dir.path().join("baseline");
        let mut file = std::fs::File::create(&path).unwrap_or_else(|e| panic!("baseline: {e}"));
        std::io::Write::write_all(&mut file, &vec![0u8; 4 << 20])
            .and_then(|()| file.sync_all())
            .unwrap_or_else(|e| panic!("baseline: {e}"));
        let record = vec![b'x'; 1200];
        let mut at = 0u64;
        group.bench_function("disk_baseline_pwrite_fdatasync", |b| {
            b.iter(|| {
                std::os::unix::fs::FileExt::write_all_at(&file, &record, at)
                    .and_then(|()| file.sync_data())
                    .unwrap_or_else(|e| panic!("baseline: {e}"));
                at = (at + 1200) % (4 << 20);
            });
        });
    }
    let mut n = 0u64;
    group.throughput(Throughput::Elements(1));
    group.bench_function("begin_one_append_fsync", |b| {
        b.iter(|| {
            n += 1;
            let row = create_row(n);
            runtime
                .block_on(wal.begin(black_box(&row)))
                .unwrap_or_else(|e| panic!("begin: {e}"));
            // The Parquet writer publishes rows soon after; without this every row would
            // stay outstanding and the log would only grow.
            tracker.published([row.audit_id.as_str()]);
        });
    });
    const CONCURRENT: u64 = 16;
    group.throughput(Throughput::Elements(CONCURRENT));
    group.bench_function("begin_16_concurrent_group_commit", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let mut tasks = Vec::new();
                for _ in 0..CONCURRENT {
                    n += 1;
                    let wal = wal.clone();
                    let row = create_row(n);
                    tasks.push(tokio::spawn(async move {
                        wal.begin(&row).await.map(|()| row.audit_id)
                    }));
                }
                for task in tasks {
                    let id = task
                        .await
                        .unwrap_or_else(|e| panic!("task: {e}"))
                        .unwrap_or_else(|e| panic!("begin: {e}"));
                    tracker.published([id.as_str()]);
                }
            });
        });
    });
    group.finish();
}

criterion_group!(benches, wal);
criterion_main!(benches);
