//! The L7 proxy: terminate TLS, understand the request, decide, forward, record.
//!
//! One accepted connection is attributed once (the kernel's record of where it was going and
//! which cgroup made it), then every HTTP/1.1 or HTTP/2 request on it goes through
//! [`Proxy::handle`]: parse into Kubernetes request attributes, ask the policy, answer a
//! denial with a `Status` 403 or forward upstream with the client's credentials replaced by
//! the gateway's, stream the response back without buffering (watches), and record one
//! row when the exchange ends. Upgraded connections (exec, attach, port-forward) are
//! relayed by [`upgrade`], whose taps decode the stream framing ([`frames`]).

pub mod frames;
pub mod upgrade;

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
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
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::{
    admin::Metrics,
    drain::DrainWatcher,
    ebpf::{ConnectionOrigin, Interceptor},
    identity::{Identity, WorkloadIdentity, principal::PrincipalVerifier},
    policy::{self, Action, Policy, RequestContext},
    recorder::{ObjectRef, PrincipalRecord, RecorderHandle, RequestRecord, WorkloadRecord},
    request::RequestInfo,
    scope::ScopeConfig,
    status::Status,
};

/// Errors a body can fail with, boxed so upstream and local bodies share one type.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every response the proxy sends.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, ProxyBody>;

/// How long a client gets to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an HTTP/1.1 client gets to send a complete request head (slowloris guard).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

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
    #[error("gateway token {path} is not a valid header value (control characters?)")]
    TokenInvalid {
        /// The token file.
        path: String,
    },
}

/// The gateway's own bearer token, re-read by a control-plane task when the file changes so
/// the request path only reads a snapshot.
#[derive(Debug)]
pub struct GatewayToken {
    path: std::path::PathBuf,
    header: ArcSwap<HeaderValue>,
}

impl GatewayToken {
    /// Reads the token file once.
    pub fn load(path: &std::path::Path) -> Result<Arc<Self>, ProxyError> {
        let header = Self::read(path)?;
        Ok(Arc::new(Self {
            path: path.to_owned(),
            header: ArcSwap::from_pointee(header),
        }))
    }

    fn read(path: &std::path::Path) -> Result<HeaderValue, ProxyError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProxyError::Token {
            path: path.display().to_string(),
            source,
        })?;
        let mut value = HeaderValue::try_from(format!("Bearer {}", text.trim())).map_err(|_| {
            ProxyError::TokenInvalid {
                path: path.display().to_string(),
            }
        })?;
        // Keeps the credential out of HPACK tables and Debug output.
        value.set_sensitive(true);
        Ok(value)
    }

    /// Re-reads the file every `every` until the drain starts; a failed read keeps the old
    /// token (as client-go does) and logs why.
    pub async fn refresh_loop(self: Arc<Self>, every: Duration, drain: DrainWatcher) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = drain.signaled() => return,
                _ = tick.tick() => {}
            }
            match Self::read(&self.path) {
                Ok(v) if v != **self.header.load() => {
                    tracing::info!(path = %self.path.display(), "gateway token changed, using the new one");
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
    /// The current policy; replaced atomically on reload.
    pub policy: ArcSwap<Policy>,
    upstream: UpstreamClient,
    upstream_base: Uri,
    token: Arc<GatewayToken>,
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
    /// The gateway credential.
    pub token: Arc<GatewayToken>,
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
        let connector = builder.enable_http1().enable_http2().wrap_connector(http);
        let upstream = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Arc::new(Self {
            policy: ArcSwap::from_pointee(s.policy),
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
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
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
            let conn_info = Arc::new(ConnectionInfo {
                peer,
                origin,
                workload,
            });
            let proxy = self.clone();
            let acceptor = acceptor.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let tls =
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
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
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let proxy = proxy.clone();
                    let conn_info = conn_info.clone();
                    async move { Ok::<_, Infallible>(proxy.handle(req, &conn_info).await) }
                });
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT);
                builder.http2().timer(TokioTimer::new());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
        drop(listener);
        // Connections finish their in-flight requests; the caller bounds this with the
        // drain grace period.
        graceful.shutdown().await;
        drop(drain);
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
                record.decision = "error".to_owned();
                record.reason = Some(status.message().to_owned());
                return self.local_response(status, record, started, &audit_id);
            }
        };
        record.verb = info.verb.clone();
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
            record.decision = "deny".to_owned();
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
            tracing::warn!(%mismatch, "service account token does not match the pod");
        }
        let decision = {
            let policy = self.policy.load();
            policy::decide(&policy, &RequestContext::new(&info))
        };
        record.policy_rule = decision.rule.as_deref().map(str::to_owned);
        if decision.action == Action::Deny {
            let why = decision.reason();
            tracing::info!(verb = %info.verb, resource = %info.resource, name = %info.name, reason = %why, "denied");
            record.decision = "deny".to_owned();
            record.reason = Some(why.clone());
            return self.local_response(forbidden_status(&info, &why), record, started, &audit_id);
        }
        record.decision = "allow".to_owned();
        if let Some(protocol) = upgrade::upgrade_protocol(&req) {
            return self
                .forward_upgrade(req, protocol, record, started, audit_id)
                .await;
        }
        self.forward(req, record, started, audit_id).await
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
            verb: req.method().as_str().to_ascii_lowercase(),
            request_uri: req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
            object_ref: ObjectRef::default(),
            decision: String::new(),
            policy_rule: None,
            reason: None,
            response_code: 0,
            request_bytes: 0,
            response_bytes: 0,
            error: None,
            principal: PrincipalRecord::default(),
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
        req: Request<Incoming>,
        mut record: RequestRecord,
        started: Instant,
        audit_id: String,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let request_bytes = Arc::new(AtomicU64::new(0));
        let counted = CountingBody {
            inner: body.map_err(BoxError::from).boxed(),
            count: request_bytes.clone(),
        };
        parts.uri = match upstream_uri(&self.upstream_base, &parts.uri) {
            Ok(uri) => uri,
            Err(e) => {
                record.decision = "error".to_owned();
                let status =
                    Status::bad_request(format!("chaperone: cannot forward {}: {e}", parts.uri));
                return self.local_response(status, record, started, &audit_id);
            }
        };
        sanitize_request_headers(&mut parts.headers);
        parts
            .headers
            .insert(header::AUTHORIZATION, self.token.header());
        // The upstream connection's protocol is negotiated independently of the client's.
        parts.version = http::Version::HTTP_11;
        let upstream_req = Request::from_parts(parts, counted.boxed());

        match self.upstream.request(upstream_req).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                record.response_code = i32::from(parts.status.as_u16());
                record.response_time = Some(jiff::Timestamp::now());
                strip_hop_by_hop(&mut parts.headers);
                if !parts.headers.contains_key("audit-id") {
                    insert_audit_id(&mut parts.headers, &audit_id);
                }
                let guard = RecordGuard::new(self, record, started, request_bytes);
                let body = Metered::new(body.map_err(BoxError::from).boxed(), guard);
                Response::from_parts(parts, body.boxed())
            }
            Err(e) => {
                let cause = error_chain(&e);
                tracing::warn!(upstream = %self.upstream_base, error = %cause, "upstream request failed");
                record.decision = "error".to_owned();
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

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
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

/// Sends the row when the exchange is over: when the response body has been fully sent,
/// or when it is dropped (client went away, watch closed, local response).
struct RecordGuard {
    pending: Option<(RecorderHandle, RequestRecord)>,
    metrics: Arc<Metrics>,
    started: Instant,
    request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
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
        self.metrics.count_request(&record.decision);
        let metrics = self.metrics.clone();
        // Drop cannot await; the recorder applies back-pressure inside the task instead.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
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
}
