//! Hot reload: the policy file is re-read when it changes (polled, which also sees the
//! symlink swap a Kubernetes ConfigMap volume does) and on SIGHUP, and swapped in
//! atomically. A new text is applied only once it reads the same twice in a row, so a file
//! caught mid-write (which may be valid YAML that lost its last rules) is not applied; an
//! invalid file keeps the policy in force, is logged loudly with file:line, counted, and
//! shown by `chaperone status` until a valid one replaces it.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use sha2::{Digest as _, Sha256};

use super::{Policy, read_policy_file};
use crate::drain::DrainWatcher;

/// How often the file is checked for changes.
pub const POLL_EVERY: Duration = Duration::from_secs(2);
/// How long a changed text must stay the same before it is applied.
pub const SETTLE: Duration = Duration::from_millis(200);

/// Hex SHA-256 of a policy text.
pub fn digest(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Counters of reloads, registered by the admin endpoint's metrics.
#[derive(Debug, Clone, Default)]
pub struct ReloadMetrics {
    /// Policies applied after start-up.
    pub applied: Counter,
    /// New policy texts that did not load (the previous policy stayed in force).
    pub failed: Counter,
}

/// Called with each newly applied policy (the proxy re-checks its open streams).
pub type OnApplied = Box<dyn Fn(&Policy) + Send + Sync>;

/// Watches one policy file and swaps the policy in force.
pub struct Reloader {
    path: PathBuf,
    policy: Arc<ArcSwap<Policy>>,
    metrics: ReloadMetrics,
    on_applied: Option<OnApplied>,
    /// Why the newest text on disk is not in force; `None` when it is.
    last_error: Mutex<Option<(String, String)>>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("path", &self.path)
            .field("on_applied", &self.on_applied.is_some())
            .finish_non_exhaustive()
    }
}

/// What a check found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// The file holds the policy in force.
    Unchanged,
    /// The text is still changing; checked again later.
    Settling,
    /// A new policy is in force.
    Applied,
    /// The new text does not load; the previous policy stays.
    Failed(String),
}

impl Reloader {
    /// A reloader for `path`, swapping into `policy` (which holds what the file held at
    /// start-up).
    pub fn new(path: PathBuf, policy: Arc<ArcSwap<Policy>>, metrics: ReloadMetrics) -> Self {
        Reloader {
            path,
            policy,
            metrics,
            on_applied: None,
            last_error: Mutex::new(None),
        }
    }

    /// Calls `f` with every policy applied from now on, after it is in force.
    pub fn on_applied(mut self, f: impl Fn(&Policy) + Send + Sync + 'static) -> Self {
        self.on_applied = Some(Box::new(f));
        self
    }

    /// Why the file's current text is not in force, if it is not.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(_, e)| e.clone())
    }

    /// Reads the file and applies it if it changed and settled.
    pub async fn check(&self) -> Reload {
        let first = match read_policy_file(&self.path) {
            Ok(text) => text,
            Err(e) => return self.failed(String::new(), e.to_string()),
        };
        let digest = digest(&first);
        if digest == self.policy.load().digest() {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Reload::Unchanged;
        }
        tokio::time::sleep(SETTLE).await;
        match read_policy_file(&self.path) {
            Ok(second) if second == first => {}
            Ok(_) => return Reload::Settling,
            Err(e) => return self.failed(String::new(), e.to_string()),
        }
        match Policy::from_yaml(&first, &self.path.display().to_string()) {
            Ok(policy) => {
                tracing::info!(
                    path = %self.path.display(),
                    rules = policy.rule_count(),
                    digest = %&digest[..12],
                    "policy reloaded"
                );
                let policy = Arc::new(policy);
                self.policy.store(policy.clone());
                self.metrics.applied.inc();
                if let Some(f) = &self.on_applied {
                    f(&policy);
                }
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Reload::Applied
            }
            Err(e) => self.failed(digest, e.to_string()),
        }
    }

    /// Notes a failed reload; logs and counts each bad text once, not every poll.
    fn failed(&self, digest: String, error: String) -> Reload {
        let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        let new = last
            .as_ref()
            .is_none_or(|(d, e)| *d != digest || *e != error);
        if new {
            tracing::error!(
                path = %self.path.display(),
                %error,
                "the new policy does not load; the previous policy stays in force"
            );
            self.metrics.failed.inc();
            *last = Some((digest, error.clone()));
        }
        Reload::Failed(error)
    }

    /// Checks every [`POLL_EVERY`] and on SIGHUP until the drain starts.
    pub async fn run(self: Arc<Self>, drain: DrainWatcher) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler; the policy reloads on change only");
                None
            }
        };
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = drain.signaled() => return,
                _ = tick.tick() => {}
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    tracing::info!(path = %self.path.display(), "SIGHUP: checking the policy file");
                }
            }
            // A text caught changing is read again shortly, not a whole poll later.
            while self.check().await == Reload::Settling {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: deny\nrules:\n  - name: reads\n    action: allow\n    verbs: [get]\n    resources: ['*']\n";

    fn setup(text: &str) -> (tempfile::TempDir, PathBuf, Reloader, Arc<ArcSwap<Policy>>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, text).expect("write");
        let policy = Arc::new(ArcSwap::from_pointee(
            Policy::from_file(&path).expect("initial policy"),
        ));
        let reloader = Reloader::new(path.clone(), policy.clone(), ReloadMetrics::default());
        (dir, path, reloader, policy)
    }

    #[tokio::test]
    async fn a_valid_change_is_applied_and_an_invalid_one_keeps_the_old_policy() {
        let (_dir, path, reloader, policy) = setup(GOOD);
        assert_eq!(reloader.check().await, Reload::Unchanged);
        let before = policy.load().digest().to_owned();

        // Invalid: the old policy stays, the error names file and line, counted once.
        std::fs::write(&path, GOOD.replace("verbs: [get]", "verbs: [remove]")).expect("write");
        let Reload::Failed(e) = reloader.check().await else {
            panic!("an invalid policy must not load");
        };
        assert!(
            e.contains("policy.yaml:7:") && e.contains("unknown verb 'remove'"),
            "{e}"
        );
        assert_eq!(policy.load().digest(), before);
        assert!(reloader.last_error().is_some());
        let _ = reloader.check().await;
        assert_eq!(
            reloader.metrics.failed.get(),
            1,
            "the same bad text counts once"
        );

        // Valid again: applied atomically, error cleared.
        let updated = GOOD.replace("default: deny", "default: allow");
        std::fs::write(&path, &updated).expect("write");
        assert_eq!(reloader.check().await, Reload::Applied);
        assert_eq!(policy.load().digest(), digest(&updated));
        assert_eq!(policy.load().default_action(), super::super::Action::Allow);
        assert_eq!(reloader.last_error(), None);
        assert_eq!(reloader.metrics.applied.get(), 1);
    }

    #[tokio::test]
    async fn a_file_caught_mid_write_is_not_applied() {
        let (_dir, path, reloader, policy) = setup(GOOD);
        let before = policy.load().digest().to_owned();
        // A writer rewrites the file; caught after its first lines, it is a valid policy
        // with no rules.
        let whole = format!(
            "{GOOD}  - name: extra\n    action: deny\n    verbs: [delete]\n    resources: ['*']\n"
        );
        let half: String = GOOD.lines().take(4).map(|l| format!("{l}\n")).collect();
        assert!(
            Policy::from_yaml(&half, "half").is_ok(),
            "the torn file is valid on its own"
        );
        std::fs::write(&path, &half).expect("write");
        let writer = {
            let path = path.clone();
            let whole = whole.clone();
            tokio::spawn(async move {
                tokio::time::sleep(SETTLE / 2).await;
                std::fs::write(&path, whole).expect("write");
            })
        };
        assert_eq!(reloader.check().await, Reload::Settling);
        writer.await.expect("writer");
        assert_eq!(policy.load().digest(), before, "nothing applied mid-write");
        assert_eq!(reloader.check().await, Reload::Applied);
        assert_eq!(policy.load().rule_count(), 2);
    }

    #[tokio::test]
    async fn a_missing_file_keeps_the_policy() {
        let (_dir, path, reloader, policy) = setup(GOOD);
        std::fs::remove_file(&path).expect("remove");
        assert!(matches!(reloader.check().await, Reload::Failed(_)));
        assert_eq!(policy.load().rule_count(), 1);
    }
}
