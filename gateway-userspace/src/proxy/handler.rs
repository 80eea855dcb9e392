//! The request path: [`Proxy::handle`] parses a request into Kubernetes attributes,
//! refuses what it must (client impersonation, unreadable bodies), asks the policy,
//! refuses what cannot be recorded, and forwards the rest upstream.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header,
    uri::{PathAndQuery, Scheme},
};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use tracing::Instrument as _;

use crate::{
    config::ReadsWhileDown,
    error_chain,
    masking::detect::Detectors,
    masking::objects::{Masker, Target},
    policy::{self, Action, RequestContext},
    recorder::{ObjectRef, Outcome, PrincipalRecord, RequestRecord},
    request::{ExecRequest, RequestInfo, Verb},
    status::Status,
};

use super::{
    BoxError, ConnectionInfo, IDENTITY_RETRY_AFTER_SECONDS, Proxy, ProxyBody,
    RECORDING_RETRY_AFTER_SECONDS, bind,
    bodies::{CountingBody, EndOnDrain, MaskedLog, Metered},
    body,
    content::{ContentBody, ReadVersion},
    headers::{sanitize_request_headers, strip_hop_by_hop},
    impersonation::impersonation,
    live::{LiveRequest, LiveStop},
    masked,
    record::{RequestBytes, Row, recorded_json},
    upgrade,
};

thread_local! {
    /// A row's principal until its token is verified (and for a request refused before
    /// that): one per thread, shared by the rows it makes, rather than one per row.
    static UNVERIFIED: Arc<PrincipalRecord> = Arc::default();
}

/// Headers kubectl sends with each request (recorded), named once rather than parsed from
/// text on every request.
const KUBECTL_COMMAND: HeaderName = HeaderName::from_static("kubectl-command");
const KUBECTL_SESSION: HeaderName = HeaderName::from_static("kubectl-session");

thread_local! {
    /// This thread's UUIDv7 clock sequence. `Uuid::now_v7` keeps one for the process behind
    /// a mutex, which the data-path threads took in turn on every request.
    static AUDIT_IDS: uuid::timestamp::context::ContextV7 =
        const { uuid::timestamp::context::ContextV7::new() };
}

/// A request's audit id: a UUIDv7 of its arrival time, increasing on each thread and
/// unique across them (the counter within a millisecond starts at a random value).
fn audit_id(arrived: jiff::Timestamp) -> String {
    let seconds = u64::try_from(arrived.as_second()).unwrap_or(0);
    let nanos = u32::try_from(arrived.subsec_nanosecond()).unwrap_or(0);
    let id =
        AUDIT_IDS.with(|ids| uuid::Uuid::new_v7(uuid::Timestamp::from_unix(ids, seconds, nanos)));
    id.hyphenated()
        .encode_lower(&mut uuid::Uuid::encode_buffer())
        .to_owned()
}

/// Set on a streamed request body that was cut off at `limits.maxRequestBodyBytes`.
#[derive(Clone)]
pub(super) struct BodyLimitExceeded(Arc<AtomicBool>);

/// The detectors that mask a request's streamed output (pod logs, exec/attach stdout and
/// stderr), carried in its extensions from the decision to forwarding.
#[derive(Clone)]
pub(super) struct StreamMasking(pub(super) Detectors);

/// The API server's answer to a body over its limit.
fn request_entity_too_large(why: &dyn std::fmt::Display) -> Status {
    let why = why.to_string();
    // The limit's sentence is the API server's; keep only it when it is in the cause.
    let message = why
        .find("Request entity too large")
        .map_or(why.as_str(), |at| &why[at..]);
    Status::failure(
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestEntityTooLarge",
        message.to_owned(),
    )
}

/// A request between inspection and forwarding.
pub(super) enum Pending {
    /// exec/attach/port-forward: forwarded as an upgrade, its body untouched.
    Upgrade(Request<Incoming>, upgrade::UpgradeProtocol),
    /// Everything else, its body already inspected; the counter holds (or will hold, as
    /// the body streams) the bytes the client sent.
    Plain(Request<ProxyBody>, RequestBytes),
}

impl Pending {
    pub(super) fn method(&self) -> &http::Method {
        match self {
            Pending::Upgrade(r, _) => r.method(),
            Pending::Plain(r, _) => r.method(),
        }
    }

    pub(super) fn uri(&self) -> &Uri {
        match self {
            Pending::Upgrade(r, _) => r.uri(),
            Pending::Plain(r, _) => r.uri(),
        }
    }

    pub(super) fn headers(&self) -> &HeaderMap {
        match self {
            Pending::Upgrade(r, _) => r.headers(),
            Pending::Plain(r, _) => r.headers(),
        }
    }

    pub(super) fn extensions_mut(&mut self) -> &mut http::Extensions {
        match self {
            Pending::Upgrade(r, _) => r.extensions_mut(),
            Pending::Plain(r, _) => r.extensions_mut(),
        }
    }
}

impl Proxy {
    /// Handles one request end to end. Never fails: every problem becomes a `Status`.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        conn: &ConnectionInfo,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let request_time = jiff::Timestamp::now();
        let audit_id = audit_id(request_time);
        let record = Row::new(
            self,
            self.base_record(&req, conn, request_time, &audit_id),
            started,
        );
        // Instrumented, not entered: a guard held across the awaits below would mark the
        // span current on whatever else the thread runs meanwhile.
        let span = tracing::debug_span!("request", %audit_id, cgroup = record.workload.cgroup_id);
        self.handle_in_span(req, conn, audit_id, record)
            .instrument(span)
            .await
    }

    async fn handle_in_span(
        &self,
        req: Request<Incoming>,
        conn: &ConnectionInfo,
        audit_id: String,
        mut record: Row<'_>,
    ) -> Response<ProxyBody> {
        let info = match RequestInfo::parse(req.method(), req.uri()) {
            Ok(info) => info,
            Err(e) => {
                let status = Status::bad_request(format!("chaperone: {e}"));
                record.outcome = Outcome::Invalid;
                record.reason = Some(status.message().to_owned());
                return self.local_response(status, record, &audit_id);
            }
        };
        record.verb = info.verb;
        record.object_ref = ObjectRef {
            api_group: info.api_group.clone(),
            api_version: info.api_version.clone(),
            resource: info.resource.clone(),
            subresource: info.subresource.clone(),
            namespace: info.namespace.clone(),
            name: info.name.clone(),
        };

        // Fail closed: with the kernel redirect on, every connection a pod makes to the API
        // server arrives with the origin the kernel recorded. One without (made to the
        // gateway's own address, or whose record was lost) cannot be attributed to a pod,
        // and serving it would let a pod choose to be "unknown" to every workload rule.
        if self.interceptor.is_some() && conn.origin.is_none() {
            let why = "the connection did not come through the node's redirect (the kernel \
                       recorded no origin for it), so the calling pod is unknown"
                .to_owned();
            let status = forbidden_status(&info, &why);
            record.decision = Some(Action::Deny);
            record.outcome = Outcome::Denied;
            record.reason = Some(why);
            return self.local_response(status, record, &audit_id);
        }
        // Fail closed: a pod that cannot be named yet is not decided as an unknown
        // workload (rules for its workload would not apply); it is asked to come back.
        if let Some(pending) = &conn.identity_pending {
            pending.close.notify_one();
            let why = format!(
                "chaperone: {}, so the workload behind this connection cannot be named and no policy decision is possible; the connection closes, retry",
                pending.why
            );
            record.decision = Some(Action::Deny);
            record.outcome = Outcome::Denied;
            record.reason = Some(why.clone());
            return self.local_response(
                Status::service_unavailable(why, IDENTITY_RETRY_AFTER_SECONDS),
                record,
                &audit_id,
            );
        }
        if let Some(h) = req
            .headers()
            .keys()
            .find(|k| k.as_str().starts_with("impersonate-"))
        {
            let why = format!("the gateway does not pass client impersonation headers ({h})");
            let status = forbidden_status(&info, &why);
            record.decision = Some(Action::Deny);
            record.outcome = Outcome::Denied;
            record.reason = Some(why);
            return self.local_response(status, record, &audit_id);
        }

        let principal = self
            .principals
            .verify_on_connection(
                req.headers().get(header::AUTHORIZATION),
                &conn.workload,
                &conn.tokens,
            )
            .await;
        record.principal = principal.record();
        // Fail closed: a token that cannot be checked now (the API server's TokenReview or
        // an issuer's keys out of reach) is not decided as an invalid one, which rules for
        // its principal would not match.
        if principal.is_unverifiable() {
            let why = format!(
                "chaperone: the bearer token cannot be verified now, so no policy decision \
                 is possible: {}; retry",
                principal
                    .reason
                    .as_deref()
                    .unwrap_or("the verifier is unavailable")
            );
            record.outcome = Outcome::Invalid;
            record.reason = Some(why.clone());
            return self.local_response(
                Status::service_unavailable(why, IDENTITY_RETRY_AFTER_SECONDS),
                record,
                &audit_id,
            );
        }
        if let Some(mismatch) = &principal.mismatch {
            self.metrics.service_account_mismatches.inc();
            tracing::warn!(%mismatch, "service account token does not match the pod");
        }
        // The body is read (up to the limit) before the decision so that a denied request's
        // object is recorded too. Upgrade requests (exec, attach, port-forward) have none.
        let (mut pending, inspected) = match upgrade::upgrade_protocol(&req) {
            // An upgrade request carries no body; one that does would reach the backend
            // (a proxied service) uninspected and unrecorded, and one approval would cover
            // any body. Refused, as any other malformed upgrade.
            Some(_) if upgrade::upgrades(&info) && !http_body::Body::is_end_stream(req.body()) => {
                let status = Status::bad_request(
                    "chaperone: a protocol upgrade (WebSocket or SPDY) request must not carry a body",
                );
                record.outcome = Outcome::Invalid;
                record.reason = Some(status.message().to_owned());
                return self.local_response(status, record, &audit_id);
            }
            Some(protocol) if upgrade::upgrades(&info) => (Pending::Upgrade(req, protocol), None),
            // Fail closed: the upgrade path relays the answer as it comes, so upgrade
            // headers on any other request (the API server would answer a `get secrets`
            // with its object) would skip the body's inspection and the response's masking.
            Some(_) => {
                let status = Status::bad_request(format!(
                    "chaperone: a protocol upgrade (WebSocket or SPDY) is accepted only for \
                     pods/exec, pods/attach, pods/portforward and proxy subresources, not for \
                     {} {}; send the request without `Connection: Upgrade`",
                    info.verb,
                    info.resource_with_subresource()
                ));
                record.outcome = Outcome::Invalid;
                record.reason = Some(status.message().to_owned());
                return self.local_response(status, record, &audit_id);
            }
            None => match self.inspect_body(req, &mut record).await {
                Ok((plain, inspected)) => (plain, Some(inspected)),
                Err(status) => {
                    record.outcome = Outcome::Invalid;
                    record.reason = Some(status.message().to_owned());
                    return self.local_response(status, record, &audit_id);
                }
            },
        };

        let as_whom = impersonation(&self.impersonate, &conn.workload, &principal);
        let exec = (info.resource == "pods"
            && matches!(info.subresource.as_str(), "exec" | "attach"))
        .then(|| ExecRequest::from_uri(pending.uri()));
        let dry_run = dry_run(&info, pending.uri(), inspected.as_ref());
        let judged = ContentBody::of(&info, inspected.as_ref());
        let base = || {
            RequestContext::new(&info)
                .with_workload(&conn.workload)
                .with_principal(&*principal)
                .with_exec(exec.as_ref(), dry_run)
        };
        let (decision, mut read_version) = {
            let policy = self.policy.load();
            if policy.reads_content() && info.is_mutating() {
                // A content rule's dry run is a request to the API server: not made for a
                // request that would be refused as unrecordable anyway.
                if let Some(why) = self.unrecordable(&info) {
                    return self.refuse_unrecordable(why, &info, record, &audit_id);
                }
                let policy = arc_swap::Guard::into_inner(policy);
                // Rare paths are boxed (here and below) so that the state machine of
                // every request, allocated and moved on each request, stays small.
                Box::pin(self.decide_by_content(&policy, base(), &pending, &judged, &as_whom)).await
            } else {
                (self.decide_plain(&policy, &base()), ReadVersion::Nothing)
            }
        };
        // What approval needs of the body: the bytes (fingerprint) and the object (summary).
        let held_body = (decision.action == Action::Approve).then(|| {
            // `None`: a body too large to read whole, which no approval can cover.
            let bytes = match &inspected {
                Some(i) if i.truncated => None,
                Some(i) => Some(i.forwarded.clone().unwrap_or_default()),
                None => Some(Bytes::new()),
            };
            let summary = approval_summary(
                &info,
                exec.as_ref(),
                inspected.as_ref().and_then(|i| i.object.as_ref()),
            );
            (bytes, summary)
        });
        // Fail closed: a masked answer cannot hide what a JSON patch copies or tests, or
        // whether an unforced apply conflicts.
        let patch_refused = decision.masking.as_ref().and_then(|_| {
            inspected
                .as_ref()
                .and_then(body::json_patch_reveals)
                .or_else(|| body::unforced_apply_reveals(pending.headers(), pending.uri()))
        });
        // What the content decision read stays for the approval's second look and the
        // binding (`record_object` takes the inspected body).
        let judged = judged.kept(&read_version, decision.action);
        if let Some(inspected) = inspected {
            self.record_object(&mut record, inspected);
        }
        record.policy_rule = decision.rule.as_deref().map(str::to_owned);
        record.decision = Some(decision.action);
        if let Some(why) = patch_refused
            && decision.action != Action::Deny
        {
            record.decision = Some(Action::Deny);
            record.outcome = Outcome::Denied;
            record.reason = Some(why.clone());
            return self.local_response(forbidden_status(&info, &why), record, &audit_id);
        }
        let mut decision = decision;
        let approved = decision.action == Action::Approve;
        // A body that cannot be bound is refused now, not after a person approved it.
        if approved && let Err(status) = bind::check(&info, &read_version, &pending, &judged) {
            record.outcome = Outcome::Invalid;
            record.reason = Some(status.message().to_owned());
            return self.local_response(*status, record, &audit_id);
        }
        // Nobody is asked to approve (an AccessRequest, notifications, a `once` approval
        // used up) what could not be recorded once approved.
        if approved && let Some(why) = self.unrecordable(&info) {
            return self.refuse_unrecordable(why, &info, record, &audit_id);
        }
        if approved {
            let (body, summary) = held_body.unwrap_or_default();
            if let Err(refused) = Box::pin(self.hold_for_approval(
                &info,
                &decision,
                conn,
                &principal,
                &pending,
                body,
                summary,
                &mut record,
            ))
            .await
            {
                return self.local_response(refused, record, &audit_id);
            }
            // Approved: forwarded like an allowed request, masked as the policy says.
            decision.action = if decision.masking.is_some() {
                Action::Mask
            } else {
                Action::Allow
            };
            // The decision is taken again under the policy in force now, on what is stored
            // now (the wait was minutes): a rule added meanwhile (an emergency deny) stops
            // it, and a request whose decision read the stored object is bound to the
            // version read now, and denied if the object changed so that a rule denies it.
            {
                let policy = arc_swap::Guard::into_inner(self.policy.load());
                let (again, read) = if policy.reads_content() && info.is_mutating() {
                    Box::pin(self.decide_by_content(&policy, base(), &pending, &judged, &as_whom))
                        .await
                } else {
                    (self.decide_plain(&policy, &base()), ReadVersion::Nothing)
                };
                read_version = read;
                // What the approval does not cover: another rule asking for approval, or
                // masking that now applies (or no longer does); the client sends it again
                // and it is decided afresh.
                let changed = match again.action {
                    Action::Deny => None,
                    Action::Approve if again.rule != decision.rule => Some(format!(
                        "now rule {:?} asks for approval",
                        again.rule.as_deref().unwrap_or("?")
                    )),
                    _ if again.masking.is_some() != decision.masking.is_some() => {
                        Some("what the policy masks in its answer changed".to_owned())
                    }
                    _ => None,
                };
                if let Some(changed) = changed {
                    let status = Status::conflict(
                        &info.api_group,
                        &info.resource,
                        &info.name,
                        &format!(
                            "chaperone: the object changed while this request waited for \
                             approval, and {changed}; send it again"
                        ),
                    );
                    record.outcome = Outcome::Invalid;
                    record.reason = Some(status.message().to_owned());
                    return self.local_response(status, record, &audit_id);
                }
                if again.action == Action::Deny {
                    record.policy_rule = again.rule.as_deref().map(str::to_owned);
                    decision = again;
                } else if again.masking.is_some() {
                    decision.masking = again.masking;
                }
            }
        }
        if decision.action == Action::Deny {
            let why = decision.reason();
            tracing::info!(verb = %info.verb, resource = %info.resource, name = %info.name, reason = %why, "denied");
            record.decision = Some(Action::Deny);
            record.outcome = Outcome::Denied;
            record.reason = Some(why.clone());
            return self.local_response(forbidden_status(&info, &why), record, &audit_id);
        }
        // A write judged by the stored object goes bound to the version that was read, and
        // is recorded as it is sent.
        if read_version != ReadVersion::Nothing
            && let Err(status) = self.bind(&info, &read_version, &mut pending, &judged, &mut record)
        {
            record.outcome = Outcome::Invalid;
            record.reason = Some(status.message().to_owned());
            return self.local_response(*status, record, &audit_id);
        }
        match as_whom {
            Ok(as_whom) => {
                record.impersonated_user = as_whom.as_ref().map(|i| i.user.clone());
                // Only an impersonation travels with the request: the first extension of a
                // request costs three allocations, and most requests have none.
                if let Some(as_whom) = as_whom {
                    pending.extensions_mut().insert(as_whom);
                }
            }
            Err(why) => {
                record.decision = Some(Action::Deny);
                record.outcome = Outcome::Denied;
                record.reason = Some(why.clone());
                return self.local_response(forbidden_status(&info, &why), record, &audit_id);
            }
        }
        // Fail closed: what cannot be recorded is not forwarded (reads per configuration).
        if let Some(why) = self.unrecordable(&info) {
            return self.refuse_unrecordable(why, &info, record, &audit_id);
        }
        // No mutation without a durable record: a mutating request, and the start of an
        // exec/attach/port-forward session, is in the write-ahead log (fsynced) before it
        // is forwarded; if the log cannot take it, it is not forwarded.
        if (info.is_mutating() || matches!(pending, Pending::Upgrade(..)))
            && let Err(cause) = Box::pin(self.recorder.begin(&record)).await
        {
            let why = format!(
                "chaperone: this request cannot be made durable in the recording's write-ahead log, so it is refused: {cause}"
            );
            tracing::warn!(verb = %info.verb, resource = %info.resource, name = %info.name, error = %cause, "refused: write-ahead log failed");
            record.outcome = Outcome::RecordingDown;
            record.reason = Some(why.clone());
            return self.local_response(
                Status::service_unavailable(why, RECORDING_RETRY_AFTER_SECONDS),
                record,
                &audit_id,
            );
        }
        if let Some(why) = upgrade::unmaskable(&pending, &info, &decision) {
            record.decision = Some(Action::Deny);
            record.outcome = Outcome::Denied;
            record.reason = Some(why.clone());
            return self.local_response(forbidden_status(&info, &why), record, &audit_id);
        }
        if let Some(detectors) = self.stream_masking(&decision) {
            pending.extensions_mut().insert(StreamMasking(detectors));
        }
        if let Some(rules) = decision.stdin_lines.clone()
            && matches!(pending, Pending::Upgrade(..))
        {
            pending
                .extensions_mut()
                .insert(super::stdin_guard::StdinLines(rules));
        }
        // Long-lived streams are re-checked when the policy reloads: watches, sessions, and
        // followed logs (`kubectl logs -f`, a `get` that never ends).
        let followed_log = info.resource == "pods"
            && info.subresource == "log"
            && pending
                .uri()
                .query()
                .is_some_and(|q| crate::request::query_bool(q, "follow"));
        if info.verb == Verb::Watch || followed_log || matches!(pending, Pending::Upgrade(..)) {
            let live = self.live.register(
                LiveRequest {
                    info: info.clone(),
                    workload: conn.workload.clone(),
                    principal: crate::identity::Principal::clone(&principal),
                    exec: exec.clone(),
                    masking: decision.masking.clone(),
                    approved,
                },
                &self.draining,
                &audit_id,
            );
            pending.extensions_mut().insert(live);
        }
        match pending {
            Pending::Upgrade(req, protocol) => {
                Box::pin(self.forward_upgrade(req, protocol, conn.slot.clone(), record, audit_id))
                    .await
            }
            Pending::Plain(req, count) => {
                self.forward(req, count, record, audit_id, decision.masking)
                    .await
            }
        }
    }

    /// Reads and decodes a request's body (see [`body::inspect`]) and notes what it held
    /// in the record; a body that cannot be accepted becomes the `Status` to answer with.
    pub(super) async fn inspect_body(
        &self,
        req: Request<Incoming>,
        record: &mut RequestRecord,
    ) -> Result<(Pending, body::Inspected), Status> {
        let (mut parts, body) = req.into_parts();
        // The API server's own body limit, for the requests it applies to.
        let limited = matches!(record.verb, Verb::Create | Verb::Update | Verb::Patch)
            && !record.object_ref.resource.is_empty()
            && record.object_ref.subresource != "proxy";
        let limit = (limited && self.limits.max_request_body_bytes > 0)
            .then_some(self.limits.max_request_body_bytes as usize);
        let inspected = body::inspect(
            &mut parts,
            body,
            self.limits.max_inspected_body_bytes as usize,
            limit,
            self.limits.body_read_timeout,
            if record.object_ref.subresource == "proxy" {
                body::Strictness::Passthrough
            } else {
                body::Strictness::ApiObject
            },
        )
        .await;
        let (body, inspected) = match inspected {
            Ok(ok) => ok,
            Err(e) => {
                record.request_content_type = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                return Err(match &e {
                    body::BodyError::Timeout(_) => Status::failure(
                        StatusCode::REQUEST_TIMEOUT,
                        "Timeout",
                        format!("chaperone: {e}"),
                    ),
                    body::BodyError::Read(_) | body::BodyError::DuplicateKey(_) => {
                        Status::bad_request(format!("chaperone: {e}"))
                    }
                    body::BodyError::TooLarge { .. } => request_entity_too_large(&e),
                    body::BodyError::Protobuf(_) => Status::failure(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        format!("chaperone: {e}"),
                    ),
                });
            }
        };
        // A body read whole is counted as the client sent it (what is forwarded may be
        // transcoded); one that streams through is counted on the way.
        let (body, count) = match inspected.whole_len {
            Some(n) => (body, RequestBytes::Known(n)),
            None => {
                let count = Arc::new(AtomicU64::new(0));
                let body = CountingBody {
                    inner: body,
                    count: count.clone(),
                };
                (body.boxed(), RequestBytes::Counted(count))
            }
        };
        if let Some(exceeded) = &inspected.exceeded {
            parts.extensions.insert(BodyLimitExceeded(exceeded.clone()));
        }
        Ok((
            Pending::Plain(Request::from_parts(parts, body), count),
            inspected,
        ))
    }

    /// Puts what body inspection found into the record: the masked object, size-capped.
    pub(super) fn record_object(&self, record: &mut RequestRecord, inspected: body::Inspected) {
        record.request_content_type = inspected.content_type;
        record.request_object_truncated = inspected.truncated;
        if let Some(object) = inspected.object {
            match recorded_json(record, object, self.max_object_bytes) {
                Some(text) => record.request_object = Some(text),
                None => record.request_object_truncated = true,
            }
        }
    }

    pub(super) fn base_record(
        &self,
        req: &Request<Incoming>,
        conn: &ConnectionInfo,
        request_time: jiff::Timestamp,
        audit_id: &str,
    ) -> Box<RequestRecord> {
        let header = |name: &HeaderName| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Box::new(RequestRecord {
            request_time,
            response_time: None,
            latency_us: 0,
            audit_id: audit_id.to_owned(),
            node: Arc::clone(&self.node),
            cluster: Arc::clone(&self.cluster),
            workload: Arc::clone(&conn.record.workload),
            source_addr: Arc::clone(&conn.record.source_addr),
            original_dst: conn.record.original_dst.clone(),
            user_agent: header(&header::USER_AGENT),
            kubectl_command: header(&KUBECTL_COMMAND),
            kubectl_session: header(&KUBECTL_SESSION),
            verb: Verb::of_method(req.method()),
            request_uri: req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
            object_ref: ObjectRef::default(),
            decision: None,
            policy_rule: None,
            reason: None,
            response_code: 0,
            request_bytes: 0,
            response_bytes: 0,
            error: None,
            principal: UNVERIFIED.with(Arc::clone),
            impersonated_user: None,
            request_content_type: None,
            request_object: None,
            request_object_truncated: false,
            masked_fields: 0,
            response_object: None,
            response_object_truncated: false,
            outcome: Outcome::Invalid,
            masked: None,
            approval_outcome: None,
            access_request: None,
            approval_decided_by: None,
            approval_wait_ms: None,
        })
    }

    /// The detectors that mask this request's streamed output (`pods/log`, exec/attach
    /// stdout and stderr): those of the decision's masking, when it masks.
    fn stream_masking(&self, decision: &policy::Decision) -> Option<Detectors> {
        decision.masking.as_ref().and_then(|m| m.stream_detectors())
    }

    pub(super) fn local_response(
        &self,
        status: Status,
        mut record: Row<'_>,
        audit_id: &str,
    ) -> Response<ProxyBody> {
        let response: Response<Full<Bytes>> = status.into_response();
        record.response_code = i32::from(response.status().as_u16());
        let (mut parts, body) = response.into_parts();
        insert_audit_id(&mut parts.headers, audit_id);
        let body = body.map_err(|never| match never {}).boxed();
        let guard = record.into_guard(RequestBytes::Known(0));
        Response::from_parts(parts, Metered::new(body, guard).boxed())
    }

    /// The 503 for a request that cannot carry the gateway's credential: it is never
    /// forwarded without it.
    pub(super) fn credential_unavailable(
        &self,
        cause: &str,
        mut record: Row<'_>,
        audit_id: &str,
    ) -> Response<ProxyBody> {
        tracing::warn!(upstream = %self.upstream_base, error = %cause, "no gateway credential; request not forwarded");
        record.outcome = Outcome::UpstreamFailed;
        record.error = Some(format!("gateway credential unavailable: {cause}"));
        let status = Status::failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            format!(
                "chaperone: the gateway's credential for the API server is unavailable: {cause}"
            ),
        );
        self.local_response(status, record, audit_id)
    }

    pub(super) async fn forward(
        &self,
        req: Request<ProxyBody>,
        request_bytes: RequestBytes,
        mut record: Row<'_>,
        audit_id: String,
        masking: Option<Arc<Masker>>,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let live = parts.extensions.remove::<LiveStop>();
        // Pod logs are masked line by line as they stream (`kubectl logs -f` never ends).
        let mask_log = parts
            .extensions
            .remove::<StreamMasking>()
            .map(|m| m.0)
            .filter(|_| {
                record.verb == Verb::Get
                    && record.object_ref.resource == "pods"
                    && record.object_ref.subresource == "log"
            });
        let exceeded = parts
            .extensions
            .get::<BodyLimitExceeded>()
            .map(|e| e.0.clone());
        parts.uri = match upstream_uri(&self.upstream_base, &parts.uri) {
            Ok(uri) => uri,
            Err(e) => {
                record.outcome = Outcome::Invalid;
                let status =
                    Status::bad_request(format!("chaperone: cannot forward {}: {e}", parts.uri));
                return self.local_response(status, record, &audit_id);
            }
        };
        sanitize_request_headers(&mut parts.headers);
        // The API server takes it as its audit event's id and sends it back: its audit log
        // and the recording name the request alike.
        insert_audit_id(&mut parts.headers, &audit_id);
        if let Err(cause) = self.upstream_credentials(&mut parts.headers, &parts.extensions) {
            return self.credential_unavailable(&cause, record, &audit_id);
        }
        // Watches stream for as long as they last; they are recorded as requests only.
        let capture = self.record_responses && record.verb != Verb::Watch;
        if let Some(masker) = &masking {
            // What is masked must arrive as JSON (see `masked`), and not as a Table when
            // configured paths apply (a Table's cells do not say which field they show).
            let tables = !masker.paths_apply_to(Target {
                group: &record.object_ref.api_group,
                resource: &record.object_ref.resource,
            });
            let accept = masked::json_only_accept(parts.headers.get(header::ACCEPT), tables);
            parts.headers.insert(header::ACCEPT, accept);
        } else if capture
            && let Some(json) = parts
                .headers
                .get(header::ACCEPT)
                .and_then(body::accept_json)
        {
            parts.headers.insert(header::ACCEPT, json);
        }
        if mask_log.is_some() {
            // Masking reads the text: ask for it uncompressed.
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        // The upstream connection's protocol is negotiated independently of the client's
        // (the pool sets the version, URI form and `Host` for the connection it picks).
        parts.version = http::Version::HTTP_11;
        let upstream_req = Request::from_parts(parts, body);

        record.may_have_applied = !matches!(
            record.verb,
            Verb::Get | Verb::List | Verb::Watch | Verb::Head | Verb::Options
        );
        match self.upstream().request(upstream_req).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                record.response_code = i32::from(parts.status.as_u16());
                record.response_time = Some(jiff::Timestamp::now());
                record.outcome = Outcome::Forwarded;
                strip_hop_by_hop(&mut parts.headers);
                keep_or_insert_audit_id(&mut parts.headers, &audit_id);
                let watch = record.verb == Verb::Watch;
                let mut body = body.map_err(BoxError::from).boxed();
                let mut live_report = None;
                let mut response_masked = false;
                // Pod logs are masked as they stream; anything else that is not JSON
                // cannot be read here, so it does not pass.
                let log =
                    record.object_ref.resource == "pods" && record.object_ref.subresource == "log";
                if masking.is_some()
                    && !log
                    && record.verb != Verb::Head
                    && let Some(why) = masked::unmaskable_other(parts.status, &parts.headers)
                {
                    self.metrics.masking_failures.inc();
                    tracing::warn!(resource = %record.object_ref.resource, error = %why, "response could not be masked; refused");
                    record.error = Some(why.clone());
                    return self.local_response(masked::refusal(&why), record, &audit_id);
                }
                if let Some(masker) = masking {
                    let target = Target {
                        group: &record.object_ref.api_group,
                        resource: &record.object_ref.resource,
                    };
                    response_masked = masker.masks_secrets();
                    let dry_run_write =
                        matches!(record.verb, Verb::Create | Verb::Update | Verb::Patch)
                            && record.request_uri.split_once('?').is_some_and(|(_, q)| {
                                !crate::request::query_values(q, "dryRun").is_empty()
                            });
                    match Box::pin(masked::mask_response(
                        &mut parts,
                        body,
                        masker.clone(),
                        target,
                        watch,
                        dry_run_write,
                        self.metrics.clone(),
                    ))
                    .await
                    {
                        Ok(done) => {
                            body = done.body;
                            live_report = done.live;
                            record.masked_fields = record.masked_fields.saturating_add(
                                i32::try_from(done.report.total()).unwrap_or(i32::MAX),
                            );
                            record.masked = done.report.to_json();
                        }
                        Err(why) => {
                            self.metrics.masking_failures.inc();
                            tracing::warn!(verb = %record.verb, resource = %record.object_ref.resource, error = %why, "response could not be masked; refused");
                            record.error = Some(why.clone());
                            return self.local_response(masked::refusal(&why), record, &audit_id);
                        }
                    }
                }
                let json = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|ct| ct.starts_with("application/json"));
                let encoded = parts
                    .headers
                    .get(header::CONTENT_ENCODING)
                    .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
                if mask_log.is_some() && encoded {
                    // Fail closed: a log the gateway cannot read is not passed on.
                    let why = "chaperone: this pod log must be masked, but the API server sent it compressed".to_owned();
                    self.metrics.masking_failures.inc();
                    record.outcome = Outcome::UpstreamFailed;
                    record.reason = Some(why.clone());
                    let status = Status::failure(StatusCode::BAD_GATEWAY, "InternalError", why);
                    return self.local_response(status, record, &audit_id);
                }
                let mut guard = record.into_guard(request_bytes);
                if capture && json {
                    guard.capture = Some(body::Capture::new(self.max_object_bytes));
                }
                guard.live_report = live_report;
                guard.response_masked = response_masked;
                if let Some(detectors) = mask_log {
                    // The length changes with masking; the body streams chunked instead.
                    parts.headers.remove(header::CONTENT_LENGTH);
                    let masked = Arc::new(AtomicU64::new(0));
                    guard.masked_streamed = Some(masked.clone());
                    body = MaskedLog::new(body, detectors, masked).boxed();
                }
                if watch || live.is_some() {
                    // A watch (or a followed log) never ends by itself; on drain, or when a
                    // reloaded policy denies it or masks it differently, it ends cleanly
                    // (the client sees the end of the stream and re-lists, and the re-list
                    // is decided anew) rather than being reset.
                    body = match live {
                        Some(live) => EndOnDrain::live(body, live).boxed(),
                        None => EndOnDrain::new(body, self.draining.clone()).boxed(),
                    };
                }
                let body = Metered::new(body, guard);
                Response::from_parts(parts, body.boxed())
            }
            Err(e) => {
                let cause = error_chain(&e);
                if exceeded.is_some_and(|e| e.load(Ordering::Relaxed)) {
                    // The body was cut off at its limit: the client's fault, answered as the
                    // API server would, whatever the upstream connection did meanwhile.
                    let status = request_entity_too_large(&cause);
                    record.outcome = Outcome::Invalid;
                    record.reason = Some(status.message().to_owned());
                    return self.local_response(status, record, &audit_id);
                }
                tracing::warn!(upstream = %self.upstream_base, error = %cause, "upstream request failed");
                record.outcome = Outcome::UpstreamFailed;
                record.error = Some(cause.clone());
                let status = Status::failure(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    format!(
                        "chaperone: the API server at {} is unavailable: {cause}",
                        self.upstream_base
                    ),
                );
                self.local_response(status, record, &audit_id)
            }
        }
    }
}

/// Whether the API server will only dry-run the request. Its options come from the query,
/// except for a delete with a body: the API server then decodes `DeleteOptions` from the
/// body and ignores the query. A body the gateway could not read says "not a dry run"
/// (rules that let dry runs through must not let a real delete through). Only writes of
/// objects have a dry run: exec, attach, port-forward and proxies ignore `dryRun` and act,
/// and reads have none, so for them it is never one.
fn dry_run(info: &RequestInfo, uri: &Uri, inspected: Option<&body::Inspected>) -> bool {
    let writes = matches!(
        info.verb,
        Verb::Create | Verb::Update | Verb::Patch | Verb::Delete | Verb::DeleteCollection
    );
    if !writes
        || matches!(
            info.subresource.as_str(),
            "exec" | "attach" | "portforward" | "proxy"
        )
    {
        return false;
    }
    let deletes = matches!(info.verb, Verb::Delete | Verb::DeleteCollection);
    if deletes
        && let Some(inspected) = inspected
        && (inspected.truncated || inspected.forwarded.as_ref().is_some_and(|b| !b.is_empty()))
    {
        return inspected
            .object
            .as_ref()
            .and_then(|o| o.get("dryRun"))
            .and_then(serde_json::Value::as_array)
            .is_some_and(|modes| !modes.is_empty());
    }
    uri.query().is_some_and(|q| {
        q.split('&')
            .any(|p| p.starts_with("dryRun=") && p != "dryRun=")
    })
}

/// Sets the `Audit-Id` response header, as the API server does.
///
/// The value is marked sensitive, which HTTP/2 sends as a literal "never indexed": an id
/// that never repeats would otherwise be added to the connection's HPACK table on every
/// response, evicting the headers that do repeat, and the encoder would compare each new id
/// with the dozens of earlier ones under the same name (a tenth of h2's CPU per request,
/// docs/benchmarks.md).
pub(super) fn insert_audit_id(headers: &mut HeaderMap, audit_id: &str) {
    if let Ok(mut v) = HeaderValue::from_str(audit_id) {
        v.set_sensitive(true);
        headers.insert(HeaderName::from_static("audit-id"), v);
    }
}

/// Keeps the API server's `Audit-Id` on a relayed response (never indexed either, see
/// [`insert_audit_id`]), or sets the gateway's when it sent none.
pub(super) fn keep_or_insert_audit_id(headers: &mut HeaderMap, audit_id: &str) {
    match headers.get_mut("audit-id") {
        Some(theirs) => theirs.set_sensitive(true),
        None => insert_audit_id(headers, audit_id),
    }
}

/// The 403 the API server's authorizer would send, carrying Chaperone's reason.
pub(super) fn forbidden_status(info: &RequestInfo, why: &str) -> Status {
    if info.is_resource_request {
        Status::forbidden(
            &info.api_group,
            &info.resource_with_subresource(),
            &info.name,
            why,
        )
    } else {
        Status::failure(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("forbidden: {why}"),
        )
    }
}

/// One line an approver can decide on: the verb and target, plus what matters for the
/// request's kind (the exec argv, the replica count, the images, privileged containers).
/// Built from named fields only, so no secret value ends up in it.
pub(super) fn approval_summary(
    info: &RequestInfo,
    exec: Option<&ExecRequest>,
    object: Option<&serde_json::Value>,
) -> String {
    let target = match (info.namespace.as_str(), info.name.as_str()) {
        ("", "") => info.resource_with_subresource(),
        ("", name) => format!("{} {name}", info.resource_with_subresource()),
        (ns, "") => format!("{} in {ns}", info.resource_with_subresource()),
        (ns, name) => format!("{} {ns}/{name}", info.resource_with_subresource()),
    };
    let mut line = if info.is_resource_request {
        format!("{} {target}", info.verb)
    } else {
        format!("{} {}", info.verb, info.path)
    };
    if let Some(exec) = exec.filter(|e| !e.command.is_empty()) {
        line.push_str(&format!(": {}", exec.command.join(" ")));
    }
    if let Some(obj) = object {
        if let Some(replicas) = obj
            .pointer("/spec/replicas")
            .and_then(serde_json::Value::as_i64)
        {
            line.push_str(&format!(", replicas={replicas}"));
        }
        let spec = obj
            .pointer("/spec/template/spec")
            .or_else(|| obj.pointer("/spec"));
        if let Some(containers) = spec
            .and_then(|s| s.get("containers"))
            .and_then(serde_json::Value::as_array)
        {
            let images: Vec<&str> = containers
                .iter()
                .filter_map(|c| c.get("image").and_then(serde_json::Value::as_str))
                .collect();
            if !images.is_empty() {
                line.push_str(&format!(", image={}", images.join(",")));
            }
            if containers.iter().any(|c| {
                c.pointer("/securityContext/privileged")
                    .and_then(serde_json::Value::as_bool)
                    == Some(true)
            }) {
                line.push_str(", privileged");
            }
        }
    }
    summary_line(&line)
}

/// Longest approval summary, in characters.
const MAX_SUMMARY_CHARS: usize = 512;

/// `line` as an approver may safely read it: control characters (an escape sequence in an
/// exec argument could redraw the approver's terminal) written as escapes, and a cut
/// marked with `…` so padding cannot push the end of a command out of sight unnoticed.
fn summary_line(line: &str) -> String {
    let printable: Vec<char> = crate::approval::client::printable(line).chars().collect();
    if printable.len() <= MAX_SUMMARY_CHARS {
        return printable.into_iter().collect();
    }
    let mut cut: String = printable[..MAX_SUMMARY_CHARS - 1].iter().collect();
    cut.push('…');
    cut
}

/// Joins the upstream base (`https://host:port[/prefix]`) with the client's path and query.
pub(super) fn upstream_uri(base: &Uri, client: &Uri) -> Result<Uri, http::Error> {
    let prefix = base.path().trim_end_matches('/');
    let path_and_query = match client.path_and_query() {
        // The usual case (no path prefix): the client's path and query as they are, shared
        // rather than parsed again.
        Some(pq) if prefix.is_empty() => pq.clone(),
        pq => PathAndQuery::try_from(format!("{prefix}{}", pq.map_or("/", PathAndQuery::as_str)))?,
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(base.scheme().cloned().unwrap_or(Scheme::HTTPS));
    parts.authority = base.authority().cloned();
    parts.path_and_query = Some(path_and_query);
    Ok(Uri::from_parts(parts)?)
}

impl Proxy {
    /// The decision of a request whose content is not read (reads, and every request
    /// under a policy without content conditions): a condition that would need it is
    /// decided as unavailable.
    fn decide_plain(&self, policy: &policy::Policy, base: &RequestContext<'_>) -> policy::Decision {
        let evaluation = policy::evaluate(policy, base);
        if let policy::Evaluation::ConditionFailed(_) = &evaluation {
            self.metrics.condition_failures.inc();
        }
        match evaluation {
            policy::Evaluation::Decided(d) | policy::Evaluation::ConditionFailed(d) => d,
            policy::Evaluation::NeedsContent { .. } => policy::decide(
                policy,
                &(*base).with_content(
                    policy::Content::Unavailable("not fetched"),
                    policy::Content::Unavailable("not fetched"),
                ),
            ),
        }
    }

    /// Why `info` must be refused because recording is down: every mutating request, and
    /// reads unless `recording.readsWhileDown` lets them pass.
    fn unrecordable(&self, info: &RequestInfo) -> Option<String> {
        let cause = self.recorder.health().err()?;
        (info.is_mutating() || self.reads_while_down == ReadsWhileDown::Refuse).then(|| {
            format!(
                "chaperone: recording is down, so this request cannot be recorded and is refused: {cause}"
            )
        })
    }

    /// The 503 for a request [`Proxy::unrecordable`] refuses.
    fn refuse_unrecordable(
        &self,
        why: String,
        info: &RequestInfo,
        mut record: Row<'_>,
        audit_id: &str,
    ) -> Response<ProxyBody> {
        tracing::warn!(verb = %info.verb, resource = %info.resource, name = %info.name, "refused while recording is down");
        record.outcome = Outcome::RecordingDown;
        record.reason = Some(why.clone());
        self.local_response(
            Status::service_unavailable(why, RECORDING_RETRY_AFTER_SECONDS),
            record,
            audit_id,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_escape_control_characters_and_mark_a_cut() {
        assert_eq!(summary_line("exec sh -c ls"), "exec sh -c ls");
        assert_eq!(
            summary_line("exec rm -rf /\u{1b}[2K\r get pods"),
            "exec rm -rf /\\u{1b}[2K\\r get pods"
        );
        let long = format!("exec {} rm -rf /", "x".repeat(600));
        let cut = summary_line(&long);
        assert_eq!(cut.chars().count(), MAX_SUMMARY_CHARS);
        assert!(cut.ends_with('…'), "{cut}");
        let exact = "y".repeat(MAX_SUMMARY_CHARS);
        assert_eq!(summary_line(&exact), exact, "no marker when nothing is cut");
        let one_more = format!("{exact}z");
        let cut = summary_line(&one_more);
        assert_eq!(cut.chars().count(), MAX_SUMMARY_CHARS);
        assert!(cut.ends_with("y…"), "{cut}");
    }

    #[test]
    fn a_delete_with_a_body_is_a_dry_run_only_when_its_delete_options_say_so() {
        let at = |method: &str, uri: &str| {
            let uri: Uri = uri.parse().expect("uri");
            let info = RequestInfo::parse(&method.parse().expect("method"), &uri).expect("info");
            (info, uri)
        };
        let body = |json: &str, object: Option<serde_json::Value>| body::Inspected {
            object,
            forwarded: Some(Bytes::from(json.to_owned())),
            ..body::Inspected::default()
        };
        let empty = body::Inspected {
            forwarded: Some(Bytes::new()),
            ..body::Inspected::default()
        };
        let options = r#"{"kind":"DeleteOptions","apiVersion":"v1"}"#;
        let dry = r#"{"kind":"DeleteOptions","apiVersion":"v1","dryRun":["All"]}"#;
        let parsed = |s: &str| serde_json::from_str(s).ok();
        for (method, uri, inspected, want) in [
            // The query decides without a body, for deletes and everything else.
            (
                "DELETE",
                "/api/v1/namespaces/d/pods/p?dryRun=All",
                Some(&empty),
                true,
            ),
            ("DELETE", "/api/v1/namespaces/d/pods/p", Some(&empty), false),
            ("POST", "/api/v1/namespaces/d/pods?dryRun=All", None, true),
            // With a body the API server reads DeleteOptions and ignores the query.
            (
                "DELETE",
                "/api/v1/namespaces/d/pods/p?dryRun=All",
                Some(&body(options, parsed(options))),
                false,
            ),
            (
                "DELETE",
                "/api/v1/namespaces/d/pods/p",
                Some(&body(dry, parsed(dry))),
                true,
            ),
            (
                "DELETE",
                "/api/v1/namespaces/d/pods?dryRun=All",
                Some(&body(options, parsed(options))),
                false,
            ),
            // Sessions and proxies ignore `dryRun` and act; reads have no dry run.
            (
                "POST",
                "/api/v1/namespaces/d/pods/p/exec?command=rm&dryRun=All",
                None,
                false,
            ),
            (
                "GET",
                "/api/v1/namespaces/d/pods/p/exec?command=rm&dryRun=All",
                None,
                false,
            ),
            (
                "POST",
                "/api/v1/namespaces/d/services/s/proxy/reset?dryRun=All",
                None,
                false,
            ),
            ("GET", "/api/v1/namespaces/d/pods/p?dryRun=All", None, false),
            (
                "PATCH",
                "/api/v1/namespaces/d/pods/p/status?dryRun=All",
                None,
                true,
            ),
            // A body the gateway could not read is no dry run.
            (
                "DELETE",
                "/api/v1/namespaces/d/pods/p?dryRun=All",
                Some(&body("{not json", None)),
                false,
            ),
        ] {
            let (info, uri) = at(method, uri);
            assert_eq!(dry_run(&info, &uri, inspected), want, "{method} {uri}");
        }
    }

    #[test]
    fn audit_ids_are_v7_of_the_arrival_increasing_and_unique_across_threads() {
        let arrived: jiff::Timestamp = "2026-12-04T18:00:00.123456789Z".parse().unwrap();
        let ids: Vec<Vec<String>> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| (0..2000).map(|_| audit_id(arrived)).collect()))
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let mut all = std::collections::HashSet::new();
        for on_thread in &ids {
            for pair in on_thread.windows(2) {
                assert!(pair[0] < pair[1], "{} then {}", pair[0], pair[1]);
            }
            for id in on_thread {
                let uuid = uuid::Uuid::parse_str(id).unwrap();
                assert_eq!(uuid.get_version_num(), 7, "{id}");
                let (seconds, nanos) = uuid.get_timestamp().unwrap().to_unix();
                assert_eq!((seconds, nanos / 1_000_000), (1_796_407_200, 123), "{id}");
                assert!(all.insert(id.clone()), "{id} twice");
            }
        }
        assert_eq!(all.len(), 8000);
    }

    #[test]
    fn audit_ids_are_never_indexed_and_the_api_servers_is_kept() {
        let mut ours = HeaderMap::new();
        keep_or_insert_audit_id(&mut ours, "0193d9a8-0000-7000-8000-000000000001");
        let id = &ours["audit-id"];
        assert_eq!(id, "0193d9a8-0000-7000-8000-000000000001");
        assert!(
            id.is_sensitive(),
            "a gateway id would churn the HPACK table"
        );

        let mut relayed = HeaderMap::new();
        relayed.insert("audit-id", HeaderValue::from_static("from-the-api-server"));
        keep_or_insert_audit_id(&mut relayed, "0193d9a8-0000-7000-8000-000000000002");
        assert_eq!(relayed.get_all("audit-id").iter().count(), 1);
        let id = &relayed["audit-id"];
        assert_eq!(id, "from-the-api-server");
        assert!(
            id.is_sensitive(),
            "the API server's id churns the table as much"
        );
    }

    #[test]
    fn upstream_uri_keeps_path_and_query() {
        let base: Uri = "https://127.0.0.1:6443".parse().unwrap();
        let client: Uri = "/api/v1/namespaces/default/pods?limit=500&watch=1"
            .parse()
            .unwrap();
        assert_eq!(
            upstream_uri(&base, &client).unwrap().to_string(),
            "https://127.0.0.1:6443/api/v1/namespaces/default/pods?limit=500&watch=1"
        );
        let bare: Uri = "https://127.0.0.1:6443".parse().unwrap();
        assert_eq!(
            upstream_uri(&bare, &"/".parse().unwrap())
                .unwrap()
                .to_string(),
            "https://127.0.0.1:6443/"
        );
        let prefixed: Uri = "https://lb.example:443/k8s/".parse().unwrap();
        assert_eq!(
            upstream_uri(&prefixed, &client).unwrap().path(),
            "/k8s/api/v1/namespaces/default/pods"
        );
        assert_eq!(
            upstream_uri(&prefixed, &client).unwrap().query(),
            Some("limit=500&watch=1")
        );
    }
}
