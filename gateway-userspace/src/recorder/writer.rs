//! The blocking half of the recorder: encodes batches and owns the Parquet files.
//!
//! Runs on its own OS thread so zstd compression and file I/O never stall the tokio
//! workers that serve requests. It only executes commands; when to rotate is decided by
//! the async coordinator in `mod.rs`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::civil::Date;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use tokio::sync::{mpsc, oneshot};

use super::manifest::Manifest;
use super::schema;
use super::table::{Rows, Table};
use super::wal::Tracker;
use super::{RecorderError, RecorderStats, Shared};

/// zstd level 3 is zstd's own default: much smaller than level 1 on repetitive request
/// rows while staying well above the throughput target.
const ZSTD_LEVEL: i32 = 3;

/// Work for the writer thread, executed in order.
pub(super) enum Command {
    /// Append rows (all with a time on `date`, UTC) to their table's open file for that
    /// date, opening one if needed.
    Write { date: Date, rows: Rows },
    /// Finish and publish `table`'s open file for `date`, if any.
    Close { table: Table, date: Date },
    /// Finish and publish every open file, then report all files finished so far.
    Flush {
        reply: oneshot::Sender<Result<Vec<PathBuf>, RecorderError>>,
    },
    /// While recording is down: check whether the disk takes a synced write again.
    Probe,
}

/// A row group is closed once its buffered (encoded, uncompressed) size reaches this, so
/// a table of large rows (`exec_frames` payloads) never buffers more than this per file.
pub(super) const MAX_ROW_GROUP_BYTES: usize = 32 * 1024 * 1024;

/// Bytes the recovery probe writes and syncs: enough to need fresh blocks on a full disk.
const PROBE_BYTES: usize = 64 * 1024;

/// A Parquet file being written under its hidden temporary name.
struct PartFile {
    table: Table,
    temp: PathBuf,
    path: PathBuf,
    writer: ArrowWriter<File>,
    rows: u64,
    /// Audit ids of the rows, when the write-ahead log needs to know they are published.
    ids: Vec<String>,
}

/// Owns the open files (one per date partition) and the list of published ones.
pub(super) struct FileWriter {
    dir: PathBuf,
    node: String,
    props: WriterProperties,
    open: BTreeMap<(Table, Date), PartFile>,
    finished: Vec<PathBuf>,
    rows: u64,
    wal: Option<Arc<Tracker>>,
    /// The write-ahead log's directory: recording is up again only once a segment's worth
    /// can be written there too.
    wal_dir: Option<PathBuf>,
    manifest: Option<Manifest>,
    exec_frame_rows: u64,
}

/// Columns whose values are (nearly) all different: a dictionary would hash every value
/// only to be abandoned when it outgrows its page, so they are written plain.
const UNIQUE_COLUMNS: [&str; 14] = [
    "request_time",
    "response_time",
    "latency_us",
    "audit_id",
    "source_addr",
    "request_uri",
    "request_bytes",
    "response_bytes",
    "request_object",
    "response_object",
    "masked",
    "access_request",
    // exec_frames
    "offset_us",
    "data",
];

/// The columns analysts filter on, which keep a minimum and maximum per row group so
/// that DuckDB, Spark and pyarrow skip row groups that cannot match. Every other column
/// (URIs, user agents, addresses, principals, free text, objects) carries none: their
/// minimum and maximum prune nothing and cost a comparison of every value, often of a long
/// common prefix.
const FILTER_COLUMNS: [&[&str]; 21] = [
    &["request_time"],
    &["response_time"],
    &["latency_us"],
    &["audit_id"],
    &["cluster"],
    &["verb"],
    &["decision"],
    &["outcome"],
    &["response_code"],
    &["policy_rule"],
    &["approval_outcome"],
    &["workload", "namespace"],
    &["workload", "pod"],
    &["workload", "service_account"],
    &["object_ref", "resource"],
    &["object_ref", "namespace"],
    &["object_ref", "name"],
    // exec_frames
    &["session_id"],
    &["seq"],
    &["time"],
    &["event"],
];

/// Builds the Parquet writer settings used for every file: zstd, minimum and maximum per
/// row group on the columns analysts filter on (per-page statistics, the crate's default
/// on every column, cost a comparison per value for little more pruning), and no
/// dictionary for columns whose values are unique. Measured by the `recorder` benchmark's
/// `encode_write` rows against the crate's defaults (docs/benchmarks.md).
pub fn writer_properties(row_group_rows: usize) -> Result<WriterProperties, RecorderError> {
    let level = ZstdLevel::try_new(ZSTD_LEVEL).map_err(|e| RecorderError::InvalidConfig {
        field: "zstd level",
        reason: e.to_string(),
    })?;
    if row_group_rows == 0 {
        return Err(RecorderError::InvalidConfig {
            field: "row_group_rows",
            reason: "must be at least 1".into(),
        });
    }
    let mut builder = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_statistics_enabled(EnabledStatistics::None);
    for column in UNIQUE_COLUMNS {
        builder = builder.set_column_dictionary_enabled(ColumnPath::from(column), false);
    }
    for path in FILTER_COLUMNS {
        let path = ColumnPath::new(path.iter().map(|p| (*p).to_owned()).collect());
        builder = builder.set_column_statistics_enabled(path, EnabledStatistics::Chunk);
    }
    Ok(builder.build())
}

fn io_error(op: &'static str, path: &Path, source: std::io::Error) -> RecorderError {
    RecorderError::Io {
        op,
        path: path.to_path_buf(),
        source: Arc::new(source),
    }
}

impl FileWriter {
    /// A writer for `<dir>/table=<table>/date=.../node=<node>/` files.
    pub(super) fn new(dir: PathBuf, node: String, props: WriterProperties) -> FileWriter {
        FileWriter {
            dir,
            node,
            props,
            open: BTreeMap::new(),
            finished: Vec::new(),
            rows: 0,
            wal: None,
            wal_dir: None,
            manifest: None,
            exec_frame_rows: 0,
        }
    }

    /// Lists every published file in the node's manifest (tamper evidence).
    pub(super) fn with_manifest(mut self, manifest: Option<Manifest>) -> FileWriter {
        self.manifest = manifest;
        self
    }

    /// Tells the write-ahead log which rows each published file holds, so it can drop the
    /// segments that vouched for them.
    pub(super) fn with_wal(
        mut self,
        wal: Option<Arc<Tracker>>,
        dir: Option<PathBuf>,
    ) -> FileWriter {
        self.wal = wal;
        self.wal_dir = dir;
        self
    }

    /// Executes commands until the channel closes, then closes every open file. A failing
    /// command marks recording down in `shared` and the writer carries on: later commands
    /// (and [`Command::Probe`]) find out when the disk works again.
    pub(super) fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        shared: &Shared,
    ) -> Result<RecorderStats, RecorderError> {
        while let Some(command) = commands.blocking_recv() {
            self.execute(command, shared);
        }
        let closed = self.close_all(shared);
        let stats = RecorderStats {
            rows: self.rows,
            exec_frame_rows: self.exec_frame_rows,
            files: self.finished,
            rows_lost: shared.rows_lost.load(std::sync::atomic::Ordering::Relaxed),
            outages: shared.outages.load(std::sync::atomic::Ordering::Relaxed),
        };
        closed.map(|()| stats)
    }

    fn execute(&mut self, command: Command, shared: &Shared) {
        match command {
            Command::Write { date, rows } => {
                let table = rows.table();
                if let Err((error, rows)) = self.write(date, rows) {
                    rows.log_lost();
                    shared.lose(rows.len() as u64);
                    shared.set_down(error);
                    // The file may hold rows from earlier batches: complete it if the disk
                    // still allows, keep it aside otherwise (its rows then count as lost).
                    if let Some(file) = self.open.remove(&(table, date))
                        && let Err(error) = self.close(file, shared)
                    {
                        shared.set_down(error);
                    }
                }
            }
            Command::Close { table, date } => {
                if let Some(file) = self.open.remove(&(table, date))
                    && let Err(error) = self.close(file, shared)
                {
                    shared.set_down(error);
                }
            }
            Command::Flush { reply } => {
                // A flush vouches for every row recorded before it: while recording is down
                // (a row was lost, or the disk still fails) it reports why instead.
                let result = self
                    .close_all(shared)
                    .and_then(|()| shared.current_error().map_or(Ok(()), Err))
                    .map(|()| self.finished.clone());
                let _ = reply.send(result);
            }
            // The log's next append may need a whole new segment: a disk with room for the
            // recording's probe but not for that would bring recording up only for the
            // next mutation to take it down again.
            Command::Probe => match probe_disk(&self.dir, PROBE_BYTES).and_then(|()| {
                self.wal_dir.as_deref().map_or(Ok(()), |dir| {
                    probe_disk(dir, super::wal::SEGMENT_BYTES as usize)
                })
            }) {
                Ok(()) => shared.set_up(),
                Err(error) => {
                    tracing::debug!(%error, "recording is still down");
                    shared.set_down(error);
                }
            },
        }
    }

    /// Appends `rows` to their table's open file for `date`; on failure hands back, with
    /// the error, the rows that did not reach the file, so their ids can be logged.
    pub(super) fn write(
        &mut self,
        date: Date,
        mut rows: Rows,
    ) -> Result<(), (RecorderError, Rows)> {
        if rows.is_empty() {
            return Ok(());
        }
        let table = rows.table();
        let file = match self.open.entry((table, date)) {
            std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::btree_map::Entry::Vacant(entry) => {
                match open_part(&self.dir, table, &self.node, date, &self.props) {
                    Ok(file) => entry.insert(file),
                    Err(error) => return Err((error, rows)),
                }
            }
        };
        let batch = match rows.encode_in_time_order() {
            Ok(batch) => batch,
            Err(source) => {
                let error = RecorderError::Encode {
                    path: file.path.clone(),
                    source: Arc::new(source),
                };
                return Err((error, rows));
            }
        };
        if let Err(source) = file.writer.write(&batch) {
            let error = RecorderError::Parquet {
                path: file.temp.clone(),
                source: Arc::new(source),
            };
            return Err((error, rows));
        }
        file.rows += rows.len() as u64;
        if self.wal.is_some()
            && let Rows::Requests(requests) = &mut rows
        {
            // The rows are written and dropped here: their ids move rather than copy.
            file.ids
                .extend(requests.iter_mut().map(|r| std::mem::take(&mut r.audit_id)));
        }
        if file.writer.in_progress_size() >= MAX_ROW_GROUP_BYTES
            && let Err(source) = file.writer.flush()
        {
            let error = RecorderError::Parquet {
                path: file.temp.clone(),
                source: Arc::new(source),
            };
            // These rows are the file's now: they are lost (and counted) with it when it
            // cannot be completed.
            return Err((error, Rows::with_capacity(table, 0)));
        }
        Ok(())
    }

    /// Closes every open file; the first failure is returned (and marks recording down),
    /// the other files are still closed.
    pub(super) fn close_all(&mut self, shared: &Shared) -> Result<(), RecorderError> {
        let mut first = Ok(());
        while let Some((_, file)) = self.open.pop_first() {
            if let Err(error) = self.close(file, shared) {
                shared.set_down(error.clone());
                if first.is_ok() {
                    first = Err(error);
                }
            }
        }
        first
    }

    /// Writes the footer, makes the file durable, then renames it into view, so a reader
    /// never sees a partial file and a crash never leaves a visible truncated one. A file
    /// that cannot be completed is kept, hidden, as `.part-<id>.parquet.failed`: what
    /// reached the disk stays there for forensic recovery.
    /// A file that cannot be completed loses every row it held: they are counted and
    /// their audit ids logged (when the write-ahead log has them listed).
    fn close(&mut self, file: PartFile, shared: &Shared) -> Result<(), RecorderError> {
        let PartFile {
            table,
            temp,
            path,
            writer,
            rows,
            ids,
        } = file;
        // The manifest lists the file (hashed from its synced temporary) before it is
        // renamed into view: a crash in between leaves an entry whose file the manifest
        // completes at the next start, never a visible file nothing vouches for.
        let manifest = self.manifest.as_mut();
        let listed = |temp: &Path| match manifest {
            Some(manifest) => manifest.append(temp, &path, rows),
            None => Ok(()),
        };
        if let Err(error) = finish_part(&temp, &path, writer, listed) {
            let kept = temp.with_extension("failed");
            match fs::rename(&temp, &kept) {
                Ok(()) => {
                    tracing::error!(%error, kept = %kept.display(), rows, "recording file could not be completed; kept aside");
                }
                Err(e) => {
                    tracing::error!(%error, path = %temp.display(), rename_error = %e, rows, "recording file could not be completed");
                }
            }
            shared.lose(rows);
            for audit_id in &ids {
                tracing::error!(%audit_id, "recording row lost: its file could not be completed");
            }
            return Err(error);
        }
        tracing::debug!(path = %path.display(), rows, "recording file published");
        match table {
            Table::Requests => self.rows += rows,
            Table::ExecFrames => self.exec_frame_rows += rows,
        }
        self.finished.push(path);
        if let Some(wal) = &self.wal {
            wal.published(ids.iter().map(String::as_str));
        }
        Ok(())
    }
}

/// Writes and syncs a scratch file of `bytes` in `dir`, then removes it: the disk takes
/// writes again.
fn probe_disk(dir: &Path, bytes: usize) -> Result<(), RecorderError> {
    let probe = dir.join(format!(".probe-{}", uuid::Uuid::now_v7()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)?;
        let zeros = [0u8; PROBE_BYTES];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(zeros.len());
            file.write_all(&zeros[..n])?;
            left -= n;
        }
        file.sync_all()
    })();
    let _ = fs::remove_file(&probe);
    result.map_err(|e| io_error("probe write", &probe, e))
}

fn open_part(
    root: &Path,
    table: Table,
    node: &str,
    date: Date,
    props: &WriterProperties,
) -> Result<PartFile, RecorderError> {
    let dir = root
        .join(format!("table={}", table.name()))
        .join(format!("date={date}"))
        .join(format!("node={node}"));
    super::durable::create_dir_all(&dir).map_err(|e| io_error("create directory", &dir, e))?;
    let id = uuid::Uuid::now_v7();
    let temp = dir.join(format!(".part-{id}.parquet.inprogress"));
    let path = dir.join(format!("part-{id}.parquet"));
    let handle = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .map_err(|e| io_error("create file", &temp, e))?;
    let mut writer =
        ArrowWriter::try_new(handle, table.schema(), Some(props.clone())).map_err(|source| {
            RecorderError::Parquet {
                path: temp.clone(),
                source: Arc::new(source),
            }
        })?;
    // What a file is, readable without its path (a copy elsewhere keeps it).
    for (key, value) in [
        (
            "chaperone.schema_version",
            schema::SCHEMA_VERSION.to_string(),
        ),
        ("chaperone.table", table.name().to_owned()),
        ("chaperone.node", node.to_owned()),
    ] {
        writer.append_key_value_metadata(KeyValue::new(key.to_owned(), value));
    }
    Ok(PartFile {
        table,
        temp,
        path,
        writer,
        rows: 0,
        ids: Vec::new(),
    })
}

fn finish_part(
    temp: &Path,
    path: &Path,
    writer: ArrowWriter<File>,
    listed: impl FnOnce(&Path) -> Result<(), RecorderError>,
) -> Result<(), RecorderError> {
    let mut handle = writer
        .into_inner()
        .map_err(|source| RecorderError::Parquet {
            path: temp.to_path_buf(),
            source: Arc::new(source),
        })?;
    handle.flush().map_err(|e| io_error("write", temp, e))?;
    handle.sync_all().map_err(|e| io_error("sync", temp, e))?;
    drop(handle);
    listed(temp)?;
    fs::rename(temp, path).map_err(|e| io_error("rename into place", path, e))?;
    // The rename is only durable once the directory entry is.
    if let Some(dir) = path.parent() {
        super::durable::sync_dir(dir).map_err(|e| io_error("sync directory", dir, e))?;
    }
    Ok(())
}
