//! One shutdown primitive for every long-lived task.
//!
//! The app holds a [`DrainTrigger`]; listeners, connections, the recorder and (later) kube
//! watchers each hold a [`DrainWatcher`]. On SIGTERM the trigger signals every watcher,
//! then waits until all of them have been dropped (each task finished its clean-up, e.g.
//! the recorder flushed its Parquet file) or the grace period runs out.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Creates a connected trigger/watcher pair.
pub fn channel() -> (DrainTrigger, DrainWatcher) {
    let (signal_tx, signal_rx) = watch::channel(false);
    let (done_tx, done_rx) = mpsc::channel(1);
    (
        DrainTrigger {
            signal: signal_tx,
            done: done_rx,
        },
        DrainWatcher {
            signal: signal_rx,
            _done: done_tx,
        },
    )
}

/// Starts a drain and waits for it to complete.
#[derive(Debug)]
pub struct DrainTrigger {
    signal: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every watcher was released within the grace period.
    Complete,
    /// The grace period ran out with watchers still held.
    TimedOut,
}

impl DrainTrigger {
    /// Signals every watcher and waits until all are dropped, at most `grace`.
    pub async fn drain(mut self, grace: Duration) -> DrainOutcome {
        // Receivers may all be gone already; then there is nothing to wait for.
        let _ = self.signal.send(true);
        // recv() returns None once every DrainWatcher (each holding a sender) is dropped.
        match tokio::time::timeout(grace, self.done.recv()).await {
            Ok(_) => DrainOutcome::Complete,
            Err(_) => DrainOutcome::TimedOut,
        }
    }
}

/// Held by a task that must finish cleanly before shutdown completes.
#[derive(Debug, Clone)]
pub struct DrainWatcher {
    signal: watch::Receiver<bool>,
    _done: mpsc::Sender<()>,
}

impl DrainWatcher {
    /// Resolves once a drain has started. Cancel-safe: use it in `select!`.
    pub async fn signaled(&self) {
        let mut signal = self.signal.clone();
        // An error means the trigger was dropped without draining: treat that as a drain.
        let _ = signal.wait_for(|drained| *drained).await;
    }

    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_watchers() {
        let (trigger, watcher) = channel();
        let task = tokio::spawn(async move {
            watcher.signaled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(watcher);
            "cleaned up"
        });
        assert_eq!(
            trigger.drain(Duration::from_secs(5)).await,
            DrainOutcome::Complete
        );
        assert_eq!(task.await.unwrap(), "cleaned up");
    }

    #[tokio::test]
    async fn drain_times_out_when_a_watcher_is_held() {
        let (trigger, watcher) = channel();
        let held = watcher.clone();
        drop(watcher);
        assert_eq!(
            trigger.drain(Duration::from_millis(50)).await,
            DrainOutcome::TimedOut
        );
        assert!(held.is_draining());
    }
}
