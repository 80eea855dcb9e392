//! The one row per request: sent when the exchange is over, with the masked response
//! object when one was captured.
//!
//! Rows finished on a data-path thread are handed to the recorder's runtime in batches
//! ([`RowBatch`]): handing each row over on its own woke a parked thread of that runtime
//! per request (a futex wake, an inter-processor interrupt and two context switches), which
//! was a fifth of the gateway's CPU time per request (docs/benchmarks.md).

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    admin::Metrics,
    masking::{self, objects::MaskReport},
    recorder::{Outcome, RecorderHandle, RequestRecord},
};

use super::{Proxy, body, workers};

/// How long a data-path thread keeps its first unsent row before handing the batch over.
/// Every hand-over wakes a thread of the shared runtime; at 2 ms (about 28 rows a batch
/// at 14,000 requests per second per thread) those wake-ups were a third of that
/// runtime's CPU per request, and at 5 ms and 128 rows they still cost 0.4 us per
/// request. A row waits at most this long more before it reaches the recorder; a
/// mutation's row is in the write-ahead log before it is forwarded either way.
const BATCH_DELAY: Duration = Duration::from_millis(20);
/// A batch this large is handed over at once.
const BATCH_ROWS: usize = 512;

/// The bytes of a request body: known when the body was read whole (most requests, so
/// no shared counter is allocated for them), counted on the way when it streams.
pub(super) enum RequestBytes {
    Known(u64),
    Counted(Arc<AtomicU64>),
}

impl RequestBytes {
    pub(super) fn get(&self) -> u64 {
        match self {
            RequestBytes::Known(n) => *n,
            RequestBytes::Counted(count) => count.load(Ordering::Relaxed),
        }
    }

    /// Adds bytes that went past the counter (an upgraded stream's).
    pub(super) fn add(&mut self, n: u64) {
        match self {
            RequestBytes::Known(known) => *known = known.saturating_add(n),
            RequestBytes::Counted(count) => {
                count.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// The row of a request still being handled, before a [`RecordGuard`] takes it. hyper
/// drops the handler's future when the client goes away (an HTTP/2 stream reset, a closed
/// connection: kubectl's timeouts and Ctrl-C do both), and with it whatever the future
/// holds; a row held in a plain box would vanish, leaving no trace of the request. This
/// one is written as it is when dropped: `cancelled`, `unknown` once a write may have
/// reached the API server, or `forwarded` once the API server has answered.
pub(super) struct Row<'p> {
    record: Option<Box<RequestRecord>>,
    proxy: &'p Proxy,
    started: Instant,
    /// A request that can change something (not a read) may have reached the API server.
    pub(super) may_have_applied: bool,
}

impl<'p> Row<'p> {
    pub(super) fn new(proxy: &'p Proxy, record: Box<RequestRecord>, started: Instant) -> Self {
        Self {
            record: Some(record),
            proxy,
            started,
            may_have_applied: false,
        }
    }

    /// The row, for a guard that sends it when the exchange is over.
    pub(super) fn into_guard(mut self, request_bytes: RequestBytes) -> RecordGuard {
        let Some(record) = self.record.take() else {
            unreachable!("a Row's record is taken only as it is consumed")
        };
        RecordGuard::new(self.proxy, record, self.started, request_bytes)
    }
}

impl std::ops::Deref for Row<'_> {
    type Target = RequestRecord;

    fn deref(&self) -> &RequestRecord {
        match &self.record {
            Some(record) => record,
            // Only `into_guard` and `drop` take the row, and both consume the `Row`.
            None => unreachable!("a Row's record is taken only as it is consumed"),
        }
    }
}

impl std::ops::DerefMut for Row<'_> {
    fn deref_mut(&mut self) -> &mut RequestRecord {
        match &mut self.record {
            Some(record) => record,
            None => unreachable!("a Row's record is taken only as it is consumed"),
        }
    }
}

impl Drop for Row<'_> {
    fn drop(&mut self) {
        let Some(mut record) = self.record.take() else {
            return;
        };
        let why = if record.response_code != 0 {
            // The API server answered (the outcome says so already); the client left while
            // the answer was being masked.
            "the client went away before the API server's answer was relayed"
        } else if self.may_have_applied {
            record.outcome = Outcome::Unknown;
            "the client went away before the API server answered, so whether the API server \
             applied the request is not known"
        } else {
            record.outcome = Outcome::Cancelled;
            "the client went away before the response began"
        };
        record.reason = Some(match record.reason.take() {
            Some(earlier) => format!("{earlier}; {why}"),
            None => why.to_owned(),
        });
        tracing::debug!(audit_id = %record.audit_id, outcome = %record.outcome, "request cancelled by the client");
        drop(RecordGuard::new(
            self.proxy,
            record,
            self.started,
            RequestBytes::Known(0),
        ));
    }
}

/// Sends the row when the exchange is over: when the response body has been fully sent,
/// or when it is dropped (client went away, watch closed, local response).
pub(super) struct RecordGuard {
    pub(super) pending: Option<Box<RequestRecord>>,
    /// Where the row goes.
    sink: Sink,
    pub(super) started: Instant,
    pub(super) request_bytes: RequestBytes,
    pub(super) response_bytes: u64,
    /// A copy of the response body for `response_object`, when it is recorded.
    pub(super) capture: Option<body::Capture>,
    /// The response body was sent to its end (a partial body is not recorded as an object).
    pub(super) complete: bool,
    /// A masked watch's report, filled event by event, read when the row is written.
    pub(super) live_report: Option<Arc<Mutex<MaskReport>>>,
    /// The response was masked for the agent (Secret data included), so the captured
    /// body is recorded as the agent received it.
    pub(super) response_masked: bool,
    pub(super) max_object_bytes: usize,
    /// Values masked in a streamed body (pod logs), added to the row's masked count.
    pub(super) masked_streamed: Option<Arc<AtomicU64>>,
}

/// Where a finished row goes: into the batch of the data-path thread that made it, or,
/// made elsewhere, to the recorder on its own. A guard on a data-path thread holds only
/// that thread's batch, which carries the recorder and the metrics: cloning a recorder
/// handle and the metrics per row touched half a dozen reference counts that every thread
/// shares, each a cache line moving between cores.
enum Sink {
    Batch(Arc<RowBatch>),
    Alone(RecorderHandle, Arc<Metrics>),
}

impl Sink {
    fn metrics(&self) -> &Metrics {
        match self {
            Sink::Batch(batch) => &batch.metrics,
            Sink::Alone(_, metrics) => metrics,
        }
    }
}

impl RecordGuard {
    pub(super) fn new(
        proxy: &Proxy,
        record: Box<RequestRecord>,
        started: Instant,
        request_bytes: RequestBytes,
    ) -> Self {
        let sink = match workers::current().and_then(|index| proxy.row_batches.get(index)) {
            Some(batch) => Sink::Batch(batch.clone()),
            None => Sink::Alone(proxy.recorder.clone(), proxy.metrics.clone()),
        };
        Self {
            pending: Some(record),
            sink,
            started,
            request_bytes,
            response_bytes: 0,
            capture: None,
            complete: false,
            live_report: None,
            response_masked: false,
            max_object_bytes: proxy.max_object_bytes,
            masked_streamed: None,
        }
    }
}

impl Drop for RecordGuard {
    fn drop(&mut self) {
        let Some(mut record) = self.pending.take() else {
            return;
        };
        record.latency_us = i64::try_from(self.started.elapsed().as_micros()).unwrap_or(i64::MAX);
        if record.response_time.is_none() {
            record.response_time = Some(jiff::Timestamp::now());
        }
        record.request_bytes = self.request_bytes.get() as i64;
        record.response_bytes = self.response_bytes as i64;
        if let Some(masked) = &self.masked_streamed {
            let n = i32::try_from(masked.load(Ordering::Relaxed)).unwrap_or(i32::MAX);
            record.masked_fields = record.masked_fields.saturating_add(n);
        }
        self.sink
            .metrics()
            .count_request(record.decision, record.outcome);
        let capture = self.capture.take().filter(|_| self.complete);
        let max_object_bytes = self.max_object_bytes;
        let response_masked = self.response_masked;
        if let Some(live) = self.live_report.take() {
            let report = match live.lock() {
                Ok(r) => r.clone(),
                Err(poisoned) => poisoned.into_inner().clone(),
            };
            record.masked_fields = record
                .masked_fields
                .saturating_add(i32::try_from(report.total()).unwrap_or(i32::MAX));
            record.masked = report.to_json();
        }
        let finished = Finished {
            record,
            capture,
            max_object_bytes,
            response_masked,
        };
        match &self.sink {
            Sink::Batch(batch) => batch.push(finished),
            // Drop cannot await; the recorder applies back-pressure inside the task instead.
            Sink::Alone(recorder, metrics) => {
                if recorder.overloaded() {
                    recorder.shed(&finished.record);
                    metrics.recording_failures.inc();
                    return;
                }
                let (recorder, metrics) = (recorder.clone(), metrics.clone());
                let waiting = Waiting::new(&recorder, 1);
                recorder.clone().spawn(async move {
                    finished.send(&recorder, &metrics).await;
                    drop(waiting);
                });
            }
        }
    }
}

/// A finished exchange's row, before its response object is decoded and masked.
pub(super) struct Finished {
    record: Box<RequestRecord>,
    capture: Option<body::Capture>,
    max_object_bytes: usize,
    response_masked: bool,
}

impl Finished {
    /// Completes the row (decoding and masking happen here, off the response's path) and
    /// queues it, waiting for room in the recorder's queue.
    async fn send(mut self, recorder: &RecorderHandle, metrics: &Metrics) {
        if let Some(capture) = self.capture.take() {
            record_response_object(
                &mut self.record,
                capture,
                self.max_object_bytes,
                self.response_masked,
            );
        }
        let audit_id = self.record.audit_id.clone();
        if let Err(e) = recorder.record_boxed(self.record).await {
            metrics.recording_failures.inc();
            tracing::error!(%audit_id, error = %e, "request could not be recorded");
        }
    }
}

/// The rows finished on one data-path thread and not yet handed to the recorder: the
/// first row of a batch starts a [`BATCH_DELAY`] timer on that thread, and the batch goes
/// to the recorder's runtime as one task when the timer fires, when it holds
/// [`BATCH_ROWS`] rows, or when the thread stops (the timer task is dropped with its
/// runtime and hands the batch over as it goes). Only its own thread touches a batch; the
/// lock is uncontended and only makes the type shareable.
pub(super) struct RowBatch {
    recorder: RecorderHandle,
    metrics: Arc<Metrics>,
    rows: Mutex<Vec<Finished>>,
}

impl RowBatch {
    pub(super) fn new(recorder: RecorderHandle, metrics: Arc<Metrics>) -> Self {
        Self {
            recorder,
            metrics,
            rows: Mutex::new(Vec::new()),
        }
    }

    fn push(self: &Arc<Self>, row: Finished) {
        let len = {
            let mut rows = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
            rows.push(row);
            rows.len()
        };
        if len >= BATCH_ROWS {
            self.hand_over();
        } else if len == 1 {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let timer = HandOverOnDrop(self.clone());
                    runtime.spawn(async move {
                        tokio::time::sleep(BATCH_DELAY).await;
                        drop(timer);
                    });
                }
                // Outside a runtime (a thread being torn down): no timer to wait for.
                Err(_) => self.hand_over(),
            }
        }
    }

    /// Sends what the batch holds to the recorder's runtime, as one task.
    fn hand_over(&self) {
        let rows = {
            let mut rows = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
            // The next batch starts with room for as many rows as this one had: growing
            // it row by row would copy the (large) rows again at every doubling.
            let room = rows.len();
            std::mem::replace(&mut *rows, Vec::with_capacity(room))
        };
        if rows.is_empty() {
            return;
        }
        if self.recorder.overloaded() {
            for row in &rows {
                self.recorder.shed(&row.record);
                self.metrics.recording_failures.inc();
            }
            return;
        }
        let recorder = self.recorder.clone();
        let metrics = self.metrics.clone();
        // Counted until queued: a writer that does not keep up makes recording behind (and
        // requests refused) instead of these tasks piling up without bound. Counted down
        // once per batch: the count shares a cache line with the flag every request reads.
        let waiting = Waiting::new(&recorder, rows.len() as u64);
        self.recorder.spawn(async move {
            for row in rows {
                row.send(&recorder, &metrics).await;
            }
            drop(waiting);
        });
    }
}

/// Rows counted as waiting for the recorder's queue until dropped: when they are queued,
/// or when the task carrying them ends any other way (a panic, a runtime shutting down),
/// so the count never drifts up into recording being behind for good.
struct Waiting {
    recorder: RecorderHandle,
    rows: u64,
}

impl Waiting {
    fn new(recorder: &RecorderHandle, rows: u64) -> Self {
        recorder.backlog_add(rows);
        Self {
            recorder: recorder.clone(),
            rows,
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.recorder.backlog_done(self.rows);
    }
}

/// Hands its batch over when dropped: when its timer fires, or when the runtime it waits
/// on shuts down.
struct HandOverOnDrop(Arc<RowBatch>);

impl Drop for HandOverOnDrop {
    fn drop(&mut self) {
        self.0.hand_over();
    }
}

/// Puts a captured response body into the record, masked and size-capped.
pub(super) fn record_response_object(
    record: &mut RequestRecord,
    capture: body::Capture,
    max_bytes: usize,
    already_masked: bool,
) {
    // Most objects hold nothing to mask for recording: their text is kept as the API
    // server sent it, checked to be JSON but not parsed into a tree and printed again
    // (that took most of the recorder's CPU per row; docs/benchmarks.md).
    if !already_masked && !masking::recording_may_mask(&record.object_ref.resource, capture.bytes())
    {
        match capture.finish_text() {
            Err(()) => record.response_object_truncated = true,
            Ok(None) => {}
            Ok(Some(text)) if text.len() <= max_bytes => record.response_object = Some(text),
            Ok(Some(_)) => record.response_object_truncated = true,
        }
        return;
    }
    match capture.finish() {
        Err(()) => record.response_object_truncated = true,
        Ok(None) => {}
        // Masked for the agent already: recorded as the agent received it.
        Ok(Some(object)) if already_masked => {
            let text = object.to_string();
            if text.len() <= max_bytes {
                record.response_object = Some(text);
            } else {
                record.response_object_truncated = true;
            }
        }
        Ok(Some(object)) => match recorded_json(record, object, max_bytes) {
            Some(text) => record.response_object = Some(text),
            None => record.response_object_truncated = true,
        },
    }
}

/// `object` as the masked JSON text a record keeps, adding what was masked to the record's
/// count; `None` when the text is larger than `max_bytes` (the caller flags it truncated).
pub(super) fn recorded_json(
    record: &mut RequestRecord,
    mut object: serde_json::Value,
    max_bytes: usize,
) -> Option<String> {
    let masked = masking::mask_for_recording(&record.object_ref.resource, &mut object);
    record.masked_fields = record
        .masked_fields
        .saturating_add(i32::try_from(masked).unwrap_or(i32::MAX));
    let text = object.to_string();
    (text.len() <= max_bytes).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorder::{Recorder, RecorderConfig};

    #[test]
    fn request_bytes_add_what_went_past_the_counter() {
        let mut known = RequestBytes::Known(120);
        known.add(30);
        assert_eq!(known.get(), 150);

        let count = Arc::new(AtomicU64::new(0));
        let mut counted = RequestBytes::Counted(count.clone());
        count.fetch_add(64, Ordering::Relaxed);
        assert_eq!(counted.get(), 64, "reads the body's counter as it streams");
        counted.add(36);
        assert_eq!(counted.get(), 100);
        assert_eq!(count.load(Ordering::Relaxed), 100);

        let mut huge = RequestBytes::Known(u64::MAX - 1);
        huge.add(5);
        assert_eq!(huge.get(), u64::MAX, "saturates instead of wrapping");
    }

    fn finished(audit_id: &str) -> Finished {
        Finished {
            record: Box::new(RequestRecord {
                audit_id: audit_id.to_owned(),
                request_time: jiff::Timestamp::now(),
                ..RequestRecord::default()
            }),
            capture: None,
            max_object_bytes: 1024,
            response_masked: false,
        }
    }

    fn queued(batch: &RowBatch) -> usize {
        batch
            .rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// A batch goes to the recorder when its timer fires, when it is full, and when the
    /// data-path thread's runtime stops before the timer fires; every row is recorded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_handed_over_after_its_delay_when_full_and_when_its_thread_stops() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (trigger, watcher) = crate::drain::channel();
        let (recorder, handle) =
            Recorder::start(RecorderConfig::new(dir.path(), "node-a"), watcher)
                .expect("recorder starts");
        let metrics = Metrics::new(None, None);
        let batch = Arc::new(RowBatch::new(handle.clone(), metrics.clone()));
        drop(handle);
        let on_thread = batch.clone();
        // A data-path thread: its own current-thread runtime, as in `workers`.
        let handed = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let seen = runtime.block_on(async {
                on_thread.push(finished("timer"));
                let waiting = queued(&on_thread);
                tokio::time::sleep(BATCH_DELAY * 10).await;
                let after_delay = queued(&on_thread);
                for i in 0..BATCH_ROWS {
                    on_thread.push(finished(&format!("full-{i}")));
                }
                let after_full = queued(&on_thread);
                on_thread.push(finished("stopped"));
                (waiting, after_delay, after_full, queued(&on_thread))
            });
            // The last row's timer task is dropped with the runtime, before it fires.
            drop(runtime);
            (seen, queued(&on_thread))
        })
        .join()
        .expect("data-path thread");
        assert_eq!(handed, ((1, 0, 0, 1), 0), "(while running), after the stop");
        drop(batch);
        let stats = recorder.join().await.expect("recorder joins");
        drop(trigger);
        assert_eq!(stats.rows, BATCH_ROWS as u64 + 2);
        let rows = crate::recorder::read_dir(dir.path()).expect("read recording");
        let mut ids: Vec<&str> = rows.iter().map(|r| r.audit_id.as_str()).collect();
        ids.sort_unstable();
        assert!(
            ids.contains(&"timer") && ids.contains(&"stopped"),
            "{ids:?}"
        );
        assert_eq!(ids.len(), BATCH_ROWS + 2);
    }
}
