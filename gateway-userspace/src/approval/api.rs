//! The approvals API: where people decide on held requests.
//!
//! An HTTPS listener (`approval.api`), run by every gateway and reached through the
//! `chaperone-approvals` Service in front of the DaemonSet. Endpoints (JSON; errors are
//! Kubernetes `Status` objects):
//!
//! * `GET /v1/accessrequests` lists the AccessRequests (`?watch=true` streams changes as
//!   one JSON watch event per line: `{"type":"ADDED","object":{...}}`, until
//!   `timeoutSeconds` or 30 to 60 minutes have passed, or until the gateway's own watch
//!   fails: then an `ERROR` event with a `Status` ends it, as the API server's do);
//! * `GET /v1/accessrequests/{name}` reads one;
//! * `POST /v1/accessrequests/{name}/approve` with `{"for":"15m","comment":"..."}`;
//! * `POST /v1/accessrequests/{name}/deny` with `{"comment":"..."}`;
//! * `GET /healthz` (no credential).
//!
//! Who may do what is decided the Kubernetes way. The approver presents an OIDC ID token or
//! a Kubernetes token as a bearer token; it is verified with the gateway's
//! [`PrincipalVerifier`] (TokenReview for Kubernetes tokens). A SubjectAccessReview then
//! asks the API server whether that user may `get`/`list`/`watch`, or `approve` (both
//! decisions, as for CSR signers), `accessrequests.chaperone.dev` in the gateway's
//! namespace, and for a decision the user (or one of their groups) must also be on the
//! request's approvers list. Nobody decides on their own request, and connections from
//! intercepted workloads are refused outright: the agent must not approve itself.
//!
//! A decision is written to the AccessRequest's `status` subresource with the gateway's
//! credential, sealed with the [`SealKey`]; the write carries the `resourceVersion` that
//! was read, so of two approvers racing only one wins and the other gets 409 Conflict.
//! Every decision attempt is recorded as a row of the `requests` table (verb `approve` or
//! `deny` on `accessrequests`, the approver as principal, their address as source).

// Refusals are Kubernetes `Status` objects carried by value: this is not the request path,
// and every error becomes a response body anyway.
#![allow(clippy::result_large_err)]

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::TryStreamExt as _;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::{Api, api::PostParams};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use super::{
    notify::Notifier,
    resource::{
        AccessRequest, AccessRequestStatus, GROUP, PLURAL, Phase, StatusCondition, VERSION,
    },
    seal::SealKey,
};
use crate::{
    drain::DrainWatcher,
    ebpf::Interceptor,
    identity::{Identity, Principal, PrincipalKind, PrincipalVerifier, WorkloadIdentity},
    policy::Action,
    proxy::limits::{ActiveBody, Activity},
    recorder::{
        Outcome, RecorderHandle,
        schema::{ObjectRef, PrincipalRecord, RequestRecord},
    },
    request::Verb,
    scope::ScopeConfig,
    status::Status,
};

/// The path prefix of the AccessRequest endpoints.
pub const BASE_PATH: &str = "/v1/accessrequests";
/// The largest request body accepted (a decision is a few hundred bytes).
const MAX_BODY_BYTES: usize = 64 * 1024;
/// How long a client gets to send its body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest comment kept.
pub const MAX_COMMENT_CHARS: usize = 1024;
/// How long one call may take to produce its answer (a watch: its first byte).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A watch ends after a random time between this and twice this, as the API server ends
/// its watches (`--min-request-timeout`), or sooner when the caller asks
/// (`timeoutSeconds`): the caller watches again and is authorised again, so an approver
/// whose access was taken away stops seeing requests.
const MIN_WATCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long the TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's headers (HTTP/1.1), and the HTTP/2
/// keep-alive ping interval and timeout.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head, either protocol.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Concurrent streams per HTTP/2 connection.
const MAX_STREAMS: u32 = 64;
/// Connections served at once; more are closed as they arrive, so nobody can use up the
/// file descriptors the agents' proxy in the same process needs.
const MAX_CONNECTIONS: usize = 512;
/// How long a connection told to close may take to finish its calls.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// Connections from intercepted pods served at once (each only ever gets a 403).
const MAX_AGENT_CONNECTIONS: usize = 16;
/// Connections served at once from one address, so one peer opening connections faster
/// than they time out cannot take every slot (approvers who come through `kubectl
/// port-forward` share the node's loopback address, and this leaves them plenty).
const MAX_CONNECTIONS_PER_PEER: usize = 128;

type Body = BoxBody<Bytes, std::io::Error>;

/// What the approvals API needs from the rest of the gateway.
pub struct ApiSettings {
    /// The namespace AccessRequests live in.
    pub namespace: String,
    /// The gateway's client (its own credential): SubjectAccessReviews, reads and status
    /// writes.
    pub client: kube::Client,
    /// Verifies approvers' bearer tokens (OIDC issuers, TokenReview).
    pub principals: Arc<PrincipalVerifier>,
    /// Seals the decisions written.
    pub seal: SealKey,
    /// Workload identity (its pod store knows this node's pods and their addresses).
    pub identity: Option<Arc<Identity>>,
    /// Whether the pod store is filled by a watch (`identity.watchPods`): until its first
    /// complete list, no address can be told to be an approver's, and every request is
    /// refused.
    pub pods_watched: bool,
    /// Which workloads are intercepted.
    pub scope: ScopeConfig,
    /// The kernel redirect, whose map knows redirected connections.
    pub interceptor: Option<Arc<Interceptor>>,
    /// Where decisions are recorded; `None` only in tests that do not record.
    pub recorder: Option<RecorderHandle>,
    /// This node.
    pub node: String,
    /// The cluster's name, recorded with every row.
    pub cluster: String,
    /// Who is told about decisions.
    pub notifier: Option<Notifier>,
    /// The gateway's metrics (decisions counted by verb and result).
    pub metrics: Option<Arc<crate::admin::Metrics>>,
    /// A connection with no call in progress for this long is closed (gracefully), so
    /// connections opened and left idle, however they keep themselves alive (HTTP/2
    /// pings), cannot hold the [`MAX_CONNECTIONS`] slots approvers need. A watch is a call
    /// in progress; a client opens a new connection when it needs one.
    pub idle_timeout: Duration,
}

/// Connections open per peer address, each held by a [`PeerSlot`].
struct PeerSlots {
    open: Mutex<HashMap<IpAddr, usize>>,
    limit: usize,
}

/// One open connection from an address; released when dropped.
struct PeerSlot {
    slots: Arc<PeerSlots>,
    ip: IpAddr,
}

impl PeerSlots {
    fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            open: Mutex::new(HashMap::new()),
            limit,
        })
    }

    /// A slot for one more connection from `ip`, unless it has `limit` open already.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        // A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(ip).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            slots: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self
            .slots
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// The approvals API server.
pub struct ApprovalApi {
    s: ApiSettings,
}

impl std::fmt::Debug for ApprovalApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApprovalApi")
            .field("namespace", &self.s.namespace)
            .finish_non_exhaustive()
    }
}

/// The body of `POST .../approve` and `.../deny`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DecisionRequest {
    /// How long an approval lasts (`15m`), within the rule's grant; absent: the rule's
    /// whole grant. Not allowed on a deny, nor for a `once` grant.
    #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
    pub for_: Option<String>,
    /// A comment for the agent (a denial's comment is in the 403 it gets) and the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// Approve or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Let the request through.
    Approve,
    /// Refuse it.
    Deny,
}

impl Decision {
    fn verb(self) -> Verb {
        match self {
            Decision::Approve => Verb::Approve,
            Decision::Deny => Verb::Deny,
        }
    }

    fn phase(self) -> Phase {
        match self {
            Decision::Approve => Phase::Approved,
            Decision::Deny => Phase::Denied,
        }
    }
}

/// Who is asking, once their token verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approver {
    /// The user name.
    pub username: String,
    /// The user's groups.
    pub groups: Vec<String>,
    /// The user's UID, when the authenticator gave one.
    pub uid: Option<String>,
    /// How the token was verified.
    pub kind: PrincipalKind,
}

impl Approver {
    /// The approver behind a verified principal; `Err` with a 401 `Status` otherwise.
    pub fn from_principal(principal: &Principal) -> Result<Self, Status> {
        match (principal.kind, &principal.subject) {
            (PrincipalKind::Anonymous, _) => Err(unauthorized(
                "the approvals API needs a bearer token (an OIDC ID token or a Kubernetes token); none was presented",
            )),
            (PrincipalKind::Invalid, _) | (_, None) => Err(unauthorized(&format!(
                "the bearer token was not accepted: {}",
                principal.reason.as_deref().unwrap_or("no user name")
            ))),
            (kind, Some(subject)) => Ok(Self {
                username: subject.clone(),
                groups: principal.groups.clone(),
                uid: principal.uid.clone(),
                kind,
            }),
        }
    }

    fn record(&self) -> PrincipalRecord {
        PrincipalRecord {
            kind: self.kind.as_str().to_owned(),
            subject: Some(self.username.clone()),
            groups: self.groups.clone(),
            reason: None,
            mismatch: None,
        }
    }
}

fn unauthorized(message: &str) -> Status {
    Status::failure(StatusCode::UNAUTHORIZED, "Unauthorized", message)
}

/// Why the approver may not decide on this request, if so: not on its approvers list, or
/// its own request. RBAC (the SubjectAccessReview) is checked separately.
pub fn refusal(request: &AccessRequest, approver: &Approver) -> Option<String> {
    let requester = &request.spec.requester;
    let own_principal = requester
        .principal
        .as_deref()
        .is_some_and(|p| p == approver.username);
    let own_account = requester
        .workload
        .service_account
        .as_deref()
        .is_some_and(|sa| {
            approver.username
                == format!(
                    "system:serviceaccount:{}:{sa}",
                    requester.workload.namespace
                )
        });
    if own_principal || own_account {
        return Some(format!(
            "{} may not decide on its own request (nobody approves their own request)",
            approver.username
        ));
    }
    let approvers = &request.spec.approvers;
    if approvers.users.is_empty() && approvers.groups.is_empty() {
        return Some(
            "the request names no approvers (the rule's approval.approvers is empty), so nobody may decide on it"
                .to_owned(),
        );
    }
    let listed = approvers.users.contains(&approver.username)
        || approvers
            .groups
            .iter()
            .any(|g| approver.groups.iter().any(|mine| mine == g));
    (!listed).then(|| {
        format!(
            "{} is not among the request's approvers (users: [{}], groups: [{}])",
            approver.username,
            approvers.users.join(", "),
            approvers.groups.join(", ")
        )
    })
}

/// An RFC 3339 time at second precision, as `metav1.Time` writes it.
pub fn rfc3339(t: jiff::Timestamp) -> String {
    let secs = t.as_second();
    jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| t.to_string())
}

/// Parses a duration written `15m`, `1h 30m` or `PT15M`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let signed: jiff::SignedDuration = text
        .trim()
        .parse()
        .map_err(|e| format!("{text:?} is not a duration (write e.g. 15m or 1h): {e}"))?;
    Duration::try_from(signed).map_err(|_| format!("{text:?} must not be negative"))
}

/// The new status for `decision` on `request` by `approver` at `now`, sealed; or the
/// `Status` refusing it (409 when the request is no longer pending or expired, 400 for a
/// bad `for` or comment).
pub fn decide(
    request: &AccessRequest,
    approver: &Approver,
    decision: Decision,
    body: &DecisionRequest,
    now: jiff::Timestamp,
    seal: &SealKey,
) -> Result<AccessRequestStatus, Status> {
    let name = request.metadata.name.as_deref().unwrap_or("");
    let conflict = |why: String| Status::conflict(GROUP, PLURAL, name, &why);
    if let Some(status) = &request.status
        && status.phase.is_decided()
    {
        return Err(conflict(format!(
            "it is already {} (by {}{}); only Pending requests can be decided",
            status.phase.as_str(),
            status.decided_by.as_deref().unwrap_or("unknown"),
            status
                .decided_at
                .as_deref()
                .map(|t| format!(" at {t}"))
                .unwrap_or_default()
        )));
    }
    // The spec is what the approver decides on, and the seal covers it; a spec edited
    // after the gateway wrote it (a longer grant, another rule or requester, more
    // approvers) is not decided at all.
    if request.metadata.generation != Some(1) {
        return Err(conflict(format!(
            "its spec was changed after the gateway created it (generation {}); it cannot be decided, and the agent has to ask again",
            request
                .metadata
                .generation
                .map_or_else(|| "unknown".to_owned(), |g| g.to_string())
        )));
    }
    // Anyone who may create AccessRequests could otherwise write a spec to decide on
    // (themselves as approvers, a grant of years, any workload).
    if let Err(e) = seal.verify_spec(request) {
        return Err(conflict(format!(
            "it was not created by a Chaperone gateway (its spec seal is {}); it cannot be decided",
            match e {
                super::seal::SealError::Missing => "missing",
                _ => "wrong",
            }
        )));
    }
    let expires: jiff::Timestamp = request.spec.expires_at.parse().map_err(|e| {
        conflict(format!(
            "its expiresAt {:?} is not a time ({e}); it cannot be decided",
            request.spec.expires_at
        ))
    })?;
    if now >= expires {
        return Err(conflict(format!(
            "it expired at {} (silence is a denial); the agent has to ask again",
            request.spec.expires_at
        )));
    }
    let comment = body
        .comment
        .as_deref()
        .map(str::trim)
        .filter(|c| !c.is_empty());
    if let Some(c) = comment
        && c.chars().count() > MAX_COMMENT_CHARS
    {
        return Err(Status::bad_request(format!(
            "the comment is {} characters long; at most {MAX_COMMENT_CHARS} are kept",
            c.chars().count()
        )));
    }
    let grant_until = match decision {
        Decision::Deny => {
            if body.for_.is_some() {
                return Err(Status::bad_request(
                    "`for` applies to approvals only; a denial lasts for this request",
                ));
            }
            None
        }
        Decision::Approve => grant_until(request, body.for_.as_deref(), now)?,
    };
    let mut status = AccessRequestStatus {
        phase: decision.phase(),
        decided_by: Some(approver.username.clone()),
        decided_at: Some(rfc3339(now)),
        comment: comment.map(str::to_owned),
        grant_until,
        seal: None,
        conditions: vec![StatusCondition {
            type_: "Decided".to_owned(),
            status: "True".to_owned(),
            reason: decision.phase().as_str().to_owned(),
            message: format!(
                "{} by {} through the approvals API",
                decision.phase().as_str().to_lowercase(),
                approver.username
            ),
            last_transition_time: rfc3339(now),
        }],
    };
    status.seal = Some(seal.seal(request, &status).map_err(|e| {
        Status::failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("cannot seal the decision: {e}"),
        )
    })?);
    Ok(status)
}

/// Until when an approval lets matching requests through: `for` (at most the rule's grant)
/// or the rule's whole grant; `None` for a `once` grant.
fn grant_until(
    request: &AccessRequest,
    wanted: Option<&str>,
    now: jiff::Timestamp,
) -> Result<Option<String>, Status> {
    let Some(granted) = request.spec.grant.duration.as_deref() else {
        return match wanted {
            Some(_) => Err(Status::bad_request(
                "the rule grants this request only (grant: once); `for` cannot extend it",
            )),
            None => Ok(None),
        };
    };
    let max = parse_duration(granted).map_err(|e| {
        Status::bad_request(format!("the request's grant.duration is unusable: {e}"))
    })?;
    if max > crate::policy::MAX_GRANT {
        // No policy grants this long: the spec was not written by a gateway.
        return Err(Status::bad_request(format!(
            "the request's grant.duration {granted} is longer than any policy may grant (7 days)"
        )));
    }
    let length = match wanted {
        None => max,
        Some(text) => {
            let wanted =
                parse_duration(text).map_err(|e| Status::bad_request(format!("for: {e}")))?;
            if wanted.is_zero() {
                return Err(Status::bad_request("for: must be longer than 0s"));
            }
            if wanted > max {
                return Err(Status::bad_request(format!(
                    "for: {text} is longer than the rule grants ({granted})"
                )));
            }
            wanted
        }
    };
    let signed = jiff::SignedDuration::try_from(length)
        .map_err(|e| Status::bad_request(format!("for: {e}")))?;
    let until = now
        .checked_add(signed)
        .map_err(|e| Status::bad_request(format!("for: {e}")))?;
    Ok(Some(rfc3339(until)))
}

/// What became of a decision call, for its row and the metric's `result`. A call that ran
/// out of time may have written the decision (the API server took it, the answer was
/// late): that is `unknown`, not refused, so the evidence does not claim an approval
/// failed when it may have let a request through.
fn decision_outcome(written: bool, result: &Status) -> (Outcome, &'static str) {
    match (written, result.code()) {
        (true, _) => (Outcome::Forwarded, "written"),
        (false, StatusCode::GATEWAY_TIMEOUT) => (Outcome::Unknown, "unknown"),
        (false, StatusCode::SERVICE_UNAVAILABLE) if result.message().contains("recording") => {
            (Outcome::RecordingDown, "refused")
        }
        (false, StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY) => {
            (Outcome::UpstreamFailed, "refused")
        }
        (false, StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED) => (Outcome::Denied, "refused"),
        (false, _) => (Outcome::Invalid, "refused"),
    }
}

/// An AccessRequest as a watch event's object.
fn json(ar: &AccessRequest) -> serde_json::Value {
    serde_json::to_value(ar).unwrap_or_default()
}

/// How long one watch runs: what the caller asked, at most a random time between
/// [`MIN_WATCH_TIMEOUT`] and twice it (spread, so watches opened together do not all
/// come back at once).
fn watch_timeout(asked: Option<Duration>) -> Duration {
    use std::hash::{BuildHasher as _, Hasher as _};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let spread = Duration::from_secs(random % MIN_WATCH_TIMEOUT.as_secs().max(1));
    let most = MIN_WATCH_TIMEOUT + spread;
    asked.map_or(most, |asked| asked.min(most))
}

/// One request to the API as routed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Health,
    List {
        watch: bool,
        /// `timeoutSeconds`, if given (not zero).
        timeout: Option<Duration>,
    },
    Get(String),
    Decide(String, Decision),
}

fn route(method: &Method, path: &str, query: Option<&str>) -> Result<Route, Status> {
    let not_found = || {
        Status::failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the approvals API has no {method} {path} (see docs/approver-guide.md)"),
        )
    };
    if path == "/healthz" {
        return Ok(Route::Health);
    }
    let rest = path.strip_prefix(BASE_PATH).ok_or_else(not_found)?;
    let parts: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let allow = |want: Method| -> Result<(), Status> {
        if *method == want {
            Ok(())
        } else {
            Err(Status::failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{method} is not supported on {path}; use {want}"),
            ))
        }
    };
    match parts.as_slice() {
        [] => {
            allow(Method::GET)?;
            let params = || query.into_iter().flat_map(|q| q.split('&'));
            let watch = params().any(|kv| matches!(kv, "watch=true" | "watch=1" | "watch"));
            let timeout = match params().find_map(|kv| kv.strip_prefix("timeoutSeconds=")) {
                None => None,
                Some(n) => match n.parse::<u64>() {
                    Ok(0) => None,
                    Ok(n) => Some(Duration::from_secs(n)),
                    Err(_) => {
                        return Err(Status::bad_request(format!(
                            "timeoutSeconds: {:?} is not a whole number of seconds",
                            n.chars().take(32).collect::<String>()
                        )));
                    }
                },
            };
            Ok(Route::List { watch, timeout })
        }
        [name] => {
            allow(Method::GET)?;
            Ok(Route::Get((*name).to_owned()))
        }
        [name, action @ ("approve" | "deny")] => {
            allow(Method::POST)?;
            let decision = if *action == "approve" {
                Decision::Approve
            } else {
                Decision::Deny
            };
            Ok(Route::Decide((*name).to_owned(), decision))
        }
        _ => Err(not_found()),
    }
}

fn json_response(code: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn status_response(status: &Status) -> Response<Body> {
    json_response(status.code(), status.to_json().to_vec())
}

/// Why the approvals API refuses a caller before looking at its credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The caller is an intercepted workload (403).
    Intercepted(String),
    /// The gateway cannot tell yet whether it is (503: this node's pods are not listed).
    NotReady(String),
}

impl ApprovalApi {
    /// An approvals API over these settings.
    pub fn new(settings: ApiSettings) -> Arc<Self> {
        Arc::new(Self { s: settings })
    }

    fn api(&self) -> Api<AccessRequest> {
        Api::namespaced(self.s.client.clone(), &self.s.namespace)
    }

    /// Why a connection from `peer` (to `local`) must be refused: it comes from a workload
    /// the gateway intercepts. Known from the kernel redirect's map (a redirected
    /// connection) or from the pod store (a pod on this node with that address that is not
    /// out of scope). `None` for everything else (approvers' machines, port-forwards).
    pub fn intercepted_peer(&self, peer: SocketAddr, local: SocketAddr) -> Option<Refusal> {
        if let Some(interceptor) = &self.s.interceptor
            && interceptor.origin(peer, local).is_some()
        {
            return Some(Refusal::Intercepted(format!(
                "the connection from {peer} was redirected from an intercepted workload"
            )));
        }
        let identity = self.s.identity.as_ref()?;
        if self.s.pods_watched && !identity.pods().is_synced() {
            return Some(Refusal::NotReady(format!(
                "the gateway has not yet listed this node's pods, so it cannot tell whether {} is an intercepted pod; try again in a moment",
                peer.ip()
            )));
        }
        // A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d; pods are indexed by
        // their plain addresses.
        let pod = identity.pods().by_ip(peer.ip().to_canonical())?;
        let workload = WorkloadIdentity {
            node: self.s.node.clone(),
            namespace: Some(pod.namespace.clone()),
            pod: Some(pod.name.clone()),
            pod_uid: Some(pod.uid.clone()),
            service_account: Some(pod.service_account.clone()),
            labels: pod.labels.clone(),
            annotations: pod.annotations.clone(),
            ..WorkloadIdentity::default()
        };
        (!self.s.scope.classify(&workload).bypass).then(|| {
            Refusal::Intercepted(format!(
                "{} is pod {}/{}, which the gateway intercepts",
                peer.ip(),
                pod.namespace,
                pod.name
            ))
        })
    }

    /// Serves HTTPS on `listener` until the drain starts.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        drain: DrainWatcher,
    ) {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let agent_permits = Arc::new(tokio::sync::Semaphore::new(MAX_AGENT_CONNECTIONS));
        let peers = PeerSlots::new(MAX_CONNECTIONS_PER_PEER);
        loop {
            let (tcp, peer) = tokio::select! {
                _ = drain.signaled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "approvals API accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let local = match tcp.local_addr() {
                Ok(a) => a,
                Err(_) => continue,
            };
            // Intercepted pods get their 403s from a small pool of their own, so they
            // cannot use up the connections approvers need.
            let pool = match self.intercepted_peer(peer, local) {
                Some(Refusal::Intercepted(_)) => &agent_permits,
                _ => &permits,
            };
            let Some(peer_slot) = peers.take(peer.ip()) else {
                tracing::warn!(%peer, "approvals API connection refused: too many open from this address");
                continue;
            };
            let Ok(permit) = pool.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "approvals API connection refused: too many open");
                continue;
            };
            let api = self.clone();
            let acceptor = acceptor.clone();
            let drain = drain.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "approvals API TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let stop = drain.clone();
                let idle_timeout = api.s.idle_timeout;
                let activity = Arc::new(Activity::default());
                let busy = activity.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let api = api.clone();
                    let drain = drain.clone();
                    let active = busy.begin();
                    async move {
                        // Checked per request: a pod that was not known yet when the
                        // connection opened is refused as soon as the watch names it.
                        let refused = api.intercepted_peer(peer, local);
                        let response = api.handle(req, peer, refused, drain).await;
                        // Busy until the body is done (a watch: until it ends).
                        Ok::<_, Infallible>(response.map(|inner| {
                            ActiveBody {
                                inner,
                                _active: active,
                            }
                            .boxed()
                        }))
                    }
                });
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                // Without a timer hyper enforces no header timeout at all: a client that
                // sends nothing would hold its connection (and a permit) for good.
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .max_buf_size(MAX_HEADER_BYTES);
                builder
                    .http2()
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(MAX_STREAMS)
                    .max_header_list_size(MAX_HEADER_BYTES as u32)
                    .keep_alive_interval(Some(HEADER_READ_TIMEOUT))
                    .keep_alive_timeout(HEADER_READ_TIMEOUT);
                let connection = builder.serve_connection(TokioIo::new(tls), service);
                tokio::pin!(connection);
                let _permits = (permit, peer_slot);
                // Open connections (a watch, keep-alive) end with the gateway.
                tokio::select! {
                    _ = connection.as_mut() => return,
                    _ = stop.signaled() => return,
                    () = activity.idle_for(idle_timeout) => {
                        tracing::debug!(%peer, "approvals API: closing an idle connection");
                        connection.as_mut().graceful_shutdown();
                    }
                }
                tokio::select! {
                    _ = connection => {}
                    _ = stop.signaled() => {}
                    () = tokio::time::sleep(CLOSE_GRACE) => {}
                }
            });
        }
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        refused: Option<Refusal>,
        drain: DrainWatcher,
    ) -> Response<Body> {
        let started = Instant::now();
        let request_time = jiff::Timestamp::now();
        let (parts, body) = req.into_parts();
        let route = match route(&parts.method, parts.uri.path(), parts.uri.query()) {
            Ok(r) => r,
            Err(status) => return status_response(&status),
        };
        if let Some(ns) = parts
            .uri
            .query()
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|kv| kv.strip_prefix("namespace="))
            && ns != self.s.namespace
        {
            return status_response(&Status::failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!(
                    "this approvals API serves the AccessRequests of namespace {:?}, not {ns:?}",
                    self.s.namespace
                ),
            ));
        }
        if route == Route::Health {
            let mut r = Response::new(full(Bytes::from_static(b"ok\n")));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain"),
            );
            return r;
        }
        let mut ctx = CallContext {
            peer,
            request_time,
            started,
            uri: parts.uri.to_string(),
            user_agent: header_text(&parts.headers, header::USER_AGENT),
            approver: None,
        };
        let result = match tokio::time::timeout(
            CALL_TIMEOUT,
            self.authenticated(&route, &parts.headers, body, refused, &mut ctx, drain),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(Status::failure(
                StatusCode::GATEWAY_TIMEOUT,
                "Timeout",
                format!(
                    "no answer within {CALL_TIMEOUT:?} (token review, access review or the API server); a decision may or may not have been written: check with `chaperone requests {}`",
                    route_name(&route)
                ),
            )),
        };
        match result {
            Ok(response) => response,
            Err(status) => {
                if let Route::Decide(name, decision) = &route {
                    self.record(&ctx, name, *decision, &status, None).await;
                }
                status_response(&status)
            }
        }
    }

    async fn authenticated(
        &self,
        route: &Route,
        headers: &HeaderMap,
        body: Incoming,
        refused: Option<Refusal>,
        ctx: &mut CallContext,
        drain: DrainWatcher,
    ) -> Result<Response<Body>, Status> {
        match refused {
            Some(Refusal::Intercepted(why)) => {
                return Err(Status::forbidden(
                    GROUP,
                    PLURAL,
                    route_name(route),
                    &format!(
                        "intercepted workloads may not use the approvals API ({why}); an agent cannot take decisions on its own requests"
                    ),
                ));
            }
            Some(Refusal::NotReady(why)) => {
                return Err(Status::failure(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    format!("chaperone: {why}"),
                ));
            }
            None => {}
        }
        let principal = self
            .s
            .principals
            .verify(
                headers.get(header::AUTHORIZATION),
                &WorkloadIdentity::default(),
            )
            .await;
        let approver = Approver::from_principal(&principal)?;
        ctx.approver = Some(approver.clone());
        match route {
            Route::Health => Ok(json_response(StatusCode::OK, b"{}".to_vec())),
            Route::List { watch, timeout } => {
                let verb = if *watch { "watch" } else { "list" };
                self.authorize(&approver, verb, "").await?;
                if *watch {
                    self.watch(drain, watch_timeout(*timeout)).await
                } else {
                    let list = self
                        .api()
                        .list(&Default::default())
                        .await
                        .map_err(upstream)?;
                    let items: Vec<&AccessRequest> = list.items.iter().collect();
                    let body = serde_json::json!({
                        "apiVersion": format!("{GROUP}/{VERSION}"),
                        "kind": "AccessRequestList",
                        "metadata": {"resourceVersion": list.metadata.resource_version},
                        "items": items,
                    });
                    Ok(json_response(
                        StatusCode::OK,
                        serde_json::to_vec(&body).unwrap_or_default(),
                    ))
                }
            }
            Route::Get(name) => {
                self.authorize(&approver, "get", name).await?;
                let object = self.get(name).await?;
                Ok(json_response(
                    StatusCode::OK,
                    serde_json::to_vec(&object).unwrap_or_default(),
                ))
            }
            Route::Decide(name, decision) => {
                let decision_body = read_decision(body).await?;
                let (object, status) = self
                    .decide_and_write(name, *decision, &decision_body, &approver)
                    .await?;
                let ok = Status::success();
                self.record(ctx, name, *decision, &ok, Some(&status)).await;
                if let Some(notifier) = &self.s.notifier {
                    notifier.decided(&object);
                }
                Ok(json_response(
                    StatusCode::OK,
                    serde_json::to_vec(&object).unwrap_or_default(),
                ))
            }
        }
    }

    async fn get(&self, name: &str) -> Result<AccessRequest, Status> {
        match self.api().get(name).await {
            Ok(o) => Ok(o),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                Err(Status::not_found(GROUP, PLURAL, name))
            }
            // Refused before it was written (the API server's other 4xx answers).
            Err(kube::Error::Api(s)) if s.code < 500 => Err(upstream(kube::Error::Api(s))),
            // A 5xx, or a connection lost after the write was sent: it may have been
            // written (etcd applied it, the answer was lost), so not "refused".
            Err(e) => Err(Status::failure(
                StatusCode::GATEWAY_TIMEOUT,
                "Timeout",
                format!(
                    "the API server failed while the decision was being written ({e}); it may or may not have been written: check with `chaperone requests {name}`"
                ),
            )),
        }
    }

    async fn decide_and_write(
        &self,
        name: &str,
        decision: Decision,
        body: &DecisionRequest,
        approver: &Approver,
    ) -> Result<(AccessRequest, AccessRequestStatus), Status> {
        self.authorize(approver, "approve", name).await?;
        let request = self.get(name).await?;
        if let Some(why) = refusal(&request, approver) {
            return Err(Status::forbidden(GROUP, PLURAL, name, &why));
        }
        // A decision that cannot be recorded is not taken.
        if let Some(recorder) = &self.s.recorder
            && let Err(e) = recorder.health()
        {
            return Err(Status::service_unavailable(
                format!(
                    "recording is down ({e}); decisions are not taken while they cannot be recorded"
                ),
                5,
            ));
        }
        let status = decide(
            &request,
            approver,
            decision,
            body,
            jiff::Timestamp::now(),
            &self.s.seal,
        )?;
        let mut updated = request.clone();
        updated.status = Some(status.clone());
        // The object carries the resourceVersion read above: a concurrent decision makes
        // this write fail with 409 rather than overwrite it.
        match self
            .api()
            .replace_status(name, &PostParams::default(), &updated)
            .await
        {
            Ok(written) => Ok((written, status)),
            Err(kube::Error::Api(s)) if s.code == 409 => Err(Status::conflict(
                GROUP,
                PLURAL,
                name,
                "it changed while the decision was being written (another approver, or its expiry, was faster); read it again",
            )),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                Err(Status::not_found(GROUP, PLURAL, name))
            }
            // Refused before it was written (the API server's other 4xx answers).
            Err(kube::Error::Api(s)) if s.code < 500 => Err(upstream(kube::Error::Api(s))),
            // A 5xx, or a connection lost after the write was sent: it may have been
            // written (etcd applied it, the answer was lost), so not "refused".
            Err(e) => Err(Status::failure(
                StatusCode::GATEWAY_TIMEOUT,
                "Timeout",
                format!(
                    "the API server failed while the decision was being written ({e}); it may or may not have been written: check with `chaperone requests {name}`"
                ),
            )),
        }
    }

    /// Asks the API server (SubjectAccessReview) whether the approver may `verb`
    /// AccessRequests (`name`, or all of them) in the gateway's namespace.
    async fn authorize(&self, approver: &Approver, verb: &str, name: &str) -> Result<(), Status> {
        let review = SubjectAccessReview {
            metadata: Default::default(),
            spec: SubjectAccessReviewSpec {
                user: Some(approver.username.clone()),
                groups: Some(approver.groups.clone()),
                uid: approver.uid.clone(),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(GROUP.to_owned()),
                    version: Some(VERSION.to_owned()),
                    resource: Some(PLURAL.to_owned()),
                    namespace: Some(self.s.namespace.clone()),
                    name: (!name.is_empty()).then(|| name.to_owned()),
                    verb: Some(verb.to_owned()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            status: None,
        };
        let api: Api<SubjectAccessReview> = Api::all(self.s.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                Status::service_unavailable(
                    format!("cannot ask the API server whether {} may {verb} accessrequests (SubjectAccessReview failed: {e})", approver.username),
                    5,
                )
            })?;
        let status = answer.status.unwrap_or_default();
        if status.allowed && !status.denied.unwrap_or(false) {
            return Ok(());
        }
        let mut why = format!(
            "User \"{}\" cannot {verb} resource \"{PLURAL}\" in API group \"{GROUP}\" in the namespace \"{}\" (grant it with the chaperone-approver ClusterRole)",
            approver.username, self.s.namespace
        );
        if let Some(reason) = status.reason.filter(|r| !r.is_empty()) {
            why.push_str(": ");
            why.push_str(&reason);
        }
        if let Some(error) = status.evaluation_error.filter(|r| !r.is_empty()) {
            why.push_str(" (evaluation error: ");
            why.push_str(&error);
            why.push(')');
        }
        Err(Status::forbidden(GROUP, PLURAL, name, &why))
    }

    /// Streams AccessRequest events until `timeout` has passed (then the body ends and
    /// the caller watches again), the caller goes away or the gateway drains.
    async fn watch(
        &self,
        drain: DrainWatcher,
        timeout: Duration,
    ) -> Result<Response<Body>, Status> {
        use kube::runtime::watcher;
        // Fail before answering 200 when the API server refuses (RBAC, unreachable).
        self.api()
            .list(&kube::api::ListParams::default().limit(1))
            .await
            .map_err(upstream)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        let stream = watcher(self.api(), watcher::Config::default());
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let ends = tokio::time::sleep(timeout);
            tokio::pin!(ends);
            loop {
                let next = tokio::select! {
                    _ = drain.signaled() => return,
                    _ = tx.closed() => return,
                    () = &mut ends => return,
                    next = stream.try_next() => next,
                };
                let (kind, object, last) = match next {
                    Ok(Some(watcher::Event::InitApply(o))) => ("ADDED", json(&o), false),
                    Ok(Some(watcher::Event::Apply(o))) => ("MODIFIED", json(&o), false),
                    Ok(Some(watcher::Event::Delete(o))) => ("DELETED", json(&o), false),
                    Ok(Some(_)) => continue,
                    Ok(None) => return,
                    // As the API server ends a watch it cannot continue: an ERROR event with
                    // a Status, then the end; the caller watches again (or says why not),
                    // instead of waiting on a watch that has gone quiet.
                    Err(e) => {
                        tracing::warn!(error = %e, "approvals API watch: the AccessRequest watch failed; ending it with an ERROR event");
                        let status = Status::service_unavailable(
                            format!(
                                "the gateway's watch of AccessRequests failed ({e}); watch again"
                            ),
                            1,
                        );
                        (
                            "ERROR",
                            serde_json::from_slice(&status.to_json()).unwrap_or_default(),
                            true,
                        )
                    }
                };
                let mut line =
                    serde_json::to_vec(&serde_json::json!({"type": kind, "object": object}))
                        .unwrap_or_default();
                line.push(b'\n');
                // A caller that stops reading must not hold the watch past its end.
                let sent = tokio::select! {
                    _ = drain.signaled() => return,
                    () = &mut ends => return,
                    sent = tx.send(Bytes::from(line)) => sent,
                };
                if sent.is_err() || last {
                    return;
                }
            }
        });
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, std::io::Error>(Frame::data(b)), rx))
        });
        let mut r = Response::new(http_body_util::BodyExt::boxed(StreamBody::new(frames)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json;stream=watch"),
        );
        Ok(r)
    }

    /// Records one decision attempt; `written` is the status written, for a success.
    async fn record(
        &self,
        ctx: &CallContext,
        name: &str,
        decision: Decision,
        result: &Status,
        written: Option<&AccessRequestStatus>,
    ) {
        let ok = written.is_some();
        let (outcome, result_label) = decision_outcome(ok, result);
        if let Some(metrics) = &self.s.metrics {
            metrics
                .approval_decisions
                .get_or_create(&crate::admin::ApprovalDecisionLabels {
                    verb: decision.verb().as_str(),
                    result: result_label,
                })
                .inc();
        }
        let Some(recorder) = &self.s.recorder else {
            return;
        };
        let reason = match written {
            Some(s) => format!(
                "{} by {}{}{}",
                s.phase.as_str().to_lowercase(),
                s.decided_by.as_deref().unwrap_or("?"),
                s.grant_until
                    .as_deref()
                    .map(|t| format!(", granted until {t}"))
                    .unwrap_or_default(),
                s.comment
                    .as_deref()
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default()
            ),
            None => result.message().to_owned(),
        };
        let row = RequestRecord {
            request_time: ctx.request_time,
            response_time: Some(jiff::Timestamp::now()),
            latency_us: i64::try_from(ctx.started.elapsed().as_micros()).unwrap_or(i64::MAX),
            audit_id: uuid::Uuid::now_v7().to_string(),
            node: self.s.node.as_str().into(),
            cluster: self.s.cluster.as_str().into(),
            source_addr: ctx.peer.to_string().into(),
            user_agent: ctx.user_agent.clone(),
            verb: decision.verb(),
            request_uri: ctx.uri.clone(),
            object_ref: ObjectRef {
                api_group: GROUP.into(),
                api_version: VERSION.into(),
                resource: PLURAL.into(),
                subresource: "status".into(),
                namespace: self.s.namespace.as_str().into(),
                name: name.into(),
            },
            decision: Some(if ok { Action::Allow } else { Action::Deny }),
            policy_rule: Some("approvals-api".to_owned()),
            reason: Some(reason),
            response_code: i32::from(if ok { 200 } else { result.code().as_u16() }),
            principal: ctx
                .approver
                .as_ref()
                .map(Approver::record)
                .unwrap_or_else(|| PrincipalRecord {
                    kind: PrincipalKind::Anonymous.as_str().to_owned(),
                    ..Default::default()
                })
                .into(),
            response_object: written.and_then(|s| serde_json::to_string(s).ok()),
            outcome,
            ..RequestRecord::default()
        };
        if let Err(e) = recorder.record(row).await {
            tracing::error!(error = %e, accessrequest = name, "a decision could not be recorded");
        }
    }
}

struct CallContext {
    peer: SocketAddr,
    request_time: jiff::Timestamp,
    started: Instant,
    uri: String,
    user_agent: Option<String>,
    approver: Option<Approver>,
}

fn route_name(route: &Route) -> &str {
    match route {
        Route::Get(n) | Route::Decide(n, _) => n,
        _ => "",
    }
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn upstream(e: kube::Error) -> Status {
    match e {
        kube::Error::Api(s) if s.code == 403 => Status::failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!(
                "the gateway's own credential may not do this ({}); check the chaperone ClusterRole",
                s.message
            ),
        ),
        other => Status::service_unavailable(
            format!("the API server could not be reached or refused the gateway: {other}"),
            5,
        ),
    }
}

async fn read_decision(body: Incoming) -> Result<DecisionRequest, Status> {
    let limited = http_body_util::Limited::new(body, MAX_BODY_BYTES);
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            return Err(Status::failure(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                format!(
                    "the decision body could not be read (at most {MAX_BODY_BYTES} bytes): {e}"
                ),
            ));
        }
        Err(_) => {
            return Err(Status::failure(
                StatusCode::REQUEST_TIMEOUT,
                "Timeout",
                "the decision body did not arrive in time",
            ));
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(DecisionRequest::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        Status::bad_request(format!(
            "the decision body is not {{\"for\": \"15m\", \"comment\": \"...\"}}: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approval::resource::{AccessRequestSpec, Approvers, Grant, Requester, WorkloadRef};

    fn request() -> AccessRequest {
        let mut r = AccessRequest::new(
            "ar-1",
            AccessRequestSpec {
                requester: Requester {
                    workload: WorkloadRef {
                        namespace: "agents".into(),
                        pod: "agent-0".into(),
                        service_account: Some("cursor".into()),
                        uid: None,
                    },
                    principal: Some("system:serviceaccount:agents:cursor".into()),
                },
                request: Default::default(),
                fingerprint: "f00d".into(),
                rule: "scale-prod".into(),
                approvers: Approvers {
                    groups: vec!["sre".into()],
                    users: vec!["carol".into()],
                },
                grant: Grant {
                    duration: Some("15m".into()),
                    ..Default::default()
                },
                node: "node-a".into(),
                created_at: "2026-12-03T20:00:00Z".into(),
                expires_at: "2026-12-03T20:05:00Z".into(),
            },
        );
        r.metadata.namespace = Some("chaperone".into());
        r.metadata.uid = Some("u1".into());
        r.metadata.generation = Some(1);
        reseal(&mut r);
        r
    }

    fn approver(name: &str, groups: &[&str]) -> Approver {
        Approver {
            username: name.into(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            uid: None,
            kind: PrincipalKind::User,
        }
    }

    fn key() -> SealKey {
        SealKey::new(vec![9; 32]).unwrap()
    }

    /// Seals `r`'s spec as a gateway creating it would.
    fn reseal(r: &mut AccessRequest) {
        let seal = key().seal_spec(r).unwrap();
        r.metadata.annotations =
            Some([(super::super::seal::SPEC_SEAL_ANNOTATION.to_owned(), seal)].into());
    }

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_decision_that_timed_out_is_unknown_not_refused() {
        let timed_out = Status::failure(StatusCode::GATEWAY_TIMEOUT, "Timeout", "no answer");
        assert_eq!(
            decision_outcome(false, &timed_out),
            (Outcome::Unknown, "unknown")
        );
        assert_eq!(
            decision_outcome(true, &Status::success()),
            (Outcome::Forwarded, "written")
        );
        let forbidden = Status::failure(StatusCode::FORBIDDEN, "Forbidden", "no");
        assert_eq!(
            decision_outcome(false, &forbidden),
            (Outcome::Denied, "refused")
        );
        let conflict = Status::failure(StatusCode::CONFLICT, "Conflict", "decided");
        assert_eq!(
            decision_outcome(false, &conflict),
            (Outcome::Invalid, "refused")
        );
        let down = Status::service_unavailable("recording is down", 5);
        assert_eq!(
            decision_outcome(false, &down),
            (Outcome::RecordingDown, "refused")
        );
    }

    #[test]
    fn approvers_list_and_self_approval() {
        let r = request();
        assert_eq!(refusal(&r, &approver("alice", &["sre"])), None);
        assert_eq!(refusal(&r, &approver("carol", &[])), None);
        let outsider = refusal(&r, &approver("mallory", &["dev"])).unwrap();
        assert!(
            outsider.contains("not among the request's approvers"),
            "{outsider}"
        );
        // The agent's own service account, even in an approver group, may not decide.
        let own = refusal(
            &r,
            &approver("system:serviceaccount:agents:cursor", &["sre"]),
        )
        .unwrap();
        assert!(own.contains("its own request"), "{own}");
        let mut by_principal = r.clone();
        by_principal.spec.requester.principal = Some("alice".into());
        assert!(refusal(&by_principal, &approver("alice", &["sre"])).is_some());
        let mut nobody = r.clone();
        nobody.spec.approvers = Approvers::default();
        assert!(
            refusal(&nobody, &approver("alice", &["sre"]))
                .unwrap()
                .contains("names no approvers")
        );
    }

    #[test]
    fn an_approval_is_sealed_and_bounded_by_the_grant() {
        let r = request();
        let now = at("2026-12-03T20:01:00Z");
        let alice = approver("alice", &["sre"]);
        let body = DecisionRequest {
            for_: Some("10m".into()),
            comment: Some(" ok for the rollout ".into()),
        };
        let status = decide(&r, &alice, Decision::Approve, &body, now, &key()).unwrap();
        assert_eq!(status.phase, Phase::Approved);
        assert_eq!(status.decided_by.as_deref(), Some("alice"));
        assert_eq!(status.decided_at.as_deref(), Some("2026-12-03T20:01:00Z"));
        assert_eq!(status.grant_until.as_deref(), Some("2026-12-03T20:11:00Z"));
        assert_eq!(status.comment.as_deref(), Some("ok for the rollout"));
        assert_eq!(status.conditions[0].type_, "Decided");
        assert_eq!(key().verify(&r, &status), Ok(()));

        let whole = decide(
            &r,
            &alice,
            Decision::Approve,
            &Default::default(),
            now,
            &key(),
        )
        .unwrap();
        assert_eq!(whole.grant_until.as_deref(), Some("2026-12-03T20:16:00Z"));

        let too_long = DecisionRequest {
            for_: Some("1h".into()),
            comment: None,
        };
        let err = decide(&r, &alice, Decision::Approve, &too_long, now, &key()).unwrap_err();
        assert_eq!(err.code(), StatusCode::BAD_REQUEST);
        assert!(
            err.message().contains("longer than the rule grants (15m)"),
            "{}",
            err.message()
        );

        let mut once = r.clone();
        once.spec.grant.duration = None;
        reseal(&mut once);
        let err = decide(&once, &alice, Decision::Approve, &body, now, &key()).unwrap_err();
        assert!(err.message().contains("grant: once"), "{}", err.message());
        let status = decide(
            &once,
            &alice,
            Decision::Approve,
            &Default::default(),
            now,
            &key(),
        )
        .unwrap();
        assert_eq!(status.grant_until, None);

        let err = decide(&r, &alice, Decision::Deny, &body, now, &key()).unwrap_err();
        assert_eq!(err.code(), StatusCode::BAD_REQUEST);
        let denied = decide(
            &r,
            &alice,
            Decision::Deny,
            &DecisionRequest {
                for_: None,
                comment: Some("not in prod".into()),
            },
            now,
            &key(),
        )
        .unwrap();
        assert_eq!(denied.phase, Phase::Denied);
        assert_eq!(key().verify(&r, &denied), Ok(()));
    }

    #[test]
    fn only_pending_unexpired_requests_are_decided() {
        let mut r = request();
        let alice = approver("alice", &["sre"]);
        let err = decide(
            &r,
            &alice,
            Decision::Approve,
            &Default::default(),
            at("2026-12-03T20:05:00Z"),
            &key(),
        )
        .unwrap_err();
        assert_eq!(err.code(), StatusCode::CONFLICT);
        assert!(err.message().contains("expired"), "{}", err.message());
        r.status = Some(AccessRequestStatus {
            phase: Phase::Denied,
            decided_by: Some("bob".into()),
            ..Default::default()
        });
        let err = decide(
            &r,
            &alice,
            Decision::Approve,
            &Default::default(),
            at("2026-12-03T20:01:00Z"),
            &key(),
        )
        .unwrap_err();
        assert_eq!(err.code(), StatusCode::CONFLICT);
        assert!(
            err.message().contains("already Denied (by bob"),
            "{}",
            err.message()
        );
        let long = DecisionRequest {
            for_: None,
            comment: Some("x".repeat(MAX_COMMENT_CHARS + 1)),
        };
        r.status = None;
        let err = decide(
            &r,
            &alice,
            Decision::Deny,
            &long,
            at("2026-12-03T20:01:00Z"),
            &key(),
        )
        .unwrap_err();
        assert_eq!(err.code(), StatusCode::BAD_REQUEST);
        // A spec edited after the gateway wrote it (here a ten-year grant) is not decided.
        r.spec.grant.duration = Some("87600h".into());
        for generation in [Some(2), None] {
            r.metadata.generation = generation;
            let err = decide(
                &r,
                &alice,
                Decision::Approve,
                &Default::default(),
                at("2026-12-03T20:01:00Z"),
                &key(),
            )
            .unwrap_err();
            assert_eq!(err.code(), StatusCode::CONFLICT);
            assert!(
                err.message()
                    .contains("its spec was changed after the gateway created it"),
                "{}",
                err.message()
            );
        }
        // A request created by someone else (generation 1, but a spec no gateway sealed:
        // alice as the only approver, a grant of ten years) is not decided either.
        let mut forged = request();
        forged.spec.approvers = Approvers {
            groups: vec![],
            users: vec!["alice".into()],
        };
        forged.spec.grant.duration = Some("87600h".into());
        let mut unsealed = forged.clone();
        unsealed.metadata.annotations = None;
        for (r, says) in [(&forged, "wrong"), (&unsealed, "missing")] {
            let err = decide(
                r,
                &alice,
                Decision::Approve,
                &Default::default(),
                at("2026-12-03T20:01:00Z"),
                &key(),
            )
            .unwrap_err();
            assert_eq!(err.code(), StatusCode::CONFLICT);
            assert!(
                err.message().contains(&format!(
                    "not created by a Chaperone gateway (its spec seal is {says})"
                )),
                "{}",
                err.message()
            );
        }
    }

    #[test]
    fn watches_end_within_twice_the_minimum_or_when_asked() {
        let most = MIN_WATCH_TIMEOUT * 2;
        for _ in 0..100 {
            let t = watch_timeout(None);
            assert!(t >= MIN_WATCH_TIMEOUT && t < most, "{t:?}");
        }
        assert_eq!(
            watch_timeout(Some(Duration::from_secs(5))),
            Duration::from_secs(5)
        );
        assert!(watch_timeout(Some(Duration::from_secs(u64::MAX / 4))) < most);
    }

    #[test]
    fn routes() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(route(&get, "/healthz", None).unwrap(), Route::Health);
        assert_eq!(
            route(&get, BASE_PATH, Some("watch=true")).unwrap(),
            Route::List {
                watch: true,
                timeout: None
            }
        );
        assert_eq!(
            route(&get, BASE_PATH, Some("timeoutSeconds=5&watch=1")).unwrap(),
            Route::List {
                watch: true,
                timeout: Some(Duration::from_secs(5))
            }
        );
        assert_eq!(
            route(&get, "/v1/accessrequests/", None).unwrap(),
            Route::List {
                watch: false,
                timeout: None
            }
        );
        let bad = route(&get, BASE_PATH, Some("watch=true&timeoutSeconds=soon")).unwrap_err();
        assert!(format!("{bad:?}").contains("timeoutSeconds"), "{bad:?}");
        assert_eq!(
            route(&get, "/v1/accessrequests/ar-1", None).unwrap(),
            Route::Get("ar-1".into())
        );
        assert_eq!(
            route(&post, "/v1/accessrequests/ar-1/deny", None).unwrap(),
            Route::Decide("ar-1".into(), Decision::Deny)
        );
        assert_eq!(
            route(&get, "/v1/accessrequests/ar-1/approve", None)
                .unwrap_err()
                .code(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            route(&get, "/v2/other", None).unwrap_err().code(),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn tokens_that_did_not_verify_get_401() {
        let err = Approver::from_principal(&Principal::anonymous()).unwrap_err();
        assert_eq!(err.code(), StatusCode::UNAUTHORIZED);
        let err = Approver::from_principal(&Principal::invalid("expired")).unwrap_err();
        assert!(err.message().contains("expired"));
    }
}
