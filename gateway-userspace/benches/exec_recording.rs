//! Exec stream recording: the relay path of an exec session whose output is masked and
//! recorded into `exec_frames` (design target: 200 MB/s per core or more), and the
//! writer's Parquet encoding of those rows.
//!
//! The output is 10 MiB of log-like text (one line in a hundred holds a credential),
//! framed as `v5.channel.k8s.io` stdout messages of 32 KiB and fed in 64 KiB reads, as the
//! relay's to-client pump reads them.
//!
//! * `tap/plain`: the frame tap alone (the relay without masking or recording);
//! * `tap/masked`: with output masking;
//! * `tap/masked_recorded`: with masking and recording: each frame becomes an
//!   `exec_frames` row handed to a running recorder (its writer thread compresses on the
//!   other core meanwhile; only the relay path is timed, each iteration a new session);
//! * `parquet/exec_frames`: what the writer thread does with the rows: Arrow encoding and
//!   zstd Parquet, per core.

/// The product's allocator (gateway-userspace/src/main.rs): figures with glibc's malloc
/// would not be the gateway's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{
    fmt::Write as _,
    hint::black_box,
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gateway_userspace::{
    drain,
    masking::detect::{Detectors, DetectorsSpec},
    proxy::{
        frames::{WsOpcode, ws_encode},
        upgrade::{Direction, StreamTap, TapFraming},
    },
    recorder::{
        ExecFrameRecord, FrameEventKind, Recorder, RecorderConfig, SessionKind, exec_frames,
    },
};
use parquet::{
    arrow::ArrowWriter,
    basic::{Compression, ZstdLevel},
    file::properties::WriterProperties,
};

const SIZE: usize = 10 << 20;
const FRAME: usize = 32 * 1024;
const READ: usize = 64 * 1024;

fn output() -> Vec<u8> {
    let mut text = String::with_capacity(SIZE + 1024);
    let mut line = 0u64;
    while text.len() < SIZE {
        line += 1;
        let id = line.wrapping_mul(2_654_435_761) % 100_000;
        let _ = if line.is_multiple_of(100) {
            writeln!(
                text,
                "export GITHUB_TOKEN={}",
                ["gh", "p_u8jzPde0IgxLd6GncfBAepfJBd0Kh8oOOL8d"].concat()
            )
        } else {
            writeln!(
                text,
                "drwxr-xr-x 2 app app 4096 Dec  1 10:00 /srv/data/orders/{id}/shard-{line}.log status=ok size={}",
                id * 7
            )
        };
    }
    text.into_bytes()
}

fn framed(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / FRAME * 16);
    for chunk in text.chunks(FRAME) {
        let mut payload = Vec::with_capacity(chunk.len() + 1);
        payload.push(1);
        payload.extend_from_slice(chunk);
        out.extend(ws_encode(WsOpcode::Binary, &payload, None));
    }
    out
}

fn v5() -> TapFraming {
    TapFraming::WebSocketChannels {
        base64: false,
        ports: None,
    }
}

fn relay(tap: &mut StreamTap, bytes: &[u8]) -> usize {
    let mut n = 0;
    for read in bytes.chunks(READ) {
        match tap.pass(Direction::ToClient, black_box(read)) {
            Ok(Some(out)) => n += out.len(),
            Ok(None) => n += read.len(),
            Err(e) => panic!("pass: {e}"),
        }
    }
    n
}

fn bench(c: &mut Criterion) {
    let detectors = Detectors::compile(&DetectorsSpec::default()).expect("detectors");
    let text = output();
    let bytes = framed(&text);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("exec_recording");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("tap/plain", |b| {
        b.iter(|| {
            let mut tap = StreamTap::new("bench", v5(), None);
            black_box(relay(&mut tap, &bytes))
        })
    });
    group.bench_function("tap/masked", |b| {
        b.iter(|| {
            let mut tap = StreamTap::new("bench", v5(), None)
                .with_masking(&detectors)
                .expect("masking");
            black_box(relay(&mut tap, &bytes))
        })
    });
    group.bench_function("tap/masked_recorded", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().expect("tempdir");
                let (_trigger, watcher) = drain::channel();
                let (recorder, handle) = runtime
                    .block_on(async {
                        Recorder::start(RecorderConfig::new(dir.path(), "bench"), watcher)
                    })
                    .expect("recorder");
                let mut tap = StreamTap::new("bench", v5(), None)
                    .with_masking(&detectors)
                    .expect("masking")
                    .with_recording(handle.session("bench", SessionKind::Exec));
                let start = Instant::now();
                black_box(relay(&mut tap, &bytes));
                timed += start.elapsed();
                assert_eq!(tap.recording_failure(), None);
                let session = tap.take_recording().expect("recording");
                runtime.block_on(session.finish(None)).expect("finish");
                drop(handle);
                let stats = runtime.block_on(recorder.join()).expect("join");
                assert!(stats.exec_frame_rows as usize >= text.len() / FRAME);
            }
            timed
        })
    });

    let rows: Vec<ExecFrameRecord> = text
        .chunks(FRAME)
        .enumerate()
        .map(|(i, chunk)| ExecFrameRecord {
            session_id: "0190a6b2-7c1d-7e3f-8a9b-000000000001".into(),
            audit_id: "0190a6b2-7c1d-7e3f-8a9b-000000000001".into(),
            seq: i as i64,
            time: jiff::Timestamp::now(),
            offset_us: i as i64 * 1000,
            event: FrameEventKind::Frame,
            direction: Some("to_client"),
            stream: Some("stdout".into()),
            data: Some(chunk.to_vec()),
            size: chunk.len() as i64,
            exit_code: None,
            detail: None,
        })
        .collect();
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("level")))
        .build();
    group.bench_function("parquet/exec_frames", |b| {
        b.iter(|| {
            let batch = exec_frames::to_record_batch(&rows).expect("batch");
            let mut writer = ArrowWriter::try_new(
                Vec::with_capacity(SIZE / 4),
                exec_frames::exec_frames_schema(),
                Some(props.clone()),
            )
            .expect("writer");
            writer.write(&batch).expect("write");
            black_box(writer.into_inner().expect("close").len())
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
