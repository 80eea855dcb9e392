//! The L7 proxy: terminate TLS, understand the request, decide, forward, record.
//!
//! One accepted connection is attributed once (the kernel's record of where it was going and
//! which cgroup made it), then every HTTP/1.1 or HTTP/2 request on it goes through
//! [`Proxy::handle`]: parse into Kubernetes request attributes, ask the policy, answer a
//! denial with a `Status` 403 or forward upstream with the client's credentials replaced by
//! the gateway's, stream the response back without buffering (watches), and record one
//! row when the exchange ends. Upgraded connections (exec, attach, port-forward) are
//! relayed by [`upgrade`], whose taps decode the stream framing ([`frames`]).

mod bind;
mod bodies;
mod body;
mod content;
pub mod credential;
pub mod frames;
mod handler;
mod headers;
mod held;
mod impersonation;
pub(crate) mod limits;
mod live;
pub use live::LiveStreams;
mod masked;
mod output_mask;
mod pool;
mod record;
mod stdin_guard;
pub mod upgrade;
mod workers;

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt as _, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::limits::{ActiveBody, Activity, ConnectionLimiter, SlotHold, WorkloadKey};
pub use self::{
    credential::{CredentialError, UpstreamCredential},
    impersonation::Impersonation,
};
use crate::{
    admin::Metrics,
    config::{ImpersonationConfig, ReadsWhileDown, UpstreamProtocol},
    config::{LimitsConfig, MIN_REQUEST_HEADER_BYTES},
    drain::DrainWatcher,
    ebpf::{ConnectionOrigin, Interceptor},
    identity::{Identity, WorkloadIdentity, principal::PrincipalVerifier},
    policy::Policy,
    recorder::RecorderHandle,
    scope::ScopeConfig,
};

/// Errors a body can fail with, boxed so upstream and local bodies share one type.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every response the proxy sends.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// What a request refused while recording is down tells the client to wait before retrying
/// (the recorder probes the disk every second).
const RECORDING_RETRY_AFTER_SECONDS: u32 = 1;
/// What a request refused because its pod cannot be named yet tells the client to wait.
const IDENTITY_RETRY_AFTER_SECONDS: u32 = 1;
/// How long a connection closed for idleness gets to say goodbye (HTTP/2 GOAWAY) before it
/// is dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long a new connection from a pod the pod store does not know yet waits for it
/// (the gateway's first list after a start, or a watch event a moment late).
const IDENTITY_WAIT: Duration = Duration::from_secs(5);
/// How long an idle upstream connection is kept for the next request.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Everything the request path needs, shared by all connections.
pub struct Proxy {
    /// The current policy; replaced atomically on reload (the admin endpoint reads it too).
    pub policy: Arc<ArcSwap<Policy>>,
    /// Open watches and exec/attach/port-forward sessions, re-checked on policy reload.
    live: Arc<LiveStreams>,
    /// One upstream connection pool per data-path worker, so a request and the upstream
    /// connection it uses are driven by the same thread ([`Proxy::upstream`]).
    upstreams: Vec<Arc<pool::UpstreamPool>>,
    /// One batch of finished rows per data-path worker ([`record::RowBatch`]).
    row_batches: Vec<Arc<record::RowBatch>>,
    upstream_base: Uri,
    credential: Option<Arc<UpstreamCredential>>,
    recorder: RecorderHandle,
    interceptor: Option<Arc<Interceptor>>,
    node: Arc<str>,
    cluster: Arc<str>,
    /// Opens the dedicated HTTP/1.1 connections of upgrades.
    dialer: pool::Dialer,
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
    /// Holds requests decided `approve` (None: such requests are refused).
    approvals: std::sync::RwLock<Option<Arc<crate::approval::holder::Holder>>>,
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
    /// The gateway credential, from kube-rs (`None`: requests go upstream without one).
    pub credential: Option<Arc<UpstreamCredential>>,
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
    /// Data-path threads (`listen.workers`; `0`: one per CPU).
    pub workers: usize,
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
    /// What every request's record says about the connection, made once per connection:
    /// `source_addr`, `original_dst` and `workload`.
    record: ConnectionRecord,
    /// The last token presented on the connection and its principal.
    tokens: crate::identity::principal::TokenMemo,
    /// Set when the workload could not be named because this node's pods are not listed
    /// yet, or the pod watch is failing: every request is refused (503), and notifying it
    /// closes the connection, so the client's next one is named afresh.
    identity_pending: Option<Arc<IdentityPending>>,
}

/// Why a connection's pod could not be named (see `ConnectionInfo::identity_pending`).
#[derive(Debug, Default)]
struct IdentityPending {
    /// Closes the connection once notified.
    close: tokio::sync::Notify,
    /// For the client: why no decision is possible.
    why: String,
}

#[derive(Debug, Clone, Default)]
struct ConnectionRecord {
    source_addr: Arc<str>,
    original_dst: Option<Arc<str>>,
    workload: Arc<crate::recorder::WorkloadRecord>,
}

impl ConnectionRecord {
    fn new(
        peer: SocketAddr,
        origin: Option<&ConnectionOrigin>,
        workload: &WorkloadIdentity,
    ) -> Self {
        Self {
            source_addr: peer.to_string().into(),
            original_dst: origin.map(|o| o.original_dst.to_string().into()),
            workload: Arc::new(origin.map(|o| workload.record(o)).unwrap_or_default()),
        }
    }
}

impl Proxy {
    /// The open streams a policy reload re-checks ([`LiveStreams::recheck`]).
    pub fn live_streams(&self) -> Arc<LiveStreams> {
        self.live.clone()
    }

    /// Builds the proxy and its upstream connection pool.
    pub fn new(s: ProxySettings) -> Arc<Self> {
        // Upgrades are HTTP/1.1 only: h2 has no Upgrade.
        let dialer = pool::Dialer::new(
            s.upstream_tls.clone(),
            &s.upstream_url,
            s.upstream_server_name.clone(),
            s.connect_timeout,
            &[b"http/1.1"],
        );
        let alpn: &[&[u8]] = match s.upstream_protocol {
            UpstreamProtocol::Http1 => &[b"http/1.1"],
            UpstreamProtocol::Http2 => &[b"h2", b"http/1.1"],
        };
        let forwarding = Arc::new(pool::Dialer::new(
            s.upstream_tls,
            &s.upstream_url,
            s.upstream_server_name,
            s.connect_timeout,
            alpn,
        ));
        let workers = workers::resolve(s.workers);
        let upstreams = (0..workers)
            .map(|_| {
                Arc::new(pool::UpstreamPool::new(
                    forwarding.clone(),
                    &s.upstream_url,
                    UPSTREAM_IDLE_TIMEOUT,
                ))
            })
            .collect();
        let row_batches = (0..workers)
            .map(|_| Arc::new(record::RowBatch::new(s.recorder.clone(), s.metrics.clone())))
            .collect();
        Arc::new(Self {
            policy: Arc::new(ArcSwap::from_pointee(s.policy)),
            upstreams,
            row_batches,
            upstream_base: s.upstream_url,
            credential: s.credential,
            recorder: s.recorder,
            interceptor: s.interceptor,
            node: s.node.into(),
            cluster: s.cluster.into(),
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
            live: Arc::default(),
            approvals: std::sync::RwLock::new(None),
        })
    }

    /// Holds requests decided `approve` with `holder` from now on (without one they are
    /// refused).
    pub fn set_approvals(&self, holder: Arc<crate::approval::holder::Holder>) {
        if let Ok(mut slot) = self.approvals.write() {
            *slot = Some(holder);
        }
    }

    fn approvals(&self) -> Option<Arc<crate::approval::holder::Holder>> {
        self.approvals.read().ok().and_then(|h| h.clone())
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
        let workers = match workers::Workers::start(self.upstreams.len()) {
            Ok(workers) => Some(workers),
            Err(error) => {
                // Still serves, on the shared runtime, rather than not at all.
                tracing::error!(%error, "cannot start the data-path threads; connections are served on the shared runtime");
                None
            }
        };
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
                record: ConnectionRecord::new(peer, origin.as_ref(), &workload),
                tokens: Default::default(),
                peer,
                origin,
                workload,
                slot: Some(SlotHold {
                    _slot: Arc::new(slot),
                }),
                identity_pending: None,
            });
            let proxy = self.clone();
            let acceptor = acceptor.clone();
            let tracked = connections.token();
            let serve = move |tcp: TcpStream| async move {
                proxy.serve_connection(tcp, acceptor, conn_info).await;
                drop(tracked);
            };
            match &workers {
                // The socket moves to the worker's own reactor, so its readiness wakes
                // that thread only.
                Some(workers) => workers.spawn(tcp, serve),
                None => {
                    tokio::spawn(serve(tcp));
                }
            }
        }
        drop(listener);
        // Connections finish their in-flight requests and watches end; the caller bounds
        // this with the drain grace period. Requests held for approval are answered now.
        self.draining.cancel();
        if let Some(holder) = self.approvals() {
            holder.stop_waiting();
        }
        connections.close();
        connections.wait().await;
        // Upgraded streams saw the same cancellation and close both ends in order.
        self.streams.close();
        self.streams.wait().await;
        if let Some(workers) = workers {
            workers.stop().await;
        }
        drop(drain);
    }

    /// The upstream connection pool of the data-path worker running the caller (the
    /// first one elsewhere, e.g. in tests that call the handler directly).
    fn upstream(&self) -> &Arc<pool::UpstreamPool> {
        let index = workers::current().unwrap_or(0) % self.upstreams.len();
        &self.upstreams[index]
    }

    /// Serves one accepted connection until the client leaves, it idles out, or the drain
    /// has let its in-flight requests finish.
    async fn serve_connection(
        self: Arc<Self>,
        tcp: TcpStream,
        acceptor: TlsAcceptor,
        mut conn_info: Arc<ConnectionInfo>,
    ) {
        if let Some(settled) = Arc::get_mut(&mut conn_info)
            && !self.settle_identity(settled).await
            && let Some(origin) = &conn_info.origin
        {
            // Named now, and out of scope: its bytes pass untouched.
            relay_l4(tcp, origin.original_dst).await;
            return;
        }
        let peer = conn_info.peer;
        let pending = conn_info.identity_pending.clone();
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
                // Boxed: hyper spawns this future as its own task, and the task's cell (and
                // every move of the stream state) would otherwise copy the whole state
                // machine of `handle`, several KiB, on each request.
                Box::pin(async move {
                    let response = proxy.handle(req, &conn_info).await;
                    // The connection counts as busy until the response body is done.
                    Ok::<_, Infallible>(response.map(|body| {
                        ActiveBody {
                            inner: body,
                            _active: active,
                        }
                        .boxed()
                    }))
                })
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
                () = pending_closed(pending.as_deref().map(|p| &p.close)), if !closing => {
                    // Its requests were refused: the client's next connection is named
                    // afresh.
                    closing = true;
                    hard_deadline = Some(tokio::time::Instant::now() + IDLE_CLOSE_GRACE);
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
}

impl Proxy {
    /// Names the workload of a connection from a pod the pod store does not know yet,
    /// waiting up to [`IDENTITY_WAIT`] for the store to be listed or to learn the pod;
    /// when it does not (not listed yet, or the watch failing), every request of the
    /// connection is refused.
    /// Returns `false` when the pod, once named, is out of scope (relay it untouched).
    async fn settle_identity(&self, conn: &mut ConnectionInfo) -> bool {
        let (Some(identity), Some(origin)) = (&self.identity, &conn.origin) else {
            return true;
        };
        let pods = identity.pods();
        let Some(uid) = conn.workload.pod_uid.as_deref() else {
            return true;
        };
        if conn.workload.is_known() || !pods.is_watched() {
            return true;
        }
        let named = || pods.is_synced() && identity.resolve(origin).is_known();
        if !pods.wait_until(named, IDENTITY_WAIT).await {
            let why = if pods.awaits_list() {
                "this node's pods are not listed yet (the gateway's pod watch has not synced)"
                    .to_owned()
            } else if let Some(error) = pods.watch_error() {
                format!(
                    "the gateway's watch of this node's pods is failing ({error}), and this pod is not among the pods it knows"
                )
            } else {
                // Listed and current, and the pod is not there: an unknown workload, as
                // the policy says.
                return true;
            };
            tracing::warn!(peer = %conn.peer, pod_uid = %uid, %why, "the connection's pod cannot be named: its requests are refused until it reconnects");
            conn.identity_pending = Some(Arc::new(IdentityPending {
                close: tokio::sync::Notify::new(),
                why,
            }));
            return true;
        }
        let workload = identity.resolve(origin);
        if self.scope.classify(&workload).bypass {
            return false;
        }
        conn.record = ConnectionRecord::new(conn.peer, Some(origin), &workload);
        conn.workload = workload;
        true
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

/// Waits until a connection whose workload is pending is told to close; forever when it
/// is not pending.
async fn pending_closed(pending: Option<&tokio::sync::Notify>) {
    match pending {
        Some(close) => close.notified().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
