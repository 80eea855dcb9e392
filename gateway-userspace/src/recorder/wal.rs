//! The write-ahead log: no mutating request reaches the API server without a durable
//! record of it.
//!
//! Before a mutating request (or an exec/attach/port-forward start) is forwarded, its row
//! is appended to the log and the log is fsynced ([`Wal::begin`]); when the exchange is
//! over the final row is appended too ([`Wal::end`], not waited for). One dedicated OS
//! thread does all writing with *group commit*: it takes every append that is waiting,
//! writes them with one `write`, syncs once, then wakes every waiter, so concurrent
//! requests share one fsync.
//!
//! The log is a directory of segments `wal-<seq>.log`. A segment starts with an 8-byte
//! magic and the segment's creation time; then records, each `len: u32 LE`,
//! `crc32: u32 LE` (of the payload), `payload` (`len` bytes: one kind byte, `B`egin or
//! `E`nd, then the row as JSON); then zeros. Segments are created full size, zero-filled
//! and synced ([`SEGMENT_BYTES`]), so an append overwrites allocated blocks and its
//! `fdatasync` flushes data only, without a file-system journal commit (half the latency
//! on ext4), and a full disk is found when a segment is created rather than mid-record.
//! A segment is deleted once every request it began has its row in a finished (synced,
//! renamed) Parquet file and every older segment is gone.
//!
//! At start-up [`recover`] reads what is left: a torn last record (the gateway died
//! mid-write) is tolerated and reported; anything else that does not parse is refused
//! with an error naming the segment and offset, never skipped silently. The recorder
//! writes a row for every request in the log that has none in the Parquet files yet:
//! the final row when the log has it, otherwise the begin row with outcome `unknown`.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::RecorderError;
use super::schema::{ObjectRef, Outcome, PrincipalRecord, RequestRecord, WorkloadRecord};
use crate::{policy::Action, request::Verb};

/// First bytes of every segment.
pub const MAGIC: &[u8; 8] = b"CHPWAL01";
/// Magic plus the creation time (unix microseconds, i64 LE).
pub const HEADER_LEN: usize = 16;
/// Bytes before each record's payload: length and checksum.
const RECORD_HEADER_LEN: usize = 8;
/// Largest payload accepted when reading; a larger length is corruption, not a row.
pub const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;
/// Size of a segment, allocated (zero-filled) when it is created; a new one is started once
/// it is full.
pub const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
/// How long a segment stays the one appended to: at a few mutations an hour a segment
/// would otherwise take days to fill, and at a start all of it is read again (and its rows checked against every Parquet file
/// written since it was created, which retention may have deleted meanwhile).
pub const MAX_SEGMENT_AGE: std::time::Duration = std::time::Duration::from_secs(600);
/// Most appends committed at once (bounds the memory of one group commit).
const MAX_BATCH: usize = 4096;

/// What a log record says about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Appended (and synced) before the request was forwarded.
    Begin,
    /// Appended when the exchange was over, with the final row.
    End,
}

impl EntryKind {
    fn byte(self) -> u8 {
        match self {
            EntryKind::Begin => b'B',
            EntryKind::End => b'E',
        }
    }
}

/// One record read back from a segment.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Begin or end.
    pub kind: EntryKind,
    /// The row as it was when appended.
    pub row: RequestRecord,
}

/// A torn record at the end of a segment: the gateway stopped in the middle of writing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// Where the torn record starts.
    pub offset: u64,
    /// What was found there.
    pub reason: String,
    /// Records (or bytes) follow the torn one: possible only in the newest segment, after
    /// a power loss (see [`parse_newest_segment`]).
    pub data_after: bool,
}

/// A segment read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// The segment file.
    pub path: PathBuf,
    /// When it was created (from its header; `None` if the header itself was torn).
    pub created: Option<jiff::Timestamp>,
    /// Its complete records, in order.
    pub entries: Vec<Entry>,
    /// A torn last record, if any (tolerated and reported).
    pub torn: Option<TornTail>,
}

/// Encodes one record: length, checksum, kind, row as JSON.
pub fn encode(kind: EntryKind, row: &RequestRecord) -> Result<Vec<u8>, RecorderError> {
    let json = serde_json::to_vec(&WalRow::from(row)).map_err(|e| RecorderError::Wal {
        reason: format!("cannot encode the row of {}: {e}", row.audit_id),
    })?;
    let len = json.len() + 1;
    if len > MAX_RECORD_BYTES {
        return Err(RecorderError::Wal {
            reason: format!(
                "the row of {} is {len} bytes, more than the log takes ({MAX_RECORD_BYTES})",
                row.audit_id
            ),
        });
    }
    let mut out = Vec::with_capacity(RECORD_HEADER_LEN + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind.byte());
    out.extend_from_slice(&json);
    let crc = crc32fast::hash(&out[RECORD_HEADER_LEN..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> RecorderError {
    RecorderError::WalCorrupt {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

/// Parses a segment's bytes. A torn last record is reported in [`Segment::torn`]; bytes
/// that are not a segment, or a bad record followed by more data, are an error naming the
/// offset.
pub fn parse_segment(path: &Path, bytes: &[u8]) -> Result<Segment, RecorderError> {
    parse_segment_as(path, bytes, false)
}

/// Parses the newest segment, the one being appended to when the gateway stopped. A
/// record there that is cut short or fails its checksum ends what is read even when bytes
/// follow it: after a power loss the pages of one group commit (or of ends, which are not
/// waited for) reach the disk in any order, and nothing past a record that never reached
/// it whole was acknowledged (a begin is acknowledged only once synced, with everything
/// before it). A record whose checksum holds but does not decode is still an error.
pub fn parse_newest_segment(path: &Path, bytes: &[u8]) -> Result<Segment, RecorderError> {
    parse_segment_as(path, bytes, true)
}

fn parse_segment_as(path: &Path, bytes: &[u8], newest: bool) -> Result<Segment, RecorderError> {
    let mut segment = Segment {
        path: path.to_path_buf(),
        created: None,
        entries: Vec::new(),
        torn: None,
    };
    if bytes.len() < HEADER_LEN {
        // Created but its header never fully reached the disk: only a prefix of it (or
        // zeros) may be there.
        let prefix_ok = bytes.iter().zip(MAGIC.iter()).all(|(a, b)| a == b);
        if prefix_ok || bytes.iter().all(|b| *b == 0) {
            segment.torn = Some(TornTail {
                data_after: false,
                offset: 0,
                reason: format!("segment header cut short ({} bytes)", bytes.len()),
            });
            return Ok(segment);
        }
        return Err(corrupt(path, 0, "not a chaperone write-ahead log segment"));
    }
    if &bytes[..8] != MAGIC {
        return Err(corrupt(
            path,
            0,
            "not a chaperone write-ahead log segment (bad magic)",
        ));
    }
    let mut created = [0u8; 8];
    created.copy_from_slice(&bytes[8..HEADER_LEN]);
    segment.created = jiff::Timestamp::from_microsecond(i64::from_le_bytes(created)).ok();
    let mut at = HEADER_LEN;
    while at < bytes.len() {
        let offset = at as u64;
        let rest = &bytes[at..];
        let torn = |reason: String| TornTail {
            offset,
            reason,
            data_after: false,
        };
        if rest.iter().all(|b| *b == 0) {
            // The zero-filled space not yet written.
            break;
        }
        if rest.len() < RECORD_HEADER_LEN {
            segment.torn = Some(torn(format!(
                "record header cut short ({} bytes)",
                rest.len()
            )));
            break;
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len == 0 || len > MAX_RECORD_BYTES {
            let reason = format!("record length {len} is impossible (1..={MAX_RECORD_BYTES})");
            if newest {
                segment.torn = Some(TornTail {
                    data_after: true,
                    ..torn(format!("{reason}, with more bytes after it"))
                });
                break;
            }
            return Err(corrupt(path, offset, reason));
        }
        let Some(payload) = rest.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + len) else {
            segment.torn = Some(torn(format!(
                "record of {len} bytes cut short ({} present)",
                rest.len() - RECORD_HEADER_LEN
            )));
            break;
        };
        // Nothing but zeros after it: the last write, cut short.
        let last = bytes[at + RECORD_HEADER_LEN + len..]
            .iter()
            .all(|b| *b == 0);
        if crc32fast::hash(payload) != crc {
            if last {
                segment.torn = Some(torn("the last record's checksum does not match".into()));
                break;
            }
            if newest {
                segment.torn = Some(TornTail {
                    data_after: true,
                    ..torn("a record's checksum does not match, with more bytes after it".into())
                });
                break;
            }
            return Err(corrupt(
                path,
                offset,
                "record checksum does not match and more records follow",
            ));
        }
        let kind = match payload[0] {
            b'B' => EntryKind::Begin,
            b'E' => EntryKind::End,
            other => {
                return Err(corrupt(
                    path,
                    offset,
                    format!("unknown record kind byte {other:#04x}"),
                ));
            }
        };
        let row: WalRow = serde_json::from_slice(&payload[1..])
            .map_err(|e| corrupt(path, offset, format!("row does not decode: {e}")))?;
        let row = row
            .into_record()
            .map_err(|e| corrupt(path, offset, format!("row does not decode: {e}")))?;
        segment.entries.push(Entry { kind, row });
        at += RECORD_HEADER_LEN + len;
    }
    Ok(segment)
}

/// Reads one segment file (see [`parse_segment`]).
pub fn read_segment(path: &Path) -> Result<Segment, RecorderError> {
    let bytes = read_bytes(path)?;
    parse_segment(path, &bytes)
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, RecorderError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| io_error("read write-ahead log segment", path, e))?;
    Ok(bytes)
}

fn io_error(op: &'static str, path: &Path, source: std::io::Error) -> RecorderError {
    RecorderError::Io {
        op,
        path: path.to_path_buf(),
        source: Arc::new(source),
    }
}

fn segment_name(seq: u64) -> String {
    format!("wal-{seq:020}.log")
}

fn segment_seq(name: &str) -> Option<u64> {
    name.strip_prefix("wal-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// What the log held at start-up.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The segments read, oldest first; delete them once `rows` are in Parquet.
    pub segments: Vec<PathBuf>,
    /// One row per request the log began: its final row when the log has it, otherwise
    /// the begin row with outcome `unknown`. In log order.
    pub rows: Vec<RequestRecord>,
    /// The oldest segment's creation time: rows already in Parquet are in files finished
    /// after it.
    pub oldest: Option<jiff::Timestamp>,
    /// Torn last records that were tolerated, one sentence each.
    pub torn: Vec<String>,
    /// The sequence number for the next segment.
    pub next_seq: u64,
}

/// Reads every segment in `dir` (created if missing). Errors name the segment and offset.
pub fn recover(dir: &Path) -> Result<Recovery, RecorderError> {
    super::durable::create_dir_all(dir).map_err(|e| RecorderError::Directory {
        path: dir.to_path_buf(),
        source: Arc::new(e),
    })?;
    let mut seqs = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_error("list write-ahead log", dir, e))? {
        let entry = entry.map_err(|e| io_error("list write-ahead log", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(seq) = segment_seq(&name) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    let mut recovery = Recovery {
        next_seq: seqs.last().map_or(1, |s| s + 1),
        ..Recovery::default()
    };
    let mut order: Vec<String> = Vec::new();
    let mut rows: HashMap<String, (RequestRecord, bool)> = HashMap::new();
    let newest = seqs.last().copied();
    for seq in seqs {
        let path = dir.join(segment_name(seq));
        let segment = if Some(seq) == newest {
            let bytes = read_bytes(&path)?;
            let segment = parse_newest_segment(&path, &bytes)?;
            // What follows a torn record is kept for forensics: the segment itself is
            // deleted once its rows are in Parquet.
            if segment.torn.as_ref().is_some_and(|t| t.data_after) {
                let kept = path.with_extension("log.torn");
                if let Err(e) = fs::write(&kept, &bytes) {
                    tracing::warn!(path = %kept.display(), error = %e, "could not keep a copy of a torn write-ahead log segment");
                }
            }
            segment
        } else {
            read_segment(&path)?
        };
        if let Some(torn) = &segment.torn {
            let sentence = format!(
                "{}: torn record at offset {} ({}); the records before it were recovered",
                path.display(),
                torn.offset,
                torn.reason
            );
            tracing::warn!("{sentence}");
            recovery.torn.push(sentence);
        }
        // A segment whose header was torn holds no records, so its time does not matter.
        if let Some(created) = segment.created {
            recovery.oldest = Some(recovery.oldest.map_or(created, |o| o.min(created)));
        }
        for entry in segment.entries {
            let id = entry.row.audit_id.clone();
            match entry.kind {
                EntryKind::Begin => {
                    if let std::collections::hash_map::Entry::Vacant(slot) = rows.entry(id) {
                        order.push(slot.key().clone());
                        let mut row = entry.row;
                        row.outcome = Outcome::Unknown;
                        slot.insert((row, false));
                    }
                }
                EntryKind::End => match rows.get_mut(&id) {
                    Some(slot) => *slot = (entry.row, true),
                    None => {
                        // Its begin was in a segment already deleted: the row is in Parquet.
                    }
                },
            }
        }
        recovery.segments.push(path);
    }
    recovery.rows = order
        .into_iter()
        .filter_map(|id| rows.remove(&id).map(|(row, _)| row))
        .collect();
    Ok(recovery)
}

/// Counters the log keeps, for `/metrics` and `/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WalStats {
    /// Records appended.
    pub appends: u64,
    /// fsyncs (one per group commit that had a waiter).
    pub syncs: u64,
    /// Group commits that failed (each refused its waiting requests).
    pub failures: u64,
    /// Requests begun whose row is not yet in a finished Parquet file.
    pub outstanding: u64,
    /// Segments on disk.
    pub segments: u64,
}

/// Which requests each segment still vouches for, and which segments may go.
#[derive(Debug, Default)]
struct Tracking {
    outstanding: HashMap<String, u64>,
    /// The begin record of each request still open (begun, no end logged), copied forward
    /// into a new segment when it has outlived a whole segment (a long exec session), so
    /// old segments can go. A request that ended is not carried: its end record is in a
    /// segment no older than its begin's, which stays until the row is published. One
    /// whose row was lost (shed, or refused while recording was down) is carried with
    /// its end record: it will not be published before the next start.
    records: HashMap<String, Arc<Vec<u8>>>,
    counts: BTreeMap<u64, usize>,
    existing: BTreeSet<u64>,
    active: Option<u64>,
}

/// State shared by the log's thread, its handles and the Parquet writer.
#[derive(Debug)]
pub struct Tracker {
    dir: PathBuf,
    state: Mutex<Tracking>,
    appends: AtomicU64,
    syncs: AtomicU64,
    failures: AtomicU64,
}

impl Tracker {
    fn state(&self) -> MutexGuard<'_, Tracking> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a request with this audit id was begun and its row is not yet published.
    pub fn is_outstanding(&self, audit_id: &str) -> bool {
        self.state().outstanding.contains_key(audit_id)
    }

    /// Rows with these audit ids are in a finished Parquet file: segments whose requests
    /// all are (and all older ones) are deleted.
    pub fn published<'a>(&self, audit_ids: impl IntoIterator<Item = &'a str>) {
        let doomed = {
            let mut state = self.state();
            for id in audit_ids {
                state.records.remove(id);
                if let Some(seq) = state.outstanding.remove(id)
                    && let Some(count) = state.counts.get_mut(&seq)
                {
                    *count = count.saturating_sub(1);
                }
            }
            state.deletable()
        };
        self.delete(doomed);
    }

    fn delete(&self, seqs: Vec<u64>) {
        for seq in seqs {
            let path = self.dir.join(segment_name(seq));
            match fs::remove_file(&path) {
                Ok(()) => {
                    tracing::debug!(path = %path.display(), "write-ahead log segment removed")
                }
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot remove a write-ahead log segment; it is replayed (and its rows deduplicated) at the next start");
                }
            }
        }
    }

    /// The counters now.
    pub fn stats(&self) -> WalStats {
        let state = self.state();
        WalStats {
            appends: self.appends.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            outstanding: state.outstanding.len() as u64,
            segments: state.existing.len() as u64,
        }
    }
}

impl Tracking {
    /// The oldest segments that are finished and vouch for nothing any more.
    fn deletable(&mut self) -> Vec<u64> {
        let mut doomed = Vec::new();
        while let Some(&seq) = self.existing.first() {
            if Some(seq) == self.active || self.counts.get(&seq).is_some_and(|c| *c > 0) {
                break;
            }
            self.existing.pop_first();
            self.counts.remove(&seq);
            doomed.push(seq);
        }
        doomed
    }
}

type Reply = oneshot::Sender<Result<(), RecorderError>>;

/// What a queued record does to the tracking once it is written.
#[derive(Debug, Clone, Copy)]
enum JobKind {
    /// A begin: tracked once it is durable, carried into new segments while open.
    Begin,
    /// An end: its request is no longer carried (its row is about to be published).
    End,
    /// An end whose row will not be published before the next start: the request's begin
    /// and end are carried together.
    LostEnd,
}

struct Job {
    bytes: Vec<u8>,
    /// Whose record this is, and what it does to the tracking.
    entry: (JobKind, String),
    /// Someone waits for the record to be durable.
    reply: Option<Reply>,
}

/// Called with the cause whenever a group commit fails (the recorder marks itself down).
pub type OnFailure = Arc<dyn Fn(RecorderError) + Send + Sync>;

/// The producer side of the log; cheap to clone.
#[derive(Clone)]
pub struct Wal {
    jobs: mpsc::Sender<Job>,
    tracker: Arc<Tracker>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.tracker.dir)
            .finish_non_exhaustive()
    }
}

impl Wal {
    /// Starts the log's writer thread in `dir`, numbering new segments from `next_seq`.
    /// The thread ends once every handle is dropped, syncing what it wrote.
    pub fn start(
        dir: &Path,
        next_seq: u64,
        on_failure: OnFailure,
    ) -> Result<(Wal, Arc<Tracker>, std::thread::JoinHandle<()>), RecorderError> {
        Wal::start_sized(dir, next_seq, SEGMENT_BYTES, on_failure)
    }

    /// [`Wal::start`] with another segment size (tests rotate with small ones).
    pub fn start_sized(
        dir: &Path,
        next_seq: u64,
        segment_bytes: u64,
        on_failure: OnFailure,
    ) -> Result<(Wal, Arc<Tracker>, std::thread::JoinHandle<()>), RecorderError> {
        Wal::start_with(dir, next_seq, segment_bytes, MAX_SEGMENT_AGE, on_failure)
    }

    /// [`Wal::start_sized`] with another [`MAX_SEGMENT_AGE`] (tests retire segments sooner).
    pub fn start_with(
        dir: &Path,
        next_seq: u64,
        segment_bytes: u64,
        max_age: std::time::Duration,
        on_failure: OnFailure,
    ) -> Result<(Wal, Arc<Tracker>, std::thread::JoinHandle<()>), RecorderError> {
        super::durable::create_dir_all(dir).map_err(|e| RecorderError::Directory {
            path: dir.to_path_buf(),
            source: Arc::new(e),
        })?;
        let tracker = Arc::new(Tracker {
            dir: dir.to_path_buf(),
            state: Mutex::new(Tracking::default()),
            appends: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        });
        let (jobs, rx) = mpsc::channel();
        let writer = LogWriter {
            max_age,
            segment_bytes: segment_bytes.max(HEADER_LEN as u64 * 2),
            dir: dir.to_path_buf(),
            next_seq,
            open: None,
            tracker: Arc::clone(&tracker),
            on_failure,
        };
        let lost = Arc::clone(&writer.on_failure);
        let thread = std::thread::Builder::new()
            .name("recorder-wal".into())
            .spawn(move || {
                // A panic would otherwise leave recording "up" while every mutating
                // request is refused for want of the log: say it is down.
                let run = std::panic::AssertUnwindSafe(|| writer.run(&rx));
                if std::panic::catch_unwind(run).is_err() {
                    lost(RecorderError::TaskLost("the write-ahead log's thread"));
                }
            })
            .map_err(|e| RecorderError::SpawnThread(Arc::new(e)))?;
        Ok((
            Wal {
                jobs,
                tracker: Arc::clone(&tracker),
            },
            tracker,
            thread,
        ))
    }

    /// Appends `row` as the begin record of its request (outcome `unknown`) and waits until
    /// it is durable. `Err` means the request must not be forwarded.
    pub async fn begin(&self, row: &RequestRecord) -> Result<(), RecorderError> {
        let mut begun = row.clone();
        begun.outcome = Outcome::Unknown;
        let bytes = encode(EntryKind::Begin, &begun)?;
        let (reply, done) = oneshot::channel();
        self.jobs
            .send(Job {
                bytes,
                entry: (JobKind::Begin, row.audit_id.clone()),
                reply: Some(reply),
            })
            .map_err(|_| RecorderError::Stopped)?;
        done.await.unwrap_or(Err(RecorderError::Stopped))
    }

    /// Appends the final row of a request that was begun (others are ignored); not waited
    /// for: if it is lost, the begin record still yields an `unknown` row.
    pub fn end(&self, row: &RequestRecord) {
        self.end_as(row, JobKind::End);
    }

    /// [`Wal::end`] for a row that will not reach a Parquet file before the next start (it
    /// was shed, or refused while recording is down): the log is then its only record, so
    /// its begin and end are carried into new segments like an open request's, rather
    /// than keeping their segment, and every later one, until the next start.
    pub fn end_lost(&self, row: &RequestRecord) {
        self.end_as(row, JobKind::LostEnd);
    }

    fn end_as(&self, row: &RequestRecord, kind: JobKind) {
        if !self.tracker.is_outstanding(&row.audit_id) {
            return;
        }
        match encode(EntryKind::End, row) {
            Ok(bytes) => {
                let _ = self.jobs.send(Job {
                    bytes,
                    entry: (kind, row.audit_id.clone()),
                    reply: None,
                });
            }
            Err(error) => {
                tracing::warn!(audit_id = %row.audit_id, %error, "final row not logged; the begin record stands")
            }
        }
    }

    /// The log's shared state.
    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }
}

/// The open segment.
struct OpenSegment {
    seq: u64,
    opened: std::time::Instant,
    path: PathBuf,
    file: File,
    len: u64,
    /// Bytes written since the last sync.
    unsynced: bool,
}

/// The writer thread's state.
struct LogWriter {
    /// See [`MAX_SEGMENT_AGE`].
    max_age: std::time::Duration,
    segment_bytes: u64,
    dir: PathBuf,
    next_seq: u64,
    open: Option<OpenSegment>,
    tracker: Arc<Tracker>,
    on_failure: OnFailure,
}

impl LogWriter {
    fn run(mut self, jobs: &mpsc::Receiver<Job>) {
        let idle_check = self.max_age.min(std::time::Duration::from_secs(30));
        loop {
            let first = match jobs.recv_timeout(idle_check) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.retire_if_stale();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
        // Every handle is gone: make what was written durable and let the last segment go
        // once its rows are published.
        if let Some(open) = self.open.take()
            && let Err(error) = open.file.sync_data()
        {
            tracing::warn!(path = %open.path.display(), %error, "write-ahead log: final sync failed");
        }
        let doomed = {
            let mut state = self.tracker.state();
            state.active = None;
            state.deletable()
        };
        self.tracker.delete(doomed);
    }

    fn commit(&mut self, batch: Vec<Job>) {
        self.retire_if_stale();
        let durable = batch.iter().any(|j| j.reply.is_some());
        let bytes: usize = batch.iter().map(|j| j.bytes.len()).sum();
        let mut buf = Vec::with_capacity(bytes);
        for job in &batch {
            buf.extend_from_slice(&job.bytes);
        }
        match self.append(&buf, durable) {
            Ok(seq) => {
                self.tracker
                    .appends
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                let mut replies = Vec::with_capacity(batch.len());
                {
                    let mut state = self.tracker.state();
                    for job in batch {
                        let (kind, id) = job.entry;
                        match kind {
                            JobKind::Begin => {
                                state.outstanding.insert(id.clone(), seq);
                                state.records.insert(id, Arc::new(job.bytes));
                                *state.counts.entry(seq).or_insert(0) += 1;
                            }
                            JobKind::End => {
                                state.records.remove(&id);
                            }
                            // Its row will not be published before the next start: its
                            // begin and end travel on together as old segments go.
                            JobKind::LostEnd => {
                                if let Some(begin) = state.records.get(&id) {
                                    let mut both =
                                        Vec::with_capacity(begin.len() + job.bytes.len());
                                    both.extend_from_slice(begin);
                                    both.extend_from_slice(&job.bytes);
                                    state.records.insert(id, Arc::new(both));
                                } else {
                                    state.records.remove(&id);
                                }
                            }
                        }
                        replies.extend(job.reply);
                    }
                }
                for reply in replies {
                    let _ = reply.send(Ok(()));
                }
                self.rotate_if_full();
            }
            Err(error) => {
                self.tracker.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, records = batch.len(), "write-ahead log append failed; the requests waiting on it are refused");
                // Down first, so no request slips through between the refusal and the flag.
                (self.on_failure)(error.clone());
                for job in batch {
                    if let Some(reply) = job.reply {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
        }
    }

    /// Writes `buf` to the open segment (opening one if needed), syncing when `durable`;
    /// returns the segment's number. On failure the segment is cut back to its last good
    /// length and closed, so the next commit starts a fresh one.
    fn append(&mut self, buf: &[u8], durable: bool) -> Result<u64, RecorderError> {
        let mut carried = Vec::new();
        let mut durable = durable;
        let mut with_carry;
        let mut buf = buf;
        if self.open.is_none() {
            // Requests begun two or more segments ago and still open (long exec or
            // port-forward sessions) are copied into the new segment, so the old ones can
            // be deleted; the replay keeps the first copy of a begin it reads.
            let before = self.next_seq.saturating_sub(1);
            with_carry = Vec::new();
            {
                let state = self.tracker.state();
                for (id, bytes) in &state.records {
                    if let Some(&seq) = state.outstanding.get(id)
                        && seq < before
                    {
                        with_carry.extend_from_slice(bytes);
                        carried.push((id.clone(), seq));
                    }
                }
            }
            self.open = Some(self.open_segment()?);
            if !carried.is_empty() {
                with_carry.extend_from_slice(buf);
                buf = &with_carry;
                durable = true;
            }
        }
        let Some(open) = self.open.as_mut() else {
            return Err(RecorderError::Stopped);
        };
        let good = open.len;
        let result = open
            .file
            .write_all_at(buf, good)
            .map_err(|e| io_error("append to write-ahead log", &open.path, e))
            .and_then(|()| {
                if durable {
                    open.file
                        .sync_data()
                        .map_err(|e| io_error("sync write-ahead log", &open.path, e))
                } else {
                    Ok(())
                }
            });
        match result {
            Ok(()) => {
                open.len += buf.len() as u64;
                if durable {
                    self.tracker.syncs.fetch_add(1, Ordering::Relaxed);
                    open.unsynced = false;
                } else {
                    open.unsynced = true;
                }
                let seq = open.seq;
                if !carried.is_empty() {
                    let doomed = {
                        let mut state = self.tracker.state();
                        for (id, old) in &carried {
                            if state.outstanding.get(id) == Some(old) {
                                state.outstanding.insert(id.clone(), seq);
                                if let Some(count) = state.counts.get_mut(old) {
                                    *count = count.saturating_sub(1);
                                }
                                *state.counts.entry(seq).or_insert(0) += 1;
                            }
                        }
                        state.deletable()
                    };
                    tracing::debug!(
                        carried = carried.len(),
                        "long-running requests carried into a new write-ahead log segment"
                    );
                    self.tracker.delete(doomed);
                }
                Ok(seq)
            }
            Err(error) => {
                // What did not reach the disk whole is zeroed again if the disk allows;
                // otherwise it reads back as a torn record. No record follows it: the
                // segment is closed.
                let zeros = vec![0u8; buf.len()];
                if let Err(e) = open
                    .file
                    .write_all_at(&zeros, good)
                    .and_then(|()| open.file.sync_data())
                {
                    tracing::warn!(path = %open.path.display(), error = %e, "cannot clear a failed append in the write-ahead log; it reads back as a torn record");
                }
                self.close_open();
                Err(error)
            }
        }
    }

    fn close_open(&mut self) {
        if let Some(open) = self.open.take() {
            if open.unsynced
                && let Err(error) = open.file.sync_data()
            {
                tracing::warn!(path = %open.path.display(), %error, "write-ahead log: sync on close failed");
            }
            let doomed = {
                let mut state = self.tracker.state();
                if state.active == Some(open.seq) {
                    state.active = None;
                }
                state.deletable()
            };
            self.tracker.delete(doomed);
        }
    }

    /// Closes the open segment once it is older than `max_age`: it is deleted as soon as
    /// every request it began has its row published, and begins still open then (a long
    /// session, a row that was lost) are carried into a later segment like those of a full
    /// one, so none pins a segment that keeps growing. The next begin opens a new one.
    fn retire_if_stale(&mut self) {
        if self
            .open
            .as_ref()
            .is_some_and(|open| open.opened.elapsed() >= self.max_age)
        {
            self.close_open();
        }
    }

    fn rotate_if_full(&mut self) {
        if self
            .open
            .as_ref()
            .is_some_and(|o| o.len >= self.segment_bytes)
        {
            self.close_open();
        }
    }

    /// Creates the next segment with its header, durably (file and directory entry).
    fn open_segment(&mut self) -> Result<OpenSegment, RecorderError> {
        let seq = self.next_seq;
        let path = self.dir.join(segment_name(seq));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_error("create write-ahead log segment", &path, e))?;
        self.next_seq += 1;
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&jiff::Timestamp::now().as_microsecond().to_le_bytes());
        let written = file
            .write_all(&header)
            .and_then(|()| zero_fill(&mut file, self.segment_bytes - HEADER_LEN as u64))
            .and_then(|()| file.sync_all())
            .and_then(|()| super::durable::sync_dir(&self.dir));
        if let Err(e) = written {
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(io_error("create write-ahead log segment", &path, e));
        }
        {
            let mut state = self.tracker.state();
            state.existing.insert(seq);
            state.active = Some(seq);
        }
        Ok(OpenSegment {
            seq,
            opened: std::time::Instant::now(),
            path,
            file,
            len: HEADER_LEN as u64,
            unsynced: false,
        })
    }
}

/// Writes `len` zero bytes at the file's cursor (blocks really allocated, unlike
/// `fallocate`'s unwritten extents, whose first write is a metadata change again).
fn zero_fill(file: &mut File, len: u64) -> std::io::Result<()> {
    const CHUNK: usize = 256 * 1024;
    let zeros = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// The row as the log stores it (JSON). Every field defaults, so a row written by an older
/// version still reads.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct WalRow<'a> {
    request_time: i64,
    response_time: Option<i64>,
    latency_us: i64,
    audit_id: Cow<'a, str>,
    node: Cow<'a, str>,
    cluster: Cow<'a, str>,
    cgroup_id: i64,
    netns_cookie: i64,
    pid: i64,
    command: Option<Cow<'a, str>>,
    pod_namespace: Option<Cow<'a, str>>,
    pod: Option<Cow<'a, str>>,
    pod_uid: Option<Cow<'a, str>>,
    service_account: Option<Cow<'a, str>>,
    container: Option<Cow<'a, str>>,
    source_addr: Cow<'a, str>,
    original_dst: Option<Cow<'a, str>>,
    user_agent: Option<Cow<'a, str>>,
    kubectl_command: Option<Cow<'a, str>>,
    kubectl_session: Option<Cow<'a, str>>,
    verb: Cow<'a, str>,
    request_uri: Cow<'a, str>,
    api_group: Cow<'a, str>,
    api_version: Cow<'a, str>,
    resource: Cow<'a, str>,
    subresource: Cow<'a, str>,
    namespace: Cow<'a, str>,
    name: Cow<'a, str>,
    decision: Option<Cow<'a, str>>,
    policy_rule: Option<Cow<'a, str>>,
    reason: Option<Cow<'a, str>>,
    response_code: i32,
    request_bytes: i64,
    response_bytes: i64,
    error: Option<Cow<'a, str>>,
    principal_kind: Cow<'a, str>,
    principal_subject: Option<Cow<'a, str>>,
    principal_groups: Cow<'a, [String]>,
    principal_reason: Option<Cow<'a, str>>,
    principal_mismatch: Option<Cow<'a, str>>,
    impersonated_user: Option<Cow<'a, str>>,
    request_content_type: Option<Cow<'a, str>>,
    request_object: Option<Cow<'a, str>>,
    request_object_truncated: bool,
    masked_fields: i32,
    response_object: Option<Cow<'a, str>>,
    response_object_truncated: bool,
    outcome: Cow<'a, str>,
    masked: Option<Cow<'a, str>>,
    approval_outcome: Option<Cow<'a, str>>,
    access_request: Option<Cow<'a, str>>,
    approval_decided_by: Option<Cow<'a, str>>,
    approval_wait_ms: Option<i64>,
}

impl<'a> From<&'a RequestRecord> for WalRow<'a> {
    fn from(r: &'a RequestRecord) -> Self {
        WalRow {
            request_time: r.request_time.as_microsecond(),
            response_time: r.response_time.map(|t| t.as_microsecond()),
            latency_us: r.latency_us,
            audit_id: Cow::Borrowed(&r.audit_id),
            node: Cow::Borrowed(&r.node),
            cluster: Cow::Borrowed(&r.cluster),
            cgroup_id: r.workload.cgroup_id,
            netns_cookie: r.workload.netns_cookie,
            pid: r.workload.pid,
            command: r.workload.command.as_deref().map(Cow::Borrowed),
            pod_namespace: r.workload.namespace.as_deref().map(Cow::Borrowed),
            pod: r.workload.pod.as_deref().map(Cow::Borrowed),
            pod_uid: r.workload.pod_uid.as_deref().map(Cow::Borrowed),
            service_account: r.workload.service_account.as_deref().map(Cow::Borrowed),
            container: r.workload.container.as_deref().map(Cow::Borrowed),
            source_addr: Cow::Borrowed(&r.source_addr),
            original_dst: r.original_dst.as_deref().map(Cow::Borrowed),
            user_agent: r.user_agent.as_deref().map(Cow::Borrowed),
            kubectl_command: r.kubectl_command.as_deref().map(Cow::Borrowed),
            kubectl_session: r.kubectl_session.as_deref().map(Cow::Borrowed),
            verb: Cow::Borrowed(r.verb.as_str()),
            request_uri: Cow::Borrowed(&r.request_uri),
            api_group: Cow::Borrowed(&r.object_ref.api_group),
            api_version: Cow::Borrowed(&r.object_ref.api_version),
            resource: Cow::Borrowed(&r.object_ref.resource),
            subresource: Cow::Borrowed(&r.object_ref.subresource),
            namespace: Cow::Borrowed(&r.object_ref.namespace),
            name: Cow::Borrowed(&r.object_ref.name),
            decision: r.decision.map(|d| Cow::Borrowed(d.as_str())),
            policy_rule: r.policy_rule.as_deref().map(Cow::Borrowed),
            reason: r.reason.as_deref().map(Cow::Borrowed),
            response_code: r.response_code,
            request_bytes: r.request_bytes,
            response_bytes: r.response_bytes,
            error: r.error.as_deref().map(Cow::Borrowed),
            principal_kind: Cow::Borrowed(&r.principal.kind),
            principal_subject: r.principal.subject.as_deref().map(Cow::Borrowed),
            principal_groups: Cow::Borrowed(&r.principal.groups),
            principal_reason: r.principal.reason.as_deref().map(Cow::Borrowed),
            principal_mismatch: r.principal.mismatch.as_deref().map(Cow::Borrowed),
            impersonated_user: r.impersonated_user.as_deref().map(Cow::Borrowed),
            request_content_type: r.request_content_type.as_deref().map(Cow::Borrowed),
            request_object: r.request_object.as_deref().map(Cow::Borrowed),
            request_object_truncated: r.request_object_truncated,
            masked_fields: r.masked_fields,
            response_object: r.response_object.as_deref().map(Cow::Borrowed),
            response_object_truncated: r.response_object_truncated,
            outcome: Cow::Borrowed(r.outcome.as_str()),
            masked: r.masked.as_deref().map(Cow::Borrowed),
            approval_outcome: r.approval_outcome.as_deref().map(Cow::Borrowed),
            access_request: r.access_request.as_deref().map(Cow::Borrowed),
            approval_decided_by: r.approval_decided_by.as_deref().map(Cow::Borrowed),
            approval_wait_ms: r.approval_wait_ms,
        }
    }
}

impl WalRow<'_> {
    // The struct update keeps columns added later at their defaults.
    #[allow(clippy::needless_update)]
    fn into_record(self) -> Result<RequestRecord, String> {
        let time =
            |us: i64| jiff::Timestamp::from_microsecond(us).map_err(|e| format!("time {us}: {e}"));
        Ok(RequestRecord {
            request_time: time(self.request_time)?,
            response_time: self.response_time.map(time).transpose()?,
            latency_us: self.latency_us,
            audit_id: self.audit_id.into_owned(),
            node: self.node.into(),
            cluster: self.cluster.into(),
            workload: Arc::new(WorkloadRecord {
                cgroup_id: self.cgroup_id,
                netns_cookie: self.netns_cookie,
                pid: self.pid,
                command: self.command.map(Cow::into_owned),
                namespace: self.pod_namespace.map(Cow::into_owned),
                pod: self.pod.map(Cow::into_owned),
                pod_uid: self.pod_uid.map(Cow::into_owned),
                service_account: self.service_account.map(Cow::into_owned),
                container: self.container.map(Cow::into_owned),
            }),
            source_addr: self.source_addr.into(),
            original_dst: self.original_dst.map(Arc::from),
            user_agent: self.user_agent.map(Cow::into_owned),
            kubectl_command: self.kubectl_command.map(Cow::into_owned),
            kubectl_session: self.kubectl_session.map(Cow::into_owned),
            verb: Verb::parse(&self.verb).ok_or_else(|| format!("unknown verb {:?}", self.verb))?,
            request_uri: self.request_uri.into_owned(),
            object_ref: ObjectRef {
                api_group: self.api_group.as_ref().into(),
                api_version: self.api_version.as_ref().into(),
                resource: self.resource.as_ref().into(),
                subresource: self.subresource.as_ref().into(),
                namespace: self.namespace.as_ref().into(),
                name: self.name.as_ref().into(),
            },
            decision: self
                .decision
                .map(|d| Action::parse(&d).ok_or_else(|| format!("unknown decision {d:?}")))
                .transpose()?,
            policy_rule: self.policy_rule.map(Cow::into_owned),
            reason: self.reason.map(Cow::into_owned),
            response_code: self.response_code,
            request_bytes: self.request_bytes,
            response_bytes: self.response_bytes,
            error: self.error.map(Cow::into_owned),
            principal: Arc::new(PrincipalRecord {
                kind: self.principal_kind.into_owned(),
                subject: self.principal_subject.map(Cow::into_owned),
                groups: self.principal_groups.into_owned(),
                reason: self.principal_reason.map(Cow::into_owned),
                mismatch: self.principal_mismatch.map(Cow::into_owned),
            }),
            impersonated_user: self.impersonated_user.map(Cow::into_owned),
            request_content_type: self.request_content_type.map(Cow::into_owned),
            request_object: self.request_object.map(Cow::into_owned),
            request_object_truncated: self.request_object_truncated,
            masked_fields: self.masked_fields,
            response_object: self.response_object.map(Cow::into_owned),
            response_object_truncated: self.response_object_truncated,
            outcome: Outcome::parse(&self.outcome)
                .ok_or_else(|| format!("unknown outcome {:?}", self.outcome))?,
            masked: self.masked.map(Cow::into_owned),
            approval_outcome: self.approval_outcome.map(Cow::into_owned),
            access_request: self.access_request.map(Cow::into_owned),
            approval_decided_by: self.approval_decided_by.map(Cow::into_owned),
            approval_wait_ms: self.approval_wait_ms,
            ..RequestRecord::default()
        })
    }
}
