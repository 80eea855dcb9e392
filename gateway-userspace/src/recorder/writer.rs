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
use parquet::file::properties::WriterProperties;
use tokio::sync::{mpsc, oneshot};

use super::schema::{self, RequestRecord};
use super::{RecorderError, RecorderStats, Shared};

/// zstd level 3 is zstd's own default: much smaller than level 1 on repetitive request
/// rows while staying well above the throughput target.
const ZSTD_LEVEL: i32 = 3;

/// Work for the writer thread, executed in order.
pub(super) enum Command {
    /// Append rows (all with a `request_time` on `date`, UTC) to that date's open file,
    /// opening one if needed.
    Write {
        date: Date,
        rows: Vec<RequestRecord>,
    },
    /// Finish and publish the open file for `date`, if any.
    Close { date: Date },
    /// Finish and publish every open file, then report all files finished so far.
    Flush {
        reply: oneshot::Sender<Result<Vec<PathBuf>, RecorderError>>,
    },
}

/// A Parquet file being written under its hidden temporary name.
struct PartFile {
    temp: PathBuf,
    path: PathBuf,
    writer: ArrowWriter<File>,
    rows: u64,
}

/// Owns the open files (one per date partition) and the list of published ones.
pub(super) struct FileWriter {
    table_dir: PathBuf,
    node: String,
    props: WriterProperties,
    open: BTreeMap<Date, PartFile>,
    finished: Vec<PathBuf>,
    rows: u64,
}

/// Builds the Parquet writer settings used for every file.
pub(super) fn writer_properties(row_group_rows: usize) -> Result<WriterProperties, RecorderError> {
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
    Ok(WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_max_row_group_row_count(Some(row_group_rows))
        .build())
}

fn io_error(op: &'static str, path: &Path, source: std::io::Error) -> RecorderError {
    RecorderError::Io {
        op,
        path: path.to_path_buf(),
        source: Arc::new(source),
    }
}

impl FileWriter {
    /// A writer for `<table_dir>/date=.../node=<node>/` files.
    pub(super) fn new(table_dir: PathBuf, node: String, props: WriterProperties) -> FileWriter {
        FileWriter {
            table_dir,
            node,
            props,
            open: BTreeMap::new(),
            finished: Vec::new(),
            rows: 0,
        }
    }

    /// Executes commands until the channel closes or an error occurs, then closes or
    /// discards every open file. The first error is also published in `shared` so
    /// producers see it on their next call.
    pub(super) fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        shared: &Shared,
    ) -> Result<RecorderStats, RecorderError> {
        let result = self.serve(&mut commands);
        let result = result.and_then(|()| self.close_all());
        match result {
            Ok(()) => Ok(RecorderStats {
                rows: self.rows,
                files: self.finished,
            }),
            Err(error) => {
                tracing::error!(%error, "recorder failed; no further rows will be accepted");
                shared.fail(error.clone());
                self.discard_all();
                // Pending flush requests learn about the failure instead of a vague "stopped".
                commands.close();
                while let Some(command) = commands.blocking_recv() {
                    if let Command::Flush { reply } = command {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
                Err(error)
            }
        }
    }

    fn serve(&mut self, commands: &mut mpsc::Receiver<Command>) -> Result<(), RecorderError> {
        while let Some(command) = commands.blocking_recv() {
            match command {
                Command::Write { date, rows } => self.write(date, rows)?,
                Command::Close { date } => {
                    if let Some(file) = self.open.remove(&date) {
                        self.close(file)?;
                    }
                }
                Command::Flush { reply } => match self.close_all() {
                    Ok(()) => {
                        let _ = reply.send(Ok(self.finished.clone()));
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error.clone()));
                        return Err(error);
                    }
                },
            }
        }
        Ok(())
    }

    fn write(&mut self, date: Date, mut rows: Vec<RequestRecord>) -> Result<(), RecorderError> {
        if rows.is_empty() {
            return Ok(());
        }
        // Rows arrive almost in order, so this stable sort is close to a linear scan.
        rows.sort_by_key(|r| r.request_time);
        let file = match self.open.entry(date) {
            std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::btree_map::Entry::Vacant(entry) => {
                entry.insert(open_part(&self.table_dir, &self.node, date, &self.props)?)
            }
        };
        let batch = schema::to_record_batch(&rows).map_err(|source| RecorderError::Encode {
            path: file.path.clone(),
            source: Arc::new(source),
        })?;
        file.writer
            .write(&batch)
            .map_err(|source| RecorderError::Parquet {
                path: file.temp.clone(),
                source: Arc::new(source),
            })?;
        file.rows += rows.len() as u64;
        Ok(())
    }

    fn close_all(&mut self) -> Result<(), RecorderError> {
        while let Some((_, file)) = self.open.pop_first() {
            self.close(file)?;
        }
        Ok(())
    }

    /// Writes the footer, makes the file durable, then renames it into view, so a reader
    /// never sees a partial file and a crash never leaves a visible truncated one.
    fn close(&mut self, file: PartFile) -> Result<(), RecorderError> {
        let PartFile {
            temp,
            path,
            writer,
            rows,
        } = file;
        let published = finish_part(&temp, &path, writer);
        if published.is_err() {
            let _ = fs::remove_file(&temp);
        }
        published?;
        tracing::debug!(path = %path.display(), rows, "recording file published");
        self.rows += rows;
        self.finished.push(path);
        Ok(())
    }

    /// After a failure nothing more can be trusted to reach disk; drop the partial files
    /// rather than leave hidden garbage behind.
    fn discard_all(&mut self) {
        while let Some((_, file)) = self.open.pop_first() {
            drop(file.writer);
            if let Err(error) = fs::remove_file(&file.temp) {
                tracing::warn!(path = %file.temp.display(), %error, "could not remove partial recording file");
            }
        }
    }
}

fn open_part(
    table_dir: &Path,
    node: &str,
    date: Date,
    props: &WriterProperties,
) -> Result<PartFile, RecorderError> {
    let dir = table_dir
        .join(format!("date={date}"))
        .join(format!("node={node}"));
    fs::create_dir_all(&dir).map_err(|e| io_error("create directory", &dir, e))?;
    let id = uuid::Uuid::now_v7();
    let temp = dir.join(format!(".part-{id}.parquet.inprogress"));
    let path = dir.join(format!("part-{id}.parquet"));
    let handle = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .map_err(|e| io_error("create file", &temp, e))?;
    let writer = ArrowWriter::try_new(handle, schema::requests_schema(), Some(props.clone()))
        .map_err(|source| RecorderError::Parquet {
            path: temp.clone(),
            source: Arc::new(source),
        })?;
    Ok(PartFile {
        temp,
        path,
        writer,
        rows: 0,
    })
}

fn finish_part(temp: &Path, path: &Path, writer: ArrowWriter<File>) -> Result<(), RecorderError> {
    let mut handle = writer
        .into_inner()
        .map_err(|source| RecorderError::Parquet {
            path: temp.to_path_buf(),
            source: Arc::new(source),
        })?;
    handle.flush().map_err(|e| io_error("write", temp, e))?;
    handle.sync_all().map_err(|e| io_error("sync", temp, e))?;
    drop(handle);
    fs::rename(temp, path).map_err(|e| io_error("rename into place", path, e))?;
    // The rename is only durable once the directory entry is.
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("sync directory", dir, e))?;
    }
    Ok(())
}
