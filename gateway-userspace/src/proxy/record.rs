//! The one row per request: sent when the exchange is over, with the masked response
//! object when one was captured.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use crate::{
    admin::Metrics,
    masking::{self, objects::MaskReport},
    recorder::{RecorderHandle, RequestRecord},
};

use super::{Proxy, body};

/// Sends the row when the exchange is over: when the response body has been fully sent,
/// or when it is dropped (client went away, watch closed, local response).
pub(super) struct RecordGuard {
    pub(super) pending: Option<(RecorderHandle, RequestRecord)>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) started: Instant,
    pub(super) request_bytes: Arc<AtomicU64>,
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

impl RecordGuard {
    pub(super) fn new(
        proxy: &Proxy,
        record: RequestRecord,
        started: Instant,
        request_bytes: Arc<AtomicU64>,
    ) -> Self {
        Self {
            pending: Some((proxy.recorder.clone(), record)),
            metrics: proxy.metrics.clone(),
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
        let Some((recorder, mut record)) = self.pending.take() else {
            return;
        };
        record.latency_us = i64::try_from(self.started.elapsed().as_micros()).unwrap_or(i64::MAX);
        if record.response_time.is_none() {
            record.response_time = Some(jiff::Timestamp::now());
        }
        record.request_bytes = self.request_bytes.load(Ordering::Relaxed) as i64;
        record.response_bytes = self.response_bytes as i64;
        if let Some(masked) = &self.masked_streamed {
            let n = i32::try_from(masked.load(Ordering::Relaxed)).unwrap_or(i32::MAX);
            record.masked_fields = record.masked_fields.saturating_add(n);
        }
        let audit_id = record.audit_id.clone();
        self.metrics.count_request(record.decision, record.outcome);
        let metrics = self.metrics.clone();
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
        // Drop cannot await; the recorder applies back-pressure inside the task instead.
        let handle = recorder.clone();
        handle.spawn(async move {
            // Decoding and masking happen here, off the response's path.
            if let Some(capture) = capture {
                record_response_object(&mut record, capture, max_object_bytes, response_masked);
            }
            if let Err(e) = recorder.record(record).await {
                metrics.recording_failures.inc();
                tracing::error!(%audit_id, error = %e, "request could not be recorded");
            }
        });
    }
}

/// Puts a captured response body into the record, masked and size-capped.
pub(super) fn record_response_object(
    record: &mut RequestRecord,
    capture: body::Capture,
    max_bytes: usize,
    already_masked: bool,
) {
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
