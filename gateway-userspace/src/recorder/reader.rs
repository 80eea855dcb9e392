//! Reads a recordings dataset back into rows: for `chaperone demo`, tests and tools.

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::Arc,
};

use arrow_array::{
    Array, RecordBatch, StructArray,
    cast::AsArray as _,
    types::{Int32Type, Int64Type, TimestampMicrosecondType},
};
use parquet::arrow::{ProjectionMask, arrow_reader::ParquetRecordBatchReaderBuilder};

use super::exec_frames::{self, ExecFrameRecord};
use super::schema::{
    ObjectRef, Outcome, PrincipalRecord, RequestRecord, TABLE_NAME, WorkloadRecord,
};
use crate::{policy::Action, request::Verb};

/// Errors reading recordings back; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A directory or file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not a `requests` Parquet file this version understands.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Every finished `requests` Parquet file under `dir`, sorted by path (in-progress files,
/// which start with a dot, are skipped).
pub fn list_files(dir: &Path) -> Result<Vec<PathBuf>, ReadError> {
    list_table_files(dir, TABLE_NAME)
}

/// Every finished Parquet file of the table `table` under `dir`, sorted by path.
pub fn list_table_files(dir: &Path, table: &str) -> Result<Vec<PathBuf>, ReadError> {
    let mut files = Vec::new();
    let root = dir.join(format!("table={table}"));
    if !root.exists() {
        return Ok(files);
    }
    let mut stack = vec![root];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| ReadError::Io {
            path: d.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| ReadError::Io {
                path: d.clone(),
                source,
            })?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                stack.push(path);
            } else if !name.starts_with('.') && name.ends_with(".parquet") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Reads every row under `dir`, ordered by request time.
pub fn read_dir(dir: &Path) -> Result<Vec<RequestRecord>, ReadError> {
    let mut rows = Vec::new();
    for file in list_files(dir)? {
        rows.extend(read_file(&file)?);
    }
    rows.sort_by_key(|r| r.request_time);
    Ok(rows)
}

/// The value of the hive partition `key=` in `path`, if it has one.
pub fn partition_value(path: &Path, key: &str) -> Option<String> {
    path.components().find_map(|c| {
        c.as_os_str()
            .to_str()?
            .strip_prefix(key)?
            .strip_prefix('=')
            .map(str::to_owned)
    })
}

/// Reads every `exec_frames` row under `dir`, ordered by session and sequence number.
pub fn read_exec_frames(dir: &Path) -> Result<Vec<ExecFrameRecord>, ReadError> {
    let mut rows = Vec::new();
    for path in list_table_files(dir, exec_frames::TABLE_NAME)? {
        let format = |message: String| ReadError::Format {
            path: path.clone(),
            message,
        };
        for batch in open_batches(&path)? {
            let batch = batch.map_err(|e| format(e.to_string()))?;
            exec_frames::decode_batch(&batch, &mut rows).map_err(format)?;
        }
    }
    rows.sort_by(|a, b| (&a.session_id, a.seq).cmp(&(&b.session_id, b.seq)));
    Ok(rows)
}

fn open_batches(
    path: &Path,
) -> Result<parquet::arrow::arrow_reader::ParquetRecordBatchReader, ReadError> {
    let file = File::open(path).map_err(|source| ReadError::Io {
        path: path.to_owned(),
        source,
    })?;
    ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| ReadError::Format {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

/// Reads one Parquet file of the `requests` table.
pub fn read_file(path: &Path) -> Result<Vec<RequestRecord>, ReadError> {
    let format = |message: String| ReadError::Format {
        path: path.to_owned(),
        message,
    };
    let file = File::open(path).map_err(|source| ReadError::Io {
        path: path.to_owned(),
        source,
    })?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| format(e.to_string()))?;
    let node = partition_value(path, "node").unwrap_or_default();
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| format(e.to_string()))?;
        decode_batch(&batch, &mut rows, &node).map_err(format)?;
    }
    Ok(rows)
}

/// The `audit_id` column of one file (read alone, so it is cheap).
pub(crate) fn read_audit_ids(path: &Path) -> Result<Vec<String>, ReadError> {
    let format = |message: String| ReadError::Format {
        path: path.to_owned(),
        message,
    };
    let file = File::open(path).map_err(|source| ReadError::Io {
        path: path.to_owned(),
        source,
    })?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| format(e.to_string()))?;
    let mask = ProjectionMask::columns(builder.parquet_schema(), ["audit_id"]);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| format(e.to_string()))?;
    let mut ids = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| format(e.to_string()))?;
        let column = batch
            .column_by_name("audit_id")
            .ok_or_else(|| format("no audit_id column".into()))?;
        let strings = column
            .as_string_opt::<i32>()
            .ok_or_else(|| format("audit_id is not a string column".into()))?;
        ids.extend(strings.iter().flatten().map(str::to_owned));
    }
    Ok(ids)
}

struct Columns<'a> {
    batch: &'a RecordBatch,
}

impl<'a> Columns<'a> {
    fn get(&self, name: &str) -> Result<&'a dyn Array, String> {
        self.batch
            .column_by_name(name)
            .map(|c| c.as_ref())
            .ok_or_else(|| format!("no column {name:?}"))
    }
}

fn string_at(array: &dyn Array, i: usize) -> Result<Option<String>, String> {
    let strings = array
        .as_string_opt::<i32>()
        .ok_or("expected a string column")?;
    Ok(strings.is_valid(i).then(|| strings.value(i).to_owned()))
}

/// A column added after the first release: files written before it lack it.
fn added<T>(
    c: &Columns<'_>,
    name: &str,
    read: impl FnOnce(&dyn Array) -> Result<T, String>,
) -> Result<Option<T>, String> {
    match c.batch.column_by_name(name) {
        Some(array) => read(array.as_ref()).map(Some),
        None => Ok(None),
    }
}

fn int64_at(array: &dyn Array, i: usize) -> Result<i64, String> {
    Ok(array
        .as_primitive_opt::<Int64Type>()
        .ok_or("expected an int64 column")?
        .value(i))
}

fn int64_opt_at(array: &dyn Array, i: usize) -> Result<Option<i64>, String> {
    let ints = array
        .as_primitive_opt::<Int64Type>()
        .ok_or("expected an int64 column")?;
    Ok(ints.is_valid(i).then(|| ints.value(i)))
}

fn time_at(array: &dyn Array, i: usize) -> Result<Option<jiff::Timestamp>, String> {
    let times = array
        .as_primitive_opt::<TimestampMicrosecondType>()
        .ok_or("expected a timestamp column")?;
    if !times.is_valid(i) {
        return Ok(None);
    }
    jiff::Timestamp::from_microsecond(times.value(i))
        .map(Some)
        .map_err(|e| e.to_string())
}

fn field<'a>(s: &'a StructArray, name: &str) -> Result<&'a dyn Array, String> {
    s.column_by_name(name)
        .map(|c| c.as_ref())
        .ok_or_else(|| format!("no struct field {name:?}"))
}

/// Decodes one batch of the `requests` table, appending to `rows`.
pub(crate) fn decode_batch(
    batch: &RecordBatch,
    rows: &mut Vec<RequestRecord>,
    node_from_path: &str,
) -> Result<(), String> {
    let c = Columns { batch };
    let workload = c
        .get("workload")?
        .as_struct_opt()
        .ok_or("workload is not a struct")?;
    let object_ref = c
        .get("object_ref")?
        .as_struct_opt()
        .ok_or("object_ref is not a struct")?;
    let s = |name: &str, i| -> Result<Option<String>, String> { string_at(c.get(name)?, i) };
    let req = |name: &str, i| -> Result<String, String> { Ok(s(name, i)?.unwrap_or_default()) };
    let ws =
        |name: &str, i| -> Result<Option<String>, String> { string_at(field(workload, name)?, i) };
    let os = |name: &str, i| -> Result<String, String> {
        Ok(string_at(field(object_ref, name)?, i)?.unwrap_or_default())
    };
    let principal = c
        .get("principal")?
        .as_struct_opt()
        .ok_or("principal is not a struct")?;
    let ps =
        |name: &str, i| -> Result<Option<String>, String> { string_at(field(principal, name)?, i) };
    let groups = field(principal, "groups")?
        .as_list_opt::<i32>()
        .ok_or("principal.groups is not a list")?;
    let code = c
        .get("response_code")?
        .as_primitive_opt::<Int32Type>()
        .ok_or("response_code is not int32")?;
    for i in 0..batch.num_rows() {
        // Files written before the outcome column said "error" for both invalid requests
        // and upstream failures.
        let decision =
            match req("decision", i)?.as_str() {
                "none" | "error" => None,
                text => Some(Action::parse(text).ok_or_else(|| {
                    format!("row {i}: column decision: unknown decision {text:?}")
                })?),
            };
        let outcome = match added(&c, "outcome", |a| string_at(a, i))?.flatten() {
            Some(text) => Outcome::parse(&text)
                .ok_or_else(|| format!("row {i}: column outcome: unknown outcome {text:?}"))?,
            None => match decision {
                Some(Action::Allow | Action::Mask) => Outcome::Forwarded,
                Some(Action::Deny | Action::Approve) => Outcome::Denied,
                None => Outcome::Invalid,
            },
        };
        let verb = req("verb", i)?;
        let verb = Verb::parse(&verb)
            .ok_or_else(|| format!("row {i}: column verb: unknown verb {verb:?}"))?;
        rows.push(RequestRecord {
            request_time: time_at(c.get("request_time")?, i)?.ok_or("request_time is null")?,
            response_time: time_at(c.get("response_time")?, i)?,
            latency_us: int64_at(c.get("latency_us")?, i)?,
            audit_id: req("audit_id", i)?,
            // Version 1 files have a node column; later ones only the partition key.
            node: match added(&c, "node", |a| string_at(a, i))?.flatten() {
                Some(node) => node.into(),
                None => node_from_path.into(),
            },
            cluster: req("cluster", i)?.into(),
            workload: Arc::new(WorkloadRecord {
                cgroup_id: int64_at(field(workload, "cgroup_id")?, i)?,
                netns_cookie: int64_at(field(workload, "netns_cookie")?, i)?,
                pid: int64_at(field(workload, "pid")?, i)?,
                command: ws("command", i)?,
                namespace: ws("namespace", i)?,
                pod: ws("pod", i)?,
                pod_uid: ws("pod_uid", i)?,
                service_account: ws("service_account", i)?,
                container: ws("container", i)?,
            }),
            source_addr: req("source_addr", i)?.into(),
            original_dst: s("original_dst", i)?.map(Arc::from),
            user_agent: s("user_agent", i)?,
            kubectl_command: s("kubectl_command", i)?,
            kubectl_session: s("kubectl_session", i)?,
            verb,
            request_uri: req("request_uri", i)?,
            object_ref: ObjectRef {
                api_group: os("api_group", i)?.into(),
                api_version: os("api_version", i)?.into(),
                resource: os("resource", i)?.into(),
                subresource: os("subresource", i)?.into(),
                namespace: os("namespace", i)?.into(),
                name: os("name", i)?.into(),
            },
            decision,
            policy_rule: s("policy_rule", i)?,
            reason: s("reason", i)?,
            response_code: code.value(i),
            request_bytes: int64_at(c.get("request_bytes")?, i)?,
            response_bytes: int64_at(c.get("response_bytes")?, i)?,
            error: s("error", i)?,
            principal: Arc::new(PrincipalRecord {
                kind: ps("kind", i)?.unwrap_or_default(),
                subject: ps("subject", i)?,
                groups: {
                    let list = groups.value(i);
                    (0..list.len())
                        .map(|j| string_at(list.as_ref(), j).map(Option::unwrap_or_default))
                        .collect::<Result<_, _>>()?
                },
                reason: ps("reason", i)?,
                mismatch: ps("mismatch", i)?,
            }),
            impersonated_user: s("impersonated_user", i)?,
            request_content_type: added(&c, "request_content_type", |a| string_at(a, i))?.flatten(),
            request_object: added(&c, "request_object", |a| string_at(a, i))?.flatten(),
            request_object_truncated: added(&c, "request_object_truncated", |a| {
                Ok(a.as_boolean_opt()
                    .ok_or("request_object_truncated is not boolean")?
                    .value(i))
            })?
            .unwrap_or(false),
            masked_fields: added(&c, "masked_fields", |a| {
                Ok(a.as_primitive_opt::<Int32Type>()
                    .ok_or("masked_fields is not int32")?
                    .value(i))
            })?
            .unwrap_or(0),
            response_object: added(&c, "response_object", |a| string_at(a, i))?.flatten(),
            response_object_truncated: added(&c, "response_object_truncated", |a| {
                Ok(a.as_boolean_opt()
                    .ok_or("response_object_truncated is not boolean")?
                    .value(i))
            })?
            .unwrap_or(false),
            outcome,
            masked: added(&c, "masked", |a| string_at(a, i))?.flatten(),
            approval_outcome: added(&c, "approval_outcome", |a| string_at(a, i))?.flatten(),
            access_request: added(&c, "access_request", |a| string_at(a, i))?.flatten(),
            approval_decided_by: added(&c, "approval_decided_by", |a| string_at(a, i))?.flatten(),
            approval_wait_ms: added(&c, "approval_wait_ms", |a| int64_opt_at(a, i))?.flatten(),
        });
    }
    Ok(())
}
