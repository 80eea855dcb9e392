//! The `exec_frames` table: what went through an exec, attach or port-forward stream.
//!
//! One row per recorded event of a session: a data frame (stdin, stdout, stderr, resize,
//! the error channel with the exit status), a truncation marker when the session reached
//! its recording cap, the exit status, per-stream byte counts (port-forward, whose
//! payloads are never stored) and the end of the session. Rows of one session share a
//! `session_id` and carry the `audit_id` of the request that opened the stream, which
//! joins them with its `requests` row. Bytes are stored as the client was sent them,
//! after output masking (docs/recording-schema.md).

use std::sync::{Arc, LazyLock};

use arrow_array::builder::{
    BinaryBuilder, Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::cast::AsArray as _;
use arrow_array::types::{Int32Type, Int64Type, TimestampMicrosecondType};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef, TimeUnit};

/// Name of the table, used as the `table=` partition of the layout.
pub const TABLE_NAME: &str = "exec_frames";

/// What an `exec_frames` row stands for (the `event` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FrameEventKind {
    /// A data frame; `data` holds its payload (cut at the session cap, see `size`).
    #[default]
    Frame,
    /// The session reached its recording cap: later frames are counted, not stored.
    Truncated,
    /// The process's exit status, read from the error channel (`exit_code`).
    Exit,
    /// Bytes relayed on one port-forward stream and direction (`size`); no payload.
    Bytes,
    /// The session ended; `detail` holds its totals and why it ended.
    End,
}

impl FrameEventKind {
    /// Every kind, for parsers and tests.
    pub const ALL: [FrameEventKind; 5] = [
        FrameEventKind::Frame,
        FrameEventKind::Truncated,
        FrameEventKind::Exit,
        FrameEventKind::Bytes,
        FrameEventKind::End,
    ];

    /// The kind as recorded.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameEventKind::Frame => "frame",
            FrameEventKind::Truncated => "truncated",
            FrameEventKind::Exit => "exit",
            FrameEventKind::Bytes => "bytes",
            FrameEventKind::End => "end",
        }
    }

    /// Parses what [`FrameEventKind::as_str`] wrote.
    pub fn parse(text: &str) -> Option<FrameEventKind> {
        FrameEventKind::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// One row of the `exec_frames` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecFrameRecord {
    /// The session (today: the audit id of the request that opened the stream).
    pub session_id: String,
    /// Audit id of the request that opened the stream (joins with `requests.audit_id`).
    pub audit_id: String,
    /// Position in the session, from 0, without gaps.
    pub seq: i64,
    /// Wall-clock time of the event (session start plus `offset_us`).
    pub time: jiff::Timestamp,
    /// Microseconds since the stream was switched (monotonic clock).
    pub offset_us: i64,
    /// What the row stands for.
    pub event: FrameEventKind,
    /// `to_server` (from the agent) or `to_client`; `None` for session-wide events.
    pub direction: Option<&'static str>,
    /// The channel: stdin, stdout, stderr, error, resize, close, portforward-data:PORT, ...
    pub stream: Option<String>,
    /// The payload as relayed to its receiver (output after masking).
    pub data: Option<Vec<u8>>,
    /// Bytes the event stands for: the frame's payload length as relayed (`data` may be
    /// shorter when cut at the cap), or a port-forward stream's total.
    pub size: i64,
    /// The exit code, on `exit` rows (0 for success).
    pub exit_code: Option<i32>,
    /// Human-readable detail: why the session was truncated or ended, its totals (JSON).
    pub detail: Option<String>,
}

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("session_id", DataType::Utf8, false),
        Field::new("audit_id", DataType::Utf8, false),
        Field::new("seq", DataType::Int64, false),
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("offset_us", DataType::Int64, false),
        Field::new("event", DataType::Utf8, false),
        Field::new("direction", DataType::Utf8, true),
        Field::new("stream", DataType::Utf8, true),
        Field::new("data", DataType::Binary, true),
        Field::new("size", DataType::Int64, false),
        Field::new("exit_code", DataType::Int32, true),
        Field::new("detail", DataType::Utf8, true),
    ]))
});

/// The Arrow schema of the `exec_frames` table.
pub fn exec_frames_schema() -> SchemaRef {
    Arc::clone(&SCHEMA)
}

fn strings<'a>(
    rows: &'a [ExecFrameRecord],
    get: impl Fn(&'a ExecFrameRecord) -> Option<&'a str>,
) -> ArrayRef {
    let bytes = rows.iter().map(|r| get(r).map_or(0, str::len)).sum();
    let mut builder = StringBuilder::with_capacity(rows.len(), bytes);
    for row in rows {
        builder.append_option(get(row));
    }
    Arc::new(builder.finish())
}

fn int64(rows: &[ExecFrameRecord], get: impl Fn(&ExecFrameRecord) -> i64) -> ArrayRef {
    let mut builder = Int64Builder::with_capacity(rows.len());
    for row in rows {
        builder.append_value(get(row));
    }
    Arc::new(builder.finish())
}

/// Encodes rows into one Arrow batch with [`exec_frames_schema`], preserving their order.
pub fn to_record_batch(rows: &[ExecFrameRecord]) -> Result<RecordBatch, ArrowError> {
    let mut time = TimestampMicrosecondBuilder::with_capacity(rows.len()).with_timezone("UTC");
    let data_bytes = rows
        .iter()
        .map(|r| r.data.as_ref().map_or(0, Vec::len))
        .sum();
    let mut data = BinaryBuilder::with_capacity(rows.len(), data_bytes);
    let mut exit_code = Int32Builder::with_capacity(rows.len());
    for row in rows {
        time.append_value(row.time.as_microsecond());
        data.append_option(row.data.as_deref());
        exit_code.append_option(row.exit_code);
    }
    RecordBatch::try_new(
        exec_frames_schema(),
        vec![
            strings(rows, |r| Some(&r.session_id)),
            strings(rows, |r| Some(&r.audit_id)),
            int64(rows, |r| r.seq),
            Arc::new(time.finish()),
            int64(rows, |r| r.offset_us),
            strings(rows, |r| Some(r.event.as_str())),
            strings(rows, |r| r.direction),
            strings(rows, |r| r.stream.as_deref()),
            Arc::new(data.finish()),
            int64(rows, |r| r.size),
            Arc::new(exit_code.finish()),
            strings(rows, |r| r.detail.as_deref()),
        ],
    )
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a dyn Array, String> {
    batch
        .column_by_name(name)
        .map(|c| c.as_ref())
        .ok_or_else(|| format!("no column {name:?}"))
}

fn string_at(array: &dyn Array, name: &str, i: usize) -> Result<Option<String>, String> {
    let strings = array
        .as_string_opt::<i32>()
        .ok_or_else(|| format!("column {name} is not a string column"))?;
    Ok(strings.is_valid(i).then(|| strings.value(i).to_owned()))
}

fn direction_str(text: &str) -> Option<&'static str> {
    match text {
        "to_server" => Some("to_server"),
        "to_client" => Some("to_client"),
        _ => None,
    }
}

/// Decodes one batch of the `exec_frames` table, appending to `rows`; every malformed
/// value is an error naming the row and column.
pub fn decode_batch(batch: &RecordBatch, rows: &mut Vec<ExecFrameRecord>) -> Result<(), String> {
    let s = |name: &str, i: usize| -> Result<Option<String>, String> {
        string_at(column(batch, name)?, name, i)
    };
    let required = |name: &str, i: usize| -> Result<String, String> {
        s(name, i)?.ok_or_else(|| format!("row {i}: column {name} is null"))
    };
    let i64_col = |name: &str| -> Result<_, String> {
        column(batch, name)?
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| format!("column {name} is not int64"))
    };
    let seq = i64_col("seq")?;
    let offset = i64_col("offset_us")?;
    let size = i64_col("size")?;
    let time = column(batch, "time")?
        .as_primitive_opt::<TimestampMicrosecondType>()
        .ok_or("column time is not a timestamp")?;
    let data = column(batch, "data")?
        .as_binary_opt::<i32>()
        .ok_or("column data is not binary")?;
    let exit_code = column(batch, "exit_code")?
        .as_primitive_opt::<Int32Type>()
        .ok_or("column exit_code is not int32")?;
    for i in 0..batch.num_rows() {
        let event = required("event", i)?;
        let event = FrameEventKind::parse(&event)
            .ok_or_else(|| format!("row {i}: column event: unknown event {event:?}"))?;
        let direction =
            match s("direction", i)? {
                Some(text) => Some(direction_str(&text).ok_or_else(|| {
                    format!("row {i}: column direction: unknown direction {text:?}")
                })?),
                None => None,
            };
        if !time.is_valid(i) {
            return Err(format!("row {i}: column time is null"));
        }
        rows.push(ExecFrameRecord {
            session_id: required("session_id", i)?,
            audit_id: required("audit_id", i)?,
            seq: seq.value(i),
            time: jiff::Timestamp::from_microsecond(time.value(i))
                .map_err(|e| format!("row {i}: column time: {e}"))?,
            offset_us: offset.value(i),
            event,
            direction,
            stream: s("stream", i)?,
            data: data.is_valid(i).then(|| data.value(i).to_vec()),
            size: size.value(i),
            exit_code: exit_code.is_valid(i).then(|| exit_code.value(i)),
            detail: s("detail", i)?,
        });
    }
    Ok(())
}

/// The exit code in an exec error-channel message (a `metav1.Status`): 0 for `Success`,
/// the `ExitCode` cause of a `NonZeroExitCode` failure; `None` for other failures (the
/// process could not start) and for text that is not a Status.
pub fn exit_code_of(status: &[u8]) -> Option<i32> {
    let value: serde_json::Value = serde_json::from_slice(status).ok()?;
    match value.get("status")?.as_str()? {
        "Success" => Some(0),
        _ => value
            .get("details")?
            .get("causes")?
            .as_array()?
            .iter()
            .find(|c| c.get("reason").and_then(|r| r.as_str()) == Some("ExitCode"))?
            .get("message")?
            .as_str()?
            .trim()
            .parse()
            .ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64) -> ExecFrameRecord {
        ExecFrameRecord {
            session_id: "s".into(),
            audit_id: "a".into(),
            seq,
            time: jiff::Timestamp::from_second(1_700_000_000).unwrap_or_default(),
            offset_us: seq * 10,
            event: FrameEventKind::Frame,
            direction: Some("to_client"),
            stream: Some("stdout".into()),
            data: Some(vec![0, 159, 146, 150, b'\n']),
            size: 5,
            exit_code: None,
            detail: None,
        }
    }

    #[test]
    fn rows_round_trip_through_arrow() {
        let mut rows = vec![row(0), row(1)];
        rows[1].event = FrameEventKind::Exit;
        rows[1].data = None;
        rows[1].exit_code = Some(3);
        rows[1].direction = None;
        rows[1].detail = Some("exit".into());
        let batch = to_record_batch(&rows).unwrap_or_else(|e| panic!("encode: {e}"));
        let mut back = Vec::new();
        decode_batch(&batch, &mut back).unwrap_or_else(|e| panic!("decode: {e}"));
        assert_eq!(back, rows);
    }

    #[test]
    fn exit_codes_from_status_messages() {
        let cases: [(&str, Option<i32>); 5] = [
            (r#"{"metadata":{},"status":"Success"}"#, Some(0)),
            (
                r#"{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"42"}]}}"#,
                Some(42),
            ),
            (r#"{"status":"Failure","message":"exec: not found"}"#, None),
            ("not json", None),
            ("", None),
        ];
        for (text, expected) in cases {
            assert_eq!(exit_code_of(text.as_bytes()), expected, "{text}");
        }
    }

    #[test]
    fn unknown_event_is_an_error_naming_the_row() {
        let batch = to_record_batch(&[row(0)]).unwrap_or_else(|e| panic!("encode: {e}"));
        let mut columns = batch.columns().to_vec();
        let index = batch
            .schema()
            .index_of("event")
            .unwrap_or_else(|e| panic!("{e}"));
        columns[index] = Arc::new(arrow_array::StringArray::from(vec!["bogus"]));
        let bad = RecordBatch::try_new(batch.schema(), columns).unwrap_or_else(|e| panic!("{e}"));
        let err = decode_batch(&bad, &mut Vec::new()).err();
        assert_eq!(
            err.as_deref(),
            Some("row 0: column event: unknown event \"bogus\"")
        );
    }
}
