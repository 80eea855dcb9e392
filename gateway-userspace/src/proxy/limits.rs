//! Per-workload connection limits and the idle timer of a connection.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::ebpf::ConnectionOrigin;

use super::ProxyBody;

/// A share of a connection slot: an upgraded stream outlives its HTTP connection and keeps
/// counting against the workload's limit until it ends.
#[derive(Clone)]
pub(super) struct SlotHold {
    /// Only held: the slot is given back when the last share is dropped.
    pub(super) _slot: Arc<ConnectionSlot>,
}

impl std::fmt::Debug for SlotHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlotHold")
    }
}

/// Whose connections count against `limits.maxConnectionsPerWorkload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum WorkloadKey {
    /// The cgroup the kernel saw making the connection.
    Cgroup(u64),
    /// The client address, when there is no kernel origin.
    Source(IpAddr),
}

impl WorkloadKey {
    pub(super) fn of(origin: Option<&ConnectionOrigin>, peer: SocketAddr) -> Self {
        match origin {
            Some(origin) => Self::Cgroup(origin.cgroup_id),
            None => Self::Source(peer.ip()),
        }
    }
}

impl std::fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cgroup(id) => write!(f, "cgroup {id}"),
            Self::Source(ip) => write!(f, "source {ip}"),
        }
    }
}

/// Counts open connections per workload; `max == 0` means no limit.
#[derive(Debug)]
pub(super) struct ConnectionLimiter {
    pub(super) max: u32,
    pub(super) open: Mutex<HashMap<WorkloadKey, u32>>,
}

impl ConnectionLimiter {
    pub(super) fn new(max: u32) -> Self {
        Self {
            max,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one more connection of `key`, or None when it is at the limit.
    pub(super) fn try_acquire(self: &Arc<Self>, key: WorkloadKey) -> Option<ConnectionSlot> {
        // A poisoned map only means a panic elsewhere held the lock; the counts are intact.
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(key).or_insert(0);
        if self.max != 0 && *count >= self.max {
            if *count == 0 {
                open.remove(&key);
            }
            return None;
        }
        *count += 1;
        Some(ConnectionSlot {
            limiter: self.clone(),
            key,
        })
    }
}

/// One open connection's place in its workload's count, given back on drop.
#[derive(Debug)]
pub(super) struct ConnectionSlot {
    pub(super) limiter: Arc<ConnectionLimiter>,
    pub(super) key: WorkloadKey,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.limiter.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// How many requests a connection has in progress and when it was last busy, for the idle
/// timeout. A request only touches two atomics and reads the clock once; the idle timer
/// re-arms itself from them when it fires. (A watch channel here woke the connection's
/// task, and with it the HTTP/2 connection, twice per request, and armed a fresh timer
/// each time the connection went quiet.)
#[derive(Debug)]
pub(crate) struct Activity {
    active: AtomicUsize,
    /// When the last request ended, in nanoseconds after `since`.
    last_end: AtomicU64,
    since: tokio::time::Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            active: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
            since: tokio::time::Instant::now(),
        }
    }
}

impl Activity {
    pub(crate) fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(self.clone())
    }

    fn end(&self) {
        let ended = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_end.fetch_max(ended, Ordering::Relaxed);
        // Release: whoever sees the count drop also sees the end time stored above.
        self.active.fetch_sub(1, Ordering::Release);
    }

    /// Resolves once no request has been in progress for `timeout`.
    pub(crate) async fn idle_for(&self, timeout: Duration) {
        loop {
            let now = tokio::time::Instant::now();
            let deadline = if self.active.load(Ordering::Acquire) > 0 {
                now + timeout
            } else {
                self.since + Duration::from_nanos(self.last_end.load(Ordering::Relaxed)) + timeout
            };
            if deadline <= now {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// One request in progress; dropped when its response body is done or abandoned.
#[derive(Debug)]
pub(crate) struct ActiveGuard(Arc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A response body that keeps its connection counted as busy.
pub(crate) struct ActiveBody<B = ProxyBody> {
    pub(crate) inner: B,
    pub(crate) _active: ActiveGuard,
}

impl<B: Body<Data = Bytes> + Unpin> Body for ActiveBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    #[test]
    fn connection_limiter_counts_per_workload_and_frees_slots() {
        let ip = |s: &str| WorkloadKey::Source(s.parse().unwrap());
        let limiter = Arc::new(ConnectionLimiter::new(2));
        let a1 = limiter.try_acquire(WorkloadKey::Cgroup(7)).expect("first");
        let a2 = limiter.try_acquire(WorkloadKey::Cgroup(7)).expect("second");
        assert!(
            limiter.try_acquire(WorkloadKey::Cgroup(7)).is_none(),
            "third connection of cgroup 7 was allowed"
        );
        let other = limiter.try_acquire(WorkloadKey::Cgroup(8));
        assert!(other.is_some(), "another cgroup must not share the count");
        let by_ip = limiter.try_acquire(ip("127.0.0.1"));
        assert!(by_ip.is_some(), "source addresses are counted separately");
        drop(a1);
        let a3 = limiter.try_acquire(WorkloadKey::Cgroup(7));
        assert!(a3.is_some(), "a closed connection did not free its slot");
        drop((a2, a3, other, by_ip));
        let open = limiter.open.lock().unwrap();
        assert!(open.is_empty(), "counts left behind: {open:?}");
        drop(open);

        let unlimited = Arc::new(ConnectionLimiter::new(0));
        let slots: Vec<_> = (0..1000)
            .map(|_| unlimited.try_acquire(WorkloadKey::Cgroup(1)))
            .collect();
        assert!(slots.iter().all(Option::is_some), "0 must mean no limit");
    }

    #[tokio::test]
    async fn idle_timer_restarts_after_the_last_request_ends() {
        let activity = Arc::new(Activity::default());
        let guard = activity.begin();
        let idle = activity.idle_for(Duration::from_millis(100));
        tokio::pin!(idle);
        tokio::select! {
            _ = &mut idle => panic!("idle while a request was in progress"),
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        drop(guard);
        let ended = Instant::now();
        idle.await;
        let waited = ended.elapsed();
        assert!(
            waited >= Duration::from_millis(100) && waited < Duration::from_secs(2),
            "idle after {waited:?}, expected about 100ms after the request ended"
        );
    }

    /// Requests that come and go keep the connection open: the timer counts from the end
    /// of the last one, not from when it was armed.
    #[tokio::test]
    async fn every_finished_request_pushes_the_idle_deadline_back() {
        let activity = Arc::new(Activity::default());
        let timeout = Duration::from_millis(200);
        let idle = activity.idle_for(timeout);
        tokio::pin!(idle);
        let mut last_end = Instant::now();
        for _ in 0..4 {
            tokio::select! {
                _ = &mut idle => panic!("idle {:?} after a request ended", last_end.elapsed()),
                _ = tokio::time::sleep(Duration::from_millis(120)) => {}
            }
            drop(activity.begin());
            last_end = Instant::now();
        }
        idle.await;
        let waited = last_end.elapsed();
        assert!(
            waited >= timeout && waited < Duration::from_secs(2),
            "idle {waited:?} after the last request, expected about {timeout:?}"
        );
    }
}
