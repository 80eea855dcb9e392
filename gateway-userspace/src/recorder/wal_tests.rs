//! The write-ahead log: its format (torn tails tolerated, garbage refused), group commit,
//! recovery, segment removal and the recorder's start-up replay.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::tests::{full_row, sparse_row, ts};
use super::wal::{self, EntryKind, Wal};
use super::*;
use crate::{drain, request::Verb};

fn create_row(i: i64) -> RequestRecord {
    let mut row = full_row(i, ts("2026-03-01T10:00:00Z"));
    row.verb = Verb::Create;
    row.outcome = Outcome::Forwarded;
    row.response_code = 201;
    row
}

fn segment_bytes(entries: &[(EntryKind, RequestRecord)]) -> Vec<u8> {
    let mut bytes = wal::MAGIC.to_vec();
    bytes.extend_from_slice(&1_772_000_000_000_000i64.to_le_bytes());
    for (kind, row) in entries {
        bytes.extend(wal::encode(*kind, row).unwrap_or_else(|e| panic!("encode: {e}")));
    }
    bytes
}

#[test]
fn records_round_trip() {
    let rows = [
        (EntryKind::Begin, create_row(1)),
        (EntryKind::End, create_row(1)),
        (EntryKind::Begin, sparse_row(2, ts("2026-03-01T10:00:01Z"))),
    ];
    let bytes = segment_bytes(&rows);
    let segment = wal::parse_segment(Path::new("wal-1.log"), &bytes)
        .unwrap_or_else(|e| panic!("a clean segment must parse: {e}"));
    assert_eq!(segment.torn, None);
    assert_eq!(segment.entries.len(), 3);
    for ((kind, row), entry) in rows.iter().zip(&segment.entries) {
        assert_eq!(*kind, entry.kind);
        assert_eq!(row, &entry.row);
    }
}

/// Every prefix of a segment (a crash at any byte) reads back as the complete records
/// before the cut, with the torn one reported, and never panics.
#[test]
fn a_torn_tail_at_any_byte_is_tolerated_and_reported() {
    let rows = [
        (EntryKind::Begin, create_row(1)),
        (EntryKind::Begin, create_row(2)),
    ];
    let bytes = segment_bytes(&rows);
    let first_end = segment_bytes(&rows[..1]).len();
    for cut in 0..bytes.len() {
        let segment = wal::parse_segment(Path::new("wal-1.log"), &bytes[..cut])
            .unwrap_or_else(|e| panic!("cut at {cut}: a torn tail must be tolerated: {e}"));
        let complete = usize::from(cut >= first_end);
        assert_eq!(segment.entries.len(), complete, "cut at {cut}");
        let at_boundary = cut == wal::HEADER_LEN || cut == first_end;
        assert_eq!(
            segment.torn.is_none(),
            at_boundary,
            "cut at {cut}: torn = {:?}",
            segment.torn
        );
    }
    // Zeros where the last write should have been (allocated, never written).
    let mut zeros = bytes.clone();
    zeros.truncate(first_end);
    zeros.extend_from_slice(&[0; 300]);
    let segment = wal::parse_segment(Path::new("wal-1.log"), &zeros)
        .unwrap_or_else(|e| panic!("zero tail: {e}"));
    assert_eq!(segment.entries.len(), 1);
    assert_eq!(
        segment.torn, None,
        "zeros are the segment's unwritten space"
    );
    // A record cut short by zeros (the preallocated space after a torn write).
    let mut cut = bytes[..first_end + 30].to_vec();
    cut.extend_from_slice(&[0; 4000]);
    let segment = wal::parse_segment(Path::new("wal-1.log"), &cut)
        .unwrap_or_else(|e| panic!("torn into zeros: {e}"));
    assert_eq!(segment.entries.len(), 1);
    assert_eq!(
        segment.torn.as_ref().map(|t| t.offset),
        Some(first_end as u64)
    );
}

#[test]
fn a_bad_checksum_is_torn_at_the_end_and_corruption_in_the_middle() {
    let rows = [
        (EntryKind::Begin, create_row(1)),
        (EntryKind::Begin, create_row(2)),
    ];
    let bytes = segment_bytes(&rows);
    let first_end = segment_bytes(&rows[..1]).len();
    // A flipped byte in the last record: a torn write.
    let mut last = bytes.clone();
    let at = last.len() - 3;
    last[at] ^= 0x40;
    let segment = wal::parse_segment(Path::new("wal-1.log"), &last)
        .unwrap_or_else(|e| panic!("bad last record: {e}"));
    assert_eq!(segment.entries.len(), 1);
    assert_eq!(
        segment.torn.as_ref().map(|t| t.offset),
        Some(first_end as u64)
    );
    // The same in the first record, with another after it: corruption, named.
    let mut middle = bytes.clone();
    middle[wal::HEADER_LEN + 20] ^= 0x40;
    let error = wal::parse_segment(Path::new("/x/wal-1.log"), &middle)
        .err()
        .unwrap_or_else(|| panic!("corruption in the middle must be refused"))
        .to_string();
    assert!(
        error.contains("/x/wal-1.log") && error.contains("offset 16") && error.contains("checksum"),
        "{error}"
    );
}

#[test]
fn garbage_is_refused_with_a_clear_error_and_never_panics() {
    let not_wal = wal::parse_segment(Path::new("wal-7.log"), b"PAR1 this is a parquet file")
        .err()
        .unwrap_or_else(|| panic!("garbage must be refused"))
        .to_string();
    assert!(
        not_wal.contains("wal-7.log") && not_wal.contains("not a chaperone write-ahead log"),
        "{not_wal}"
    );
    // An impossible length in front of more data.
    let mut bytes = segment_bytes(&[(EntryKind::Begin, create_row(1))]);
    bytes.extend_from_slice(&u32::MAX.to_le_bytes());
    bytes.extend_from_slice(&[7; 64]);
    let error = wal::parse_segment(Path::new("wal-1.log"), &bytes)
        .err()
        .unwrap_or_else(|| panic!("an impossible length must be refused"))
        .to_string();
    assert!(error.contains("impossible"), "{error}");
    // A valid checksum over a payload that is not a row.
    let mut bad = segment_bytes(&[]);
    let payload = b"Bnot json";
    bad.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bad.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    bad.extend_from_slice(payload);
    let error = wal::parse_segment(Path::new("wal-1.log"), &bad)
        .err()
        .unwrap_or_else(|| panic!("a payload that is not a row must be refused"))
        .to_string();
    assert!(error.contains("does not decode"), "{error}");
    // Pseudo-random bytes after a valid header: an answer either way, never a panic.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for round in 0..2000 {
        let mut bytes = segment_bytes(&[]);
        let len = (round % 97) + 1;
        for _ in 0..len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bytes.push(state as u8);
        }
        let _ = wal::parse_segment(Path::new("wal-1.log"), &bytes);
    }
}

fn no_failure() -> wal::OnFailure {
    Arc::new(|e| panic!("the log must not fail here: {e}"))
}

/// Many concurrent begins share fsyncs, and every one of them is durable on return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (wal, tracker, _thread) = Wal::start(dir.path(), 1, no_failure())
        .unwrap_or_else(|e| panic!("the log should start: {e}"));
    const N: i64 = 400;
    let mut tasks = Vec::new();
    for i in 0..N {
        let wal = wal.clone();
        tasks.push(tokio::spawn(async move { wal.begin(&create_row(i)).await }));
    }
    for task in tasks {
        task.await
            .unwrap_or_else(|e| panic!("task: {e}"))
            .unwrap_or_else(|e| panic!("begin: {e}"));
    }
    let stats = tracker.stats();
    assert_eq!(stats.appends, N as u64);
    assert_eq!(stats.outstanding, N as u64);
    assert!(
        stats.syncs < stats.appends,
        "group commit should share fsyncs: {stats:?}"
    );
    // What was acknowledged is on disk.
    let recovery = wal::recover(dir.path()).unwrap_or_else(|e| panic!("recover: {e}"));
    assert_eq!(recovery.rows.len(), N as usize);
    assert!(recovery.rows.iter().all(|r| r.outcome == Outcome::Unknown));
}

#[tokio::test]
async fn recovery_keeps_the_final_row_when_there_is_one() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (wal, _tracker, _thread) =
        Wal::start(dir.path(), 1, no_failure()).unwrap_or_else(|e| panic!("start: {e}"));
    for i in 0..3 {
        wal.begin(&create_row(i))
            .await
            .unwrap_or_else(|e| panic!("begin: {e}"));
    }
    let mut done = create_row(1);
    done.response_code = 409;
    wal.end(&done);
    // An end for a request never begun is ignored.
    wal.end(&create_row(99));
    // A later begin makes the end durable too (same order on the one thread).
    wal.begin(&create_row(3))
        .await
        .unwrap_or_else(|e| panic!("begin: {e}"));
    let recovery = wal::recover(dir.path()).unwrap_or_else(|e| panic!("recover: {e}"));
    let got: Vec<(String, Outcome, i32)> = recovery
        .rows
        .iter()
        .map(|r| (r.audit_id.clone(), r.outcome, r.response_code))
        .collect();
    let id = |i: i64| create_row(i).audit_id;
    assert_eq!(
        got,
        vec![
            (id(0), Outcome::Unknown, 201),
            (id(1), Outcome::Forwarded, 409),
            (id(2), Outcome::Unknown, 201),
            (id(3), Outcome::Unknown, 201),
        ]
    );
    assert_eq!(recovery.next_seq, 2);
}

fn segments(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("wal-"))
            })
            .count()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn segments_go_once_their_rows_are_published() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (wal, tracker, _thread) =
        Wal::start(dir.path(), 1, no_failure()).unwrap_or_else(|e| panic!("start: {e}"));
    for i in 0..3 {
        wal.begin(&create_row(i))
            .await
            .unwrap_or_else(|e| panic!("begin: {e}"));
    }
    assert_eq!(segments(dir.path()), 1);
    let ids: Vec<String> = (0..3).map(|i| create_row(i).audit_id).collect();
    tracker.published(ids[..2].iter().map(String::as_str));
    assert_eq!(tracker.stats().outstanding, 1);
    drop(wal);
    // The thread closed the segment, but it still vouches for one request.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(segments(dir.path()), 1);
    tracker.published(ids[2..].iter().map(String::as_str));
    assert_eq!(
        segments(dir.path()),
        0,
        "a fully published segment is removed"
    );
}

/// A log whose open segment is retired after 200 ms.
fn aging_wal(dir: &Path) -> (Wal, Arc<wal::Tracker>, std::thread::JoinHandle<()>) {
    Wal::start_with(
        dir,
        1,
        wal::SEGMENT_BYTES,
        Duration::from_millis(200),
        no_failure(),
    )
    .unwrap_or_else(|e| panic!("start: {e}"))
}

/// A segment that is old enough and vouches for nothing any more is retired while the
/// log runs, at a rate of mutations that would take days to fill it: idle, or before the
/// next begin (which then opens a new one). One that still vouches for a request stays.
#[tokio::test]
async fn an_old_segment_that_vouches_for_nothing_is_retired() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (wal, tracker, _thread) = aging_wal(dir.path());
    let begin = async |i| {
        wal.begin(&create_row(i))
            .await
            .unwrap_or_else(|e| panic!("begin: {e}"));
    };
    begin(0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(segments(dir.path()), 1, "it still vouches for request 0");
    tracker.published([create_row(0).audit_id.as_str()]);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(segments(dir.path()), 0, "idle and old: retired");
    assert_eq!(tracker.stats().segments, 0);
    // The next begin opens a new segment; once it is old and published, the begin after
    // it retires it first.
    begin(1).await;
    tracker.published([create_row(1).audit_id.as_str()]);
    assert_eq!(segments(dir.path()), 1);
    tokio::time::sleep(Duration::from_millis(250)).await;
    begin(2).await;
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    let recovery = wal::recover(dir.path()).unwrap_or_else(|e| panic!("recover: {e}"));
    assert_eq!(
        recovery.rows.len(),
        1,
        "only the request still outstanding is in the log"
    );
    assert_eq!(recovery.rows[0].audit_id, create_row(2).audit_id);
}

/// A begin whose row never comes (a long session, a lost row) does not pin an old
/// segment that keeps taking new begins: the segment is retired by age all the same, and
/// the begin is carried forward while the old segments go.
#[tokio::test]
async fn an_open_request_does_not_keep_an_old_segment_growing() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (wal, tracker, _thread) = aging_wal(dir.path());
    for i in 0..3 {
        wal.begin(&create_row(i))
            .await
            .unwrap_or_else(|e| panic!("begin: {e}"));
        if i > 0 {
            tracker.published([create_row(i).audit_id.as_str()]);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wal.begin(&create_row(3))
        .await
        .unwrap_or_else(|e| panic!("begin: {e}"));
    assert!(
        segments(dir.path()) <= 2,
        "old segments go: {}",
        segments(dir.path())
    );
    let recovery = wal::recover(dir.path()).unwrap_or_else(|e| panic!("recover: {e}"));
    let ids: Vec<&str> = recovery.rows.iter().map(|r| r.audit_id.as_str()).collect();
    for i in [0, 3] {
        assert!(
            ids.contains(&create_row(i).audit_id.as_str()),
            "request {i}: {ids:?}"
        );
    }
    assert!(
        !ids.contains(&create_row(1).audit_id.as_str()),
        "request 1's segment went: {ids:?}"
    );
}

/// A log that cannot be written refuses (and reports) at once, and works again as soon as
/// the disk does.
#[tokio::test]
async fn a_failing_log_refuses_then_recovers_by_itself() {
    let root = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let dir = root.path().join("wal");
    let failures = Arc::new(AtomicUsize::new(0));
    let seen = failures.clone();
    let (wal, tracker, _thread) = Wal::start(
        &dir,
        1,
        Arc::new(move |_| {
            seen.fetch_add(1, Ordering::Relaxed);
        }),
    )
    .unwrap_or_else(|e| panic!("start: {e}"));
    // The directory vanishes (as good as a failing disk for creating a segment).
    std::fs::remove_dir(&dir).unwrap_or_else(|e| panic!("rmdir: {e}"));
    let error = wal
        .begin(&create_row(1))
        .await
        .err()
        .unwrap_or_else(|| panic!("a begin the log cannot write must fail"))
        .to_string();
    assert!(error.contains("write-ahead log segment"), "{error}");
    assert_eq!(failures.load(Ordering::Relaxed), 1);
    assert_eq!(tracker.stats().failures, 1);
    assert_eq!(tracker.stats().outstanding, 0);
    std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir: {e}"));
    wal.begin(&create_row(2))
        .await
        .unwrap_or_else(|e| panic!("the log must work again: {e}"));
    assert_eq!(tracker.stats().outstanding, 1);
}

fn start_recorder(dir: &Path) -> (Recorder, RecorderHandle, drain::DrainTrigger) {
    let (trigger, watcher) = drain::channel();
    let (recorder, handle) = Recorder::start(RecorderConfig::new(dir, "node-a"), watcher)
        .unwrap_or_else(|e| panic!("recorder should start: {e}"));
    (recorder, handle, trigger)
}

/// A gateway that died after forwarding leaves begun requests in the log; the next start
/// writes their rows (outcome `unknown`), without duplicating rows already published, and
/// empties the log.
#[tokio::test]
async fn start_up_replays_the_log_into_parquet() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let wal_dir = dir.path().join(DEFAULT_WAL_DIR);
    // First run: rows 0 and 1 are begun and published, 2 and 3 only begun.
    {
        let (recorder, handle, _trigger) = start_recorder(dir.path());
        for i in 0..4 {
            handle
                .begin(&create_row(i))
                .await
                .unwrap_or_else(|e| panic!("begin: {e}"));
        }
        for i in 0..2 {
            handle
                .record(create_row(i))
                .await
                .unwrap_or_else(|e| panic!("record: {e}"));
        }
        handle
            .flush()
            .await
            .unwrap_or_else(|e| panic!("flush: {e}"));
        let status = handle.status();
        assert_eq!(status.health_report().wal.map(|w| w.outstanding), Some(2));
        drop(handle);
        recorder
            .join()
            .await
            .unwrap_or_else(|e| panic!("join: {e}"));
    }
    assert_eq!(segments(&wal_dir), 1, "the log still vouches for two rows");
    // Simulate the crash's torn write at the end of the segment.
    let segment = std::fs::read_dir(&wal_dir)
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
        .next()
        .unwrap_or_else(|| panic!("a segment"))
        .path();
    // (at the logical end: the segment is zero-filled beyond it).
    let bytes = std::fs::read(&segment).unwrap_or_else(|e| panic!("{e}"));
    let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |at| at + 1);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap_or_else(|e| panic!("{e}"));
    std::os::unix::fs::FileExt::write_all_at(&file, &[0x30, 0, 0, 0, 1, 2], end as u64)
        .unwrap_or_else(|e| panic!("{e}"));
    drop(file);
    // Second run: the replay.
    let (recorder, handle, _trigger) = start_recorder(dir.path());
    assert_eq!(handle.status().health_report().replayed, 2);
    assert_eq!(segments(&wal_dir), 0, "replayed segments are removed");
    drop(handle);
    recorder
        .join()
        .await
        .unwrap_or_else(|e| panic!("join: {e}"));
    let mut rows = read_dir(dir.path()).unwrap_or_else(|e| panic!("read: {e}"));
    rows.sort_by(|a, b| a.audit_id.cmp(&b.audit_id));
    let got: Vec<(String, Outcome)> = rows
        .iter()
        .map(|r| (r.audit_id.clone(), r.outcome))
        .collect();
    let id = |i: i64| create_row(i).audit_id;
    assert_eq!(
        got,
        vec![
            (id(0), Outcome::Forwarded),
            (id(1), Outcome::Forwarded),
            (id(2), Outcome::Unknown),
            (id(3), Outcome::Unknown),
        ]
    );
}

#[tokio::test]
async fn a_corrupt_segment_stops_the_start_with_its_name() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let wal_dir = dir.path().join(DEFAULT_WAL_DIR);
    std::fs::create_dir_all(&wal_dir).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        wal_dir.join("wal-00000000000000000001.log"),
        b"garbage, not a log",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (_trigger, watcher) = drain::channel();
    let error = Recorder::start(RecorderConfig::new(dir.path(), "node-a"), watcher)
        .err()
        .unwrap_or_else(|| panic!("a corrupt log must stop the start"))
        .to_string();
    assert!(
        error.contains("wal-00000000000000000001.log") && error.contains("corrupt"),
        "{error}"
    );
}

/// After a power loss, the newest segment can hold a record that never reached the disk
/// whole with synced records' neighbours after it (pages reach the disk in any order):
/// nothing after it was acknowledged, so it ends what is read there, with a copy kept for
/// forensics. In an older, closed segment the same is corruption and stops the start.
#[test]
fn a_bad_record_in_the_newest_segment_is_a_torn_tail_in_older_ones_corruption() {
    let rows = [
        (EntryKind::Begin, create_row(1)),
        (EntryKind::Begin, create_row(2)),
        (EntryKind::Begin, create_row(3)),
    ];
    let bytes = segment_bytes(&rows);
    let first_end = segment_bytes(&rows[..1]).len();
    let mut middle = bytes.clone();
    middle[first_end + 20] ^= 0x40;
    let segment = wal::parse_newest_segment(Path::new("wal-2.log"), &middle)
        .unwrap_or_else(|e| panic!("newest: {e}"));
    assert_eq!(segment.entries.len(), 1);
    let torn = segment.torn.as_ref().expect("torn");
    assert_eq!((torn.offset, torn.data_after), (first_end as u64, true));
    // An impossible length with bytes after it, likewise.
    let mut length = bytes[..first_end].to_vec();
    length.extend_from_slice(&u32::MAX.to_le_bytes());
    length.extend_from_slice(&[7; 64]);
    let segment = wal::parse_newest_segment(Path::new("wal-2.log"), &length)
        .unwrap_or_else(|e| panic!("newest: {e}"));
    assert_eq!(segment.entries.len(), 1);

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let newest = dir.path().join("wal-00000000000000000002.log");
    std::fs::write(dir.path().join("wal-00000000000000000001.log"), &bytes)
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&newest, &middle).unwrap_or_else(|e| panic!("{e}"));
    let recovery = wal::recover(dir.path()).unwrap_or_else(|e| panic!("recover: {e}"));
    assert_eq!(
        recovery.rows.len(),
        3,
        "rows 1-3 from the first segment, 1 again from the second"
    );
    assert_eq!(recovery.torn.len(), 1);
    assert_eq!(
        std::fs::read(newest.with_extension("log.torn")).unwrap_or_default(),
        middle,
        "the torn segment is kept whole"
    );
    // The same bytes in the older segment: corruption.
    std::fs::write(dir.path().join("wal-00000000000000000001.log"), &middle)
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&newest, &bytes).unwrap_or_else(|e| panic!("{e}"));
    let error = wal::recover(dir.path())
        .err()
        .unwrap_or_else(|| panic!("corruption in a closed segment must stop the start"))
        .to_string();
    assert!(error.contains("wal-00000000000000000001.log"), "{error}");
}

/// A request that stays open (a long exec session) does not pin the log: once it has
/// outlived a segment its begin record is copied forward, old segments go, and a replay
/// still finds it exactly once.
#[tokio::test]
async fn a_long_running_request_is_carried_forward_and_old_segments_go() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (wal, tracker, _thread) = Wal::start_sized(dir.path(), 1, 8 * 1024, no_failure())
        .unwrap_or_else(|e| panic!("start: {e}"));
    let mut session = create_row(0);
    session.verb = Verb::Create;
    session.object_ref.subresource = "exec".into();
    wal.begin(&session)
        .await
        .unwrap_or_else(|e| panic!("begin: {e}"));
    // Many short requests, each published right away, rotate through many segments.
    for i in 1..200 {
        let row = create_row(i);
        wal.begin(&row)
            .await
            .unwrap_or_else(|e| panic!("begin: {e}"));
        tracker.published([row.audit_id.as_str()]);
    }
    let stats = tracker.stats();
    assert_eq!(stats.outstanding, 1, "only the session is open");
    assert!(
        stats.segments <= 3,
        "old segments should be gone although the session is open: {stats:?}"
    );
    assert!(segments(dir.path()) <= 3);
    let recovery = wal::recover(dir.path()).unwrap_or_else(|e| panic!("recover: {e}"));
    let ids: Vec<&str> = recovery.rows.iter().map(|r| r.audit_id.as_str()).collect();
    assert_eq!(
        ids.iter().filter(|id| **id == session.audit_id).count(),
        1,
        "{ids:?}"
    );
}

/// Requests that ended but whose rows are not yet in Parquet (the writer is behind, or its
/// disk is full) are not copied into new segments: their segments stay until the rows are
/// published, and the log grows with what was appended, not with its square.
#[tokio::test]
async fn ended_but_unpublished_requests_are_not_carried() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let segment = 8 * 1024;
    let (wal, tracker, _thread) = Wal::start_sized(dir.path(), 1, segment, no_failure())
        .unwrap_or_else(|e| panic!("start: {e}"));
    let mut appended = 0;
    let mut ids = Vec::new();
    for i in 0..100 {
        let mut row = create_row(i);
        wal.begin(&row)
            .await
            .unwrap_or_else(|e| panic!("begin: {e}"));
        row.response_code = 202;
        wal.end(&row);
        appended += wal::encode(EntryKind::Begin, &row)
            .map(|b| b.len())
            .unwrap_or_else(|e| panic!("encode: {e}"))
            * 2;
        ids.push(row.audit_id);
    }
    // One more durable begin, so every end before it is on disk.
    let last = create_row(100);
    wal.begin(&last)
        .await
        .unwrap_or_else(|e| panic!("begin: {e}"));
    let most = appended / (segment as usize - wal::HEADER_LEN) + 2;
    assert!(
        segments(dir.path()) <= most,
        "{} segments for {appended} bytes of records (at most {most} expected)",
        segments(dir.path())
    );
    let recovery = wal::recover(dir.path()).unwrap_or_else(|e| panic!("recover: {e}"));
    let ended = recovery
        .rows
        .iter()
        .filter(|r| r.outcome == Outcome::Forwarded && r.response_code == 202)
        .count();
    assert_eq!(ended, 100, "every ended request keeps its final row");
    tracker.published(
        ids.iter()
            .map(String::as_str)
            .chain([last.audit_id.as_str()]),
    );
    assert!(
        tracker.stats().segments <= 1,
        "published rows free their segments: {:?}",
        tracker.stats()
    );
}

/// A request whose row was lost (shed, or refused while recording was down) is never
/// published before the next start: it travels with new segments, its final row included,
/// instead of keeping its segment and every later one on disk.
#[tokio::test]
async fn a_lost_row_is_carried_forward_with_its_final_row() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (wal, tracker, _thread) = Wal::start_sized(dir.path(), 1, 8 * 1024, no_failure())
        .unwrap_or_else(|e| panic!("start: {e}"));
    let mut lost = create_row(0);
    wal.begin(&lost)
        .await
        .unwrap_or_else(|e| panic!("begin: {e}"));
    lost.response_code = 201;
    lost.outcome = Outcome::Forwarded;
    wal.end_lost(&lost);
    // Many short requests, each published right away, rotate through many segments.
    for i in 1..200 {
        let row = create_row(i);
        wal.begin(&row)
            .await
            .unwrap_or_else(|e| panic!("begin: {e}"));
        tracker.published([row.audit_id.as_str()]);
    }
    let stats = tracker.stats();
    assert_eq!(stats.outstanding, 1, "only the lost row waits: {stats:?}");
    assert!(
        stats.segments <= 3,
        "old segments go although a row was lost: {stats:?}"
    );
    let recovery = wal::recover(dir.path()).unwrap_or_else(|e| panic!("recover: {e}"));
    let found: Vec<&RequestRecord> = recovery
        .rows
        .iter()
        .filter(|r| r.audit_id == lost.audit_id)
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].outcome, found[0].response_code),
        (Outcome::Forwarded, 201),
        "the final row, not an unknown begin"
    );
}
