//! Records every request through the gateway as one row of the `requests` table, written
//! as zstd-compressed, hive-partitioned Parquet that DuckDB, pyarrow and Spark read as is:
//! `<dir>/table=requests/date=YYYY-MM-DD/node=<node>/part-<uuidv7>.parquet`.
//!
//! Producers hold a cheap [`RecorderHandle`] and await [`RecorderHandle::record`], which
//! waits for queue space rather than dropping a row. An async coordinator task batches
//! rows per date partition and decides rotation (row count, file age, date); a dedicated
//! OS thread (`writer`) encodes and writes, so compression never blocks the runtime.
//! Files are written under a hidden `.inprogress` name and renamed once complete and
//! synced. On drain, or once every handle is dropped, queued rows are written and all
//! files are closed before [`Recorder::join`] returns. The schema is documented in
//! docs/recording-schema.md.
//!
//! A write failure (disk full, I/O error) does not stop the recorder: it marks recording
//! *down* ([`RecorderHandle::health`]), keeps what it had written (a file it cannot
//! complete stays on disk as a hidden `.failed` file instead of being deleted), logs the
//! audit id of every row it loses, and probes the disk every [`PROBE_EVERY`] until a write
//! and fsync succeed again. While it is down, producers' rows are refused at once and the
//! proxy refuses what it must not forward unrecorded (see `proxy`).
//!
//! Mutating requests are also made durable *before* they are forwarded: the proxy awaits
//! [`RecorderHandle::begin`], which appends the row to the write-ahead log (`wal`) and
//! fsyncs it (group commit). A failing log marks recording down like a failing file. At
//! start the log is replayed, so every request that was forwarded has a row (outcome
//! `unknown` when the gateway died before the response).

mod dir_lock;
pub(crate) mod durable;
pub mod exec_frames;
pub mod manifest;
mod reader;
pub mod replay;
pub mod schema;
mod session;
pub mod sessions;
pub mod table;
pub mod upload;
pub mod wal;
mod writer;

#[cfg(test)]
mod manifest_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod wal_tests;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use std::collections::HashSet;

use jiff::civil::Date;
use jiff::tz::Offset;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::drain::DrainWatcher;

pub use dir_lock::{DirLock, DirLockError, LOCK_FILE, lock_dir};
pub use exec_frames::{ExecFrameRecord, FrameEventKind};
pub use reader::{ReadError, list_files, list_table_files, read_dir, read_exec_frames, read_file};
pub use schema::{
    ObjectRef, Outcome, PrincipalRecord, RequestRecord, WorkloadRecord, decision_str,
    requests_schema, to_record_batch,
};
pub use session::{SessionKind, SessionRecorder};
use table::Rows;
pub use table::Table;
pub use writer::writer_properties;
use writer::{Command, FileWriter};

/// The write-ahead log's directory under the recording root (hidden, so dataset readers
/// that walk the tree skip it).
pub const DEFAULT_WAL_DIR: &str = ".wal";
/// Default [`RecorderConfig::max_rows_per_file`].
pub const DEFAULT_MAX_ROWS_PER_FILE: usize = 100_000;
/// Default [`RecorderConfig::max_file_age`]: short, so analysts see recent requests soon.
pub const DEFAULT_MAX_FILE_AGE: Duration = Duration::from_secs(60);
/// Default [`RecorderConfig::queue_capacity`].
pub const DEFAULT_QUEUE_CAPACITY: usize = 8192;
/// The fewest finished rows that may wait for room in the queue before recording is
/// *behind* (see [`RecorderHandle::backlog_add`]).
const MIN_BACKLOG_LIMIT: u64 = 4096;
/// Default [`RecorderConfig::row_group_rows`]: one row group per full file.
pub const DEFAULT_ROW_GROUP_ROWS: usize = 100_000;
/// Default [`RecorderConfig::max_session_bytes`]: 64 MiB of exec/attach payload.
pub const DEFAULT_MAX_SESSION_BYTES: u64 = 64 * 1024 * 1024;

/// Rows handed to the writer thread at once: large enough for efficient columnar
/// encoding, small enough to keep memory bounded (a few MiB per batch).
const BATCH_ROWS: usize = 4096;
/// Payload bytes of `exec_frames` rows handed to the writer at once: their rows are large,
/// so a batch is bounded by bytes too.
const BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Batches queued for the writer thread while it encodes another one.
const WRITER_QUEUE_BATCHES: usize = 2;
/// How often a recorder that is down checks whether the disk takes writes again.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// How many queued messages the coordinator takes per turn of its loop.
const INBOX_MESSAGES: usize = 256;
/// How long [`Recorder::join`] waits for the write-ahead log's thread to finish.
const WAL_STOP_GRACE: Duration = Duration::from_secs(2);
/// Longest node name accepted (a Kubernetes node name is a DNS subdomain).
const MAX_NODE_NAME_LEN: usize = 253;

/// Where and how the recorder writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecorderConfig {
    /// Root of the recording; the table lives in `<dir>/table=requests/`.
    pub dir: PathBuf,
    /// This node's name, used as the `node=` partition value.
    pub node: String,
    /// A file is closed once it holds this many rows.
    pub max_rows_per_file: usize,
    /// A file is closed this long after its first row, so data becomes visible soon.
    pub max_file_age: Duration,
    /// Rows that may wait for the writer before `record` starts waiting.
    pub queue_capacity: usize,
    /// Maximum rows per Parquet row group.
    pub row_group_rows: usize,
    /// The write-ahead log's directory (`None`: no log; mutating requests are then only
    /// recorded when their exchange ends; tests and benchmarks only).
    pub wal_dir: Option<PathBuf>,
    /// List every finished file in the node's manifest (`<dir>/_manifests/`).
    pub manifest: bool,
    /// The ed25519 key (PKCS#8 PEM) that signs manifest entries; `None`: unsigned.
    pub signing_key_file: Option<PathBuf>,
    /// Payload bytes of one exec/attach session stored in `exec_frames`; past it frames
    /// are counted but not stored, and a `truncated` row says so.
    pub max_session_bytes: u64,
}

impl RecorderConfig {
    /// A configuration with the default limits.
    pub fn new(dir: impl Into<PathBuf>, node: impl Into<String>) -> RecorderConfig {
        let dir = dir.into();
        RecorderConfig {
            wal_dir: Some(dir.join(DEFAULT_WAL_DIR)),
            manifest: true,
            signing_key_file: None,
            dir,
            node: node.into(),
            max_rows_per_file: DEFAULT_MAX_ROWS_PER_FILE,
            max_file_age: DEFAULT_MAX_FILE_AGE,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            row_group_rows: DEFAULT_ROW_GROUP_ROWS,
            max_session_bytes: DEFAULT_MAX_SESSION_BYTES,
        }
    }

    fn validate(&self) -> Result<(), RecorderError> {
        let invalid = |field: &'static str, reason: &str| {
            Err(RecorderError::InvalidConfig {
                field,
                reason: reason.to_string(),
            })
        };
        let node_ok = !self.node.is_empty()
            && self.node.len() <= MAX_NODE_NAME_LEN
            && self
                .node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !node_ok {
            return Err(RecorderError::InvalidConfig {
                field: "node",
                reason: format!(
                    "{:?} is not a usable partition value: use 1-{MAX_NODE_NAME_LEN} characters from [A-Za-z0-9._-]",
                    self.node
                ),
            });
        }
        if self.dir.as_os_str().is_empty() {
            return invalid("dir", "must not be empty");
        }
        if self.max_rows_per_file == 0 {
            return invalid("max_rows_per_file", "must be at least 1");
        }
        if self.max_file_age.is_zero() {
            return invalid("max_file_age", "must be greater than zero");
        }
        if self.queue_capacity == 0 {
            return invalid("queue_capacity", "must be at least 1");
        }
        if self.row_group_rows == 0 {
            return invalid("row_group_rows", "must be at least 1");
        }
        Ok(())
    }
}

/// Everything that can go wrong while recording; cloneable so every producer can be told.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecorderError {
    /// A configuration value is unusable.
    #[error("recorder config: {field}: {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// The recording directory cannot be created.
    #[error("recording directory {}: cannot create: {source}", path.display())]
    Directory {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: Arc<std::io::Error>,
    },
    /// The recording directory exists but files cannot be created in it.
    #[error("recording directory {} is not writable: {source}", path.display())]
    NotWritable {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: Arc<std::io::Error>,
    },
    /// A file system operation on a recording file failed (disk full, permissions, ...).
    #[error("recording: {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: Arc<std::io::Error>,
    },
    /// Rows could not be converted to Arrow.
    #[error("recording: encode rows for {}: {source}", path.display())]
    Encode {
        /// The file the rows were meant for.
        path: PathBuf,
        /// The cause.
        source: Arc<arrow_schema::ArrowError>,
    },
    /// The Parquet writer failed (often an I/O error underneath).
    #[error("recording: write {}: {source}", path.display())]
    Parquet {
        /// The file being written.
        path: PathBuf,
        /// The cause.
        source: Arc<parquet::errors::ParquetError>,
    },
    /// The recorder was drained or shut down; the row was not recorded.
    #[error("recorder has stopped (drained or shut down); row not recorded")]
    Stopped,
    /// `Recorder::start` was called outside a tokio runtime.
    #[error("recorder: Recorder::start must be called from within a tokio runtime")]
    NoRuntime,
    /// The writer thread could not be started.
    #[error("recorder: cannot start writer thread: {0}")]
    SpawnThread(Arc<std::io::Error>),
    /// The write-ahead log refused a row.
    #[error("write-ahead log: {reason}")]
    Wal {
        /// What is wrong.
        reason: String,
    },
    /// A write-ahead log segment holds bytes that are not a record (beyond a torn tail).
    #[error("write-ahead log segment {} is corrupt at offset {offset}: {reason}; move the file aside (keep it for forensics) to start without it", path.display())]
    WalCorrupt {
        /// The segment.
        path: PathBuf,
        /// Where the bad record starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The manifest cannot be read, continued or written.
    #[error("manifest {}: {reason}", path.display())]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The signing key cannot be used.
    #[error("recording.signingKeyFile: {0}")]
    SigningKey(String),
    /// A background task ended without reporting (it panicked or was cancelled).
    #[error("recorder: {0} ended without reporting a result")]
    TaskLost(&'static str),
    /// More finished rows wait for room in the recorder's queue than it may hold: the
    /// writer does not keep up (a slow or stalled disk).
    #[error(
        "recording is behind: {rows} finished rows wait for the writer, more than the {limit} it may hold back"
    )]
    Behind {
        /// Rows waiting.
        rows: u64,
        /// The most that may wait.
        limit: u64,
    },
}

/// What the recorder wrote before it stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecorderStats {
    /// `requests` rows in published files.
    pub rows: u64,
    /// `exec_frames` rows in published files.
    pub exec_frame_rows: u64,
    /// Published files, in the order they were closed.
    pub files: Vec<PathBuf>,
    /// Rows that never reached a published file (each was logged with its audit id).
    pub rows_lost: u64,
    /// Times recording went down.
    pub outages: u64,
}

/// Whether recording works right now, as [`RecorderHandle::health`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RecorderHealth {
    /// Rows are being written.
    pub up: bool,
    /// Why recording is down, when it is.
    pub cause: Option<String>,
    /// Times recording went down since start.
    pub outages: u64,
    /// Rows refused or lost since start.
    pub rows_lost: u64,
    /// The write-ahead log's counters, when there is one.
    pub wal: Option<wal::WalStats>,
    /// Rows rebuilt from the write-ahead log at start.
    pub replayed: u64,
    /// The uploader's counters, when files are uploaded.
    pub upload: Option<UploadHealth>,
}

/// The uploader's state in [`RecorderHealth`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct UploadHealth {
    /// Files (and manifest versions) confirmed uploaded since start.
    pub uploaded: u64,
    /// Bytes uploaded since start.
    pub bytes: u64,
    /// Upload rounds that failed.
    pub failures: u64,
    /// Local files deleted by the retention limit after a confirmed upload.
    pub deleted: u64,
    /// Age of the oldest finished file not yet confirmed uploaded, in seconds.
    pub lag_seconds: u64,
    /// Files waiting to be uploaded.
    pub pending: u64,
}

/// State shared by producers, the writer thread and the admin endpoint: whether
/// recording is down and why. The proxy reads `down` on every request, so it is an atomic.
#[derive(Debug, Default)]
struct Shared {
    /// The uploader's counters, once one runs.
    upload: std::sync::OnceLock<Arc<upload::UploadStats>>,
    down: AtomicBool,
    cause: Mutex<Option<RecorderError>>,
    outages: AtomicU64,
    rows_lost: AtomicU64,
    /// Finished rows handed to the recorder's runtime and not yet in its queue: they wait
    /// there while the queue is full. Past `backlog_limit`, recording is *behind*.
    backlog: AtomicU64,
    backlog_limit: u64,
    behind: AtomicBool,
    /// A part recording needs is gone for good (a thread that panicked): no probe brings
    /// recording back up.
    broken: AtomicBool,
}

impl Shared {
    fn cause(&self) -> std::sync::MutexGuard<'_, Option<RecorderError>> {
        self.cause.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Recording is down because of `error` (the latest cause is kept).
    fn set_down(&self, error: RecorderError) {
        let mut cause = self.cause();
        if !self.down.swap(true, Ordering::AcqRel) {
            self.outages.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%error, "recording is down: requests that must be recorded are refused until it recovers");
        }
        *cause = Some(error);
    }

    /// Recording is down for good: `error` says which part is gone.
    fn set_broken(&self, error: RecorderError) {
        self.broken.store(true, Ordering::Release);
        self.set_down(error);
    }

    /// A probe wrote and synced a file: recording works again (unless a part is gone).
    fn set_up(&self) {
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        let mut cause = self.cause();
        if self.down.swap(false, Ordering::AcqRel) {
            tracing::info!(previous = ?cause.as_ref().map(ToString::to_string), "recording recovered");
        }
        *cause = None;
    }

    fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Why a request that must be recorded is refused now: recording is down, or so far
    /// behind that the rows waiting for it would grow without bound.
    fn refusal(&self) -> Option<RecorderError> {
        if let Some(error) = self.current_error() {
            return Some(error);
        }
        self.behind
            .load(Ordering::Acquire)
            .then(|| RecorderError::Behind {
                rows: self.backlog.load(Ordering::Relaxed),
                limit: self.backlog_limit,
            })
    }

    /// `rows` finished rows now wait to be queued.
    fn backlog_add(&self, rows: u64) {
        let now = self.backlog.fetch_add(rows, Ordering::AcqRel) + rows;
        if now > self.backlog_limit && !self.behind.swap(true, Ordering::AcqRel) {
            self.outages.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                rows = now,
                limit = self.backlog_limit,
                "recording is behind: requests that must be recorded are refused until it catches up"
            );
        }
    }

    /// `rows` waiting rows were queued (or lost, and counted so).
    fn backlog_done(&self, rows: u64) {
        let now = self
            .backlog
            .fetch_sub(rows, Ordering::AcqRel)
            .saturating_sub(rows);
        if now <= self.backlog_limit / 2
            && self.behind.load(Ordering::Acquire)
            && self.behind.swap(false, Ordering::AcqRel)
        {
            tracing::info!(rows = now, "recording caught up");
        }
    }

    fn current_error(&self) -> Option<RecorderError> {
        if !self.is_down() {
            return None;
        }
        Some(self.cause().clone().unwrap_or(RecorderError::Stopped))
    }

    fn lose(&self, rows: u64) {
        self.rows_lost.fetch_add(rows, Ordering::Relaxed);
    }

    /// The error a producer gets when the channel is closed.
    fn closed_error(&self) -> RecorderError {
        self.current_error().unwrap_or(RecorderError::Stopped)
    }
}

type FlushReply = oneshot::Sender<Result<Vec<PathBuf>, RecorderError>>;

enum Message {
    Row(Box<RequestRecord>),
    /// A chunk of one session's `exec_frames` rows.
    Frames(Vec<ExecFrameRecord>),
    Flush(FlushReply),
}

/// Owns the recorder's background work; [`Recorder::join`] waits for it to finish.
#[derive(Debug)]
pub struct Recorder {
    task: JoinHandle<Result<RecorderStats, RecorderError>>,
    wal_thread: Option<std::thread::JoinHandle<()>>,
}

/// Cheap, cloneable producer side of the recorder.
#[derive(Clone)]
pub struct RecorderHandle {
    queue: mpsc::Sender<Message>,
    shared: Arc<Shared>,
    wal: Option<wal::Wal>,
    replayed: u64,
    max_session_bytes: u64,
    /// The runtime the recorder runs on, which outlives every request: rows sent from a
    /// destructor go through a task there, not on a data-path thread that may stop first.
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for RecorderHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecorderHandle")
            .field(
                "queued",
                &(self.queue.max_capacity() - self.queue.capacity()),
            )
            .field("down", &self.shared.is_down())
            .finish()
    }
}

impl Recorder {
    /// Validates the config, creates and write-tests the directory, and starts the writer.
    pub fn start(
        cfg: RecorderConfig,
        drain: DrainWatcher,
    ) -> Result<(Recorder, RecorderHandle), RecorderError> {
        cfg.validate()?;
        let props = writer::writer_properties(cfg.row_group_rows)?;
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| RecorderError::NoRuntime)?;
        let table_dir = cfg.dir.join(format!("table={}", schema::TABLE_NAME));
        durable::create_dir_all(&table_dir).map_err(|e| RecorderError::Directory {
            path: table_dir.clone(),
            source: Arc::new(e),
        })?;
        probe_writable(&table_dir)?;
        tracing::info!(
            dir = %cfg.dir.display(),
            node = %cfg.node,
            max_rows_per_file = cfg.max_rows_per_file,
            max_file_age_s = cfg.max_file_age.as_secs_f64(),
            queue_capacity = cfg.queue_capacity,
            row_group_rows = cfg.row_group_rows,
            "recorder starting"
        );

        let shared = Arc::new(Shared {
            // As many rows again as the queue holds may wait for room in it (at least
            // a few data-path batches' worth, which wait there in normal operation).
            backlog_limit: (cfg.queue_capacity as u64).max(MIN_BACKLOG_LIMIT),
            ..Shared::default()
        });
        let signing_key = cfg
            .signing_key_file
            .as_deref()
            .map(manifest::load_signing_key)
            .transpose()
            .map_err(RecorderError::SigningKey)?;
        let open_manifest = || {
            cfg.manifest
                .then(|| manifest::Manifest::open(&cfg.dir, &cfg.node, signing_key.clone()))
                .transpose()
        };
        let (wal, tracker, wal_thread, replayed) = match &cfg.wal_dir {
            Some(wal_dir) => {
                let recovery = wal::recover(wal_dir)?;
                let replayed = replay(
                    &table_dir,
                    &cfg.node,
                    &props,
                    &shared,
                    recovery,
                    open_manifest()?,
                )?;
                let down = Arc::clone(&shared);
                let (wal, tracker, thread) = wal::Wal::start(
                    wal_dir,
                    replayed.next_seq,
                    Arc::new(move |error| match error {
                        // Its thread is gone: every mutation is refused from now on.
                        RecorderError::TaskLost(_) => down.set_broken(error),
                        error => down.set_down(error),
                    }),
                )?;
                (Some(wal), Some(tracker), Some(thread), replayed.rows)
            }
            None => (None, None, None, 0),
        };
        let (command_tx, command_rx) = mpsc::channel(WRITER_QUEUE_BATCHES);
        let (done_tx, done_rx) = oneshot::channel();
        let file_writer = FileWriter::new(cfg.dir.clone(), cfg.node.clone(), props)
            .with_wal(tracker, cfg.wal_dir.clone())
            .with_manifest(open_manifest()?);
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("recorder-writer".into())
            .spawn(move || {
                let _ = done_tx.send(file_writer.run(command_rx, &thread_shared));
            })
            .map_err(|e| RecorderError::SpawnThread(Arc::new(e)))?;

        let (queue, rows) = mpsc::channel(cfg.queue_capacity);
        let max_session_bytes = cfg.max_session_bytes;
        let coordinator = Coordinator {
            shared: Arc::clone(&shared),
            batch_rows: BATCH_ROWS
                .min(cfg.row_group_rows)
                .min(cfg.max_rows_per_file),
            cfg,
            open: BTreeMap::new(),
            commands: command_tx,
        };
        let task = runtime.spawn(coordinator.run(rows, drain, done_rx));
        Ok((
            Recorder { task, wal_thread },
            RecorderHandle {
                queue,
                shared,
                wal,
                replayed,
                max_session_bytes,
                runtime: runtime.clone(),
            },
        ))
    }

    /// Waits until the recorder has stopped (drain signalled, or every handle dropped) and
    /// every row is in a published file; returns what was written or the first failure.
    pub async fn join(self) -> Result<RecorderStats, RecorderError> {
        let result = self
            .task
            .await
            .unwrap_or(Err(RecorderError::TaskLost("recorder coordinator task")));
        // The log's thread syncs and removes its last segment once every handle is gone;
        // give it a moment so a clean stop leaves no log behind (a segment left is only
        // replayed, and its rows deduplicated, at the next start).
        if let Some(thread) = self.wal_thread {
            let joined = tokio::task::spawn_blocking(move || thread.join());
            if tokio::time::timeout(WAL_STOP_GRACE, joined).await.is_err() {
                tracing::debug!(
                    "write-ahead log still held open at stop; its segment stays for the next start"
                );
            }
        }
        result
    }
}

impl RecorderHandle {
    /// Queues one row, waiting for space; fails at once while recording is down, and once
    /// the recorder has stopped.
    /// Runs `work` (which ends by recording a row) on the recorder's runtime, for callers
    /// that cannot wait: destructors, and data-path threads that stop before the recorder.
    pub fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.runtime.spawn(work);
    }

    pub async fn record(&self, row: RequestRecord) -> Result<(), RecorderError> {
        self.record_boxed(Box::new(row)).await
    }

    /// `rows` finished rows are on their way to [`RecorderHandle::record_boxed`], which
    /// may wait for room in the queue: counted until [`RecorderHandle::backlog_done`], so
    /// that rows piling up outside the queue make recording *behind*.
    pub fn backlog_add(&self, rows: u64) {
        self.shared.backlog_add(rows);
    }

    /// `rows` counted by [`RecorderHandle::backlog_add`] were recorded (or refused).
    pub fn backlog_done(&self, rows: u64) {
        self.shared.backlog_done(rows);
    }

    /// Whether twice as many rows as may wait are waiting already: new rows are then shed
    /// ([`RecorderHandle::shed`]) so that memory stays bounded while the writer is stuck.
    pub fn overloaded(&self) -> bool {
        self.shared.backlog.load(Ordering::Relaxed) >= self.shared.backlog_limit.saturating_mul(2)
    }

    /// Drops a finished row that recording is too far behind to hold: logged with its
    /// audit id and counted as lost. A begun request's end still goes to the write-ahead
    /// log, so its outcome is known at the next start.
    pub fn shed(&self, row: &RequestRecord) {
        if let Some(wal) = &self.wal {
            wal.end_lost(row);
        }
        self.shared.lose(1);
        tracing::error!(audit_id = %row.audit_id, "recording row lost: recording is too far behind to hold it");
    }

    /// [`RecorderHandle::record`] of a row already boxed: it reaches the writer without
    /// being copied again.
    pub async fn record_boxed(&self, row: Box<RequestRecord>) -> Result<(), RecorderError> {
        // The final row of a begun request goes to the log first: should it never reach a
        // Parquet file, the replay still knows the outcome.
        if let Some(error) = self.shared.current_error() {
            if let Some(wal) = &self.wal {
                wal.end_lost(&row);
            }
            self.shared.lose(1);
            return Err(error);
        }
        if let Some(wal) = &self.wal {
            wal.end(&row);
        }
        // Boxed so a queued row costs one pointer in the channel's blocks.
        self.queue
            .send(Message::Row(row))
            .await
            .map_err(|_| self.shared.closed_error())
    }

    /// Makes `row` durable in the write-ahead log before its request is forwarded (a
    /// no-op without a log). `Err` means the request must not be forwarded: refuse it.
    /// A caller dropped while waiting (the client went away) still writes the request's
    /// row (the proxy's `Row` does, as `cancelled`), whose publication ends the log's
    /// vouching for it.
    pub async fn begin(&self, row: &RequestRecord) -> Result<(), RecorderError> {
        let Some(wal) = &self.wal else {
            return Ok(());
        };
        if let Some(error) = self.shared.current_error() {
            return Err(error);
        }
        wal.begin(row).await
    }

    /// Shows an uploader's counters in the health report and metrics.
    pub fn attach_upload(&self, stats: Arc<upload::UploadStats>) {
        let _ = self.shared.upload.set(stats);
    }

    /// Queues a chunk of `exec_frames` rows if the queue has room now, without waiting
    /// (the relay calls it inline). `Err(rows)` hands them back when the queue is full;
    /// an error while recording is down or stopped.
    pub(crate) fn try_record_frames(
        &self,
        rows: Vec<ExecFrameRecord>,
    ) -> Result<Result<(), Vec<ExecFrameRecord>>, RecorderError> {
        if let Some(error) = self.shared.current_error() {
            self.shared.lose(rows.len() as u64);
            return Err(error);
        }
        match self.queue.try_send(Message::Frames(rows)) {
            Ok(()) => Ok(Ok(())),
            Err(mpsc::error::TrySendError::Full(Message::Frames(rows))) => Ok(Err(rows)),
            Err(_) => Err(self.shared.closed_error()),
        }
    }

    /// Queues a chunk of `exec_frames` rows, waiting for space (used once a session has
    /// ended, off the relay path).
    pub async fn record_frames(&self, rows: Vec<ExecFrameRecord>) -> Result<(), RecorderError> {
        if let Some(error) = self.shared.current_error() {
            self.shared.lose(rows.len() as u64);
            return Err(error);
        }
        self.queue
            .send(Message::Frames(rows))
            .await
            .map_err(|_| self.shared.closed_error())
    }

    /// Starts recording one exec, attach or port-forward session opened by the request
    /// `audit_id`, with the configured per-session cap.
    pub fn session(&self, audit_id: &str, kind: SessionKind) -> SessionRecorder {
        SessionRecorder::new(self.clone(), audit_id, kind, self.max_session_bytes)
    }

    /// `Err(cause)` while recording is down or behind. Cheap (two atomic loads when up):
    /// the proxy asks before forwarding every request.
    pub fn health(&self) -> Result<(), RecorderError> {
        // Asked on every request: read the flags in place rather than through `status()`,
        // whose two reference counts every data-path thread would bump.
        self.shared.refusal().map_or(Ok(()), Err)
    }

    /// What `/readyz`, `/metrics` and `chaperone status` show.
    pub fn health_report(&self) -> RecorderHealth {
        self.status().health_report()
    }

    /// A read-only view of the recorder's health that, unlike a handle, does not keep the
    /// recorder running (the admin endpoint holds one).
    pub fn status(&self) -> RecorderStatus {
        RecorderStatus {
            shared: Arc::clone(&self.shared),
            wal: self.wal.as_ref().map(|w| Arc::clone(w.tracker())),
            replayed: self.replayed,
        }
    }

    /// Closes the open files now (after every row recorded before this call) and returns
    /// every file published since start.
    pub async fn flush(&self) -> Result<Vec<PathBuf>, RecorderError> {
        let (reply, done) = oneshot::channel();
        self.queue
            .send(Message::Flush(reply))
            .await
            .map_err(|_| self.shared.closed_error())?;
        done.await
            .unwrap_or_else(|_| Err(self.shared.closed_error()))
    }
}

/// Whether recording works, without the power to record (see [`RecorderHandle::status`]).
#[derive(Debug, Clone)]
pub struct RecorderStatus {
    shared: Arc<Shared>,
    wal: Option<Arc<wal::Tracker>>,
    replayed: u64,
}

impl RecorderStatus {
    /// `Err(cause)` while recording is down or behind.
    pub fn health(&self) -> Result<(), RecorderError> {
        self.shared.refusal().map_or(Ok(()), Err)
    }

    /// Up or down, why, and the counters since start.
    pub fn health_report(&self) -> RecorderHealth {
        let cause = self.shared.refusal().map(|e| e.to_string());
        RecorderHealth {
            up: cause.is_none(),
            cause,
            outages: self.shared.outages.load(Ordering::Relaxed),
            rows_lost: self.shared.rows_lost.load(Ordering::Relaxed),
            wal: self.wal.as_ref().map(|t| t.stats()),
            replayed: self.replayed,
            upload: self.shared.upload.get().map(|u| UploadHealth {
                uploaded: u.uploaded.load(Ordering::Relaxed),
                bytes: u.bytes.load(Ordering::Relaxed),
                failures: u.failures.load(Ordering::Relaxed),
                deleted: u.deleted.load(Ordering::Relaxed),
                lag_seconds: u.lag_seconds.load(Ordering::Relaxed),
                pending: u.pending.load(Ordering::Relaxed),
            }),
        }
    }
}

/// What the start-up replay did.
struct Replayed {
    rows: u64,
    next_seq: u64,
}

/// Writes a row for every request the log holds that no finished Parquet file has yet,
/// then deletes the log's segments. Fails start-up rather than lose a row.
fn replay(
    table_dir: &std::path::Path,
    node: &str,
    props: &parquet::file::properties::WriterProperties,
    shared: &Shared,
    recovery: wal::Recovery,
    manifest: Option<manifest::Manifest>,
) -> Result<Replayed, RecorderError> {
    let next_seq = recovery.next_seq;
    if recovery.segments.is_empty() {
        return Ok(Replayed { rows: 0, next_seq });
    }
    let mut rows = recovery.rows;
    if !rows.is_empty() {
        // A row already published is in a file finished after its segment was created.
        let since = recovery.oldest.unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        let published = published_ids(table_dir, node, since)?;
        rows.retain(|row| !published.contains(&row.audit_id));
    }
    let count = rows.len() as u64;
    if !rows.is_empty() {
        let mut by_date: BTreeMap<Date, Vec<Box<RequestRecord>>> = BTreeMap::new();
        for row in rows {
            by_date
                .entry(Offset::UTC.to_datetime(row.request_time).date())
                .or_default()
                .push(Box::new(row));
        }
        // The writer takes the recording root and adds `table=requests/` itself.
        let root = table_dir.parent().unwrap_or(table_dir);
        let mut writer = FileWriter::new(root.to_path_buf(), node.to_owned(), props.clone())
            .with_manifest(manifest);
        for (date, rows) in by_date {
            writer
                .write(date, table::Rows::Requests(rows))
                .map_err(|(error, _)| error)?;
        }
        writer.close_all(shared)?;
    }
    for segment in &recovery.segments {
        fs::remove_file(segment).map_err(|e| RecorderError::Io {
            op: "remove replayed write-ahead log segment",
            path: segment.clone(),
            source: Arc::new(e),
        })?;
    }
    tracing::info!(
        rows = count,
        segments = recovery.segments.len(),
        torn = recovery.torn.len(),
        "write-ahead log replayed"
    );
    Ok(Replayed {
        rows: count,
        next_seq,
    })
}

/// The audit ids in this node's finished files modified at or after `since` (less a
/// margin for coarse file-system clocks).
fn published_ids(
    table_dir: &std::path::Path,
    node: &str,
    since: jiff::Timestamp,
) -> Result<HashSet<String>, RecorderError> {
    let since = std::time::SystemTime::UNIX_EPOCH
        + Duration::from_micros(u64::try_from(since.as_microsecond()).unwrap_or(0))
            .saturating_sub(Duration::from_secs(5));
    let mut ids = HashSet::new();
    let root = table_dir.parent().unwrap_or(table_dir);
    let node_dir = format!("node={node}");
    for file in list_files(root).map_err(|e| RecorderError::Wal {
        reason: format!("cannot list recorded files for the replay: {e}"),
    })? {
        let ours = file
            .parent()
            .and_then(|p| p.file_name())
            .is_some_and(|n| n.to_string_lossy() == node_dir);
        let recent = fs::metadata(&file)
            .and_then(|m| m.modified())
            .is_ok_and(|m| m >= since);
        if !(ours && recent) {
            continue;
        }
        match reader::read_audit_ids(&file) {
            Ok(found) => ids.extend(found),
            // Its rows are written again rather than risk losing them.
            Err(error) => tracing::warn!(%error, "replay: a recorded file is unreadable"),
        }
    }
    Ok(ids)
}

/// Fails start-up with one clear sentence rather than at the first request.
fn probe_writable(dir: &std::path::Path) -> Result<(), RecorderError> {
    let probe = dir.join(format!(".write-probe-{}", uuid::Uuid::now_v7()));
    let not_writable = |e| RecorderError::NotWritable {
        path: dir.to_path_buf(),
        source: Arc::new(e),
    };
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(not_writable)?;
    fs::remove_file(&probe).map_err(not_writable)
}

/// Rows buffered for one table's and date partition's open file.
struct Pending {
    rows: Rows,
    /// Payload bytes in `rows` (exec_frames data).
    bytes: usize,
    rows_in_file: usize,
    opened_at: Instant,
}

/// The async half: batches rows per date and decides when files rotate.
struct Coordinator {
    shared: Arc<Shared>,
    cfg: RecorderConfig,
    batch_rows: usize,
    open: BTreeMap<(Table, Date), Pending>,
    commands: mpsc::Sender<Command>,
}

/// The writer thread has stopped (it failed); its result says why.
struct WriterGone;

/// Marks recording down when the coordinator's task ends without reaching its orderly
/// end (it panicked): the proxy would otherwise go on forwarding requests whose rows have
/// nowhere to go while every health surface said recording was up.
struct DownIfLost {
    shared: Arc<Shared>,
    armed: bool,
}

impl Drop for DownIfLost {
    fn drop(&mut self) {
        if self.armed {
            self.shared
                .set_down(RecorderError::TaskLost("recorder coordinator task"));
        }
    }
}

impl Coordinator {
    async fn run(
        mut self,
        mut rows: mpsc::Receiver<Message>,
        drain: DrainWatcher,
        done: oneshot::Receiver<Result<RecorderStats, RecorderError>>,
    ) -> Result<RecorderStats, RecorderError> {
        // A panic here ends this task: recording is then down, not silently gone.
        let mut lost = DownIfLost {
            shared: Arc::clone(&self.shared),
            armed: true,
        };
        let mut draining = false;
        let mut inbox = Vec::with_capacity(INBOX_MESSAGES);
        let mut probe = tokio::time::interval(PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A file age too large to represent simply never expires.
            let deadline = self
                .open
                .values()
                .filter_map(|p| p.opened_at.checked_add(self.cfg.max_file_age))
                .min();
            // Biased so a drain or a due rotation is not starved by a busy queue.
            let step = tokio::select! {
                biased;
                () = drain.signaled(), if !draining => {
                    // Refuse new rows but keep draining the ones already queued.
                    draining = true;
                    rows.close();
                    Ok(())
                }
                // The writer stopped on its own: it failed, and its result says why.
                () = self.commands.closed() => Err(WriterGone),
                () = sleep_until_opt(deadline), if deadline.is_some() => self.rotate_expired().await,
                // Always polled: the writer marks recording down from its own thread, and a
                // branch disabled when the select started would never see it.
                _ = probe.tick() => {
                    if self.shared.is_down() {
                        self.send(Command::Probe).await
                    } else {
                        Ok(())
                    }
                }
                // Every message already queued at once: setting up this select (a timer,
                // the drain watch) per row cost more than handling the row.
                received = rows.recv_many(&mut inbox, INBOX_MESSAGES) => {
                    if received == 0 {
                        break;
                    }
                    let mut step = Ok(());
                    for message in inbox.drain(..) {
                        step = match message {
                            Message::Row(row) => self.push(row).await,
                            Message::Frames(rows) => self.push_frames(rows).await,
                            Message::Flush(reply) => self.flush(reply).await,
                        };
                        if step.is_err() {
                            break;
                        }
                    }
                    // Whatever is left after a failure goes the way of the queued rows.
                    inbox.clear();
                    step
                }
            };
            if step.is_err() {
                // Fail closed: with the writer gone nothing more is written, so every
                // request that must be recorded is refused from now on, and /readyz,
                // `recording_up` and `chaperone status` say so.
                if !self.shared.is_down() {
                    self.shared
                        .set_down(RecorderError::TaskLost("recorder writer thread"));
                }
                rows.close();
                break;
            }
        }
        // Hand over what is still buffered; the writer closes every file once the command
        // channel closes. Failures surface through its result below.
        let pending = std::mem::take(&mut self.open);
        for ((_, date), pending) in pending {
            if self
                .send(Command::Write {
                    date,
                    rows: pending.rows,
                })
                .await
                .is_err()
            {
                break;
            }
        }
        drop(self.commands);
        lost.armed = false;
        let result = done
            .await
            .unwrap_or(Err(RecorderError::TaskLost("recorder writer thread")));
        if let Err(error) = &result
            && self.shared.is_down()
        {
            // The writer's own account of why it stopped, rather than that it did.
            self.shared.set_down(error.clone());
        }
        match &result {
            Ok(stats) => tracing::info!(
                rows = stats.rows,
                files = stats.files.len(),
                "recorder stopped"
            ),
            Err(error) => tracing::error!(%error, "recorder stopped after a failure"),
        }
        drop(drain);
        result
    }

    async fn send(&self, command: Command) -> Result<(), WriterGone> {
        self.commands.send(command).await.map_err(|_| WriterGone)
    }

    fn pending(&mut self, table: Table, date: Date) -> &mut Pending {
        let batch_rows = self.batch_rows;
        self.open.entry((table, date)).or_insert_with(|| Pending {
            rows: Rows::with_capacity(table, batch_rows),
            bytes: 0,
            rows_in_file: 0,
            opened_at: Instant::now(),
        })
    }

    async fn push(&mut self, row: Box<RequestRecord>) -> Result<(), WriterGone> {
        let date = Offset::UTC.to_datetime(row.request_time).date();
        let pending = self.pending(Table::Requests, date);
        if let Err(row) = pending.rows.push_request(row) {
            // Unreachable: the pending rows are keyed by their table.
            tracing::error!(audit_id = %row.audit_id, "recording row lost: pending rows of another table");
            self.shared.lose(1);
            return Ok(());
        }
        pending.rows_in_file += 1;
        self.after_push(Table::Requests, date).await
    }

    async fn push_frames(&mut self, rows: Vec<ExecFrameRecord>) -> Result<(), WriterGone> {
        // A chunk rarely spans midnight; when it does, each date gets its part.
        let mut by_date: BTreeMap<Date, Vec<ExecFrameRecord>> = BTreeMap::new();
        for row in rows {
            let date = Offset::UTC.to_datetime(row.time).date();
            by_date.entry(date).or_default().push(row);
        }
        for (date, rows) in by_date {
            let count = rows.len();
            let bytes: usize = rows
                .iter()
                .map(|r| r.data.as_ref().map_or(0, Vec::len))
                .sum();
            let pending = self.pending(Table::ExecFrames, date);
            if let Err(lost) = pending.rows.append(Rows::ExecFrames(rows)) {
                lost.log_lost();
                self.shared.lose(lost.len() as u64);
                continue;
            }
            pending.rows_in_file += count;
            pending.bytes += bytes;
            self.after_push(Table::ExecFrames, date).await?;
        }
        Ok(())
    }

    /// Hands a full batch to the writer, and closes a full file.
    async fn after_push(&mut self, table: Table, date: Date) -> Result<(), WriterGone> {
        let key = (table, date);
        let Some(pending) = self.open.get_mut(&key) else {
            return Ok(());
        };
        if pending.rows_in_file >= self.cfg.max_rows_per_file {
            if let Some(pending) = self.open.remove(&key) {
                self.send(Command::Write {
                    date,
                    rows: pending.rows,
                })
                .await?;
                self.send(Command::Close { table, date }).await?;
            }
        } else if pending.rows.len() >= self.batch_rows || pending.bytes >= BATCH_BYTES {
            pending.bytes = 0;
            let rows = std::mem::replace(
                &mut pending.rows,
                Rows::with_capacity(table, self.batch_rows),
            );
            self.send(Command::Write { date, rows }).await?;
        }
        Ok(())
    }

    async fn rotate_expired(&mut self) -> Result<(), WriterGone> {
        let now = Instant::now();
        let expired: Vec<(Table, Date)> = self
            .open
            .iter()
            .filter(|(_, p)| {
                p.opened_at
                    .checked_add(self.cfg.max_file_age)
                    .is_some_and(|due| due <= now)
            })
            .map(|(key, _)| *key)
            .collect();
        for (table, date) in expired {
            if let Some(pending) = self.open.remove(&(table, date)) {
                self.send(Command::Write {
                    date,
                    rows: pending.rows,
                })
                .await?;
                self.send(Command::Close { table, date }).await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self, reply: FlushReply) -> Result<(), WriterGone> {
        let pending = std::mem::take(&mut self.open);
        for ((_, date), pending) in pending {
            self.send(Command::Write {
                date,
                rows: pending.rows,
            })
            .await?;
        }
        self.send(Command::Flush { reply }).await
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
