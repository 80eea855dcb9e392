//! The admin endpoint: `/metrics` (Prometheus text), `/healthz`, `/readyz` and `/status`
//! (JSON, what `chaperone status` prints).
//!
//! It runs on its own listener (loopback by default) and only reads snapshots: nothing here
//! can slow the proxy's request path.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, OnceLock},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge, gauge::Gauge,
    },
    registry::Registry,
};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::{
    drain::DrainWatcher,
    ebpf::{InterceptionStatus, Interceptor},
    policy::{Action, Policy},
    recorder::{Outcome, RecorderHealth, RecorderStatus, decision_str},
};

/// Labels of `chaperone_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// allow | deny | mask | approve | none (refused before a decision).
    pub decision: &'static str,
    /// forwarded | denied | invalid | recording_down | upstream_failed.
    pub outcome: &'static str,
}

/// Labels of `chaperone_approval_decisions_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApprovalDecisionLabels {
    /// approve | deny.
    pub verb: &'static str,
    /// written | refused.
    pub result: &'static str,
}

/// Labels of `chaperone_tls_certificate_expiry_timestamp_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    /// serving (the certificate agents see) | ca (the CA it is minted from).
    pub certificate: &'static str,
}

/// The gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests handled, by decision.
    pub requests: Family<RequestLabels, Counter>,
    /// `requests`' counter of each decision and outcome, looked up in the family once:
    /// the lookup (a lock and a hash of the labels) ran on every request.
    request_counters: [[OnceLock<Counter>; Outcome::ALL.len()]; 5],
    /// Rows the recorder refused or lost (each is also logged with its audit id).
    pub recording_failures: Counter,
    /// Requests whose ServiceAccount token names another service account than the pod's.
    pub service_account_mismatches: Counter,
    /// Connections closed right after accept because their workload was at its limit.
    pub connections_rejected: Counter,
    /// Requests denied because a policy condition could not be evaluated (an error, a
    /// non-boolean result, a cost over the limit, content that could not be fetched).
    pub condition_failures: Counter,
    /// Policy reloads applied and refused.
    pub policy_reload: crate::policy::reload::ReloadMetrics,
    /// Open watches and exec/attach/port-forward sessions closed because a reloaded policy
    /// denies them.
    pub policy_streams_closed: Counter,
    /// Responses that had to be masked and could not be (refused, or a watch ended).
    pub masking_failures: Counter,
    /// AccessRequest decisions seen without a valid seal (a status edited directly at the
    /// API server): ignored, and counted here.
    pub approval_tampering: Counter,
    /// Decisions attempted through the approvals API, by verb and whether written.
    pub approval_decisions: Family<ApprovalDecisionLabels, Counter>,
    /// Notifications dropped because their queue was full.
    pub approval_notifications_dropped: Counter,
    /// Notifications not delivered after every attempt.
    pub approval_notifications_failed: Counter,
    /// Failures to learn the API server's addresses (DNS, the Service and EndpointSlice
    /// watches) or to write them into the kernel's target maps.
    pub redirect_target_errors: Counter,
    /// Pod watch errors (the store keeps serving what it has).
    pub pod_watch_errors: Counter,
    /// 1 while the gateway has a credential for the API server (set at each scrape).
    pub upstream_credential_up: Gauge,
    /// Requests needing approval that could not be held (the AccessRequest store failed).
    pub approval_hold_failures: Counter,
    /// Requests needing approval refused (429) because their workload had
    /// `approval.maxWaitingPerWorkload` requests held already.
    pub approval_busy: Counter,
    /// Requests held for approval on this gateway right now.
    pub approval_waiting: Gauge,
    /// AccessRequests deleted past `approval.retention`.
    pub approval_requests_deleted: Counter,
    /// Rounds of that clean-up that failed (listing or deleting refused).
    pub approval_cleanup_failures: Counter,
    /// When the serving certificate and its CA expire (Unix seconds; set at each scrape).
    pub tls_expiry: Family<CertificateLabels, Gauge>,
}

impl Metrics {
    /// Creates the registry; `interceptor` adds the kernel's connect-path counters,
    /// `recorder` whether recording works.
    pub fn new(
        interceptor: Option<Arc<Interceptor>>,
        recorder: Option<RecorderStatus>,
    ) -> Arc<Self> {
        let mut registry = Registry::with_prefix("chaperone");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests handled by the proxy, by policy decision",
            requests.clone(),
        );
        let recording_failures = Counter::default();
        registry.register(
            "recording_failures",
            "Requests whose recording row could not be written",
            recording_failures.clone(),
        );
        let connections_rejected = Counter::default();
        registry.register(
            "connections_rejected",
            "Connections closed at accept because the workload held limits.maxConnectionsPerWorkload",
            connections_rejected.clone(),
        );
        let service_account_mismatches = Counter::default();
        registry.register(
            "service_account_mismatches",
            "Requests whose ServiceAccount token names another service account than the kernel-attributed pod runs as",
            service_account_mismatches.clone(),
        );
        let condition_failures = Counter::default();
        registry.register(
            "policy_condition_failures",
            "Requests denied because a policy condition could not be evaluated (error, non-boolean, over the cost limit, content not fetched)",
            condition_failures.clone(),
        );
        let policy_reload = crate::policy::reload::ReloadMetrics::default();
        registry.register(
            "policy_reloads",
            "Policy files applied after start-up (on change or SIGHUP)",
            policy_reload.applied.clone(),
        );
        registry.register(
            "policy_reload_failures",
            "New policy texts that did not load; the previous policy stayed in force",
            policy_reload.failed.clone(),
        );
        let policy_streams_closed = Counter::default();
        registry.register(
            "policy_streams_closed",
            "Open watches and exec/attach/port-forward sessions closed because a reloaded policy denies them",
            policy_streams_closed.clone(),
        );
        let masking_failures = Counter::default();
        registry.register(
            "masking_failures",
            "Responses a mask decision applied to that could not be masked, so they were refused (or their watch ended with an error event)",
            masking_failures.clone(),
        );
        let approval_tampering = Counter::default();
        registry.register(
            "approval_tampering_attempts",
            "AccessRequest decisions without a valid seal (not written by a gateway's approvals API), ignored",
            approval_tampering.clone(),
        );
        let approval_decisions = Family::<ApprovalDecisionLabels, Counter>::default();
        registry.register(
            "approval_decisions",
            "Decisions attempted through the approvals API, by verb (approve, deny) and result (written, refused)",
            approval_decisions.clone(),
        );
        let approval_notifications_dropped = Counter::default();
        registry.register(
            "approval_notifications_dropped",
            "AccessRequest notifications dropped because the notification queue was full",
            approval_notifications_dropped.clone(),
        );
        let approval_notifications_failed = Counter::default();
        registry.register(
            "approval_notifications_failed",
            "AccessRequest notifications not delivered after every retry",
            approval_notifications_failed.clone(),
        );
        let redirect_target_errors = Counter::default();
        registry.register(
            "redirect_target_errors",
            "Failures to learn the API server's addresses (DNS, the kubernetes Service and EndpointSlice watches) or to write them into the kernel's maps; the last addresses learnt stay redirected",
            redirect_target_errors.clone(),
        );
        let pod_watch_errors = Counter::default();
        registry.register(
            "pod_watch_errors",
            "Errors of the watch on this node's pods; until it recovers, new pods are not named",
            pod_watch_errors.clone(),
        );
        let approval_hold_failures = Counter::default();
        registry.register(
            "approval_hold_failures",
            "Requests needing approval refused (503) because they could not be held: the AccessRequest store (the API server) failed or timed out, or a used approval could not be recorded",
            approval_hold_failures.clone(),
        );
        let approval_busy = Counter::default();
        registry.register(
            "approval_busy",
            "Requests needing approval refused (429) because their workload already had approval.maxWaitingPerWorkload requests held on this node",
            approval_busy.clone(),
        );
        let approval_waiting = Gauge::default();
        registry.register(
            "approval_waiting",
            "Requests held for approval on this node right now (waiting for a decision, or for their workload's turn to ask for one)",
            approval_waiting.clone(),
        );
        let approval_requests_deleted = Counter::default();
        registry.register(
            "approval_requests_deleted",
            "AccessRequests this gateway deleted past approval.retention",
            approval_requests_deleted.clone(),
        );
        let approval_cleanup_failures = Counter::default();
        registry.register(
            "approval_cleanup_failures",
            "Hourly rounds deleting AccessRequests past approval.retention that failed (the gateway needs list and delete on accessrequests)",
            approval_cleanup_failures.clone(),
        );
        let tls_expiry = Family::<CertificateLabels, Gauge>::default();
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the serving certificate agents see, and the CA (tls.caCertFile) it is minted from, expire (Unix time); the serving certificate is renewed, the CA is not",
            tls_expiry.clone(),
        );
        let upstream_credential_up = Gauge::default();
        upstream_credential_up.set(1);
        registry.register(
            "upstream_credential_up",
            "1 while the gateway has its credential for the API server; 0 while it cannot get one (requests are refused with 503)",
            upstream_credential_up.clone(),
        );
        if let Some(interceptor) = interceptor {
            registry.register_collector(Box::new(KernelCounters(interceptor)));
        }
        if let Some(recorder) = recorder {
            registry.register_collector(Box::new(RecorderGauges(recorder)));
        }
        Arc::new(Self {
            registry,
            service_account_mismatches,
            condition_failures,
            policy_reload,
            policy_streams_closed,
            requests,
            request_counters: Default::default(),
            recording_failures,
            connections_rejected,
            masking_failures,
            approval_tampering,
            approval_decisions,
            approval_notifications_dropped,
            approval_notifications_failed,
            redirect_target_errors,
            pod_watch_errors,
            upstream_credential_up,
            approval_hold_failures,
            approval_busy,
            approval_waiting,
            approval_requests_deleted,
            approval_cleanup_failures,
            tls_expiry,
        })
    }

    /// Counts one handled request.
    pub fn count_request(&self, decision: Option<Action>, outcome: Outcome) {
        let row = match decision {
            None => 0,
            Some(Action::Allow) => 1,
            Some(Action::Deny) => 2,
            Some(Action::Mask) => 3,
            Some(Action::Approve) => 4,
        };
        let column = match outcome {
            Outcome::Forwarded => 0,
            Outcome::Denied => 1,
            Outcome::Invalid => 2,
            Outcome::RecordingDown => 3,
            Outcome::UpstreamFailed => 4,
            Outcome::Unknown => 5,
            Outcome::Cancelled => 6,
        };
        self.request_counters[row][column]
            .get_or_init(|| {
                self.requests
                    .get_or_create(&RequestLabels {
                        decision: decision_str(decision),
                        outcome: outcome.as_str(),
                    })
                    .clone()
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Reads the eBPF counters at scrape time.
#[derive(Debug)]
struct KernelCounters(Arc<Interceptor>);

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = self.0.status();
        let c = status.counters;
        for (name, help, value) in [
            (
                "redirect_connects",
                "connect() calls redirected to the proxy",
                c.redirected,
            ),
            (
                "redirect_host_namespace",
                "connect() calls to targets from the node's namespace, not redirected",
                c.host_namespace,
            ),
            (
                "redirect_attributed",
                "redirected connections keyed by 4-tuple",
                c.attributed,
            ),
            (
                "redirect_map_errors",
                "eBPF map insert failures",
                c.map_errors,
            ),
            (
                "redirect_bypassed",
                "connect() calls from out-of-scope cgroups, not redirected",
                c.bypassed,
            ),
            (
                "redirect_fail_open",
                "connect() calls let through while the daemon was down",
                c.fail_open,
            ),
            (
                "raw_guard_drops",
                "raw-socket packets to API server addresses dropped",
                c.guard_drops,
            ),
            ("redirect_closed", "redirected sockets closed", c.closed),
        ] {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        let pressure = ConstGauge::new(status.connections as i64);
        pressure.encode(encoder.encode_descriptor(
            "redirect_map_entries",
            "entries in the connection attribution map (capacity: redirect_map_capacity)",
            None,
            pressure.metric_type(),
        )?)?;
        let capacity = ConstGauge::new(i64::from(status.connections_max));
        capacity.encode(encoder.encode_descriptor(
            "redirect_map_capacity",
            "capacity of the connection attribution map",
            None,
            capacity.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Reads the recorder's state at scrape time.
struct RecorderGauges(RecorderStatus);

impl std::fmt::Debug for RecorderGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecorderGauges")
    }
}

impl Collector for RecorderGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let health = self.0.health_report();
        let up = ConstGauge::new(i64::from(health.up));
        up.encode(encoder.encode_descriptor(
            "recording_up",
            "1 while rows are being written; 0 while recording is down (requests that must be recorded are refused)",
            None,
            up.metric_type(),
        )?)?;
        for (name, help, value) in [
            (
                "recording_outages",
                "Times recording went down (disk full, I/O errors)",
                health.outages,
            ),
            (
                "recording_rows_lost",
                "Rows refused or lost while recording was down (each logged with its audit id)",
                health.rows_lost,
            ),
        ] {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        let replayed = ConstGauge::new(i64::try_from(health.replayed).unwrap_or(i64::MAX));
        replayed.encode(encoder.encode_descriptor(
            "recording_wal_replayed_rows",
            "Rows rebuilt from the write-ahead log at start (outcome unknown when the gateway had died before the response)",
            None,
            replayed.metric_type(),
        )?)?;
        if let Some(upload) = health.upload {
            for (name, help, value) in [
                (
                    "recording_upload_files",
                    "Files and manifest versions confirmed uploaded to object storage",
                    upload.uploaded,
                ),
                (
                    "recording_upload_bytes",
                    "Bytes uploaded to object storage",
                    upload.bytes,
                ),
                (
                    "recording_upload_failures",
                    "Upload rounds that failed (object storage unreachable or refusing); retried with backoff",
                    upload.failures,
                ),
                (
                    "recording_upload_retention_deleted",
                    "Local files deleted by the retention limit after their upload was confirmed",
                    upload.deleted,
                ),
            ] {
                let metric = ConstCounter::new(value);
                metric.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    metric.metric_type(),
                )?)?;
            }
            for (name, help, value) in [
                (
                    "recording_upload_lag_seconds",
                    "Age of the oldest finished file not yet confirmed uploaded (0 when none)",
                    upload.lag_seconds,
                ),
                (
                    "recording_upload_pending",
                    "Files waiting to be uploaded",
                    upload.pending,
                ),
            ] {
                let metric = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
                metric.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    metric.metric_type(),
                )?)?;
            }
        }
        if let Some(wal) = health.wal {
            for (name, help, value) in [
                (
                    "recording_wal_appends",
                    "Records appended to the write-ahead log",
                    wal.appends,
                ),
                (
                    "recording_wal_syncs",
                    "fsyncs of the write-ahead log (one per group commit: concurrent mutating requests share one)",
                    wal.syncs,
                ),
                (
                    "recording_wal_failures",
                    "Write-ahead log appends that failed (their mutating requests were refused with 503)",
                    wal.failures,
                ),
            ] {
                let metric = ConstCounter::new(value);
                metric.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    metric.metric_type(),
                )?)?;
            }
            for (name, help, value) in [
                (
                    "recording_wal_outstanding",
                    "Requests in the write-ahead log whose row is not yet in a finished Parquet file",
                    wal.outstanding,
                ),
                (
                    "recording_wal_segments",
                    "Write-ahead log segments on disk",
                    wal.segments,
                ),
            ] {
                let metric = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
                metric.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    metric.metric_type(),
                )?)?;
            }
        }
        Ok(())
    }
}

/// What `/status` returns.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    /// The proxy listener.
    pub listen: SocketAddr,
    /// The upstream API server.
    pub upstream: String,
    /// The gateway's credential for it.
    pub credential: CredentialReport,
    /// The policy in force.
    pub policy: PolicyReport,
    /// Whether recording works.
    pub recording: RecorderHealth,
    /// The kernel side, when eBPF interception is on.
    pub interception: Option<InterceptionStatus>,
    /// This node's pods, when a watch names them (`identity.watchPods`).
    pub pods: Option<PodsReport>,
    /// The serving certificate.
    pub tls: Option<TlsReport>,
    /// Requests held for approval, when approvals are configured.
    pub approvals: Option<ApprovalsReport>,
}

/// The approvals part of `/status`.
#[derive(Debug, Serialize)]
pub struct ApprovalsReport {
    /// Requests held on this gateway right now.
    pub waiting: usize,
    /// Whether the AccessRequest watch is current (false: failing since its last event,
    /// and held requests read their AccessRequests every 15 s instead).
    pub watch_current: bool,
}

/// The serving certificate part of `/status`.
#[derive(Debug, Serialize)]
pub struct TlsReport {
    /// When the serving certificate agents see expires (RFC 3339); renewed before then.
    pub serving_expires: String,
    /// When the CA it is minted from expires: it must be replaced before then.
    pub ca_expires: String,
}

/// The pod watch part of `/status`.
#[derive(Debug, Serialize)]
pub struct PodsReport {
    /// Whether the first complete list has arrived (until then, connections from pods
    /// are refused with 503).
    pub listed: bool,
    /// Pods known.
    pub count: usize,
    /// The watch's error while it fails (connections from pods it does not know are
    /// refused with 503 until it is back).
    pub watch_error: Option<String>,
}

impl PodsReport {
    fn of(pods: &crate::identity::pods::PodStore) -> Option<Self> {
        pods.is_watched().then(|| Self {
            listed: pods.is_synced(),
            count: pods.len(),
            watch_error: pods.watch_error(),
        })
    }

    /// Why the gateway cannot name new pods now, if so.
    fn problem(&self) -> Option<String> {
        if !self.listed {
            return Some("this node's pods are not listed yet".to_owned());
        }
        self.watch_error
            .as_ref()
            .map(|e| format!("the watch of this node's pods is failing: {e}"))
    }
}

/// The credential part of `/status`.
#[derive(Debug, Serialize)]
pub struct CredentialReport {
    /// Why the gateway has no credential for the API server now (requests are refused
    /// with 503 until it is back); `None` while it has one.
    pub error: Option<String>,
}

/// The policy part of `/status`.
#[derive(Debug, Serialize)]
pub struct PolicyReport {
    /// The policy file, or `allowAll` when the config asked for no policy.
    pub source: String,
    /// Number of rules.
    pub rules: usize,
    /// What applies when no rule matches.
    pub default: String,
    /// SHA-256 of the policy text in force (empty for allowAll).
    pub digest: String,
    /// When the policy in force was loaded.
    pub loaded_at: Option<String>,
    /// Why the file's current text is not in force (it failed to load), if so.
    pub reload_error: Option<String>,
}

impl PolicyReport {
    fn of(policy: &Policy, reload_error: Option<String>) -> Self {
        Self {
            source: policy.source().to_owned(),
            rules: policy.rule_count(),
            default: policy.default_action().to_string(),
            digest: policy.digest().to_owned(),
            loaded_at: policy.loaded_at().map(|t| t.to_string()),
            reload_error,
        }
    }
}

/// Shared state of the admin endpoint.
pub struct Admin {
    /// Metrics, also updated by the proxy.
    pub metrics: Arc<Metrics>,
    /// The kernel redirect, if attached.
    pub interceptor: Option<Arc<Interceptor>>,
    /// The proxy listener address.
    pub listen: SocketAddr,
    /// The upstream URL.
    pub upstream: String,
    /// The policy in force (the proxy's; swapped on reload).
    pub policy: Arc<arc_swap::ArcSwap<Policy>>,
    /// The policy file's reloader, when the policy is a file.
    pub reloader: Option<Arc<crate::policy::reload::Reloader>>,
    /// The recorder's health, for readiness.
    pub recorder: RecorderStatus,
    /// The gateway's credential for the API server (`None` in tests without one).
    pub credential: Option<Arc<crate::proxy::credential::UpstreamCredential>>,
    /// This node's pods (the identity's store).
    pub pods: Option<crate::identity::pods::PodStore>,
    /// The serving certificate (renewed from the CA).
    pub serving_cert: Option<Arc<crate::tls::ServingCert>>,
    /// The approval holder, once approvals are set up.
    pub approvals: OnceLock<Arc<crate::approval::holder::Holder>>,
}

impl Admin {
    fn credential_failure(&self) -> Option<Arc<str>> {
        self.credential.as_ref().and_then(|c| c.failure())
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let text = |code: StatusCode, ct: &'static str, body: String| {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = code;
            r.headers_mut()
                .insert(header::CONTENT_TYPE, http::HeaderValue::from_static(ct));
            r
        };
        if req.method() != Method::GET {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "only GET\n".to_owned(),
            );
        }
        match req.uri().path() {
            "/metrics" => {
                let up = self.credential_failure().is_none();
                self.metrics.upstream_credential_up.set(i64::from(up));
                if let Some(cert) = &self.serving_cert {
                    let unix = |t: std::time::SystemTime| {
                        t.duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                    };
                    for (certificate, expires) in
                        [("serving", cert.expires()), ("ca", cert.ca_expires())]
                    {
                        self.metrics
                            .tls_expiry
                            .get_or_create(&CertificateLabels { certificate })
                            .set(unix(expires));
                    }
                }
                text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.metrics.encode(),
                )
            }
            "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".to_owned()),
            // Not ready while recording is down or the gateway has no credential: requests
            // that must be recorded, or forwarded, are refused.
            "/readyz" => {
                let not_ready = match (self.recorder.health(), self.credential_failure()) {
                    (Err(cause), _) => Some(format!("recording is down: {cause}")),
                    (Ok(()), Some(reason)) => Some(format!(
                        "the gateway's credential for the API server is unavailable: {reason}"
                    )),
                    (Ok(()), None) => self
                        .pods
                        .as_ref()
                        .and_then(PodsReport::of)
                        .and_then(|p| p.problem())
                        .map(|p| format!("{p}: requests from pods it does not know are refused")),
                };
                match not_ready {
                    None => text(StatusCode::OK, "text/plain", "ok\n".to_owned()),
                    Some(why) => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("{why}\n"),
                    ),
                }
            }
            "/status" => {
                let report = StatusReport {
                    listen: self.listen,
                    upstream: self.upstream.clone(),
                    credential: CredentialReport {
                        error: self.credential_failure().map(|r| r.to_string()),
                    },
                    policy: PolicyReport::of(
                        &self.policy.load(),
                        self.reloader.as_ref().and_then(|r| r.last_error()),
                    ),
                    recording: self.recorder.health_report(),
                    interception: self.interceptor.as_ref().map(|i| i.status()),
                    pods: self.pods.as_ref().and_then(PodsReport::of),
                    approvals: self.approvals.get().map(|h| ApprovalsReport {
                        waiting: h.waiting(),
                        watch_current: h.watch_is_current(),
                    }),
                    tls: self.serving_cert.as_ref().map(|c| TlsReport {
                        serving_expires: crate::tls::rfc3339(c.expires()),
                        ca_expires: crate::tls::rfc3339(c.ca_expires()),
                    }),
                };
                let body = serde_json::to_string_pretty(&report).unwrap_or_default();
                text(StatusCode::OK, "application/json", body)
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found\n".to_owned(),
            ),
        }
    }

    /// Serves until the drain starts.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: DrainWatcher) {
        loop {
            let (tcp, _) = tokio::select! {
                _ = drain.signaled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let response = admin.respond(&req);
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_counter_appears_in_the_exposition() {
        let metrics = Metrics::new(None, None);
        metrics.count_request(Some(Action::Deny), Outcome::Denied);
        metrics.count_request(Some(Action::Deny), Outcome::Denied);
        metrics.count_request(Some(Action::Allow), Outcome::UpstreamFailed);
        metrics.count_request(None, Outcome::Invalid);
        let text = metrics.encode();
        for line in [
            "chaperone_requests_total{decision=\"deny\",outcome=\"denied\"} 2",
            "chaperone_requests_total{decision=\"allow\",outcome=\"upstream_failed\"} 1",
            "chaperone_requests_total{decision=\"none\",outcome=\"invalid\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in {text}");
        }
        assert!(
            text.contains("# TYPE chaperone_recording_failures counter"),
            "{text}"
        );
    }

    #[test]
    fn every_decision_and_outcome_is_counted_under_its_own_labels() {
        let metrics = Metrics::new(None, None);
        let decisions = [
            None,
            Some(Action::Allow),
            Some(Action::Deny),
            Some(Action::Mask),
            Some(Action::Approve),
        ];
        // A distinct count per pair, so a counter filed under another pair's labels shows.
        let mut n = 0;
        for decision in decisions {
            for outcome in Outcome::ALL {
                n += 1;
                for _ in 0..n {
                    metrics.count_request(decision, outcome);
                }
            }
        }
        let text = metrics.encode();
        let mut n = 0;
        for decision in decisions {
            for outcome in Outcome::ALL {
                n += 1;
                let line = format!(
                    "chaperone_requests_total{{decision=\"{}\",outcome=\"{}\"}} {n}\n",
                    decision_str(decision),
                    outcome.as_str()
                );
                assert!(text.contains(&line), "{line} missing in {text}");
            }
        }
    }
}
