//! The gateway side of approval: a request decided `approve` becomes (or joins) an
//! `AccessRequest`, waits for a sealed decision, and is released, refused or expired.
//!
//! * [`Holder::hold`] fingerprints the request, lets it through if a lasting grant covers
//!   it, else reuses a Pending `AccessRequest` of the same workload and fingerprint (found
//!   by labels, so a restarted gateway finds it too) or creates one with the gateway's
//!   credential, capped per workload. In `hold` mode it waits for the decision until the
//!   request's expiry (then writes a sealed `Expired`); in `async` mode it answers at once.
//! * [`Holder::run_watcher`] watches the AccessRequests of the gateway's namespace (kube-rs
//!   watcher) and releases held requests when one is decided, whichever node decided. A
//!   decision counts only when its seal verifies with the [`SealKey`]; any other is
//!   ignored, logged and counted as a tampering attempt.
//!
//! Fail closed everywhere: an AccessRequest that cannot be created or read refuses the
//! request (503 naming why); nothing is forwarded without a verified approval. A client
//! that disconnects while held simply stops waiting (the future is dropped); its
//! AccessRequest stays and an identical retry reuses it.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use prometheus_client::metrics::counter::Counter;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use super::{
    resource::{
        AccessRequest, AccessRequestSpec, AccessRequestStatus, Grant, GrantScope, Phase,
        RequestedAction, Requester, StatusCondition, WorkloadRef,
    },
    seal::SealKey,
};
use crate::policy::{Approval, ApprovalMode, GrantSpec};

/// Label holding the first 40 hex digits of the request's fingerprint.
pub const FINGERPRINT_LABEL: &str = "chaperone.dev/fingerprint";
/// Label holding a hash of the requesting workload (`namespace/pod`).
pub const WORKLOAD_LABEL: &str = "chaperone.dev/workload";
/// Who an expiry is attributed to.
pub const EXPIRY_DECIDER: &str = "chaperone";
/// Default cap on pending AccessRequests per workload.
pub const DEFAULT_MAX_PENDING_PER_WORKLOAD: usize = 10;
/// Default cap on requests of one workload held at once on one gateway.
pub const DEFAULT_MAX_WAITING_PER_WORKLOAD: usize = 32;
/// The status condition that marks a `once` approval used.
pub const CONSUMED: &str = "Consumed";
/// How long one call to the API server may take before the request is refused.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a held request reads its AccessRequest itself, besides the watch: a decision
/// reaches it even while the watcher is failing.
pub const DEFAULT_DECISION_POLL: Duration = Duration::from_secs(15);

/// What the holder needs to know besides the API client.
#[derive(Debug, Clone)]
pub struct HolderConfig {
    /// The namespace AccessRequests live in (the gateway's own).
    pub namespace: String,
    /// This node's name (written into the AccessRequests it creates).
    pub node: String,
    /// The key that seals decisions.
    pub seal_key: SealKey,
    /// Most AccessRequests pending at once for one workload; more are refused.
    pub max_pending_per_workload: usize,
    /// Most requests of one workload held on this gateway at once (waiting for a decision,
    /// or for their turn to ask for one); more are refused with 429. Identical requests
    /// share one AccessRequest, so the pending cap alone does not bound them, and each
    /// keeps its body in memory while it waits.
    pub max_waiting_per_workload: usize,
    /// How often a held request reads its AccessRequest itself, so a decision reaches it
    /// while the watcher fails ([`DEFAULT_DECISION_POLL`]).
    pub decision_poll: Duration,
    /// This node's durable record of the `once` approvals it used (see
    /// [`super::used`]); `None` keeps only the status mark and memory.
    pub used: Option<Arc<super::used::UsedLog>>,
}

/// One request decided `approve`, as the holder needs it.
#[derive(Debug, Clone)]
pub struct HoldRequest<'a> {
    /// The rule that asked for approval.
    pub rule: &'a str,
    /// Its approval settings.
    pub approval: &'a Approval,
    /// The calling workload (empty names when unknown).
    pub workload: WorkloadRef,
    /// The principal behind the agent's token, if verified.
    pub principal: Option<String>,
    /// HTTP method.
    pub method: &'a str,
    /// The path with its query as sent, unmasked: what the fingerprint covers (the
    /// AccessRequest shows `action.path`, masked).
    pub target: &'a str,
    /// What was asked (verb, resource, path, summary).
    pub action: RequestedAction,
    /// The body's `Content-Type` as forwarded (empty when none).
    pub content_type: &'a str,
    /// The request body as forwarded, read whole (empty when none).
    pub body: &'a [u8],
}

/// What marking a `once` approval used came to.
enum Consumption {
    /// This call marked it: the request goes through on it.
    Done,
    /// It was used already (here or by another gateway), or no longer holds an approval.
    Taken,
    /// It could not be marked (an API error or timeout): not used, and nothing goes
    /// through on it now.
    Failed(String),
}

/// How holding a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldOutcome {
    /// Approved: forward it.
    Approved {
        /// The AccessRequest that was approved (the one whose grant applied).
        name: String,
        /// Who approved.
        decided_by: Option<String>,
        /// How long the request waited.
        waited: Duration,
        /// Whether a lasting grant let it through without a new decision.
        via_grant: bool,
    },
    /// Denied by an approver.
    Denied {
        /// The AccessRequest.
        name: String,
        /// Who denied.
        decided_by: Option<String>,
        /// The approver's comment.
        comment: Option<String>,
        /// How long the request waited.
        waited: Duration,
    },
    /// Nobody decided in time.
    Expired {
        /// The AccessRequest.
        name: String,
        /// How long the request waited.
        waited: Duration,
    },
    /// `async` mode: the AccessRequest waits; the client was told to retry.
    Queued {
        /// The AccessRequest.
        name: String,
    },
    /// Approved for one request (`once`), and an identical request that waited on the
    /// same AccessRequest went through on it: refuse this one (sending it again asks anew).
    Used {
        /// The AccessRequest.
        name: String,
        /// Who approved.
        decided_by: Option<String>,
        /// How long the request waited.
        waited: Duration,
    },
    /// The request could not be held (API error, too many pending): refuse it.
    Failed {
        /// Why, for the client.
        why: String,
    },
    /// The gateway is stopping: the request waited and is answered without a decision;
    /// the AccessRequest stays pending for the client's retry.
    Interrupted {
        /// The AccessRequest.
        name: String,
        /// How long the request waited.
        waited: Duration,
    },
    /// The workload has `max_waiting_per_workload` requests held already: refuse this one
    /// until some are decided (nothing was asked of the API server).
    Busy {
        /// Why, for the client.
        why: String,
    },
}

/// A verified decision on one AccessRequest.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verdict {
    phase: Phase,
    decided_by: Option<String>,
    comment: Option<String>,
}

/// A lasting approval.
#[derive(Debug, Clone)]
struct GrantEntry {
    name: String,
    decided_by: Option<String>,
    /// [`grantee_key`]: the workload and the principal it was approved for.
    grantee: String,
    fingerprint: String,
    rule: String,
    scope: GrantScope,
    until: jiff::Timestamp,
}

#[derive(Default)]
struct State {
    /// Verified decisions (and waiters) by AccessRequest name.
    verdicts: HashMap<String, watch::Sender<Option<Verdict>>>,
    grants: Vec<GrantEntry>,
    /// `once` approvals already used (async retries).
    consumed: HashSet<String>,
    /// When each AccessRequest seen expires, to forget it a day after (see `forget_old`).
    expiry: HashMap<String, jiff::Timestamp>,
    /// Decisions observed since the last `forget_old`.
    observed: usize,
    /// One lock per workload, held from listing its AccessRequests to creating one, so
    /// that concurrent holds neither pass the pending cap together nor create duplicates
    /// of one request (and page approvers twice).
    creating: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Holds in progress per workload key (see `HolderConfig::max_waiting_per_workload`).
    waiting: HashMap<String, usize>,
}

/// How long past its expiry an AccessRequest is remembered: longer than any `once`
/// approval stays usable (decided before the expiry, usable for the rule's timeout, at
/// most a day, after the decision).
const REMEMBER_AFTER_EXPIRY: jiff::SignedDuration = jiff::SignedDuration::from_hours(25);

impl State {
    /// Forgets AccessRequests long expired that nobody waits on, so the maps do not grow
    /// with every request the namespace ever held.
    fn forget_old(&mut self, now: jiff::Timestamp) {
        let Some(cutoff) = now.checked_sub(REMEMBER_AFTER_EXPIRY).ok() else {
            return;
        };
        let old: Vec<String> = self
            .expiry
            .iter()
            .filter(|(name, expires)| {
                **expires < cutoff
                    && self
                        .verdicts
                        .get(*name)
                        .is_none_or(|tx| tx.receiver_count() == 0)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in old {
            self.expiry.remove(&name);
            self.verdicts.remove(&name);
            self.consumed.remove(&name);
        }
    }
}

/// Holds requests for approval and releases them on sealed decisions.
pub struct Holder {
    api: Api<AccessRequest>,
    cfg: HolderConfig,
    notifier: Option<super::notify::Notifier>,
    state: Mutex<State>,
    tampering: AtomicU64,
    tampering_metric: Mutex<Option<prometheus_client::metrics::counter::Counter>>,
    /// Whether the AccessRequest watcher is current: set by its events, cleared by its
    /// errors (and false until it runs); while it is not, held requests poll.
    watch_current: std::sync::atomic::AtomicBool,
    /// Cancelled when the gateway stops: held requests are answered at once.
    stopping: tokio_util::sync::CancellationToken,
    /// The gateway's `chaperone_approval_requests_deleted_total` and
    /// `chaperone_approval_cleanup_failures_total`, when counted.
    cleanup_metrics: std::sync::OnceLock<(Counter, Counter)>,
    /// The gateway's `chaperone_approval_waiting` gauge, when counted.
    waiting_metric: std::sync::OnceLock<prometheus_client::metrics::gauge::Gauge>,
}

/// One hold in progress of a workload (see `HolderConfig::max_waiting_per_workload`);
/// dropped when the hold ends, also when the client goes away mid-wait.
struct WaitSlot<'a> {
    holder: &'a Holder,
    wkey: String,
}

impl Drop for WaitSlot<'_> {
    fn drop(&mut self) {
        let mut state = self.holder.lock();
        if let Some(n) = state.waiting.get_mut(&self.wkey) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                state.waiting.remove(&self.wkey);
            }
        }
        drop(state);
        if let Some(g) = self.holder.waiting_metric.get() {
            g.dec();
        }
    }
}

impl std::fmt::Debug for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holder")
            .field("namespace", &self.cfg.namespace)
            .field("node", &self.cfg.node)
            .finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// What makes two requests "the identical request" for an approval.
pub struct Identity<'a> {
    /// The calling workload; the pod's UID, when known, is part of it: the same request
    /// from a pod created again under the same name is another request.
    pub workload: &'a WorkloadRef,
    /// The verified principal behind the token, when there is one: under principal
    /// impersonation it is whom the API server sees, so an approval shown for one
    /// principal must not let through the same request sent with another's token.
    pub principal: Option<&'a str>,
    /// The rule that asked for approval: after a policy reload, a request another rule
    /// holds (with other approvers) is another request.
    pub rule: &'a str,
}

/// Hex SHA-256 over the workload, the principal, the rule, the method, the path with its
/// query, the body's `Content-Type` and the body, each length-prefixed: "the identical
/// request". The media type belongs to it: the same bytes as a merge patch (which replaces
/// whole lists) and as a strategic merge patch do different things.
pub fn fingerprint(
    who: &Identity<'_>,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> String {
    let mut h = Sha256::new();
    let absent: &[u8] = &[];
    for field in [
        who.workload.namespace.as_bytes(),
        who.workload.pod.as_bytes(),
        method.as_bytes(),
        path.as_bytes(),
        content_type.as_bytes(),
        body,
        // Optional fields as a presence byte and the value, so "none" and "" differ.
        &[u8::from(who.workload.uid.is_some())],
        who.workload.uid.as_deref().map_or(absent, str::as_bytes),
        &[u8::from(who.principal.is_some())],
        who.principal.map_or(absent, str::as_bytes),
        who.rule.as_bytes(),
    ] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field);
    }
    hex(&h.finalize())
}

/// Whom a lasting grant is for: the workload and the principal it was approved for.
fn grantee_key(w: &WorkloadRef, principal: Option<&str>) -> String {
    match principal {
        Some(p) => format!("{} as {p:?}", workload_key(w)),
        None => workload_key(w),
    }
}

/// `namespace/pod`, and the pod's UID when known: what pending counts and grants are
/// kept by.
fn workload_key(w: &WorkloadRef) -> String {
    match &w.uid {
        Some(uid) => format!("{}/{} (uid {uid})", w.namespace, w.pod),
        None => format!("{}/{}", w.namespace, w.pod),
    }
}

/// Whether the kernel attributed the request to a pod. Lasting grants apply only then:
/// every caller the gateway could not attribute would share one.
fn identified(w: &WorkloadRef) -> bool {
    !w.namespace.is_empty() && !w.pod.is_empty()
}

/// The label AccessRequests are listed by: a hash of `namespace/pod` (not the UID, so the
/// pending cap holds for a pod created again under the same name; the fingerprint, which
/// includes the UID, tells their requests apart).
fn workload_label(w: &WorkloadRef) -> String {
    let digest = Sha256::digest(format!("{}/{}", w.namespace, w.pod).as_bytes());
    hex(&digest)[..40].to_owned()
}

/// Until when the (sealed) decision in `ar`'s status lets identical requests through: its
/// `grantUntil`, at most [`crate::policy::MAX_GRANT`] after the decision. `None`: `once`.
fn grant_until(ar: &AccessRequest) -> Option<jiff::Timestamp> {
    let status = ar.status.as_ref()?;
    parse_time(status.grant_until.as_deref())
        .map(|until| until.min(grant_cap(status.decided_at.as_deref())))
}

/// The latest a grant decided at `decided_at` (sealed) may run to: the longest grant a
/// policy may give (`policy::MAX_GRANT`) after the decision, whatever the status says. A
/// decision without a time gets no window.
fn grant_cap(decided_at: Option<&str>) -> jiff::Timestamp {
    let max = jiff::SignedDuration::try_from(crate::policy::MAX_GRANT).unwrap_or_default();
    parse_time(decided_at)
        .and_then(|t| t.checked_add(max).ok())
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

fn now() -> jiff::Timestamp {
    jiff::Timestamp::now()
}

fn parse_time(text: Option<&str>) -> Option<jiff::Timestamp> {
    text.and_then(|t| t.parse().ok())
}

/// Whether an approved `once` request may still be used by a retry (async mode): for as
/// long after its approval as the approver had to decide (`expiresAt - createdAt`), so an
/// approval nobody used does not wait for an identical request indefinitely.
fn once_usable(ar: &AccessRequest, t: jiff::Timestamp) -> bool {
    let (Some(created), Some(expires), Some(decided)) = (
        parse_time(Some(ar.spec.created_at.as_str())),
        parse_time(Some(ar.spec.expires_at.as_str())),
        parse_time(ar.status.as_ref().and_then(|s| s.decided_at.as_deref())),
    ) else {
        return false;
    };
    let window = expires.duration_since(created);
    decided.checked_add(window).is_ok_and(|until| t < until)
}

fn lasting(grant: GrantSpec) -> Grant {
    match grant {
        GrantSpec::Once => Grant::default(),
        GrantSpec::For { duration, scope } => Grant {
            duration: Some(format!("{}s", duration.as_secs())),
            scope,
        },
    }
}

impl Holder {
    /// A holder creating and watching AccessRequests through `client` (the gateway's
    /// credential).
    pub fn new(client: kube::Client, cfg: HolderConfig) -> Arc<Self> {
        Self::with_notifier(client, cfg, None)
    }

    /// Like [`Holder::new`], telling `notifier` about every AccessRequest it creates.
    pub fn with_notifier(
        client: kube::Client,
        cfg: HolderConfig,
        notifier: Option<super::notify::Notifier>,
    ) -> Arc<Self> {
        Arc::new(Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            notifier,
            state: Mutex::new(State::default()),
            tampering: AtomicU64::new(0),
            tampering_metric: Mutex::new(None),
            waiting_metric: std::sync::OnceLock::new(),
            cleanup_metrics: std::sync::OnceLock::new(),
            watch_current: std::sync::atomic::AtomicBool::new(false),
            stopping: tokio_util::sync::CancellationToken::new(),
        })
    }

    /// Also counts tampering attempts in `counter` (the gateway's
    /// `chaperone_approval_tampering_attempts_total`).
    pub fn count_tampering_in(&self, counter: prometheus_client::metrics::counter::Counter) {
        *self
            .tampering_metric
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(counter);
    }

    /// Also counts the requests held right now in `gauge` (the gateway's
    /// `chaperone_approval_waiting`).
    pub fn count_waiting_in(&self, gauge: prometheus_client::metrics::gauge::Gauge) {
        let _ = self.waiting_metric.set(gauge);
    }

    /// Answers every request waiting for a decision now (the gateway stops): each gets
    /// [`HoldOutcome::Interrupted`], and holds that start later too.
    pub fn stop_waiting(&self) {
        self.stopping.cancel();
    }

    /// Whether the AccessRequest watcher is current (see `watch_current`).
    pub fn watch_is_current(&self) -> bool {
        self.watch_current.load(Ordering::Acquire)
    }

    /// Also counts the AccessRequests [`Holder::run_janitor`] deletes in `deleted`, and
    /// its failed rounds in `failures`.
    pub fn count_cleanup_in(&self, deleted: Counter, failures: Counter) {
        let _ = self.cleanup_metrics.set((deleted, failures));
    }

    /// Requests held on this gateway right now (all workloads).
    pub fn waiting(&self) -> usize {
        self.lock().waiting.values().sum()
    }

    /// Takes one of `wkey`'s hold slots, or says why there is none.
    fn wait_slot(&self, wkey: &str) -> Result<WaitSlot<'_>, String> {
        let mut state = self.lock();
        let n = state.waiting.entry(wkey.to_owned()).or_default();
        if *n >= self.cfg.max_waiting_per_workload {
            return Err(format!(
                "workload {wkey} already has {n} requests held for approval on this node (the limit is {}); wait for them to be decided",
                self.cfg.max_waiting_per_workload
            ));
        }
        *n += 1;
        drop(state);
        if let Some(g) = self.waiting_metric.get() {
            g.inc();
        }
        Ok(WaitSlot {
            holder: self,
            wkey: wkey.to_owned(),
        })
    }

    /// The namespace AccessRequests live in.
    pub fn namespace(&self) -> &str {
        &self.cfg.namespace
    }

    /// Decisions seen without a valid seal so far (each is also logged).
    pub fn tampering_attempts(&self) -> u64 {
        self.tampering.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for `wkey`'s turn to look up and create AccessRequests (see
    /// `State::creating`); the turn ends when the guard is dropped.
    async fn turn(&self, wkey: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut state = self.lock();
            // Locks nobody holds or waits for are dropped as others are taken.
            state.creating.retain(|_, l| Arc::strong_count(l) > 1);
            state.creating.entry(wkey.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// The verified decision on `ar`, if it is decided and sealed; a decided status
    /// without a valid seal is counted as tampering and ignored.
    fn verified(&self, ar: &AccessRequest) -> Option<Verdict> {
        match self.check(ar) {
            Ok(verdict) => verdict,
            Err(what) => {
                self.tampered(ar, &what);
                None
            }
        }
    }

    /// The verified decision on `ar` (`None`: undecided, or decided on a request from
    /// before spec seals); the error says what is wrong with a decision without a valid
    /// seal.
    fn check(&self, ar: &AccessRequest) -> Result<Option<Verdict>, String> {
        let Some(status) = ar.status.as_ref() else {
            return Ok(None);
        };
        if !status.phase.is_decided() {
            return Ok(None);
        }
        let decision = self.cfg.seal_key.verify(ar, status);
        if decision.is_ok()
            && self.cfg.seal_key.verify_spec(ar) == Err(super::seal::SealError::Missing)
        {
            // Decided by a gateway on a request created before specs were sealed: not
            // honoured (its spec cannot be vouched for), but not tampering either.
            tracing::debug!(
                access_request = ar.metadata.name.as_deref().unwrap_or(""),
                "an AccessRequest from before spec seals is ignored"
            );
            return Ok(None);
        }
        if let Err(e) = decision.and_then(|()| self.cfg.seal_key.verify_spec(ar)) {
            return Err(format!(
                "a {} decision by {:?} without a valid seal is ignored ({e})",
                status.phase.as_str(),
                status.decided_by.as_deref().unwrap_or("")
            ));
        }
        Ok(Some(Verdict {
            phase: status.phase,
            decided_by: status.decided_by.clone(),
            comment: status.comment.clone(),
        }))
    }

    /// Takes note of an AccessRequest as it is now: a verified decision releases its
    /// waiters, and an approval with `grantUntil` opens a grant window.
    fn observe(&self, ar: &AccessRequest) {
        let Some(verdict) = self.verified(ar) else {
            return;
        };
        let Some(name) = ar.metadata.name.clone() else {
            return;
        };
        let mut state = self.lock();
        if verdict.phase == Phase::Approved
            && identified(&ar.spec.requester.workload)
            && let Some(until) = grant_until(ar)
            && until > now()
            && !state.grants.iter().any(|g| g.name == name)
        {
            state.grants.push(GrantEntry {
                name: name.clone(),
                decided_by: verdict.decided_by.clone(),
                grantee: grantee_key(
                    &ar.spec.requester.workload,
                    ar.spec.requester.principal.as_deref(),
                ),
                fingerprint: ar.spec.fingerprint.clone(),
                rule: ar.spec.rule.clone(),
                scope: ar.spec.grant.scope,
                until,
            });
        }
        if let Some(expires) = parse_time(Some(ar.spec.expires_at.as_str())) {
            state.expiry.insert(name.clone(), expires);
        }
        state
            .verdicts
            .entry(name)
            .or_insert_with(|| watch::channel(None).0)
            .send_replace(Some(verdict));
        state.observed += 1;
        if state.observed >= 1024 {
            state.observed = 0;
            state.forget_old(now());
        }
    }

    /// Deletes AccessRequests nothing needs any more, so the namespace (and every hold's
    /// lookup) does not grow with every request ever held: those whose expiry, and grant
    /// window if any, ended more than `retention` ago. Each gateway deletes the ones its
    /// node created; any gateway deletes those left twice as long (their node is gone).
    /// Returns how many were deleted; an error when the list or a delete failed.
    pub async fn sweep(&self, retention: Duration) -> Result<usize, String> {
        let Ok(retention) = jiff::SignedDuration::try_from(retention) else {
            return Ok(0);
        };
        let t = now();
        let (Ok(own_cutoff), Ok(any_cutoff)) = (
            t.checked_sub(retention),
            t.checked_sub(retention.saturating_mul(2)),
        ) else {
            return Ok(0);
        };
        let mut params = ListParams::default().limit(500);
        let mut deleted = 0;
        loop {
            let page = tokio::time::timeout(API_TIMEOUT, self.api.list(&params))
                .await
                .map_err(|_| "listing AccessRequests timed out".to_owned())?
                .map_err(|e| format!("cannot list AccessRequests: {e}"))?;
            for ar in &page.items {
                // An object without a readable expiry is not judged: left alone.
                let Some(expires) = parse_time(Some(ar.spec.expires_at.as_str())) else {
                    continue;
                };
                let ended = grant_until(ar).map_or(expires, |g| g.max(expires));
                let cutoff = if ar.spec.node == self.cfg.node {
                    own_cutoff
                } else {
                    any_cutoff
                };
                if ended >= cutoff {
                    continue;
                }
                let (Some(name), Some(uid)) = (&ar.metadata.name, &ar.metadata.uid) else {
                    continue;
                };
                let params = kube::api::DeleteParams {
                    preconditions: Some(kube::api::Preconditions {
                        uid: Some(uid.clone()),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match tokio::time::timeout(API_TIMEOUT, self.api.delete(name, &params)).await {
                    Ok(Ok(_)) => deleted += 1,
                    // Deleted meanwhile (by another gateway), or replaced: nothing to do.
                    Ok(Err(kube::Error::Api(e))) if e.code == 404 || e.code == 409 => {}
                    Ok(Err(e)) => return Err(format!("cannot delete AccessRequest {name}: {e}")),
                    Err(_) => return Err(format!("deleting AccessRequest {name} timed out")),
                }
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(deleted),
            }
        }
    }

    /// Runs [`Holder::sweep`] every `every` (the first after a part of it drawn from the
    /// node's name, so gateways started together do not list together) until the task is
    /// dropped.
    pub async fn run_janitor(self: Arc<Self>, retention: Duration, every: Duration) {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::hash::DefaultHasher::new();
        self.cfg.node.hash(&mut hasher);
        let first = every.mul_f64((hasher.finish() % 1000) as f64 / 1000.0);
        tokio::time::sleep(first).await;
        loop {
            let swept = self.sweep(retention).await;
            match &swept {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    deleted = n,
                    namespace = %self.cfg.namespace,
                    "deleted AccessRequests past their retention"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "AccessRequests past their retention are not deleted (the gateway needs delete on accessrequests)"
                ),
            }
            if let Some((deleted, failures)) = self.cleanup_metrics.get() {
                match swept {
                    Ok(n) => {
                        deleted.inc_by(n as u64);
                    }
                    Err(_) => {
                        failures.inc();
                    }
                }
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Watches the namespace's AccessRequests until the stream ends (it retries with
    /// backoff on errors, so practically until the task is dropped).
    pub async fn run_watcher(self: Arc<Self>) {
        use kube::runtime::{WatchStreamExt as _, watcher};
        let mut events =
            std::pin::pin!(watcher(self.api.clone(), watcher::Config::default()).default_backoff());
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::InitApply(ar) | watcher::Event::Apply(ar)) => {
                    self.observe(&ar);
                    self.watch_current.store(true, Ordering::Release);
                }
                Ok(watcher::Event::InitDone | watcher::Event::Delete(_)) => {
                    self.watch_current.store(true, Ordering::Release);
                }
                Ok(watcher::Event::Init) => {}
                Err(e) => {
                    self.watch_current.store(false, Ordering::Release);
                    tracing::warn!(error = %e, "watching AccessRequests failed; retrying (held requests read their AccessRequest meanwhile)")
                }
            }
        }
        self.watch_current.store(false, Ordering::Release);
    }

    fn grant_for(&self, grantee: &str, fingerprint: &str, rule: &str) -> Option<GrantEntry> {
        let mut state = self.lock();
        let t = now();
        state.grants.retain(|g| g.until > t);
        state
            .grants
            .iter()
            .find(|g| {
                g.grantee == grantee
                    && match g.scope {
                        GrantScope::Identical => g.fingerprint == fingerprint,
                        GrantScope::Rule => g.rule == rule,
                    }
            })
            .cloned()
    }

    /// Holds `req` until it is decided (see the module doc).
    pub async fn hold(&self, req: &HoldRequest<'_>) -> HoldOutcome {
        let started = Instant::now();
        let fp = fingerprint(
            &Identity {
                workload: &req.workload,
                principal: req.principal.as_deref(),
                rule: req.rule,
            },
            req.method,
            req.target,
            req.content_type,
            req.body,
        );
        let wkey = workload_key(&req.workload);
        if identified(&req.workload)
            && let Some(g) = self.grant_for(
                &grantee_key(&req.workload, req.principal.as_deref()),
                &fp,
                req.rule,
            )
        {
            return HoldOutcome::Approved {
                name: g.name,
                decided_by: g.decided_by,
                waited: Duration::ZERO,
                via_grant: true,
            };
        }
        // Taken before anything else (a grant above needs no holding): a workload over
        // its cap costs the API server nothing.
        let _slot = match self.wait_slot(&wkey) {
            Ok(slot) => slot,
            Err(why) => return HoldOutcome::Busy { why },
        };
        let wlabel = workload_label(&req.workload);
        let turn = self.turn(&wkey).await;
        let listed = tokio::time::timeout(
            API_TIMEOUT,
            self.api
                .list(&ListParams::default().labels(&format!("{WORKLOAD_LABEL}={wlabel}"))),
        )
        .await;
        let existing = match listed {
            Ok(Ok(list)) => list.items,
            Ok(Err(e)) => {
                return HoldOutcome::Failed {
                    why: format!(
                        "cannot look up AccessRequests in namespace {}: {e}",
                        self.cfg.namespace
                    ),
                };
            }
            Err(_) => {
                return HoldOutcome::Failed {
                    why: format!(
                        "looking up AccessRequests in namespace {} timed out",
                        self.cfg.namespace
                    ),
                };
            }
        };
        let t = now();
        let live = |ar: &&AccessRequest| {
            parse_time(Some(ar.spec.expires_at.as_str())).is_some_and(|e| e > t)
        };
        let pending =
            |ar: &&AccessRequest| ar.status.as_ref().is_none_or(|s| s.phase == Phase::Pending);
        // A decided identical request: an async retry after approval (or a denial). A
        // `once` approval lets one request through, across gateways and restarts: it is
        // marked consumed in its status (a condition, outside the seal) before it is used.
        let mut reuse: Option<AccessRequest> = None;
        for ar in existing.iter().filter(|ar| ar.spec.fingerprint == fp) {
            if let Some(v) = self.verified(ar) {
                if v.phase != Phase::Approved {
                    continue;
                }
                let name = ar.metadata.name.clone().unwrap_or_default();
                let lasting = grant_until(ar).filter(|_| identified(&req.workload));
                let usable = match lasting {
                    // A lasting grant: usable while it runs (observe() records it).
                    Some(until) => until > now(),
                    // A grant to a caller no pod was found for lets one request through,
                    // as a `once` approval does: every such caller would share it.
                    None => {
                        // Taken here first (as a waiter takes it), so that two holds on
                        // this gateway cannot both get past the checks below.
                        if once_usable(ar, now())
                            && self.lock().consumed.insert(name.clone())
                            && !self.used_here(ar)
                        {
                            match self.consume(ar).await {
                                Consumption::Done => true,
                                Consumption::Taken => false,
                                // Not used: a retry may still go through on it.
                                Consumption::Failed(why) => {
                                    self.lock().consumed.remove(&name);
                                    return HoldOutcome::Failed { why };
                                }
                            }
                        } else {
                            false
                        }
                    }
                };
                if usable && lasting.is_none() {
                    self.lock().consumed.insert(name.clone());
                    match self.record_used(ar).await {
                        Ok(true) => {}
                        Ok(false) => {
                            // Marked used in the status just now, yet used here before:
                            // the mark had been removed.
                            self.tampered(ar, "the Consumed mark of a once approval used on this node was removed");
                            continue;
                        }
                        Err(why) => return HoldOutcome::Failed { why },
                    }
                }
                if usable {
                    self.observe(ar);
                    self.lock().consumed.insert(name.clone());
                    return HoldOutcome::Approved {
                        name,
                        decided_by: v.decided_by,
                        waited: started.elapsed(),
                        via_grant: lasting.is_some(),
                    };
                }
            } else if live(&ar) && pending(&ar) && self.cfg.seal_key.verify_spec(ar).is_ok() {
                // Only a request a gateway created: any other spec is someone else's.
                reuse = Some(ar.clone());
            }
        }
        let ar = match reuse {
            Some(ar) => ar,
            None => {
                // Only requests a gateway created count: forged ones must not use up the cap.
                let pending_count = existing
                    .iter()
                    .filter(live)
                    .filter(pending)
                    .filter(|ar| self.cfg.seal_key.verify_spec(ar).is_ok())
                    .count();
                if pending_count >= self.cfg.max_pending_per_workload {
                    return HoldOutcome::Failed {
                        why: format!(
                            "workload {wkey} already has {pending_count} AccessRequests pending (the limit is {}); wait for them to be decided",
                            self.cfg.max_pending_per_workload
                        ),
                    };
                }
                match self.create(req, &fp, &wlabel).await {
                    Ok(ar) => ar,
                    Err(why) => return HoldOutcome::Failed { why },
                }
            }
        };
        // Created or found: the next hold of this workload lists it.
        drop(turn);
        let name = ar.metadata.name.clone().unwrap_or_default();
        if req.approval.mode == ApprovalMode::Async {
            return HoldOutcome::Queued { name };
        }
        let expires = parse_time(Some(ar.spec.expires_at.as_str())).unwrap_or(t);
        let wait = Duration::try_from(expires.duration_since(now())).unwrap_or_default();
        let mut rx = self
            .lock()
            .verdicts
            .entry(name.clone())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        let decided = tokio::select! {
            decided = tokio::time::timeout(wait, self.decision(&name, &mut rx)) => decided.ok(),
            // The gateway stops: the request is answered now, not at the end of the drain;
            // its AccessRequest stays pending, and the client's retry (through the next
            // gateway) waits on it.
            () = self.stopping.cancelled() => {
                return HoldOutcome::Interrupted { name, waited: started.elapsed() };
            }
        };
        let verdict = match decided {
            Some(v) => Some(v),
            // Timed out (or the sender went away, which the map prevents): expire it.
            None => self.expire(&name).await,
        };
        let waited = started.elapsed();
        match verdict {
            Some(v) if v.phase == Phase::Approved => {
                // Identical requests that arrived together wait on one AccessRequest. A
                // lasting grant lets them all through; a `once` approval lets one through:
                // the waiter that marks it used, first on this gateway and then in its
                // status (written with its resourceVersion, so across gateways too). If it
                // cannot be marked used, nothing goes through on it (fail closed).
                let first_here = self.lock().consumed.insert(name.clone());
                let fetched = tokio::time::timeout(API_TIMEOUT, self.api.get(&name)).await;
                // What the request goes through on is the object as read now, its decision
                // sealed: the verdict waited on may be an earlier one, of a request whose
                // status was since written back to `Pending` by hand (and picked up again).
                let approved = |ar: &AccessRequest| {
                    self.verified(ar)
                        .is_some_and(|v| v.phase == Phase::Approved)
                };
                // A grant to a caller no pod was found for counts as `once` (see `identified`).
                let lasting = |ar: &AccessRequest| {
                    identified(&req.workload) && grant_until(ar).is_some_and(|until| until > now())
                };
                match &fetched {
                    Ok(Ok(ar)) if !approved(ar) => {
                        if ar.status.as_ref().is_none_or(|s| !s.phase.is_decided()) {
                            self.tampered(
                                ar,
                                "an approved AccessRequest was written back to undecided",
                            );
                        }
                        return HoldOutcome::Failed {
                            why: format!(
                                "AccessRequest {name} no longer holds a sealed approval; the request is not forwarded"
                            ),
                        };
                    }
                    Ok(Ok(ar)) if lasting(ar) => {}
                    Ok(Ok(ar)) if first_here && !self.used_here(ar) => {
                        match self.consume(ar).await {
                            Consumption::Done => {}
                            Consumption::Taken => {
                                return HoldOutcome::Used {
                                    name,
                                    decided_by: v.decided_by,
                                    waited,
                                };
                            }
                            // Not used: an identical retry may still go through on it.
                            Consumption::Failed(why) => {
                                self.lock().consumed.remove(&name);
                                return HoldOutcome::Failed { why };
                            }
                        }
                        match self.record_used(ar).await {
                            Ok(true) => {}
                            Ok(false) => {
                                return HoldOutcome::Used {
                                    name,
                                    decided_by: v.decided_by,
                                    waited,
                                };
                            }
                            Err(why) => return HoldOutcome::Failed { why },
                        }
                    }
                    Ok(Ok(_)) => {
                        return HoldOutcome::Used {
                            name,
                            decided_by: v.decided_by,
                            waited,
                        };
                    }
                    Ok(Err(e)) => {
                        if first_here {
                            self.lock().consumed.remove(&name);
                        }
                        return HoldOutcome::Failed {
                            why: format!(
                                "AccessRequest {name} was approved, but cannot be read back to mark it used: {e}"
                            ),
                        };
                    }
                    Err(_) => {
                        if first_here {
                            self.lock().consumed.remove(&name);
                        }
                        return HoldOutcome::Failed {
                            why: format!(
                                "AccessRequest {name} was approved, but reading it back to mark it used timed out"
                            ),
                        };
                    }
                }
                HoldOutcome::Approved {
                    name,
                    decided_by: v.decided_by,
                    waited,
                    via_grant: false,
                }
            }
            Some(v) if v.phase == Phase::Denied => HoldOutcome::Denied {
                name,
                decided_by: v.decided_by,
                comment: v.comment,
                waited,
            },
            _ => HoldOutcome::Expired { name, waited },
        }
    }

    /// Whether this node's record says `ar` was used here (the status mark can be undone
    /// by whoever may write the status; this record cannot). A use recorded here on a
    /// request whose status lacks the mark is counted as tampering.
    fn used_here(&self, ar: &AccessRequest) -> bool {
        let uid = ar.metadata.uid.as_deref().unwrap_or_default();
        let used = self.cfg.used.as_ref().is_some_and(|log| log.contains(uid));
        let marked = ar
            .status
            .as_ref()
            .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == CONSUMED));
        if used && !marked {
            self.tampered(
                ar,
                "the Consumed mark of a once approval used on this node was removed",
            );
        }
        used
    }

    /// Counts and logs an attempt to make the gateway honour what nobody decided.
    fn tampered(&self, ar: &AccessRequest, what: &str) {
        self.tampering.fetch_add(1, Ordering::Relaxed);
        if let Some(counter) = &*self
            .tampering_metric
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            counter.inc();
        }
        tracing::warn!(
            access_request = ar.metadata.name.as_deref().unwrap_or(""),
            "tampering attempt: {what}"
        );
    }

    /// Writes `ar`'s use into this node's record, synced, before the request goes on:
    /// `Ok(false)` when the record has it already (used before: refuse), the error when it
    /// cannot be written (refuse too).
    async fn record_used(&self, ar: &AccessRequest) -> Result<bool, String> {
        let Some(log) = self.cfg.used.clone() else {
            return Ok(true);
        };
        let name = ar.metadata.name.clone().unwrap_or_default();
        let uid = ar.metadata.uid.clone().unwrap_or_default();
        let forget_after = parse_time(Some(ar.spec.expires_at.as_str()))
            .and_then(|e| e.checked_add(REMEMBER_AFTER_EXPIRY).ok())
            .unwrap_or(jiff::Timestamp::MAX);
        let written = tokio::task::spawn_blocking(move || log.record(&uid, forget_after)).await;
        match written {
            Ok(Ok(fresh)) => Ok(fresh),
            Ok(Err(e)) => Err(format!(
                "AccessRequest {name} was approved, but its use cannot be recorded on this node: {e}"
            )),
            Err(e) => Err(format!(
                "AccessRequest {name} was approved, but recording its use failed: {e}"
            )),
        }
    }

    /// Marks a `once` approval used: condition `Consumed` in its status, written with the
    /// object's resourceVersion, so one gateway wins across all of them. A conflict from
    /// another change of the object (a label, an annotation) is retried on the object as
    /// read again; an error leaves it unused (fail closed: nothing goes through on it now,
    /// an identical retry may).
    async fn consume(&self, ar: &AccessRequest) -> Consumption {
        let name = ar.metadata.name.clone().unwrap_or_default();
        let mut ar = ar.clone();
        for _ in 0..3 {
            let Some(mut status) = ar.status.clone() else {
                return Consumption::Taken;
            };
            if status.conditions.iter().any(|c| c.type_ == CONSUMED)
                || self
                    .verified(&ar)
                    .is_none_or(|v| v.phase != Phase::Approved)
            {
                return Consumption::Taken;
            }
            status.conditions.push(StatusCondition {
                type_: CONSUMED.to_owned(),
                status: "True".to_owned(),
                reason: "Used".to_owned(),
                message: format!(
                    "the approved request went through on node {}",
                    self.cfg.node
                ),
                last_transition_time: now().to_string(),
            });
            let mut updated = ar.clone();
            updated.status = Some(status);
            let written = tokio::time::timeout(
                API_TIMEOUT,
                self.api
                    .replace_status(&name, &PostParams::default(), &updated),
            )
            .await;
            match written {
                Ok(Ok(_)) => return Consumption::Done,
                // Changed meanwhile: read it again and look once more.
                Ok(Err(kube::Error::Api(e))) if e.code == 409 => {
                    match tokio::time::timeout(API_TIMEOUT, self.api.get(&name)).await {
                        Ok(Ok(fresh)) => ar = fresh,
                        Ok(Err(e)) => {
                            return Consumption::Failed(format!(
                                "AccessRequest {name} was approved, but cannot be read again to mark it used: {e}"
                            ));
                        }
                        Err(_) => {
                            return Consumption::Failed(format!(
                                "AccessRequest {name} was approved, but reading it again to mark it used timed out"
                            ));
                        }
                    }
                }
                Ok(Err(e)) => {
                    return Consumption::Failed(format!(
                        "AccessRequest {name} was approved, but it cannot be marked used: {e}"
                    ));
                }
                Err(_) => {
                    return Consumption::Failed(format!(
                        "AccessRequest {name} was approved, but marking it used timed out"
                    ));
                }
            }
        }
        Consumption::Failed(format!(
            "AccessRequest {name} was approved, but it kept changing while being marked used"
        ))
    }

    async fn create(
        &self,
        req: &HoldRequest<'_>,
        fp: &str,
        wlabel: &str,
    ) -> Result<AccessRequest, String> {
        let t = now();
        let expires = t
            .checked_add(jiff::SignedDuration::try_from(req.approval.timeout).unwrap_or_default())
            .unwrap_or(t);
        let mut ar = AccessRequest::new(
            "",
            AccessRequestSpec {
                requester: Requester {
                    workload: req.workload.clone(),
                    principal: req.principal.clone(),
                },
                request: req.action.clone(),
                fingerprint: fp.to_owned(),
                rule: req.rule.to_owned(),
                approvers: req.approval.approvers.clone(),
                // An unattributed caller is offered no window: approvers then cannot give
                // one (the approvals API refuses `for` on a `once` request).
                grant: if identified(&req.workload) {
                    lasting(req.approval.grant)
                } else {
                    Grant::default()
                },
                node: self.cfg.node.clone(),
                created_at: t.to_string(),
                expires_at: expires.to_string(),
            },
        );
        ar.metadata.name = None;
        let prefix = match req.workload.pod.as_str() {
            "" => "unknown".to_owned(),
            pod => pod.chars().take(40).collect::<String>(),
        };
        ar.metadata.generate_name = Some(format!("{}-", prefix.trim_end_matches('-')));
        ar.metadata.namespace = Some(self.cfg.namespace.clone());
        let spec_seal = self
            .cfg
            .seal_key
            .seal_spec(&ar)
            .map_err(|e| format!("cannot seal the AccessRequest's spec: {e}"))?;
        ar.metadata.annotations =
            Some([(super::seal::SPEC_SEAL_ANNOTATION.to_owned(), spec_seal)].into());
        ar.metadata.labels = Some(
            [
                (FINGERPRINT_LABEL.to_owned(), fp[..40].to_owned()),
                (WORKLOAD_LABEL.to_owned(), wlabel.to_owned()),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    "chaperone".to_owned(),
                ),
            ]
            .into(),
        );
        match tokio::time::timeout(API_TIMEOUT, self.api.create(&PostParams::default(), &ar)).await
        {
            Ok(Ok(created)) => {
                tracing::info!(
                    access_request = created.metadata.name.as_deref().unwrap_or(""),
                    rule = req.rule,
                    summary = %req.action.summary,
                    "request held for approval"
                );
                if let Some(notifier) = &self.notifier {
                    notifier.created(&created);
                }
                Ok(created)
            }
            Ok(Err(e)) => Err(format!(
                "cannot create the AccessRequest in namespace {}: {e}",
                self.cfg.namespace
            )),
            Err(_) => Err(format!(
                "creating the AccessRequest in namespace {} timed out",
                self.cfg.namespace
            )),
        }
    }

    /// Waits for the decision on `name`: from the watcher (through `rx`), or, while the
    /// watcher is not current (not started, or failing since its last event), from
    /// reading the AccessRequest every `decision_poll`, so a decision reaches the held
    /// request anyway.
    async fn decision(&self, name: &str, rx: &mut watch::Receiver<Option<Verdict>>) -> Verdict {
        loop {
            // The watch's answer, taken out of its lock before anything else is awaited.
            let watched =
                match tokio::time::timeout(self.cfg.decision_poll, rx.wait_for(Option::is_some))
                    .await
                {
                    Ok(Ok(v)) => Ok(v.clone()),
                    Ok(Err(_)) => Err(true),
                    Err(_) => Err(false),
                };
            let closed = match watched {
                Ok(Some(v)) => return v,
                Ok(None) => continue,
                // The watcher is current: its events bring the decision.
                Err(false) if self.watch_current.load(Ordering::Acquire) => continue,
                Err(closed) => closed,
            };
            // The sender went away (the map keeps it while anyone waits), or the watch
            // said nothing for a while: read it. A read that fails is retried at the next
            // poll; the expiry bounds the wait. A decision without a valid seal is counted
            // once, by the watcher, not at every poll.
            if let Ok(Ok(ar)) = tokio::time::timeout(API_TIMEOUT, self.api.get(name)).await
                && let Ok(Some(v)) = self.check(&ar)
            {
                self.observe(&ar);
                return v;
            }
            if closed {
                tokio::time::sleep(self.cfg.decision_poll).await;
            }
        }
    }

    /// Writes a sealed `Expired` unless a verified decision got there first, and returns
    /// the decision that stands.
    async fn expire(&self, name: &str) -> Option<Verdict> {
        for _ in 0..3 {
            let ar = match tokio::time::timeout(API_TIMEOUT, self.api.get(name)).await {
                Ok(Ok(ar)) => ar,
                // Cannot read it: the request stays refused (expired) locally.
                _ => return None,
            };
            if let Some(v) = self.verified(&ar) {
                self.observe(&ar);
                return Some(v);
            }
            let t = now().to_string();
            let mut status = AccessRequestStatus {
                phase: Phase::Expired,
                decided_by: Some(EXPIRY_DECIDER.to_owned()),
                decided_at: Some(t.clone()),
                comment: Some("nobody decided before the request expired".to_owned()),
                conditions: vec![StatusCondition {
                    type_: "Decided".to_owned(),
                    status: "True".to_owned(),
                    reason: "Expired".to_owned(),
                    message: "nobody decided before the request expired".to_owned(),
                    last_transition_time: t,
                }],
                ..AccessRequestStatus::default()
            };
            status.seal = self.cfg.seal_key.seal(&ar, &status).ok();
            let mut updated = ar.clone();
            updated.status = Some(status);
            match tokio::time::timeout(
                API_TIMEOUT,
                self.api
                    .replace_status(name, &PostParams::default(), &updated),
            )
            .await
            {
                Ok(Ok(_)) => return None,
                // A conflict: someone wrote first; read again.
                Ok(Err(kube::Error::Api(e))) if e.code == 409 => continue,
                _ => return None,
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload() -> WorkloadRef {
        WorkloadRef {
            namespace: "agents".into(),
            pod: "agent-0".into(),
            service_account: None,
            uid: None,
        }
    }

    #[test]
    fn the_fingerprint_covers_every_part_of_the_request() {
        let agent = workload();
        let who = Identity {
            workload: &agent,
            principal: Some("bob"),
            rule: "scale-down",
        };
        let path = "/apis/apps/v1/namespaces/d/deployments/x";
        let smp = "application/strategic-merge-patch+json";
        let body: &[u8] = br#"{"spec":{}}"#;
        let base = fingerprint(&who, "PATCH", path, smp, body);
        let other_pod = WorkloadRef {
            pod: "agent-1".into(),
            ..workload()
        };
        let recreated = WorkloadRef {
            uid: Some("a2".into()),
            ..workload()
        };
        let same = |f: fn(&mut Identity<'_>)| {
            let mut changed = Identity { ..who };
            f(&mut changed);
            changed
        };
        for (what, changed) in [
            (
                "pod",
                fingerprint(
                    &Identity {
                        workload: &other_pod,
                        ..same(|_| {})
                    },
                    "PATCH",
                    path,
                    smp,
                    body,
                ),
            ),
            (
                "pod UID",
                fingerprint(
                    &Identity {
                        workload: &recreated,
                        ..same(|_| {})
                    },
                    "PATCH",
                    path,
                    smp,
                    body,
                ),
            ),
            (
                "principal",
                fingerprint(
                    &same(|w| w.principal = Some("mallory")),
                    "PATCH",
                    path,
                    smp,
                    body,
                ),
            ),
            (
                "no principal",
                fingerprint(&same(|w| w.principal = None), "PATCH", path, smp, body),
            ),
            (
                "empty principal",
                fingerprint(&same(|w| w.principal = Some("")), "PATCH", path, smp, body),
            ),
            (
                "rule",
                fingerprint(&same(|w| w.rule = "other-rule"), "PATCH", path, smp, body),
            ),
            ("method", fingerprint(&who, "PUT", path, smp, body)),
            (
                "path",
                fingerprint(
                    &who,
                    "PATCH",
                    "/apis/apps/v1/namespaces/d/deployments/y",
                    smp,
                    body,
                ),
            ),
            (
                "content type",
                fingerprint(&who, "PATCH", path, "application/merge-patch+json", body),
            ),
            (
                "body",
                fingerprint(&who, "PATCH", path, smp, br#"{"spec":{"replicas":0}}"#),
            ),
        ] {
            assert_ne!(changed, base, "{what}");
        }
        assert_eq!(fingerprint(&who, "PATCH", path, smp, body), base);
    }

    #[test]
    fn requests_long_expired_are_forgotten_unless_someone_waits() {
        let at = |s: &str| s.parse::<jiff::Timestamp>().expect("time");
        let mut state = State::default();
        for name in ["old", "waited-on", "recent"] {
            state
                .verdicts
                .insert(name.to_owned(), watch::channel(None).0);
            state.consumed.insert(name.to_owned());
        }
        state
            .expiry
            .insert("old".into(), at("2026-12-01T00:00:00Z"));
        state
            .expiry
            .insert("waited-on".into(), at("2026-12-01T00:00:00Z"));
        state
            .expiry
            .insert("recent".into(), at("2026-12-04T12:00:00Z"));
        let _waiter = state.verdicts["waited-on"].subscribe();
        state.forget_old(at("2026-12-05T00:00:00Z"));
        let mut kept: Vec<&str> = state.verdicts.keys().map(String::as_str).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["recent", "waited-on"]);
        assert!(!state.consumed.contains("old") && state.consumed.contains("recent"));
        assert!(!state.expiry.contains_key("old"));
    }

    #[test]
    fn an_unused_once_approval_lasts_as_long_as_the_decision_could_take() {
        let mut ar = AccessRequest::new(
            "ar-1",
            crate::approval::resource::AccessRequestSpec {
                requester: Default::default(),
                request: Default::default(),
                fingerprint: "f00d".into(),
                rule: "r".into(),
                approvers: Default::default(),
                grant: Default::default(),
                node: "node-a".into(),
                created_at: "2026-12-03T20:00:00Z".into(),
                expires_at: "2026-12-03T20:05:00Z".into(),
            },
        );
        let at = |s: &str| s.parse::<jiff::Timestamp>().expect("time");
        assert!(!once_usable(&ar, at("2026-12-03T20:01:00Z")), "not decided");
        ar.status = Some(AccessRequestStatus {
            phase: Phase::Approved,
            decided_at: Some("2026-12-03T20:04:00Z".into()),
            ..AccessRequestStatus::default()
        });
        assert!(once_usable(&ar, at("2026-12-03T20:08:59Z")));
        assert!(!once_usable(&ar, at("2026-12-03T20:09:00Z")));
        assert!(!once_usable(&ar, at("2026-12-10T20:00:00Z")), "days later");
    }
}
