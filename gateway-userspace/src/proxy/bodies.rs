//! Body wrappers on the streaming path: counting request bytes, metering responses for the
//! record, ending watches cleanly on drain, and masking pod logs as they stream.

use std::{
    future::Future as _,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::{BoxError, ProxyBody, record::RecordGuard};
use crate::masking::{
    detect::Detectors,
    stream::{LOG_HOLD, LineMasker},
};

/// A response body that ends (cleanly, not with an error) once the drain starts.
pub(super) struct EndOnDrain {
    pub(super) inner: ProxyBody,
    pub(super) drained: Pin<Box<WaitForCancellationFutureOwned>>,
    pub(super) ended: bool,
    /// Keeps the stream registered for policy re-checks while the body lives.
    pub(super) live: Option<Arc<super::live::LiveGuard>>,
}

impl EndOnDrain {
    pub(super) fn new(inner: ProxyBody, draining: CancellationToken) -> Self {
        Self {
            inner,
            drained: Box::pin(draining.cancelled_owned()),
            ended: false,
            live: None,
        }
    }

    /// Ends on `stop` (the drain, or a reload that denies the stream), keeping the
    /// stream registered until the body is dropped.
    pub(super) fn live(inner: ProxyBody, stop: super::live::LiveStop) -> Self {
        let mut body = Self::new(inner, stop.stop);
        body.live = Some(stop.guard);
        body
    }
}

impl Body for EndOnDrain {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            // Whatever the upstream already sent is passed on before the stream ends.
            Poll::Pending if this.drained.as_mut().poll(cx).is_ready() => {
                this.ended = true;
                Poll::Ready(None)
            }
            polled => polled,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.ended {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        }
    }
}

/// A response body that counts bytes and owns the [`RecordGuard`].
pub(super) struct Metered {
    pub(super) inner: ProxyBody,
    pub(super) guard: RecordGuard,
}

impl Metered {
    pub(super) fn new(inner: ProxyBody, guard: RecordGuard) -> Self {
        Self { inner, guard }
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.guard.response_bytes += data.len() as u64;
            if let Some(capture) = this.guard.capture.as_mut() {
                capture.push(data);
            }
            // hyper stops polling a body that says it has ended.
            this.guard.complete |= this.inner.is_end_stream();
        }
        if let Poll::Ready(None) = &polled {
            this.guard.complete = true;
        }
        if let Poll::Ready(Some(Err(e))) = &polled
            && let Some(record) = this.guard.pending.as_mut()
        {
            record.error = Some(format!("response body: {e}"));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that counts the bytes the client sent.
pub(super) struct CountingBody {
    pub(super) inner: ProxyBody,
    pub(super) count: Arc<AtomicU64>,
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A `pods/log` response body masked line by line as it streams ([`LineMasker`]): each
/// completed line goes out as soon as it is masked; a partial line is held until its
/// newline, [`LOG_HOLD`]'s bound or delay, or the end of the body.
pub(super) struct MaskedLog {
    inner: ProxyBody,
    masker: LineMasker,
    /// Fires when a held partial line has waited [`LOG_HOLD`]'s delay.
    hold: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Trailers (rare) wait until the held bytes are out.
    trailers: Option<Frame<Bytes>>,
    ended: bool,
    masked: Arc<AtomicU64>,
}

impl MaskedLog {
    pub(super) fn new(inner: ProxyBody, detectors: Detectors, masked: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            masker: LineMasker::new(detectors, LOG_HOLD.max_bytes),
            hold: None,
            trailers: None,
            ended: false,
            masked,
        }
    }

    fn data(&mut self, out: Vec<u8>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.masked.store(self.masker.masked(), Ordering::Relaxed);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))))
    }
}

impl Body for MaskedLog {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.ended {
                let mut out = Vec::new();
                this.masker.flush(&mut out);
                if !out.is_empty() {
                    return this.data(out);
                }
                return Poll::Ready(this.trailers.take().map(Ok));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let mut out = Vec::with_capacity(data.len());
                        this.masker.push(&data, &mut out);
                        if this.masker.pending() == 0 {
                            this.hold = None;
                        } else if this.hold.is_none() {
                            this.hold = Some(Box::pin(tokio::time::sleep(LOG_HOLD.max_delay)));
                        }
                        if !out.is_empty() {
                            return this.data(out);
                        }
                    }
                    Err(trailers) => {
                        this.trailers = Some(trailers);
                        this.ended = true;
                    }
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => {
                    // A partial line waited long enough: send it (masked) as it is.
                    if let Some(hold) = this.hold.as_mut()
                        && hold.as_mut().poll(cx).is_ready()
                    {
                        this.hold = None;
                        let mut out = Vec::new();
                        this.masker.flush(&mut out);
                        if !out.is_empty() {
                            return this.data(out);
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.masker.pending() == 0 && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Masking changes the length.
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{BodyExt as _, StreamBody};
    use tokio::sync::mpsc;

    use super::*;
    use crate::masking::detect::{DetectorsSpec, tests::fixtures};

    /// A log body that ends only when the sender is dropped, like `kubectl logs -f`.
    fn follow() -> (
        mpsc::UnboundedSender<&'static str>,
        MaskedLog,
        Arc<AtomicU64>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel::<&'static str>();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|s| (Ok::<_, BoxError>(Frame::data(Bytes::from(s))), rx))
        });
        let detectors = Detectors::compile(&DetectorsSpec::default()).expect("detectors");
        let masked = Arc::new(AtomicU64::new(0));
        let body = MaskedLog::new(StreamBody::new(stream).boxed(), detectors, masked.clone());
        (tx, body, masked)
    }

    async fn next(body: &mut MaskedLog, within: Duration) -> Option<String> {
        let frame = tokio::time::timeout(within, body.frame())
            .await
            .ok()??
            .expect("no error");
        Some(String::from_utf8_lossy(frame.data_ref().expect("data")).into_owned())
    }

    #[tokio::test]
    async fn a_log_that_never_ends_yields_each_line_at_once() {
        let (tx, mut body, masked) = follow();
        let token: &'static str =
            Box::leak(format!("pushing with {}\n", fixtures::github_token()).into_boxed_str());
        tx.send("first line\nsecond ").unwrap();
        assert_eq!(
            next(&mut body, Duration::from_millis(100)).await.as_deref(),
            Some("first line\n")
        );
        tx.send("line\n").unwrap();
        tx.send(token).unwrap();
        assert_eq!(
            next(&mut body, Duration::from_millis(100)).await.as_deref(),
            Some("second line\n")
        );
        assert_eq!(
            next(&mut body, Duration::from_millis(100)).await.as_deref(),
            Some("pushing with **masked:github-token**\n")
        );
        assert_eq!(masked.load(Ordering::Relaxed), 1);
        // A partial line (a prompt) goes out after the hold delay, not never.
        tx.send("waiting for input: ").unwrap();
        let started = std::time::Instant::now();
        assert_eq!(
            next(&mut body, Duration::from_secs(5)).await.as_deref(),
            Some("waiting for input: ")
        );
        assert!(started.elapsed() >= LOG_HOLD.max_delay);
        // Nothing else until more is logged: the body is still open.
        assert_eq!(next(&mut body, Duration::from_millis(50)).await, None);
        assert!(!body.is_end_stream());
        tx.send("tail without newline").unwrap();
        drop(tx);
        assert_eq!(
            next(&mut body, Duration::from_millis(100)).await.as_deref(),
            Some("tail without newline")
        );
        assert!(body.frame().await.is_none(), "ended");
    }
}
