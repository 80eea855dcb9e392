//! Recording of one exec, attach or port-forward session into `exec_frames`.
//!
//! The relay calls [`SessionRecorder::frame`] inline for every decoded frame, so it never
//! waits: rows are collected into a chunk (at most [`CHUNK_ROWS`] rows or
//! [`CHUNK_BYTES`] of payload, or [`CHUNK_AGE`] old) and the chunk is offered to the
//! recorder's queue without waiting. A chunk the queue cannot take yet stays with the
//! session and is offered again with the next frame; the session holds at most
//! [`MAX_WAITING_BYTES`] of such rows. Past that, or when recording is down, `frame`
//! fails and the relay ends the stream: **fail closed**, a session never goes on with
//! frames that cannot be recorded, and nothing is dropped silently. The end of the
//! session is recorded off the relay path ([`SessionRecorder::finish`] waits for queue
//! space), with its totals and why it ended.
//!
//! Memory per session is bounded by one chunk plus the waiting rows. What is stored per
//! session is bounded by the configured cap (`recording.maxSessionBytes`): past it frames
//! are counted, not stored, and one `truncated` row marks the point. Port-forward
//! sessions store no payload at all, only byte counts per stream and direction.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::exec_frames::{ExecFrameRecord, FrameEventKind, exit_code_of};
use super::{RecorderError, RecorderHandle};

/// Rows per chunk handed to the recorder.
pub const CHUNK_ROWS: usize = 256;
/// Payload bytes per chunk handed to the recorder.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// A chunk is handed over once its first row is this old (at the next frame), so a
/// slow interactive session reaches the disk soon.
pub const CHUNK_AGE: Duration = Duration::from_millis(200);
/// Rows a session may hold while the recorder's queue is full; past it the stream ends.
pub const MAX_WAITING_BYTES: usize = 8 * 1024 * 1024;
/// What a row costs in memory besides its payload (the record and its strings), counted
/// toward [`CHUNK_BYTES`] and [`MAX_WAITING_BYTES`]: a flood of empty frames, a row each,
/// must reach the bound too.
const ROW_OVERHEAD: usize = 256;

/// What kind of session is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    /// exec or attach: payloads are stored (after output masking).
    Exec,
    /// port-forward: byte counts per stream and direction, no payloads.
    PortForward,
}

/// Records one session; owned by the stream's tap (see the module docs).
pub struct SessionRecorder {
    handle: RecorderHandle,
    session_id: String,
    audit_id: String,
    kind: SessionKind,
    started: Instant,
    started_wall: jiff::Timestamp,
    seq: i64,
    cap: u64,
    stored: u64,
    relayed: u64,
    unstored: u64,
    frames: u64,
    truncated: bool,
    exit_code: Option<i32>,
    chunk: Vec<ExecFrameRecord>,
    chunk_bytes: usize,
    chunk_started: Option<Instant>,
    waiting: Vec<ExecFrameRecord>,
    waiting_bytes: usize,
    /// Port-forward totals per (stream, direction), in the order first seen.
    counts: Vec<(String, &'static str, u64)>,
    /// Where each stream is in `counts`, to the server and to the client (a port-forward
    /// can use many ports, and a scan per frame would grow with them).
    count_index: [HashMap<String, usize>; 2],
    failed: Option<String>,
}

impl std::fmt::Debug for SessionRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRecorder")
            .field("session_id", &self.session_id)
            .field("kind", &self.kind)
            .field("seq", &self.seq)
            .field("stored", &self.stored)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl SessionRecorder {
    pub(super) fn new(
        handle: RecorderHandle,
        audit_id: &str,
        kind: SessionKind,
        cap: u64,
    ) -> SessionRecorder {
        SessionRecorder {
            handle,
            session_id: audit_id.to_owned(),
            audit_id: audit_id.to_owned(),
            kind,
            started: Instant::now(),
            started_wall: jiff::Timestamp::now(),
            seq: 0,
            cap,
            stored: 0,
            relayed: 0,
            unstored: 0,
            frames: 0,
            truncated: false,
            exit_code: None,
            chunk: Vec::new(),
            chunk_bytes: 0,
            chunk_started: None,
            waiting: Vec::new(),
            waiting_bytes: 0,
            counts: Vec::new(),
            count_index: Default::default(),
            failed: None,
        }
    }

    /// The session's id (the `session_id` column).
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Why recording failed and the stream must end, once it has.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// The exit code read from the error channel, if one was.
    pub fn exit_code(&self) -> Option<i32> {
        self.exit_code
    }

    fn row(&mut self, now: Instant, event: FrameEventKind) -> ExecFrameRecord {
        let offset = now.saturating_duration_since(self.started);
        let offset_us = i64::try_from(offset.as_micros()).unwrap_or(i64::MAX);
        let time = self
            .started_wall
            .checked_add(offset)
            .unwrap_or(self.started_wall);
        let seq = self.seq;
        self.seq += 1;
        ExecFrameRecord {
            session_id: self.session_id.clone(),
            audit_id: self.audit_id.clone(),
            seq,
            time,
            offset_us,
            event,
            ..ExecFrameRecord::default()
        }
    }

    /// Records one decoded frame as relayed (`direction` is `to_server` or `to_client`).
    /// `Err(why)` when it cannot be recorded: the caller must end the stream.
    pub fn frame(
        &mut self,
        direction: &'static str,
        stream: &str,
        payload: &[u8],
    ) -> Result<(), String> {
        if let Some(failed) = &self.failed {
            return Err(failed.clone());
        }
        self.frames += 1;
        self.relayed += payload.len() as u64;
        if self.kind == SessionKind::PortForward {
            let index = &mut self.count_index[usize::from(direction == "to_client")];
            match index.get(stream) {
                Some(&at) => self.counts[at].2 += payload.len() as u64,
                None => {
                    index.insert(stream.to_owned(), self.counts.len());
                    self.counts
                        .push((stream.to_owned(), direction, payload.len() as u64));
                }
            }
            return Ok(());
        }
        let now = Instant::now();
        let room = self.cap.saturating_sub(self.stored);
        let keep = usize::try_from(room)
            .unwrap_or(usize::MAX)
            .min(payload.len());
        if keep < payload.len() {
            self.unstored += (payload.len() - keep) as u64;
        }
        if keep > 0 || (payload.is_empty() && !self.truncated) {
            let mut row = self.row(now, FrameEventKind::Frame);
            row.direction = Some(direction);
            row.stream = Some(stream.to_owned());
            row.data = Some(payload[..keep].to_vec());
            row.size = payload.len() as i64;
            self.stored += keep as u64;
            self.push(row, keep);
        }
        if stream == "error" && direction == "to_client" {
            let code = exit_code_of(payload);
            let mut row = self.row(now, FrameEventKind::Exit);
            row.direction = Some(direction);
            row.stream = Some(stream.to_owned());
            row.exit_code = code;
            row.detail = Some(String::from_utf8_lossy(payload).into_owned());
            if code.is_some() {
                self.exit_code = code;
            }
            self.push(row, 0);
        }
        if keep < payload.len() && !self.truncated {
            self.truncated = true;
            let mut row = self.row(now, FrameEventKind::Truncated);
            row.detail = Some(format!(
                "the session reached recording.maxSessionBytes ({} bytes): later frames are counted, not stored",
                self.cap
            ));
            self.push(row, 0);
        }
        self.offer(now)
    }

    fn push(&mut self, row: ExecFrameRecord, bytes: usize) {
        if self.chunk.is_empty() {
            self.chunk_started = Some(Instant::now());
            self.chunk.reserve(CHUNK_ROWS.min(64));
        }
        self.chunk.push(row);
        self.chunk_bytes += bytes + ROW_OVERHEAD;
    }

    /// Offers the chunk (and rows still waiting) to the recorder when it is due.
    fn offer(&mut self, now: Instant) -> Result<(), String> {
        let due = self.chunk.len() >= CHUNK_ROWS
            || self.chunk_bytes >= CHUNK_BYTES
            || self
                .chunk_started
                .is_some_and(|t| now.saturating_duration_since(t) >= CHUNK_AGE)
            || !self.waiting.is_empty();
        if !due {
            return Ok(());
        }
        if !self.chunk.is_empty() {
            self.waiting_bytes += self.chunk_bytes;
            if self.waiting.is_empty() {
                self.waiting = std::mem::take(&mut self.chunk);
            } else {
                self.waiting.append(&mut self.chunk);
            }
            self.chunk_bytes = 0;
            self.chunk_started = None;
        }
        let rows = std::mem::take(&mut self.waiting);
        match self.handle.try_record_frames(rows) {
            Ok(Ok(())) => {
                self.waiting_bytes = 0;
                Ok(())
            }
            Ok(Err(rows)) => {
                self.waiting = rows;
                if self.waiting_bytes > MAX_WAITING_BYTES {
                    Err(self.fail(format!(
                        "the recorder cannot keep up with this session ({} bytes waiting): the stream is ended rather than relayed unrecorded",
                        self.waiting_bytes
                    )))
                } else {
                    Ok(())
                }
            }
            Err(error) => Err(self.fail(format!(
                "the session cannot be recorded, so the stream is ended: {error}"
            ))),
        }
    }

    fn fail(&mut self, why: String) -> String {
        tracing::error!(session_id = %self.session_id, error = %why, "exec session recording failed");
        self.failed = Some(why.clone());
        why
    }

    /// Marks the session failed from outside (the tap could not decode the stream, so its
    /// frames cannot be recorded); the caller ends the stream.
    pub fn fail_with(&mut self, why: &str) {
        if self.failed.is_none() {
            self.fail(why.to_owned());
        }
    }

    /// Records the end of the session (port-forward totals, then an `end` row with the
    /// totals and `error`, why it ended) and hands every remaining row to the recorder,
    /// waiting for queue space: the relay is over, so waiting stalls nothing.
    pub async fn finish(mut self, error: Option<&str>) -> Result<(), RecorderError> {
        let now = Instant::now();
        for (stream, direction, total) in std::mem::take(&mut self.counts) {
            let mut row = self.row(now, FrameEventKind::Bytes);
            row.direction = Some(direction);
            row.stream = Some(stream);
            row.size = i64::try_from(total).unwrap_or(i64::MAX);
            self.push(row, 0);
        }
        let detail = serde_json::json!({
            "frames": self.frames,
            "bytes_relayed": self.relayed,
            "bytes_stored": self.stored,
            "bytes_not_stored": self.unstored,
            "exit_code": self.exit_code,
            "error": error.or(self.failed.as_deref()),
        });
        let mut end = self.row(now, FrameEventKind::End);
        end.size = i64::try_from(self.relayed).unwrap_or(i64::MAX);
        end.exit_code = self.exit_code;
        end.detail = Some(detail.to_string());
        self.push(end, 0);
        let mut rows = std::mem::take(&mut self.waiting);
        rows.append(&mut self.chunk);
        self.handle.record_frames(rows).await
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
