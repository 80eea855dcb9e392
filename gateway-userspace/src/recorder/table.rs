//! The recorder's tables: which rows go to which `table=<name>` directory, with which
//! schema. The coordinator batches and the writer thread writes each table's rows on
//! their own, into their own files, with the same rotation and failure handling.

use arrow_array::RecordBatch;
use arrow_schema::{ArrowError, SchemaRef};

use super::exec_frames::{self, ExecFrameRecord};
use super::schema::{self, RequestRecord};

/// A table of the recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// One row per API request.
    Requests,
    /// Frames of exec/attach/port-forward sessions.
    ExecFrames,
}

impl Table {
    /// Every table, in the order they are documented.
    pub const ALL: [Table; 2] = [Table::Requests, Table::ExecFrames];

    /// The table's name, its `table=` directory.
    pub fn name(self) -> &'static str {
        match self {
            Table::Requests => schema::TABLE_NAME,
            Table::ExecFrames => exec_frames::TABLE_NAME,
        }
    }

    /// The table's Arrow schema.
    pub fn schema(self) -> SchemaRef {
        match self {
            Table::Requests => schema::requests_schema(),
            Table::ExecFrames => exec_frames::exec_frames_schema(),
        }
    }
}

/// Rows of one table on their way to a file.
///
/// Request rows stay in the boxes they arrive in: moving each kilobyte record into a
/// batch of 4,096 copied it once more, and the batch's 4 MiB of fresh memory cost a page
/// fault every few rows (half the gateway's page faults under load, docs/benchmarks.md).
#[derive(Debug)]
#[expect(
    clippy::vec_box,
    reason = "rows arrive boxed and stay in their boxes, see above"
)]
pub(super) enum Rows {
    Requests(Vec<Box<RequestRecord>>),
    ExecFrames(Vec<ExecFrameRecord>),
}

impl Rows {
    /// No rows of `table`, with room for `capacity`.
    pub(super) fn with_capacity(table: Table, capacity: usize) -> Rows {
        match table {
            Table::Requests => Rows::Requests(Vec::with_capacity(capacity)),
            Table::ExecFrames => Rows::ExecFrames(Vec::with_capacity(capacity)),
        }
    }

    pub(super) fn table(&self) -> Table {
        match self {
            Rows::Requests(_) => Table::Requests,
            Rows::ExecFrames(_) => Table::ExecFrames,
        }
    }

    pub(super) fn len(&self) -> usize {
        match self {
            Rows::Requests(rows) => rows.len(),
            Rows::ExecFrames(rows) => rows.len(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows as one Arrow batch in time order (a stable sort: rows from the data-path
    /// threads arrive interleaved, each thread's in order). Request rows are ordered
    /// through references: sorting the records themselves moved a kilobyte per row several
    /// times, a tenth of the writer thread's time.
    pub(super) fn encode_in_time_order(&mut self) -> Result<RecordBatch, ArrowError> {
        match self {
            Rows::Requests(rows) => {
                let mut ordered: Vec<&RequestRecord> = rows.iter().map(|r| &**r).collect();
                ordered.sort_by_key(|r| r.request_time);
                schema::to_record_batch_of(&ordered)
            }
            Rows::ExecFrames(rows) => {
                rows.sort_by_key(|r| r.time);
                exec_frames::to_record_batch(rows)
            }
        }
    }

    /// Moves `other`'s rows to the end of these; hands them back when they belong to
    /// another table.
    pub(super) fn append(&mut self, other: Rows) -> Result<(), Rows> {
        match (self, other) {
            (Rows::Requests(a), Rows::Requests(b)) => a.extend(b),
            (Rows::ExecFrames(a), Rows::ExecFrames(b)) => a.extend(b),
            (_, other) => return Err(other),
        }
        Ok(())
    }

    /// Adds one request row; hands it back when these rows belong to another table.
    pub(super) fn push_request(
        &mut self,
        row: Box<RequestRecord>,
    ) -> Result<(), Box<RequestRecord>> {
        match self {
            Rows::Requests(rows) => {
                rows.push(row);
                Ok(())
            }
            Rows::ExecFrames(_) => Err(row),
        }
    }

    /// Logs every row that did not reach a published file, so it can be followed up.
    pub(super) fn log_lost(&self) {
        match self {
            Rows::Requests(rows) => {
                for row in rows {
                    tracing::error!(audit_id = %row.audit_id, verb = %row.verb, "recording row lost");
                }
            }
            Rows::ExecFrames(rows) => {
                for row in rows {
                    tracing::error!(session_id = %row.session_id, seq = row.seq, event = row.event.as_str(), "exec frame row lost");
                }
            }
        }
    }
}
