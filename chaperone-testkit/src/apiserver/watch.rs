//! Watch streams: newline-terminated JSON `WatchEvent`s, flushed one by one, as
//! `apiserver/pkg/endpoints/handlers/watch.go` writes them.
//!
//! The stream ends cleanly when `timeoutSeconds` elapses, when the client goes away, and
//! when the server shuts down. An expired resourceVersion is a 200 with a single ERROR
//! event (410 `Expired`), not an HTTP 410. Periodic bookmarks are not sent (clients treat
//! them as optional); the `k8s.io/initial-events-end` bookmark after `sendInitialEvents`
//! is.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::{
    Body,
    store::{Event, Scope, Subscription},
    table::{self, TableOptions},
};
use gateway_userspace::{drain::DrainWatcher, status::Status};

/// How event objects are encoded.
#[derive(Debug, Clone, Copy)]
pub(crate) enum WatchFormat {
    /// The objects themselves.
    Json,
    /// One-row Tables (column definitions on the first event only).
    Table(TableOptions),
}

/// What the stream sends and for how long.
pub(crate) struct WatchPlan {
    /// Which objects.
    pub scope: Scope,
    /// The registered subscription.
    pub sub: Subscription,
    /// Encoding.
    pub format: WatchFormat,
    /// `timeoutSeconds` (or the server's default).
    pub timeout: Duration,
    /// Send the `k8s.io/initial-events-end` bookmark after the initial events.
    pub initial_events_end: bool,
}

fn line(event_type: &str, object: Value) -> Bytes {
    let mut bytes =
        serde_json::to_vec(&json!({"type": event_type, "object": object})).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

struct Encoder {
    format: WatchFormat,
    columns_sent: bool,
}

impl Encoder {
    fn event(&mut self, event: &Event) -> Bytes {
        let object = match self.format {
            WatchFormat::Json => event.object.clone(),
            WatchFormat::Table(opts) => {
                let rv = event.rv.to_string();
                let with_columns = !self.columns_sent;
                self.columns_sent = true;
                table::table(
                    event.res,
                    std::slice::from_ref(&event.object),
                    &rv,
                    "",
                    opts,
                    with_columns,
                )
            }
        };
        line(event.kind.as_str(), object)
    }
}

fn expired(message: String) -> Bytes {
    let status = Status::failure(StatusCode::GONE, "Expired", message);
    line(
        "ERROR",
        serde_json::from_slice(&status.to_json()).unwrap_or(Value::Null),
    )
}

/// Starts the stream: a spawned task feeds the response body until the stream ends.
pub(crate) fn respond(plan: WatchPlan, drain: DrainWatcher) -> Response<Body> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(run(plan, tx, drain));
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    });
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

async fn run(plan: WatchPlan, tx: mpsc::Sender<Bytes>, drain: DrainWatcher) {
    let WatchPlan {
        scope,
        mut sub,
        format,
        timeout,
        initial_events_end,
    } = plan;
    if let Some(message) = sub.expired.take() {
        // The receiver may be gone already; then there is nobody to tell.
        let _ = tx.send(expired(message)).await;
        return;
    }
    let mut encoder = Encoder {
        format,
        columns_sent: false,
    };
    for event in &sub.initial {
        if tx.send(encoder.event(event)).await.is_err() {
            return;
        }
    }
    if initial_events_end {
        let bookmark = json!({
            "kind": scope.res.kind,
            "apiVersion": scope.res.api_version(),
            "metadata": {"resourceVersion": sub.rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}},
        });
        if tx.send(line("BOOKMARK", bookmark)).await.is_err() {
            return;
        }
    }
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        let next: Arc<Event> = tokio::select! {
            () = &mut deadline => return,
            () = drain.signaled() => return,
            () = tx.closed() => return,
            received = sub.live.recv() => match received {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // This watcher fell behind the event buffer: like a cache watcher that
                    // is too slow, end with Expired so the client relists.
                    let _ = tx.send(expired("too old resource version: watch fell behind".into())).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if scope.matches(next.res, &next.object) && tx.send(encoder.event(&next)).await.is_err() {
            return;
        }
    }
}

/// The server's default watch length when `timeoutSeconds` is absent (the API server
/// picks between 30 and 60 minutes).
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);
