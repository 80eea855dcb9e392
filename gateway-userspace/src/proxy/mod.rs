//! The L7 proxy: terminate TLS, understand the request, decide, forward, record.
//!
//! One accepted connection is attributed once (the kernel's record of where it was going and
//! which cgroup made it), then every HTTP/1.1 or HTTP/2 request on it goes through
//! [`Proxy::handle`]: parse into Kubernetes request attributes, ask the policy, answer a
//! denial with a `Status` 403 or forward upstream with the client's credentials replaced by
//! the gateway's, stream the response back without buffering (watches), and record one
//! row when the exchange ends. Upgraded connections (exec, attach, port-forward) are
//! relayed by [`upgrade`], whose taps decode the stream framing ([`frames`]).

mod body;
pub mod frames;
pub mod upgrade;

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future as _,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFutureOwned},
    task::TaskTracker,
};

use crate::{
    admin::Metrics,
    config::{ImpersonationConfig, ImpersonationMode, ReadsWhileDown, UpstreamProtocol},
    config::{LimitsConfig, MIN_REQUEST_HEADER_BYTES},
    drain::DrainWatcher,
    ebpf::{ConnectionOrigin, Interceptor},
    error_chain,
    identity::{
        Identity, WorkloadIdentity,
        principal::{Principal, PrincipalKind, PrincipalVerifier},
    },
    masking,
    policy::{self, Action, Policy, RequestContext},
    recorder::{
        ObjectRef, Outcome, PrincipalRecord, RecorderHandle, RequestRecord, WorkloadRecord,
    },
    request::{RequestInfo, Verb},
    scope::ScopeConfig,
    status::Status,
};

/// Errors a body can fail with, boxed so upstream and local bodies share one type.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every response the proxy sends.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, ProxyBody>;

/// What a request refused while recording is down tells the client to wait before retrying
/// (the recorder probes the disk every second).
const RECORDING_RETRY_AFTER_SECONDS: u32 = 1;
/// How long a connection closed for idleness gets to say goodbye (HTTP/2 GOAWAY) before it
/// is dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Errors setting up the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The gateway's token file could not be read.
    #[error("read gateway token {path}: {source}")]
    Token {
        /// The token file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The token file's content cannot be sent as a header.
    #[error("gateway token from {path} is not a valid header value (control characters?)")]
    TokenInvalid {
        /// Where the token came from (its file, or the kubeconfig).
        path: String,
    },
}

/// The gateway's own bearer token, re-read by a control-plane task when the file changes so
/// the request path only reads a snapshot.
#[derive(Debug)]
pub struct GatewayToken {
    /// The file it is re-read from; `None` for a token given inline (kubeconfig `token`).
    path: Option<std::path::PathBuf>,
    header: ArcSwap<HeaderValue>,
}

impl GatewayToken {
    /// Reads the token file once.
    pub fn load(path: &std::path::Path) -> Result<Arc<Self>, ProxyError> {
        let header = Self::read(path)?;
        Ok(Arc::new(Self {
            path: Some(path.to_owned()),
            header: ArcSwap::from_pointee(header),
        }))
    }

    /// A token given inline, which never changes.
    pub fn fixed(token: &str) -> Result<Arc<Self>, ProxyError> {
        let header = Self::header_value(token, "the kubeconfig's inline token")?;
        Ok(Arc::new(Self {
            path: None,
            header: ArcSwap::from_pointee(header),
        }))
    }

    fn read(path: &std::path::Path) -> Result<HeaderValue, ProxyError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProxyError::Token {
            path: path.display().to_string(),
            source,
        })?;
        Self::header_value(&text, &path.display().to_string())
    }

    /// `Authorization: Bearer <token>`; `source` names where the token came from in errors.
    fn header_value(token: &str, source: &str) -> Result<HeaderValue, ProxyError> {
        let mut value =
            HeaderValue::try_from(format!("Bearer {}", token.trim())).map_err(|_| {
                ProxyError::TokenInvalid {
                    path: source.to_owned(),
                }
            })?;
        // Keeps the credential out of HPACK tables and Debug output.
        value.set_sensitive(true);
        Ok(value)
    }

    /// Re-reads the file every `every` until the drain starts; a failed read keeps the old
    /// token (as client-go does) and logs why.
    pub async fn refresh_loop(self: Arc<Self>, every: Duration, drain: DrainWatcher) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = drain.signaled() => return,
                _ = tick.tick() => {}
            }
            match Self::read(&path) {
                Ok(v) if v != **self.header.load() => {
                    tracing::info!(path = %path.display(), "gateway token changed, using the new one");
                    self.header.store(Arc::new(v));
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "keeping the previous gateway token"),
            }
        }
    }

    fn header(&self) -> HeaderValue {
        (**self.header.load()).clone()
    }
}

/// Everything the request path needs, shared by all connections.
pub struct Proxy {
    /// The current policy; replaced atomically on reload (the admin endpoint reads it too).
    pub policy: Arc<ArcSwap<Policy>>,
    upstream: UpstreamClient,
    upstream_base: Uri,
    token: Option<Arc<GatewayToken>>,
    recorder: RecorderHandle,
    interceptor: Option<Arc<Interceptor>>,
    node: String,
    cluster: String,
    dialer: upgrade::Dialer,
    frame_sink: std::sync::RwLock<Option<Arc<dyn upgrade::FrameSink>>>,
    identity: Option<Arc<Identity>>,
    principals: Arc<PrincipalVerifier>,
    scope: ScopeConfig,
    metrics: Arc<Metrics>,
    limits: LimitsConfig,
    impersonate: ImpersonationConfig,
    max_object_bytes: usize,
    record_responses: bool,
    reads_while_down: ReadsWhileDown,
    connections: Arc<ConnectionLimiter>,
    /// Upgraded streams (exec, attach, port-forward), which outlive their HTTP connection.
    streams: TaskTracker,
    /// Cancelled when the drain starts: connections stop taking requests, watches end.
    draining: CancellationToken,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("upstream", &self.upstream_base)
            .finish_non_exhaustive()
    }
}

/// Settings for [`Proxy::new`].
pub struct ProxySettings {
    /// The policy in force.
    pub policy: Policy,
    /// `https://host:port` of the API server.
    pub upstream_url: Uri,
    /// TLS settings for the upstream (roots = cluster CA).
    pub upstream_tls: rustls::ClientConfig,
    /// Overrides the name verified in the upstream certificate.
    pub upstream_server_name: Option<rustls_pki_types::ServerName<'static>>,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// HTTP version spoken upstream.
    pub upstream_protocol: UpstreamProtocol,
    /// The gateway credential.
    pub token: Option<Arc<GatewayToken>>,
    /// Where rows go.
    pub recorder: RecorderHandle,
    /// The kernel redirect, if attached.
    pub interceptor: Option<Arc<Interceptor>>,
    /// Node name for the records.
    pub node: String,
    /// Cluster name for the records.
    pub cluster: String,
    /// Names the workload behind a connection (None: records carry kernel facts only).
    pub identity: Option<Arc<Identity>>,
    /// Verifies the bearer tokens agents present.
    pub principals: Arc<PrincipalVerifier>,
    /// Which workloads are out of scope (relayed at L4 if redirected before classification).
    pub scope: ScopeConfig,
    /// Request counters.
    pub metrics: Arc<Metrics>,
    /// Connection and request limits.
    pub limits: LimitsConfig,
    /// Whose identity upstream requests run as.
    pub impersonate: ImpersonationConfig,
    /// Largest object recorded (`recording.maxObjectBytes`).
    pub max_object_bytes: usize,
    /// Record response bodies (`recording.responseBodies`).
    pub record_responses: bool,
    /// Whether reads pass while recording is down (`recording.readsWhileDown`).
    pub reads_while_down: ReadsWhileDown,
}

/// A request between inspection and forwarding.
enum Pending {
    /// exec/attach/port-forward: forwarded as an upgrade, its body untouched.
    Upgrade(Request<Incoming>, upgrade::UpgradeProtocol),
    /// Everything else, its body already inspected; the counter holds (or will hold, as
    /// the body streams) the bytes the client sent.
    Plain(Request<ProxyBody>, Arc<AtomicU64>),
}

impl Pending {
    fn extensions_mut(&mut self) -> &mut http::Extensions {
        match self {
            Pending::Upgrade(r, _) => r.extensions_mut(),
            Pending::Plain(r, _) => r.extensions_mut(),
        }
    }
}

/// Per-connection facts, fixed at accept() time.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The client's address as the proxy sees it.
    pub peer: SocketAddr,
    /// What the kernel recorded about the connection (None without eBPF interception).
    pub origin: Option<ConnectionOrigin>,
    /// The workload the kernel's facts resolve to.
    pub workload: WorkloadIdentity,
    /// The workload's connection slot (`limits.maxConnectionsPerWorkload`).
    slot: Option<SlotHold>,
}

/// A share of a connection slot: an upgraded stream outlives its HTTP connection and keeps
/// counting against the workload's limit until it ends.
#[derive(Clone)]
struct SlotHold {
    /// Only held: the slot is given back when the last share is dropped.
    _slot: Arc<ConnectionSlot>,
}

impl std::fmt::Debug for SlotHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlotHold")
    }
}

impl Proxy {
    /// Builds the proxy and its upstream connection pool.
    pub fn new(s: ProxySettings) -> Arc<Self> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(s.connect_timeout));
        http.set_nodelay(true);
        let dialer = upgrade::Dialer::new(
            s.upstream_tls.clone(),
            &s.upstream_url,
            s.upstream_server_name.clone(),
            s.connect_timeout,
        );
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(s.upstream_tls)
            .https_only();
        let builder = match s.upstream_server_name {
            Some(name) => {
                builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
            }
            None => builder,
        };
        let connector = match s.upstream_protocol {
            UpstreamProtocol::Http1 => builder.enable_http1().wrap_connector(http),
            UpstreamProtocol::Http2 => builder.enable_http1().enable_http2().wrap_connector(http),
        };
        let upstream = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Arc::new(Self {
            policy: Arc::new(ArcSwap::from_pointee(s.policy)),
            upstream,
            upstream_base: s.upstream_url,
            token: s.token,
            recorder: s.recorder,
            interceptor: s.interceptor,
            node: s.node,
            cluster: s.cluster,
            dialer,
            frame_sink: std::sync::RwLock::new(None),
            identity: s.identity,
            principals: s.principals,
            scope: s.scope,
            metrics: s.metrics,
            connections: Arc::new(ConnectionLimiter::new(
                s.limits.max_connections_per_workload,
            )),
            limits: s.limits,
            impersonate: s.impersonate,
            max_object_bytes: s.max_object_bytes,
            record_responses: s.record_responses,
            reads_while_down: s.reads_while_down,
            streams: TaskTracker::new(),
            draining: CancellationToken::new(),
        })
    }

    /// Sends the decoded frames of every upgraded stream started from now on to `sink`.
    pub fn set_frame_sink(&self, sink: Arc<dyn upgrade::FrameSink>) {
        if let Ok(mut slot) = self.frame_sink.write() {
            *slot = Some(sink);
        }
    }

    /// Accepts connections until the drain starts, then lets in-flight requests finish.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        drain: DrainWatcher,
    ) {
        let acceptor = TlsAcceptor::from(tls);
        let connections = TaskTracker::new();
        loop {
            let (tcp, peer) = tokio::select! {
                _ = drain.signaled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let local = tcp.local_addr().unwrap_or(peer);
            let origin = self
                .interceptor
                .as_ref()
                .and_then(|i| i.origin(peer, local));
            let workload = match (&self.identity, &origin) {
                (Some(identity), Some(origin)) => identity.resolve(origin),
                _ => WorkloadIdentity::default(),
            };
            if let Some(origin) = &origin
                && self.scope.classify(&workload).bypass
            {
                // Out of scope, but redirected before the classifier put its cgroup in the
                // bypass map: pass the bytes through untouched, TLS and all.
                tokio::spawn(relay_l4(tcp, origin.original_dst));
                continue;
            }
            let key = WorkloadKey::of(origin.as_ref(), peer);
            let Some(slot) = self.connections.try_acquire(key) else {
                self.metrics.connections_rejected.inc();
                tracing::warn!(
                    %peer,
                    workload = %key,
                    limit = self.limits.max_connections_per_workload,
                    "workload is at limits.maxConnectionsPerWorkload; closing the new connection"
                );
                drop(tcp);
                continue;
            };
            // Released when the connection and every stream upgraded from it are gone.
            let conn_info = Arc::new(ConnectionInfo {
                peer,
                origin,
                workload,
                slot: Some(SlotHold {
                    _slot: Arc::new(slot),
                }),
            });
            let proxy = self.clone();
            let acceptor = acceptor.clone();
            connections.spawn(async move {
                proxy.serve_connection(tcp, acceptor, conn_info).await;
            });
        }
        drop(listener);
        // Connections finish their in-flight requests and watches end; the caller bounds
        // this with the drain grace period.
        self.draining.cancel();
        connections.close();
        connections.wait().await;
        // Upgraded streams saw the same cancellation and close both ends in order.
        self.streams.close();
        self.streams.wait().await;
        drop(drain);
    }

    /// Serves one accepted connection until the client leaves, it idles out, or the drain
    /// has let its in-flight requests finish.
    async fn serve_connection(
        self: Arc<Self>,
        tcp: TcpStream,
        acceptor: TlsAcceptor,
        conn_info: Arc<ConnectionInfo>,
    ) {
        let peer = conn_info.peer;
        let limits = &self.limits;
        let tls =
            match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
        let activity = Arc::new(Activity::default());
        let service = {
            let proxy = self.clone();
            let activity = activity.clone();
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let proxy = proxy.clone();
                let conn_info = conn_info.clone();
                let active = activity.begin();
                async move {
                    let response = proxy.handle(req, &conn_info).await;
                    // The connection counts as busy until the response body is done.
                    Ok::<_, Infallible>(response.map(|body| {
                        ActiveBody {
                            inner: body,
                            _active: active,
                        }
                        .boxed()
                    }))
                }
            })
        };
        let header_bytes = usize::try_from(limits.max_request_header_bytes)
            .unwrap_or(usize::MAX)
            .max(MIN_REQUEST_HEADER_BYTES as usize);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(header_bytes);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(limits.max_request_header_bytes)
            .max_concurrent_streams(limits.http2_max_concurrent_streams)
            .keep_alive_interval(
                Some(limits.http2_keep_alive_interval).filter(|interval| !interval.is_zero()),
            )
            .keep_alive_timeout(limits.http2_keep_alive_timeout);
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
        tokio::pin!(conn);
        let idle = activity.idle_for(limits.idle_timeout);
        tokio::pin!(idle);
        let mut closing = false;
        let mut hard_deadline = None;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = self.draining.cancelled(), if !closing => {
                    // HTTP/1.1: close after the current response; HTTP/2: GOAWAY, then let
                    // open streams finish.
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = &mut idle, if !closing => {
                    tracing::debug!(%peer, timeout = ?limits.idle_timeout, "closing an idle connection");
                    closing = true;
                    hard_deadline = Some(tokio::time::Instant::now() + IDLE_CLOSE_GRACE);
                    conn.as_mut().graceful_shutdown();
                }
                _ = sleep_until_opt(hard_deadline) => {
                    tracing::debug!(%peer, "idle connection did not close in time; dropping it");
                    return;
                }
            }
        }
    }

    /// Handles one request end to end. Never fails: every problem becomes a `Status`.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        conn: &ConnectionInfo,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let request_time = jiff::Timestamp::now();
        let audit_id = uuid::Uuid::now_v7().to_string();
        let mut record = self.base_record(&req, conn, request_time, &audit_id);
        let span = tracing::debug_span!("request", %audit_id, cgroup = record.workload.cgroup_id);
        let _enter = span.enter();

        let info = match RequestInfo::parse(req.method(), req.uri()) {
            Ok(info) => info,
            Err(e) => {
                let status = Status::bad_request(format!("chaperone: {e}"));
                record.outcome = Outcome::Invalid;
                record.reason = Some(status.message().to_owned());
                return self.local_response(status, record, started, &audit_id);
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
            return self.local_response(status, record, started, &audit_id);
        }

        let principal = self
            .principals
            .verify(req.headers().get(header::AUTHORIZATION), &conn.workload)
            .await;
        record.principal = PrincipalRecord {
            kind: principal.kind.as_str().to_owned(),
            subject: principal.subject.clone(),
            groups: principal.groups.clone(),
            reason: principal.reason.clone(),
            mismatch: principal.mismatch.clone(),
        };
        if let Some(mismatch) = &principal.mismatch {
            self.metrics.service_account_mismatches.inc();
            tracing::warn!(%mismatch, "service account token does not match the pod");
        }
        // The body is read (up to the limit) before the decision so that a denied request's
        // object is recorded too. Upgrade requests (exec, attach, port-forward) have none.
        let mut pending = match upgrade::upgrade_protocol(&req) {
            Some(protocol) => Pending::Upgrade(req, protocol),
            None => match self.inspect_body(req, &mut record).await {
                Ok(plain) => plain,
                Err(status) => {
                    record.outcome = Outcome::Invalid;
                    record.reason = Some(status.message().to_owned());
                    return self.local_response(status, record, started, &audit_id);
                }
            },
        };

        let decision = {
            let policy = self.policy.load();
            policy::decide(
                &policy,
                &RequestContext::new(&info)
                    .with_workload(&conn.workload)
                    .with_principal(&principal),
            )
        };
        record.policy_rule = decision.rule.as_deref().map(str::to_owned);
        record.decision = Some(decision.action);
        if decision.action == Action::Deny {
            let why = decision.reason();
            tracing::info!(verb = %info.verb, resource = %info.resource, name = %info.name, reason = %why, "denied");
            record.decision = Some(Action::Deny);
            record.outcome = Outcome::Denied;
            record.reason = Some(why.clone());
            return self.local_response(forbidden_status(&info, &why), record, started, &audit_id);
        }
        match impersonation(&self.impersonate, &conn.workload, &principal) {
            Ok(as_whom) => {
                record.impersonated_user = as_whom.as_ref().map(|i| i.user.clone());
                pending.extensions_mut().insert(as_whom);
            }
            Err(why) => {
                record.decision = Some(Action::Deny);
                record.outcome = Outcome::Denied;
                record.reason = Some(why.clone());
                return self.local_response(
                    forbidden_status(&info, &why),
                    record,
                    started,
                    &audit_id,
                );
            }
        }
        // Fail closed: what cannot be recorded is not forwarded (reads per configuration).
        if let Err(cause) = self.recorder.health()
            && (info.is_mutating() || self.reads_while_down == ReadsWhileDown::Refuse)
        {
            let why = format!(
                "chaperone: recording is down, so this request cannot be recorded and is refused: {cause}"
            );
            tracing::warn!(verb = %info.verb, resource = %info.resource, name = %info.name, "refused while recording is down");
            record.outcome = Outcome::RecordingDown;
            record.reason = Some(why.clone());
            return self.local_response(
                Status::service_unavailable(why, RECORDING_RETRY_AFTER_SECONDS),
                record,
                started,
                &audit_id,
            );
        }
        match pending {
            Pending::Upgrade(req, protocol) => {
                self.forward_upgrade(req, protocol, conn.slot.clone(), record, started, audit_id)
                    .await
            }
            Pending::Plain(req, count) => self.forward(req, count, record, started, audit_id).await,
        }
    }

    /// Reads and decodes a request's body (see [`body::inspect`]) and notes what it held
    /// in the record; a body that cannot be accepted becomes the `Status` to answer with.
    async fn inspect_body(
        &self,
        req: Request<Incoming>,
        record: &mut RequestRecord,
    ) -> Result<Pending, Status> {
        let (mut parts, body) = req.into_parts();
        let inspected = body::inspect(
            &mut parts,
            body,
            self.limits.max_inspected_body_bytes as usize,
            self.limits.body_read_timeout,
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
                    body::BodyError::Read(_) => Status::bad_request(format!("chaperone: {e}")),
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
        let count = Arc::new(AtomicU64::new(0));
        let body = match inspected.whole_len {
            Some(n) => {
                count.store(n, Ordering::Relaxed);
                body
            }
            None => CountingBody {
                inner: body,
                count: count.clone(),
            }
            .boxed(),
        };
        self.record_object(record, inspected);
        Ok(Pending::Plain(Request::from_parts(parts, body), count))
    }

    /// Puts what body inspection found into the record: the masked object, size-capped.
    fn record_object(&self, record: &mut RequestRecord, inspected: body::Inspected) {
        record.request_content_type = inspected.content_type;
        record.request_object_truncated = inspected.truncated;
        if let Some(object) = inspected.object {
            match recorded_json(record, object, self.max_object_bytes) {
                Some(text) => record.request_object = Some(text),
                None => record.request_object_truncated = true,
            }
        }
    }

    fn base_record(
        &self,
        req: &Request<Incoming>,
        conn: &ConnectionInfo,
        request_time: jiff::Timestamp,
        audit_id: &str,
    ) -> RequestRecord {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let workload = match &conn.origin {
            Some(origin) => conn.workload.record(origin),
            None => WorkloadRecord::default(),
        };
        RequestRecord {
            request_time,
            response_time: None,
            latency_us: 0,
            audit_id: audit_id.to_owned(),
            node: self.node.clone(),
            cluster: self.cluster.clone(),
            workload,
            source_addr: conn.peer.to_string(),
            original_dst: conn.origin.as_ref().map(|o| o.original_dst.to_string()),
            user_agent: header("user-agent"),
            kubectl_command: header("kubectl-command"),
            kubectl_session: header("kubectl-session"),
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
            principal: PrincipalRecord::default(),
            impersonated_user: None,
            request_content_type: None,
            request_object: None,
            request_object_truncated: false,
            masked_fields: 0,
            response_object: None,
            response_object_truncated: false,
            outcome: Outcome::Invalid,
        }
    }

    fn local_response(
        &self,
        status: Status,
        mut record: RequestRecord,
        started: Instant,
        audit_id: &str,
    ) -> Response<ProxyBody> {
        let response: Response<Full<Bytes>> = status.into_response();
        record.response_code = i32::from(response.status().as_u16());
        let (mut parts, body) = response.into_parts();
        insert_audit_id(&mut parts.headers, audit_id);
        let body = body.map_err(|never| match never {}).boxed();
        let guard = RecordGuard::new(self, record, started, Arc::new(AtomicU64::new(0)));
        Response::from_parts(parts, Metered::new(body, guard).boxed())
    }

    async fn forward(
        &self,
        req: Request<ProxyBody>,
        request_bytes: Arc<AtomicU64>,
        mut record: RequestRecord,
        started: Instant,
        audit_id: String,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        parts.uri = match upstream_uri(&self.upstream_base, &parts.uri) {
            Ok(uri) => uri,
            Err(e) => {
                record.outcome = Outcome::Invalid;
                let status =
                    Status::bad_request(format!("chaperone: cannot forward {}: {e}", parts.uri));
                return self.local_response(status, record, started, &audit_id);
            }
        };
        sanitize_request_headers(&mut parts.headers);
        self.upstream_credentials(&mut parts.headers, &parts.extensions);
        // Watches stream for as long as they last; they are recorded as requests only.
        let capture = self.record_responses && record.verb != Verb::Watch;
        if capture
            && let Some(json) = parts
                .headers
                .get(header::ACCEPT)
                .and_then(body::accept_json)
        {
            parts.headers.insert(header::ACCEPT, json);
        }
        // The upstream connection's protocol is negotiated independently of the client's.
        parts.version = http::Version::HTTP_11;
        let upstream_req = Request::from_parts(parts, body);

        match self.upstream.request(upstream_req).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                record.response_code = i32::from(parts.status.as_u16());
                record.response_time = Some(jiff::Timestamp::now());
                record.outcome = Outcome::Forwarded;
                strip_hop_by_hop(&mut parts.headers);
                if !parts.headers.contains_key("audit-id") {
                    insert_audit_id(&mut parts.headers, &audit_id);
                }
                let watch = record.verb == Verb::Watch;
                let json = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|ct| ct.starts_with("application/json"));
                let mut guard = RecordGuard::new(self, record, started, request_bytes);
                if capture && json {
                    guard.capture = Some(body::Capture::new(self.max_object_bytes));
                }
                let mut body = body.map_err(BoxError::from).boxed();
                if watch {
                    // A watch never ends by itself; on drain it ends cleanly (the client sees
                    // the end of the stream and re-lists elsewhere) rather than being reset.
                    body = EndOnDrain::new(body, self.draining.clone()).boxed();
                }
                let body = Metered::new(body, guard);
                Response::from_parts(parts, body.boxed())
            }
            Err(e) => {
                let cause = error_chain(&e);
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
                self.local_response(status, record, started, &audit_id)
            }
        }
    }
}

fn insert_audit_id(headers: &mut HeaderMap, audit_id: &str) {
    if let Ok(v) = HeaderValue::from_str(audit_id) {
        headers.insert(HeaderName::from_static("audit-id"), v);
    }
}

/// The 403 the API server's authorizer would send, carrying Chaperone's reason.
fn forbidden_status(info: &RequestInfo, why: &str) -> Status {
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

/// Joins the upstream base (`https://host:port[/prefix]`) with the client's path and query.
fn upstream_uri(base: &Uri, client: &Uri) -> Result<Uri, http::Error> {
    let prefix = base.path().trim_end_matches('/');
    let pq = client.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    Uri::builder()
        .scheme(base.scheme_str().unwrap_or("https"))
        .authority(base.authority().map(|a| a.as_str()).unwrap_or_default())
        .path_and_query(format!("{prefix}{pq}"))
        .build()
}

/// Headers that describe one hop, not the message (RFC 9110 7.6.1), plus `Host`, which the
/// client set to the virtual API server address.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named by Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(str::trim).map(str::to_ascii_lowercase))
        .filter_map(|n| HeaderName::try_from(n).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Removes everything the agent must not be able to pass upstream: its own credentials
/// (the gateway injects its own), impersonation (refused earlier; removed again as a second
/// line of defence), and hop-by-hop headers.
fn sanitize_request_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove(header::COOKIE);
    let impersonation: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("impersonate-"))
        .cloned()
        .collect();
    for name in impersonation {
        headers.remove(name);
    }
}

/// Who the upstream request runs as, when the gateway impersonates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Impersonation {
    /// `Impersonate-User`.
    pub user: String,
    /// `Impersonate-Group`, one header each.
    pub groups: Vec<String>,
    /// `Impersonate-Uid`, when the identity has a known UID.
    pub uid: Option<String>,
}

/// Decides the impersonated identity; an identity that cannot be established is a refusal,
/// never a silent fallback to the gateway's own (broad) identity.
fn impersonation(
    cfg: &ImpersonationConfig,
    workload: &WorkloadIdentity,
    principal: &Principal,
) -> Result<Option<Impersonation>, String> {
    match cfg.mode {
        ImpersonationMode::None => Ok(None),
        ImpersonationMode::Fixed => Ok(Some(Impersonation {
            user: cfg.user.clone().unwrap_or_default(),
            groups: cfg.groups.clone(),
            uid: None,
        })),
        ImpersonationMode::Workload => match (&workload.namespace, &workload.service_account, workload.is_known()) {
            (Some(ns), Some(sa), true) => Ok(Some(Impersonation {
                user: format!("system:serviceaccount:{ns}:{sa}"),
                groups: vec!["system:serviceaccounts".to_owned(), format!("system:serviceaccounts:{ns}")],
                uid: None,
            })),
            _ => Err("the gateway impersonates workloads, and this connection's workload is not identified".to_owned()),
        },
        ImpersonationMode::Principal => match (principal.kind, &principal.subject) {
            (PrincipalKind::Oidc | PrincipalKind::ServiceAccount | PrincipalKind::User, Some(subject)) => {
                Ok(Some(Impersonation {
                    user: subject.clone(),
                    groups: principal.groups.clone(),
                    uid: principal.uid.clone(),
                }))
            }
            _ => Err(format!(
                "the gateway impersonates the presented principal, and this request has none it could verify ({})",
                principal.reason.as_deref().unwrap_or(principal.kind.as_str())
            )),
        },
    }
}

impl Proxy {
    /// Puts the gateway's credential and, when configured, the impersonation headers on an
    /// upstream request whose client headers were already sanitized.
    pub(crate) fn upstream_credentials(
        &self,
        headers: &mut HeaderMap,
        extensions: &http::Extensions,
    ) {
        if let Some(token) = &self.token {
            headers.insert(header::AUTHORIZATION, token.header());
        }
        if let Some(Some(as_whom)) = extensions.get::<Option<Impersonation>>() {
            impersonation_headers(headers, as_whom);
        }
    }
}

/// Writes `Impersonate-User`, one `Impersonate-Group` per group and `Impersonate-Uid`.
fn impersonation_headers(headers: &mut HeaderMap, as_whom: &Impersonation) {
    let Ok(user) = HeaderValue::from_str(&as_whom.user) else {
        tracing::warn!(user = %as_whom.user, "impersonated user is not a valid header value");
        return;
    };
    headers.insert(HeaderName::from_static("impersonate-user"), user);
    for group in &as_whom.groups {
        if let Ok(g) = HeaderValue::from_str(group) {
            headers.append(HeaderName::from_static("impersonate-group"), g);
        }
    }
    if let Some(uid) = as_whom
        .uid
        .as_deref()
        .and_then(|u| HeaderValue::from_str(u).ok())
    {
        headers.insert(HeaderName::from_static("impersonate-uid"), uid);
    }
}

/// Relays an out-of-scope connection to where it was going, without looking inside.
async fn relay_l4(mut client: tokio::net::TcpStream, original_dst: SocketAddr) {
    match tokio::net::TcpStream::connect(original_dst).await {
        Ok(mut upstream) => {
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(%original_dst, error = %e, "L4 relay ended");
            }
        }
        Err(e) => {
            tracing::warn!(%original_dst, error = %e, "L4 relay: cannot reach the original destination")
        }
    }
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Whose connections count against `limits.maxConnectionsPerWorkload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum WorkloadKey {
    /// The cgroup the kernel saw making the connection.
    Cgroup(u64),
    /// The client address, when there is no kernel origin.
    Source(IpAddr),
}

impl WorkloadKey {
    fn of(origin: Option<&ConnectionOrigin>, peer: SocketAddr) -> Self {
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
struct ConnectionLimiter {
    max: u32,
    open: Mutex<HashMap<WorkloadKey, u32>>,
}

impl ConnectionLimiter {
    fn new(max: u32) -> Self {
        Self {
            max,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one more connection of `key`, or None when it is at the limit.
    fn try_acquire(self: &Arc<Self>, key: WorkloadKey) -> Option<ConnectionSlot> {
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
struct ConnectionSlot {
    limiter: Arc<ConnectionLimiter>,
    key: WorkloadKey,
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

/// How many requests a connection has in progress, for the idle timeout.
#[derive(Debug)]
struct Activity {
    active: tokio::sync::watch::Sender<usize>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            active: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Activity {
    fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.active.send_modify(|n| *n += 1);
        ActiveGuard(self.clone())
    }

    /// Resolves once no request has been in progress for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        let mut changes = self.active.subscribe();
        loop {
            if *changes.borrow_and_update() == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(timeout) => return,
                    _ = changes.changed() => {}
                }
            } else if changes.changed().await.is_err() {
                return;
            }
        }
    }
}

/// One request in progress; dropped when its response body is done or abandoned.
#[derive(Debug)]
struct ActiveGuard(Arc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A response body that keeps its connection counted as busy.
struct ActiveBody {
    inner: ProxyBody,
    _active: ActiveGuard,
}

impl Body for ActiveBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that ends (cleanly, not with an error) once the drain starts.
struct EndOnDrain {
    inner: ProxyBody,
    drained: Pin<Box<WaitForCancellationFutureOwned>>,
    ended: bool,
}

impl EndOnDrain {
    fn new(inner: ProxyBody, draining: CancellationToken) -> Self {
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

/// Sends the row when the exchange is over: when the response body has been fully sent,
/// or when it is dropped (client went away, watch closed, local response).
struct RecordGuard {
    pending: Option<(RecorderHandle, RequestRecord)>,
    metrics: Arc<Metrics>,
    started: Instant,
    request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
    /// A copy of the response body for `response_object`, when it is recorded.
    capture: Option<body::Capture>,
    /// The response body was sent to its end (a partial body is not recorded as an object).
    complete: bool,
    max_object_bytes: usize,
}

impl RecordGuard {
    fn new(
        proxy: &Proxy,
        record: RequestRecord,
        started: Instant,
        request_bytes: Arc<AtomicU64>,
    ) -> Self {
        Self {
            pending: Some((proxy.recorder.clone(), record)),
            metrics: proxy.metrics.clone(),
            started,
            request_bytes,
            response_bytes: 0,
            capture: None,
            complete: false,
            max_object_bytes: proxy.max_object_bytes,
        }
    }
}

impl Drop for RecordGuard {
    fn drop(&mut self) {
        let Some((recorder, mut record)) = self.pending.take() else {
            return;
        };
        record.latency_us = i64::try_from(self.started.elapsed().as_micros()).unwrap_or(i64::MAX);
        if record.response_time.is_none() {
            record.response_time = Some(jiff::Timestamp::now());
        }
        record.request_bytes = self.request_bytes.load(Ordering::Relaxed) as i64;
        record.response_bytes = self.response_bytes as i64;
        let audit_id = record.audit_id.clone();
        self.metrics.count_request(record.decision, record.outcome);
        let metrics = self.metrics.clone();
        let capture = self.capture.take().filter(|_| self.complete);
        let max_object_bytes = self.max_object_bytes;
        // Drop cannot await; the recorder applies back-pressure inside the task instead.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    // Decoding and masking happen here, off the response's path.
                    if let Some(capture) = capture {
                        record_response_object(&mut record, capture, max_object_bytes);
                    }
                    if let Err(e) = recorder.record(record).await {
                        metrics.recording_failures.inc();
                        tracing::error!(%audit_id, error = %e, "request could not be recorded");
                    }
                });
            }
            Err(_) => tracing::error!(%audit_id, "request could not be recorded: no runtime"),
        }
    }
}

/// Puts a captured response body into the record, masked and size-capped.
fn record_response_object(record: &mut RequestRecord, capture: body::Capture, max_bytes: usize) {
    match capture.finish() {
        Err(()) => record.response_object_truncated = true,
        Ok(None) => {}
        Ok(Some(object)) => match recorded_json(record, object, max_bytes) {
            Some(text) => record.response_object = Some(text),
            None => record.response_object_truncated = true,
        },
    }
}

/// `object` as the masked JSON text a record keeps, adding what was masked to the record's
/// count; `None` when the text is larger than `max_bytes` (the caller flags it truncated).
fn recorded_json(
    record: &mut RequestRecord,
    mut object: serde_json::Value,
    max_bytes: usize,
) -> Option<String> {
    let masked = masking::mask_for_recording(&record.object_ref.resource, &mut object);
    record.masked_fields = record
        .masked_fields
        .saturating_add(i32::try_from(masked).unwrap_or(i32::MAX));
    let text = object.to_string();
    (text.len() <= max_bytes).then_some(text)
}

/// A response body that counts bytes and owns the [`RecordGuard`].
struct Metered {
    inner: ProxyBody,
    guard: RecordGuard,
}

impl Metered {
    fn new(inner: ProxyBody, guard: RecordGuard) -> Self {
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
struct CountingBody {
    inner: ProxyBody,
    count: Arc<AtomicU64>,
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let prefixed: Uri = "https://lb.example:443/k8s/".parse().unwrap();
        assert_eq!(
            upstream_uri(&prefixed, &client).unwrap().path(),
            "/k8s/api/v1/namespaces/default/pods"
        );
    }

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

    #[test]
    fn credentials_and_impersonation_never_pass() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer pod-token"),
            ("Impersonate-User", "system:admin"),
            ("impersonate-group", "system:masters"),
            ("Impersonate-Extra-scopes", "x"),
            ("proxy-authorization", "Basic x"),
            ("cookie", "session=1"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("host", "169.254.77.100"),
            ("accept", "application/json"),
        ] {
            h.append(
                HeaderName::try_from(k).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        sanitize_request_headers(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(
            left,
            vec!["accept"],
            "unexpected headers survived: {left:?}"
        );
    }

    #[test]
    fn principal_impersonation_carries_user_groups_and_uid() {
        let cfg = ImpersonationConfig {
            mode: ImpersonationMode::Principal,
            ..ImpersonationConfig::default()
        };
        let mut principal = Principal::anonymous();
        principal.kind = PrincipalKind::ServiceAccount;
        principal.subject = Some("system:serviceaccount:agents:cursor".to_owned());
        principal.groups = vec![
            "system:serviceaccounts".to_owned(),
            "system:authenticated".to_owned(),
        ];
        principal.uid = Some("7c1d0e2a-5b7f-4b0e-9f5d-2f1a8e3c4b6d".to_owned());
        let as_whom = impersonation(&cfg, &WorkloadIdentity::default(), &principal)
            .expect("principal mode with a verified principal")
            .expect("an impersonated identity");
        let mut h = HeaderMap::new();
        impersonation_headers(&mut h, &as_whom);
        let written: Vec<(&str, &str)> = h
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap_or("<binary>")))
            .collect();
        assert_eq!(
            written,
            [
                ("impersonate-user", "system:serviceaccount:agents:cursor"),
                ("impersonate-group", "system:serviceaccounts"),
                ("impersonate-group", "system:authenticated"),
                ("impersonate-uid", "7c1d0e2a-5b7f-4b0e-9f5d-2f1a8e3c4b6d"),
            ]
        );

        // Without a UID (OIDC, fixed, workload) no Impersonate-Uid is sent.
        principal.uid = None;
        let as_whom = impersonation(&cfg, &WorkloadIdentity::default(), &principal)
            .expect("ok")
            .expect("identity");
        let mut h = HeaderMap::new();
        impersonation_headers(&mut h, &as_whom);
        assert!(!h.contains_key("impersonate-uid"));
    }
}
