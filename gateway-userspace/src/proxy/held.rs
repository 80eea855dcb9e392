//! Requests decided `approve`: handed to the approval [`Holder`](crate::approval::holder)
//! and answered from its outcome.

use bytes::Bytes;

use crate::{
    approval::{
        holder::{HoldOutcome, HoldRequest},
        resource::{RequestedAction, WorkloadRef},
    },
    identity::principal::Principal,
    policy::Decision,
    recorder::{Outcome, RequestRecord},
    request::RequestInfo,
    status::Status,
};

use super::{ConnectionInfo, Proxy, handler::Pending, handler::forbidden_status};

/// The credential detectors with their default settings, compiled once: they mask an
/// AccessRequest's summary when the policy's masking names none for the request.
static DEFAULT_DETECTORS: std::sync::LazyLock<Option<crate::masking::detect::Detectors>> =
    std::sync::LazyLock::new(|| {
        crate::masking::detect::Detectors::compile(&Default::default()).ok()
    });

/// Text of the AccessRequest (summary, path) as approvers will read it: credentials (a
/// password in an exec argv, a token in an image reference) replaced by the request's
/// masking detectors, or the default ones.
fn masked(decision: &Decision, summary: &str) -> String {
    let own = decision.masking.as_ref().and_then(|m| m.stream_detectors());
    let detectors = own.as_ref().or(DEFAULT_DETECTORS.as_ref());
    match detectors {
        Some(d) => d.redact(summary, &mut Vec::new()).into_owned(),
        // No detector could be built: say less rather than leak.
        None => summary.split(':').next().unwrap_or_default().to_owned(),
    }
}

/// Seconds a client is told to wait before retrying when a request cannot be held.
const HOLD_RETRY_AFTER_SECONDS: u32 = 5;

/// The approval columns of the request's row.
fn note(
    record: &mut RequestRecord,
    outcome: &str,
    name: Option<&str>,
    by: Option<&str>,
    waited_ms: Option<i64>,
) {
    record.approval_outcome = Some(outcome.to_owned());
    record.access_request = name.map(str::to_owned);
    record.approval_decided_by = by.map(str::to_owned);
    record.approval_wait_ms = waited_ms;
}

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A request that is not let through: its row's approval columns (`outcome`, the
/// AccessRequest, who decided, the wait), outcome and reason, and the 403 to answer with.
fn refused(
    record: &mut RequestRecord,
    info: &RequestInfo,
    why: &str,
    outcome: &str,
    name: Option<&str>,
    by: Option<&str>,
    waited_ms: Option<i64>,
) -> Status {
    note(record, outcome, name, by, waited_ms);
    record.outcome = Outcome::Denied;
    record.reason = Some(why.to_owned());
    forbidden_status(info, why)
}

impl Proxy {
    /// Holds a request decided `approve` until it is decided: `Ok` when approved (forward
    /// it), else the `Status` to answer with. Records the outcome in `record`.
    #[expect(
        clippy::too_many_arguments,
        reason = "the request's parts, borrowed from handle()"
    )]
    pub(super) async fn hold_for_approval(
        &self,
        info: &RequestInfo,
        decision: &Decision,
        conn: &ConnectionInfo,
        principal: &Principal,
        pending: &Pending,
        body: Option<Bytes>,
        summary: String,
        record: &mut RequestRecord,
    ) -> Result<(), Status> {
        let rule = decision.rule.as_deref().unwrap_or("");
        let (Some(holder), Some(approval)) = (self.approvals(), decision.approval.as_deref())
        else {
            let why = format!(
                "{}; this gateway cannot hold requests for approval (approval is not configured), so it is refused",
                decision.reason()
            );
            return Err(refused(record, info, &why, "failed", None, None, None));
        };
        // An approval covers exactly what was sent: a body too large to read whole could
        // not be told from another, so such a request cannot be held and is refused.
        let Some(body) = body else {
            let why = format!(
                "{}; the request body is larger than the gateway reads whole (limits.maxInspectedBodyBytes), so an approval could not cover exactly what would be forwarded, and the request is refused",
                decision.reason()
            );
            return Err(refused(record, info, &why, "failed", None, None, None));
        };
        let workload = WorkloadRef {
            namespace: conn.workload.namespace.clone().unwrap_or_default(),
            pod: conn.workload.pod.clone().unwrap_or_default(),
            service_account: conn.workload.service_account.clone(),
            uid: conn.workload.pod_uid.clone(),
        };
        let resource = if info.api_group.is_empty() {
            info.resource.to_string()
        } else {
            format!("{}/{}", info.api_group, info.resource)
        };
        let target = pending
            .uri()
            .path_and_query()
            .map_or_else(|| info.path.clone(), |p| p.as_str().to_owned());
        let path = masked(decision, &target);
        let request = HoldRequest {
            rule,
            approval,
            workload,
            principal: principal.subject.clone(),
            method: pending.method().as_str(),
            target: &target,
            content_type: pending
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
            action: RequestedAction {
                verb: info.verb.as_str().to_owned(),
                resource,
                subresource: (!info.subresource.is_empty()).then(|| info.subresource.to_string()),
                namespace: (!info.namespace.is_empty()).then(|| info.namespace.to_string()),
                name: (!info.name.is_empty()).then(|| info.name.to_string()),
                path,
                summary: masked(decision, &summary),
            },
            body: &body,
        };
        let ns = holder.namespace().to_owned();
        match holder.hold(&request).await {
            HoldOutcome::Approved {
                name,
                decided_by,
                waited,
                via_grant,
            } => {
                note(
                    record,
                    "approved",
                    Some(&name),
                    decided_by.as_deref(),
                    Some(ms(waited)),
                );
                record.reason = Some(if via_grant {
                    format!("approved by the grant of AccessRequest {ns}/{name} (rule \"{rule}\")")
                } else {
                    format!(
                        "approved by {} through AccessRequest {ns}/{name} (rule \"{rule}\")",
                        decided_by.as_deref().unwrap_or("an approver")
                    )
                });
                Ok(())
            }
            HoldOutcome::Denied {
                name,
                decided_by,
                comment,
                waited,
            } => {
                let by = decided_by.as_deref().unwrap_or("an approver");
                let why = match comment.as_deref().filter(|c| !c.is_empty()) {
                    Some(c) => format!(
                        "denied by {by} through AccessRequest {ns}/{name} (Chaperone policy rule \"{rule}\"): {c}"
                    ),
                    None => format!(
                        "denied by {by} through AccessRequest {ns}/{name} (Chaperone policy rule \"{rule}\")"
                    ),
                };
                Err(refused(
                    record,
                    info,
                    &why,
                    "denied",
                    Some(&name),
                    decided_by.as_deref(),
                    Some(ms(waited)),
                ))
            }
            HoldOutcome::Expired { name, waited } => {
                let why = format!(
                    "expired waiting for approval: nobody decided on AccessRequest {ns}/{name} within {}s (Chaperone policy rule \"{rule}\")",
                    approval.timeout.as_secs()
                );
                Err(refused(
                    record,
                    info,
                    &why,
                    "expired",
                    Some(&name),
                    Some(crate::approval::holder::EXPIRY_DECIDER),
                    Some(ms(waited)),
                ))
            }
            HoldOutcome::Used {
                name,
                decided_by,
                waited,
            } => {
                let why = format!(
                    "AccessRequest {ns}/{name} was approved{} for one request (Chaperone policy rule \"{rule}\"), and an identical request that waited with this one went through on it; send this request again to ask for its own approval",
                    decided_by
                        .as_deref()
                        .map(|by| format!(" by {by}"))
                        .unwrap_or_default()
                );
                Err(refused(
                    record,
                    info,
                    &why,
                    "used",
                    Some(&name),
                    decided_by.as_deref(),
                    Some(ms(waited)),
                ))
            }
            HoldOutcome::Queued { name } => {
                let who: Vec<String> = approval
                    .approvers
                    .groups
                    .iter()
                    .map(|g| format!("group {g}"))
                    .chain(approval.approvers.users.iter().map(|u| format!("user {u}")))
                    .collect();
                let why = format!(
                    "held for approval (Chaperone policy rule \"{rule}\"): AccessRequest {ns}/{name} waits for a decision by {}; approve it with `kubectl chaperone approve {name}` (or `chaperone approve {name}`), then retry the same request",
                    who.join(", ")
                );
                Err(refused(
                    record,
                    info,
                    &why,
                    "pending",
                    Some(&name),
                    None,
                    Some(0),
                ))
            }
            HoldOutcome::Failed { why } => {
                let why = format!(
                    "chaperone: this request needs approval (Chaperone policy rule \"{rule}\") and cannot be held for it, so it is refused: {why}"
                );
                tracing::warn!(%why, "request needing approval refused");
                self.metrics.approval_hold_failures.inc();
                note(record, "failed", None, None, None);
                // Not a person's or the policy's denial: the AccessRequest store (the API
                // server) or the node's record of used approvals failed.
                record.outcome = Outcome::UpstreamFailed;
                record.reason = Some(why.clone());
                Err(Status::service_unavailable(why, HOLD_RETRY_AFTER_SECONDS))
            }
            HoldOutcome::Interrupted { name, waited } => {
                let why = format!(
                    "chaperone: the gateway is restarting; this request (Chaperone policy rule \"{rule}\") was not decided and not sent: AccessRequest {ns}/{name} stays pending, and sending the request again waits on it"
                );
                note(record, "interrupted", Some(&name), None, Some(ms(waited)));
                record.outcome = Outcome::UpstreamFailed;
                record.reason = Some(why.clone());
                Err(Status::service_unavailable(why, 1))
            }
            HoldOutcome::Busy { why } => {
                let why = format!(
                    "chaperone: this request needs approval (Chaperone policy rule \"{rule}\") and is not held: {why}"
                );
                tracing::warn!(%why, "request needing approval refused: too many held");
                self.metrics.approval_busy.inc();
                note(record, "busy", None, None, None);
                record.outcome = Outcome::Denied;
                record.reason = Some(why.clone());
                Err(Status::too_many_requests(why, HOLD_RETRY_AFTER_SECONDS))
            }
        }
    }
}
