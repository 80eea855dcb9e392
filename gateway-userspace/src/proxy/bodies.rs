//! Body wrappers on the streaming path: counting request bytes, metering responses for the
//! record, and ending watches cleanly on drain.

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

/// A response body that ends (cleanly, not with an error) once the drain starts.
pub(super) struct EndOnDrain {
    pub(super) inner: ProxyBody,
    pub(super) drained: Pin<Box<WaitForCancellationFutureOwned>>,
    pub(super) ended: bool,
}

impl EndOnDrain {
    pub(super) fn new(inner: ProxyBody, draining: CancellationToken) -> Self {
        Self {
            inner,
            drained: Box::pin(draining.cancelled_owned()),
            ended: false,
        }
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
            && let Some((_, record)) = this.guard.pending.as_mut()
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
