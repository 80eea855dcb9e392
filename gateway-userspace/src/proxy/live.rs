//! Long-lived streams (watches; exec, attach and port-forward sessions) that a policy
//! reload re-checks: each holds what its decision was made on, and a stop token (a child
//! of the drain token) that ends it when the new policy denies it.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio_util::sync::CancellationToken;

use crate::{
    identity::{WorkloadIdentity, principal::Principal},
    masking::objects::Masker,
    policy::{Action, Policy, RequestContext, decide},
    request::{ExecRequest, RequestInfo},
};

/// What a stream's decision was made on.
#[derive(Debug, Clone)]
pub(crate) struct LiveRequest {
    pub(crate) info: RequestInfo,
    pub(crate) workload: WorkloadIdentity,
    pub(crate) principal: Principal,
    pub(crate) exec: Option<ExecRequest>,
    /// The masking the stream was decided with: a reload that masks it differently ends
    /// it (what it already sent was masked the old way, and what follows would be too).
    pub(crate) masking: Option<Arc<Masker>>,
    /// A person approved it (its rule was `approve`): a reload that still asks for approval
    /// leaves it open, as one that still allows it.
    pub(crate) approved: bool,
}

impl LiveRequest {
    /// Whether `new` masks this stream as its masking does: a port-forward is never
    /// masked, exec, attach and followed logs only by the credential detectors, a watch
    /// by everything.
    fn masked_alike(&self, new: Option<&Masker>) -> bool {
        let old = self.masking.as_deref();
        match (self.info.resource.as_str(), self.info.subresource.as_str()) {
            ("pods", "portforward") => true,
            ("pods", "exec" | "attach" | "log") => {
                old.and_then(Masker::stream_detectors) == new.and_then(Masker::stream_detectors)
            }
            _ => old == new,
        }
    }
}

#[derive(Debug)]
struct Live {
    request: LiveRequest,
    stop: CancellationToken,
    audit_id: String,
}

/// The open streams of a proxy.
#[derive(Debug, Default)]
pub struct LiveStreams {
    next: AtomicU64,
    streams: Mutex<HashMap<u64, Live>>,
}

/// Keeps a stream registered; dropping it (the stream ended) unregisters it.
#[derive(Debug)]
pub(crate) struct LiveGuard {
    id: u64,
    registry: Arc<LiveStreams>,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// A registered stream's stop token and guard, carried in the request's extensions from
/// the decision to the code that streams.
#[derive(Debug, Clone)]
pub(crate) struct LiveStop {
    pub(crate) stop: CancellationToken,
    pub(crate) guard: Arc<LiveGuard>,
}

impl LiveStreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a stream; its stop token is cancelled by the drain (`parent`) or by a
    /// reload that denies it.
    pub(crate) fn register(
        self: &Arc<Self>,
        request: LiveRequest,
        parent: &CancellationToken,
        audit_id: &str,
    ) -> LiveStop {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let stop = parent.child_token();
        self.lock().insert(
            id,
            Live {
                request,
                stop: stop.clone(),
                audit_id: audit_id.to_owned(),
            },
        );
        LiveStop {
            stop,
            guard: Arc::new(LiveGuard {
                id,
                registry: self.clone(),
            }),
        }
    }

    /// Number of open streams.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no stream is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides every open stream again with `policy` and stops those it no longer allows,
    /// or masks differently; returns how many were stopped.
    pub fn recheck(&self, policy: &Policy) -> usize {
        let streams = self.lock();
        let mut stopped = 0;
        for live in streams.values() {
            if live.stop.is_cancelled() {
                continue;
            }
            let r = &live.request;
            let ctx = RequestContext::new(&r.info)
                .with_workload(&r.workload)
                .with_principal(&r.principal)
                .with_exec(r.exec.as_ref(), false);
            let decision = decide(policy, &ctx);
            let allowed =
                decision.is_allowed() || (r.approved && decision.action == Action::Approve);
            let why = if !allowed {
                "the reloaded policy denies an open stream; closing it"
            } else if !r.masked_alike(decision.masking.as_deref()) {
                // A stream cannot change masking midway: it ends, and the client's
                // reconnect is masked by the new policy.
                "the reloaded policy masks an open stream differently; closing it"
            } else {
                continue;
            };
            tracing::warn!(
                audit_id = %live.audit_id,
                verb = %r.info.verb,
                resource = %r.info.resource_with_subresource(),
                reason = %decision.reason(),
                "{why}"
            );
            live.stop.cancel();
            stopped += 1;
        }
        stopped
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, Uri};

    use super::*;

    fn live(method: &str, uri: &str) -> LiveRequest {
        let uri: Uri = uri.parse().expect("uri");
        let info = RequestInfo::parse(&Method::from_bytes(method.as_bytes()).expect("m"), &uri)
            .expect("request");
        let exec = matches!(info.subresource.as_str(), "exec" | "attach")
            .then(|| ExecRequest::from_uri(&uri));
        LiveRequest {
            info,
            workload: WorkloadIdentity::default(),
            principal: Principal::anonymous(),
            exec,
            masking: None,
            approved: false,
        }
    }

    fn policy(rules: &str) -> Policy {
        Policy::from_yaml(
            &format!(
                "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules:\n{rules}"
            ),
            "p.yaml",
        )
        .expect("policy")
    }

    #[test]
    fn a_reload_stops_the_streams_it_denies_and_only_those() {
        let registry = Arc::new(LiveStreams::default());
        let drain = CancellationToken::new();
        let watch = registry.register(
            live("GET", "/api/v1/namespaces/default/secrets?watch=true"),
            &drain,
            "a",
        );
        let shell = registry.register(
            live(
                "GET",
                "/api/v1/namespaces/default/pods/p/exec?command=sh&stdin=true&tty=true",
            ),
            &drain,
            "b",
        );
        let pods = registry.register(
            live("GET", "/api/v1/namespaces/default/pods?watch=true"),
            &drain,
            "c",
        );
        assert_eq!(registry.len(), 3);
        assert_eq!(registry.recheck(&policy("")), 0, "allow-all stops nothing");
        let stricter = policy(
            "  - name: no-secrets\n    action: deny\n    verbs: [watch]\n    resources: [secrets]\n  - name: no-shells\n    action: deny\n    verbs: ['*']\n    resources: [pods/exec]\n    exec: {interactive: true}\n",
        );
        assert_eq!(registry.recheck(&stricter), 2);
        assert!(watch.stop.is_cancelled() && shell.stop.is_cancelled());
        assert!(!pods.stop.is_cancelled(), "an allowed stream stays open");
        assert!(!drain.is_cancelled(), "the drain is not touched");
        assert_eq!(
            registry.recheck(&stricter),
            0,
            "a stopped stream is not counted twice"
        );

        drop((watch, shell));
        assert_eq!(registry.len(), 1, "ended streams unregister");
        drain.cancel();
        assert!(pods.stop.is_cancelled(), "the drain stops every stream");
    }

    /// A stream ends only for a masking change that touches it: a port-forward is never
    /// masked, an exec only by the detectors. An approved session stays open under a
    /// policy that still asks for approval; one that was never approved does not.
    #[test]
    fn a_reload_ends_only_the_streams_its_masking_or_approval_changes_touch() {
        const MASK_ALL: &str =
            "  - name: mask-all\n    action: mask\n    verbs: ['*']\n    resources: ['*']\n";
        let before = policy(MASK_ALL);
        let paths = policy(&format!(
            "{MASK_ALL}    masking: {{paths: [{{resources: [widgets], fields: [.spec.x]}}]}}\n"
        ));
        let registry = Arc::new(LiveStreams::default());
        let drain = CancellationToken::new();
        let register = |policy: &Policy, uri: &str, approved: bool| {
            let mut request = live("GET", uri);
            request.masking = decide(policy, &RequestContext::new(&request.info)).masking;
            request.approved = approved;
            registry.register(request, &drain, "x")
        };
        let forward = register(
            &before,
            "/api/v1/namespaces/d/pods/p/portforward?ports=80",
            false,
        );
        let exec = register(
            &before,
            "/api/v1/namespaces/d/pods/p/exec?command=ls",
            false,
        );
        let watch = register(&before, "/api/v1/namespaces/d/configmaps?watch=1", false);
        assert_eq!(
            registry.recheck(&paths),
            1,
            "only the watch is masked by paths"
        );
        assert!(watch.stop.is_cancelled());
        assert!(!forward.stop.is_cancelled() && !exec.stop.is_cancelled());

        const APPROVE: &str = "  - name: approve-exec\n    action: approve\n    verbs: ['*']\n    resources: [pods/exec]\n    approval: {approvers: {groups: [sre]}}\n";
        let approve = policy(APPROVE);
        let registry = Arc::new(LiveStreams::default());
        let register = |approved: bool| {
            let mut request = live("GET", "/api/v1/namespaces/d/pods/p/exec?command=ls");
            request.approved = approved;
            registry.register(request, &drain, "y")
        };
        let approved = register(true);
        let unapproved = register(false);
        assert_eq!(registry.recheck(&approve), 1);
        assert!(
            unapproved.stop.is_cancelled(),
            "now needs an approval it never had"
        );
        assert!(
            !approved.stop.is_cancelled(),
            "approved, and still approvable"
        );
    }

    #[test]
    fn a_reload_that_masks_an_open_stream_differently_stops_it() {
        const MASK: &str = "  - name: mask-config\n    action: mask\n    verbs: ['*']\n    resources: [configmaps]\n";
        let masked = policy(MASK);
        let other_settings = policy(&format!("{MASK}    masking: {{envNames: [SECRET]}}\n"));
        let registry = Arc::new(LiveStreams::default());
        let drain = CancellationToken::new();
        // Registered as the handler does: with the masking it was decided with.
        let register = |policy: &Policy, uri: &str| {
            let mut request = live("GET", uri);
            request.masking = decide(policy, &RequestContext::new(&request.info)).masking;
            registry.register(request, &drain, "x")
        };
        let config = "/api/v1/namespaces/default/configmaps?watch=true";
        let unmasked_watch = register(&policy(""), config);
        let masked_watch = register(&masked, config);
        let pods = register(&masked, "/api/v1/namespaces/default/pods?watch=true");
        assert_eq!(registry.len(), 3);
        assert_eq!(
            registry.recheck(&masked),
            1,
            "the same masking stops nothing else"
        );
        assert!(
            unmasked_watch.stop.is_cancelled(),
            "masking added: the stream ends"
        );
        assert!(!masked_watch.stop.is_cancelled() && !pods.stop.is_cancelled());
        assert_eq!(
            registry.recheck(&other_settings),
            1,
            "same rule, other settings"
        );
        assert!(masked_watch.stop.is_cancelled());
        assert!(
            !pods.stop.is_cancelled(),
            "an unmasked stream stays unmasked"
        );
    }
}
