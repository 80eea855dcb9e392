//! A faithful in-process stand-in for kube-apiserver, for tests and `chaperone demo`.
//!
//! It speaks what real kubectl 1.32 and the Python client expect (see
//! `shared/k8s-wire-reference.md`): TLS with HTTP/2 and HTTP/1.1 by ALPN; `/version`,
//! health endpoints; aggregated and legacy discovery; an in-memory store of namespaces,
//! pods, secrets, configmaps, serviceaccounts and apps/v1 deployments, replicasets and
//! statefulsets with a global resourceVersion; CustomResourceDefinitions (apiextensions.k8s.io/v1)
//! whose creation registers custom resources, discovered and served like the built-in
//! ones, with the `status` subresource (see `crd`);
//! get/list/watch/create/update/patch/delete/deletecollection; the `status` subresource, and
//! the `scale` subresource of the apps/v1 kinds (an `autoscaling/v1` `Scale`, see `scale`);
//! Tables for `kubectl get`; Status errors; static bearer-token authentication (each token maps to a
//! user); the review APIs behind `kubectl auth can-i [--list]`, `kubectl auth whoami` and
//! TokenReview, answered by a configurable [`Authorizer`] (see `reviews`); and a log of every
//! request it received so tests can assert exactly what reached it. Pods can be exec'd
//! into, attached to, port-forwarded to and have logs, like behind a kubelet (see
//! `streams`: real host processes in a per-pod temporary directory, ports on 127.0.0.1).
//!
//! Simplified on purpose (each also noted where it is implemented): no protobuf (request
//! bodies in `application/vnd.kubernetes.protobuf` get 415, so kubectl's typed-client
//! commands such as `kubectl create configmap` fail; `kubectl create -f` and `apply` work);
//! OpenAPI v3 with the schemas of the served kinds for `kubectl explain` and the operations
//! kubectl's fieldValidation check looks for, but no more (see `openapi`; no `/openapi/v2`),
//! and `fieldValidation=Strict` does not reject unknown fields; authorization of requests
//! only for the `scale` subresource: elsewhere the [`Authorizer`] answers access reviews but
//! every request is served, and impersonation headers are recorded and honoured only by the
//! self-reviews (who am I, what may I do) and scale requests, never checked; no admission;
//! immediate deletes; server-side apply without field ownership.

#![expect(
    clippy::result_large_err,
    reason = "handlers return a Kubernetes Status as their error; its size is irrelevant in a test server"
)]

mod auth;
mod crd;
mod discovery;
mod exec;
mod openapi;
mod patch;
mod portforward;
mod reviews;
mod scale;
mod spdy;
mod store;
mod streams;
mod table;
mod watch;

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::TlsAcceptor;

pub use self::auth::{Authorizer, Denial, DenialTarget, ResourceMatch, Subject, UserInfo};
use self::{
    discovery::ResourceDef,
    store::{Part, Preconditions, Scope, Selector, Store, WatchFrom},
    table::{IncludeObject, TableOptions},
    watch::{WatchFormat, WatchPlan},
};
use gateway_userspace::{
    drain::{self, DrainTrigger, DrainWatcher},
    status::{Status, StatusDetails},
    tls::{self, CertificateAuthority, TlsError},
};

/// Response body type of every handler.
type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Largest request body accepted (the API server's limit is 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;
/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Errors starting the test API server or seeding it.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The serving certificate could not be minted or loaded.
    #[error("test API server serving certificate: {0}")]
    Tls(#[from] TlsError),
    /// The listen address could not be bound.
    #[error("test API server: bind {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// An object given to [`TestApiServer::seed`] was not acceptable.
    #[error("{0}")]
    Seed(String),
}

/// How to start a [`TestApiServer`].
#[derive(Debug, Clone)]
pub struct ApiServerConfig {
    /// Listen address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// CA that mints the serving certificate; a fresh one is generated if `None`.
    pub ca: Option<Arc<CertificateAuthority>>,
    /// Extra subject alternative names (IP addresses or DNS names) besides `127.0.0.1`,
    /// `::1` and `localhost`.
    pub extra_sans: Vec<String>,
    /// Accepted bearer tokens; each authenticates as `system:admin` in `system:masters`
    /// unless `token_users` names someone else. With no tokens here or in `token_users`,
    /// authentication is off: every request is served as `system:anonymous`, like an API
    /// server with no authenticator but anonymous access.
    pub tokens: Vec<String>,
    /// Who a bearer token authenticates as (`system:authenticated` is added). These tokens
    /// are accepted whether or not they are also in `tokens`.
    pub token_users: BTreeMap<String, UserInfo>,
    /// Answers access reviews and authorizes scale requests; allows everything by default.
    pub authorizer: Authorizer,
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            ca: None,
            extra_sans: Vec::new(),
            tokens: Vec::new(),
            token_users: BTreeMap::new(),
            authorizer: Authorizer::allow_all(),
        }
    }
}

impl ApiServerConfig {
    /// Defaults (127.0.0.1:0, generated CA) accepting exactly these bearer tokens.
    pub fn with_tokens<I: IntoIterator<Item = S>, S: Into<String>>(tokens: I) -> Self {
        Self {
            tokens: tokens.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Also accepts `token`, authenticating as `user`.
    pub fn with_token_user(mut self, token: impl Into<String>, user: UserInfo) -> Self {
        self.token_users.insert(token.into(), user);
        self
    }

    /// Answers access reviews and authorizes scale requests with `authorizer`.
    pub fn with_authorizer(mut self, authorizer: Authorizer) -> Self {
        self.authorizer = authorizer;
        self
    }
}

/// One request as it reached the server, before authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    /// HTTP method.
    pub method: String,
    /// Path and query exactly as sent.
    pub path_and_query: String,
    /// The raw `Authorization` header value.
    pub authorization: Option<String>,
    /// Every `Impersonate-*` header (lowercased name, value), in order.
    pub impersonation: Vec<(String, String)>,
    /// `User-Agent`.
    pub user_agent: Option<String>,
    /// `Accept`.
    pub accept: Option<String>,
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub http_version: String,
}

/// Whether a request is the one a [`TestApiServer::seed_on`] change waits for.
type RequestMatch = Box<dyn Fn(&SeenRequest) -> bool + Send + Sync>;

/// A change another client makes, timed by [`TestApiServer::seed_on`] or
/// [`TestApiServer::delete_on`].
enum Race {
    Seed(Value),
    /// Answer the request with this Status instead of serving it.
    Refuse(Box<Status>),
    /// Answer the request with this code, content type and body instead of serving it.
    Answer(StatusCode, &'static str, Bytes),
    Delete {
        plural: String,
        namespace: String,
        name: String,
    },
}

struct State {
    store: Store,
    /// Changes to make just before the first request each one waits for is handled.
    races: Mutex<Vec<(RequestMatch, Race)>>,
    tokens: Vec<String>,
    token_users: BTreeMap<String, UserInfo>,
    authorizer: Mutex<Authorizer>,
    seen: Mutex<Vec<SeenRequest>>,
    addr: SocketAddr,
    runtime: streams::PodRuntime,
}

/// A running test API server. Dropping it without [`TestApiServer::shutdown`] also stops
/// it, without waiting.
pub struct TestApiServer {
    addr: SocketAddr,
    ca_pem: String,
    state: Arc<State>,
    trigger: DrainTrigger,
    accept_task: JoinHandle<()>,
}

impl std::fmt::Debug for TestApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestApiServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl TestApiServer {
    /// Binds, mints the serving certificate and starts serving on spawned tasks (needs a
    /// tokio runtime; the caller does not have to poll anything).
    pub async fn start(cfg: ApiServerConfig) -> Result<TestApiServer, ApiServerError> {
        let ca = match cfg.ca {
            Some(ca) => ca,
            None => Arc::new(CertificateAuthority::generate("chaperone-test-apiserver-ca")?.0),
        };
        let mut dns = vec!["localhost".to_owned()];
        let mut ips: Vec<IpAddr> = vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()];
        for san in cfg.extra_sans {
            match san.parse::<IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => dns.push(san),
            }
        }
        let (chain, key) = ca.issue_server_cert(&dns, &ips, Duration::from_secs(24 * 3600))?;
        let acceptor = TlsAcceptor::from(tls::server_config(chain, key)?);
        let listener =
            TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| ApiServerError::Bind {
                    addr: cfg.listen,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ApiServerError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let state = Arc::new(State {
            store: Store::new(),
            races: Mutex::new(Vec::new()),
            tokens: cfg.tokens,
            token_users: cfg.token_users,
            authorizer: Mutex::new(cfg.authorizer),
            seen: Mutex::new(Vec::new()),
            addr,
            runtime: streams::PodRuntime::default(),
        });
        let (trigger, watcher) = drain::channel();
        let accept_task = tokio::spawn(accept_loop(listener, acceptor, state.clone(), watcher));
        tracing::debug!(%addr, "test API server listening");
        Ok(TestApiServer {
            addr,
            ca_pem: ca.cert_pem().to_owned(),
            state,
            trigger,
            accept_task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:<port>` (brackets for IPv6).
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The CA certificate (PEM) the serving certificate chains to.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.state
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the authorizer that answers access reviews and authorizes scale requests
    /// (takes effect for the next request).
    pub fn set_authorizer(&self, authorizer: Authorizer) {
        *self
            .state
            .authorizer
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = authorizer;
    }

    /// Forgets the requests received so far.
    pub fn clear_requests(&self) {
        self.state
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Runs `race` just before the server handles the first request `when` matches.
    fn race(&self, when: impl Fn(&SeenRequest) -> bool + Send + Sync + 'static, race: Race) {
        self.state
            .races
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((Box::new(when), race));
    }

    /// Inserts or replaces an object directly (no validation; missing namespaces are
    /// created; status is kept as given), returning it as stored.
    pub fn seed(&self, obj: Value) -> Result<Value, ApiServerError> {
        self.state.store.seed(obj).map_err(ApiServerError::Seed)
    }

    /// Seeds `obj` (as [`seed`](Self::seed) does) once, just before the server handles
    /// the first request `when` matches: another client's write landing between two
    /// requests of the gateway's, a race a test could not otherwise time. A seed that
    /// fails panics the request's task (the request then fails), so a test notices.
    pub fn seed_on(&self, when: impl Fn(&SeenRequest) -> bool + Send + Sync + 'static, obj: Value) {
        self.race(when, Race::Seed(obj));
    }

    /// Answers the first request `when` matches with `status` instead of serving it: a
    /// review or read the API server cannot answer now (overloaded, a webhook down).
    pub fn refuse_on(
        &self,
        when: impl Fn(&SeenRequest) -> bool + Send + Sync + 'static,
        status: Status,
    ) {
        self.race(when, Race::Refuse(Box::new(status)));
    }

    /// Answers the first request `when` matches with `code`, `content_type` and `body`
    /// instead of serving it: what an aggregated API or a proxy in front of the API server
    /// may send.
    pub fn answer_on(
        &self,
        when: impl Fn(&SeenRequest) -> bool + Send + Sync + 'static,
        code: StatusCode,
        content_type: &'static str,
        body: impl Into<Bytes>,
    ) {
        self.race(when, Race::Answer(code, content_type, body.into()));
    }

    /// Deletes an object (`resource` is the plural) once, just before the server handles
    /// the first request `when` matches, as [`seed_on`](Self::seed_on) seeds one.
    pub fn delete_on(
        &self,
        when: impl Fn(&SeenRequest) -> bool + Send + Sync + 'static,
        resource: &str,
        namespace: &str,
        name: &str,
    ) {
        self.race(
            when,
            Race::Delete {
                plural: resource.to_owned(),
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            },
        );
    }

    /// A stored object: `resource` is the plural (`pods`, `deployments`), `namespace` is
    /// `""` for cluster-scoped objects.
    pub fn object(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let res = self
            .state
            .store
            .catalog
            .stored()
            .into_iter()
            .find(|r| r.plural == resource)?;
        self.state.store.object(res, namespace, name)
    }

    /// Every stored object of `resource` (the plural, built-in or custom) in `namespace`
    /// (`""`: all namespaces), sorted by namespace and name.
    pub fn objects(&self, resource: &str, namespace: &str) -> Vec<Value> {
        let Some(res) = self
            .state
            .store
            .catalog
            .stored()
            .into_iter()
            .find(|r| r.plural == resource)
        else {
            return Vec::new();
        };
        let scope = Scope {
            res,
            namespace: (!namespace.is_empty()).then(|| namespace.to_owned()),
            name: None,
            selector: Selector::default(),
        };
        self.state
            .store
            .list(&scope, None, None)
            .map(|(items, _, _)| items)
            .unwrap_or_default()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.state.store.resource_version()
    }

    /// The pod's working directory (created on first use): where its exec'd commands run
    /// and where `kubectl cp` reads and writes.
    pub fn pod_dir(
        &self,
        namespace: &str,
        pod: &str,
    ) -> Result<std::path::PathBuf, ApiServerError> {
        self.state
            .runtime
            .dir(namespace, pod)
            .map_err(|e| ApiServerError::Seed(format!("pod directory for {namespace}/{pod}: {e}")))
    }

    /// Appends text to a pod's log (what `kubectl logs` shows; followers see it at once).
    pub fn append_pod_log(&self, namespace: &str, pod: &str, text: &str) {
        self.state
            .runtime
            .append_log(namespace, pod, text.as_bytes());
    }

    /// Forgets the watch history, as etcd compaction does: watches and continue tokens
    /// from earlier resourceVersions then get 410 Expired.
    pub fn compact(&self) {
        self.state.store.compact();
    }

    /// Stops accepting, ends every watch stream, lets in-flight requests finish and
    /// returns once every connection is closed (or a 10 s grace period ran out).
    pub async fn shutdown(self) {
        let outcome = self.trigger.drain(SHUTDOWN_GRACE).await;
        if outcome != drain::DrainOutcome::Complete {
            tracing::warn!(addr = %self.addr, "test API server: connections still open after the grace period");
        }
        self.accept_task.abort();
        // The task has finished or was aborted; either way there is nothing left to run.
        let _ = self.accept_task.await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    drain: DrainWatcher,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = drain.signaled() => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "test API server: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tokio::spawn(serve_connection(
            tcp,
            peer,
            acceptor.clone(),
            state.clone(),
            drain.clone(),
        ));
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    drain: DrainWatcher,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "test API server: TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let service_drain = drain.clone();
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        let drain = service_drain.clone();
        async move {
            let gzip = accepts_gzip(req.headers());
            // As the API server's audit filter does (before authentication): the client's
            // `Audit-ID` is the event's id, else a new one; every response carries it.
            let audit_id = req.headers().get("audit-id").cloned().unwrap_or_else(|| {
                HeaderValue::try_from(uuid::Uuid::now_v7().to_string())
                    .expect("a UUID is a header value")
            });
            let mut response = handle(state, req, drain).await;
            response.headers_mut().insert("audit-id", audit_id);
            Ok::<_, Infallible>(if gzip {
                gzip_large(response).await
            } else {
                response
            })
        }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Upgrades: exec, attach and port-forward (see `streams`).
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "test API server: connection ended with an error");
            }
        }
        () = drain.signaled() => {
            conn.as_mut().graceful_shutdown();
            // Watches end on the same signal, so this finishes promptly.
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await;
        }
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

fn status_response(status: Status) -> Response<Body> {
    status
        .into_response::<Full<Bytes>>()
        .map(BodyExt::boxed_unsync)
}

/// Responses at least this large are gzipped for clients that accept it: k8s.io/apiserver's
/// compression filter (`defaultGzipThresholdBytes`, 128 KiB), which kubectl meets on every
/// large list because client-go sends `Accept-Encoding: gzip`.
pub const GZIP_THRESHOLD_BYTES: u64 = 128 * 1024;

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| {
            e.split(';')
                .next()
                .is_some_and(|e| e.trim().eq_ignore_ascii_case("gzip"))
        })
}

/// Gzips a complete (non-streaming) response of at least [`GZIP_THRESHOLD_BYTES`], as the
/// API server does; watches and other streams have no exact size and pass as they are.
async fn gzip_large(response: Response<Body>) -> Response<Body> {
    use hyper::body::Body as _;
    use std::io::Write as _;
    let large = response
        .body()
        .size_hint()
        .exact()
        .is_some_and(|n| n >= GZIP_THRESHOLD_BYTES);
    if !large || response.headers().contains_key(header::CONTENT_ENCODING) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(collected) = body.collect().await;
    let plain = collected.to_bytes();
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let gz = encoder.write_all(&plain).and_then(|()| encoder.finish());
    match gz {
        Ok(gz) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            parts
                .headers
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            parts
                .headers
                .insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
            Response::from_parts(parts, full(gz))
        }
        Err(_) => Response::from_parts(parts, full(plain)),
    }
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    json_bytes_response(code, serde_json::to_vec(value).unwrap_or_default())
}

/// A response with an already serialized JSON body.
fn json_bytes_response(code: StatusCode, json: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(json));
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn text_response(code: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(full(text));
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The API server's answer for a path no handler serves.
fn not_found_path() -> Status {
    Status::failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
    )
    .with_details(StatusDetails::default())
}

fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

impl State {
    /// Notes the request and runs the race it triggers; `Some` is the answer to give
    /// instead of serving it.
    fn record(&self, req: &Request<Incoming>) -> Option<Response<Body>> {
        let headers = req.headers();
        let lossy = |v: &HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
        let seen = SeenRequest {
            method: req.method().as_str().to_owned(),
            path_and_query: req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
            authorization: headers.get(header::AUTHORIZATION).map(lossy),
            impersonation: headers
                .iter()
                .filter(|(name, _)| name.as_str().starts_with("impersonate-"))
                .map(|(name, value)| (name.as_str().to_owned(), lossy(value)))
                .collect(),
            user_agent: headers.get(header::USER_AGENT).map(lossy),
            accept: headers.get(header::ACCEPT).map(lossy),
            content_type: headers.get(header::CONTENT_TYPE).map(lossy),
            http_version: format!("{:?}", req.version()),
        };
        let race = {
            let mut races = self.races.lock().unwrap_or_else(|e| e.into_inner());
            races
                .iter()
                .position(|(when, _)| when(&seen))
                .map(|i| races.remove(i).1)
        };
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(seen);
        match race {
            None => {}
            Some(Race::Refuse(status)) => return Some(status_response(*status)),
            Some(Race::Answer(code, content_type, body)) => {
                let mut response = Response::new(Full::new(body).boxed_unsync());
                *response.status_mut() = code;
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
                return Some(response);
            }
            Some(Race::Seed(obj)) => {
                if let Err(e) = self.store.seed(obj) {
                    panic!("seed_on: {e}");
                }
            }
            Some(Race::Delete {
                plural,
                namespace,
                name,
            }) => {
                let res = self
                    .store
                    .catalog
                    .stored()
                    .into_iter()
                    .find(|r| r.plural == plural)
                    .unwrap_or_else(|| panic!("delete_on: no resource {plural}"));
                if let Err(e) =
                    self.store
                        .delete(res, &namespace, &name, &Preconditions::default(), false)
                {
                    panic!("delete_on: {}", e.message());
                }
            }
        }
        None
    }

    /// Bearer-token authentication (scheme case-insensitive, token whitespace-trimmed):
    /// who the request comes from, or `None` for a 401.
    fn authenticate(&self, headers: &HeaderMap) -> Option<UserInfo> {
        if self.tokens.is_empty() && self.token_users.is_empty() {
            return Some(UserInfo::anonymous());
        }
        let value = header_str(headers, header::AUTHORIZATION)?;
        let (scheme, token) = value.trim().split_once(|c: char| c.is_ascii_whitespace())?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.user_for_token(token.trim())
    }

    /// Who `token` authenticates as, if the server knows it.
    fn user_for_token(&self, token: &str) -> Option<UserInfo> {
        let user = match self.token_users.get(token) {
            Some(user) => user.clone(),
            None if !token.is_empty() && self.tokens.iter().any(|t| t == token) => {
                UserInfo::admin()
            }
            None => return None,
        };
        Some(user.with_authenticated_group())
    }

    /// The current authorizer (a snapshot, so no lock is held while it decides).
    fn authorizer(&self) -> Authorizer {
        self.authorizer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// One media range of an `Accept` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MediaType {
    /// `type/subtype`, lowercased.
    pub essence: String,
    params: Vec<(String, String)>,
}

impl MediaType {
    /// A parameter's value (names compared case-insensitively).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Parses an `Accept` (or `Content-Type`) header into media types in order.
pub(crate) fn parse_accept(accept: &str) -> Vec<MediaType> {
    accept
        .split(',')
        .filter_map(|range| {
            let mut parts = range.split(';');
            let essence = parts.next()?.trim().to_ascii_lowercase();
            if essence.is_empty() {
                return None;
            }
            let params = parts
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
                .collect();
            Some(MediaType { essence, params })
        })
        .collect()
}

/// Go's query-string boolean: missing is false, `0`/`false` (any case) are false, any
/// other value (including empty, `1`, `True`) is true.
pub(crate) fn go_bool(value: Option<&str>) -> bool {
    match value {
        None => false,
        Some(v) => !(v == "0" || v.eq_ignore_ascii_case("false")),
    }
}

/// Decoded query parameters; the first value of a repeated key wins, as in Go.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: Option<&str>) -> Self {
        Query(
            url::form_urlencoded::parse(raw.unwrap_or("").as_bytes())
                .into_owned()
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// How a read response is encoded.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Output {
    Json,
    Yaml,
    Table(TableOptions),
}

/// Content negotiation for reads, like the API server's: the first acceptable media range
/// wins; `as=Table` only for `meta.k8s.io` `v1`/`v1beta1`.
fn negotiate(accept: Option<&str>, query: &Query, allow_yaml: bool) -> Result<Output, Status> {
    let accept = accept.unwrap_or("").trim();
    if accept.is_empty() {
        return Ok(Output::Json);
    }
    for media in parse_accept(accept) {
        let json_like = matches!(
            media.essence.as_str(),
            "application/json" | "application/*" | "*/*"
        );
        match media.param("as") {
            Some("Table") => {
                let version = match (media.param("g"), media.param("v")) {
                    (Some("meta.k8s.io"), Some("v1")) => "meta.k8s.io/v1",
                    (Some("meta.k8s.io"), Some("v1beta1")) => "meta.k8s.io/v1beta1",
                    _ => continue,
                };
                if media.essence != "application/json" {
                    continue;
                }
                let include = IncludeObject::parse(query.get("includeObject"))
                    .map_err(Status::bad_request)?;
                return Ok(Output::Table(TableOptions {
                    meta_version: version,
                    include,
                }));
            }
            Some(_) => continue,
            None if json_like => return Ok(Output::Json),
            None if allow_yaml && media.essence == "application/yaml" => return Ok(Output::Yaml),
            None => continue,
        }
    }
    Err(Status::failure(
        StatusCode::NOT_ACCEPTABLE,
        "NotAcceptable",
        if allow_yaml {
            "only the following media types are accepted: application/json, application/yaml"
        } else {
            "only the following media types are accepted: application/json"
        },
    ))
}

fn encode(output: Output, code: StatusCode, value: &Value) -> Response<Body> {
    match output {
        Output::Yaml => match serde_norway::to_string(value) {
            Ok(yaml) => {
                let mut response = Response::new(full(yaml));
                *response.status_mut() = code;
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/yaml"),
                );
                response
            }
            Err(e) => status_response(internal(&e.to_string())),
        },
        Output::Json | Output::Table(_) => json_response(code, value),
    }
}

fn internal(message: &str) -> Status {
    Status::failure(
        StatusCode::INTERNAL_SERVER_ERROR,
        "InternalError",
        format!("Internal error occurred: {message}"),
    )
}

async fn handle(
    state: Arc<State>,
    mut req: Request<Incoming>,
    drain: DrainWatcher,
) -> Response<Body> {
    if let Some(answer) = state.record(&req) {
        return answer;
    }
    let Some(user) = state.authenticate(req.headers()) else {
        return status_response(Status::failure(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
        ));
    };
    // Streaming subresources take the connection over; they are routed before the body
    // is read.
    {
        let path = req.uri().path().to_owned();
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        if let Some(response) = streams::route(&state, &segs, &mut req, &drain) {
            return response;
        }
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let too_large = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            return status_response(if too_large {
                Status::failure(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "RequestEntityTooLarge",
                    "Request entity too large: limit is 3145728",
                )
            } else {
                Status::bad_request(format!("reading the request body: {e}"))
            });
        }
    };
    let query = Query::parse(parts.uri.query());
    let path = parts.uri.path().to_owned();
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let accept = header_str(&parts.headers, header::ACCEPT);

    // Non-resource paths and discovery.
    let non_resource = match segs.as_slice() {
        ["version"] => Some(Ok(json_response(StatusCode::OK, &discovery::version()))),
        ["healthz" | "readyz" | "livez", ..] => Some(Ok(text_response(StatusCode::OK, "ok"))),
        ["api"] => Some(Ok(discovery_response(&state, accept, true))),
        ["apis"] => Some(Ok(discovery_response(&state, accept, false))),
        ["apis", group] => Some(
            state
                .store
                .catalog
                .legacy_group_doc(group)
                .map(|d| json_response(StatusCode::OK, &d))
                .ok_or_else(not_found_path),
        ),
        ["api", version] => Some(
            state
                .store
                .catalog
                .resource_list("", version)
                .map(|d| json_response(StatusCode::OK, &d))
                .ok_or_else(not_found_path),
        ),
        ["apis", group, version] => Some(
            state
                .store
                .catalog
                .resource_list(group, version)
                .map(|d| json_response(StatusCode::OK, &d))
                .ok_or_else(not_found_path),
        ),
        ["openapi", "v3"] => Some(Ok(json_response(StatusCode::OK, &openapi::index()))),
        ["openapi", "v3", "api", version] => Some(
            openapi::document("", version)
                .map(|d| json_bytes_response(StatusCode::OK, d))
                .ok_or_else(not_found_path),
        ),
        ["openapi", "v3", "apis", group, version] => Some(
            openapi::document(group, version)
                .map(|d| json_bytes_response(StatusCode::OK, d))
                .ok_or_else(not_found_path),
        ),
        ["api", ..] | ["apis", ..] => None,
        _ => Some(Err(not_found_path())),
    };
    if let Some(result) = non_resource {
        if parts.method != Method::GET && parts.method != Method::HEAD {
            return status_response(Status::failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!(
                    "the server does not allow this method on the requested resource ({} {path})",
                    parts.method
                ),
            ));
        }
        return result.unwrap_or_else(status_response);
    }
    let review = reviews::ReviewCall {
        state: &state,
        user: &user,
        method: &parts.method,
        headers: &parts.headers,
        request_uri: parts
            .uri
            .path_and_query()
            .map_or(path.as_str(), |p| p.as_str()),
        query: &query,
        body: &body,
    };
    if let Some(response) = reviews::route(&review, &segs) {
        return response;
    }
    let target = match parse_target(&state.store.catalog, &segs) {
        Ok(target) => target,
        Err(status) => return status_response(status),
    };
    if target.sub == Sub::Scale
        && let Some(refused) = scale::authorize(&review, &target)
    {
        return refused;
    }
    let request = ResourceRequest {
        state: &state,
        method: &parts.method,
        headers: &parts.headers,
        query: &query,
        body,
    };
    request.serve(target, drain).unwrap_or_else(status_response)
}

fn discovery_response(state: &State, accept: Option<&str>, core: bool) -> Response<Body> {
    let catalog = &state.store.catalog;
    match discovery::aggregated_version(accept.unwrap_or("")) {
        Some(version) => {
            let mut response = json_response(StatusCode::OK, &catalog.aggregated(core, version));
            if let Ok(ct) = HeaderValue::from_str(&discovery::aggregated_content_type(version)) {
                response.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            response
        }
        None if core => json_response(
            StatusCode::OK,
            &discovery::legacy_api_versions(&state.addr.to_string()),
        ),
        None => json_response(StatusCode::OK, &catalog.legacy_group_list()),
    }
}

/// Which part of an object a resource URL addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sub {
    /// The object itself (or the collection).
    None,
    /// The `status` subresource.
    Status,
    /// The `scale` subresource.
    Scale,
}

/// What a resource URL addresses.
#[derive(Debug)]
struct Target {
    res: &'static ResourceDef,
    namespace: String,
    name: Option<String>,
    sub: Sub,
    legacy_watch: bool,
}

impl Target {
    /// What a write to this target may change.
    fn part(&self) -> Part {
        match self.sub {
            Sub::Status => Part::Status,
            Sub::None | Sub::Scale => Part::Main,
        }
    }
}

/// Parses `/api/v1/...` and `/apis/<g>/<v>/...` the way `requestinfo.go` does (section 1).
fn parse_target(catalog: &discovery::Catalog, segs: &[&str]) -> Result<Target, Status> {
    let (group, version, mut rest) = match segs {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(not_found_path()),
    };
    if !catalog.serves_group_version(group, version) {
        return Err(not_found_path());
    }
    let mut legacy_watch = false;
    if rest.first() == Some(&"watch") {
        legacy_watch = true;
        rest = &rest[1..];
    }
    let mut namespace = String::new();
    if rest.first() == Some(&"namespaces")
        && rest.len() >= 3
        && rest[2] != "status"
        && rest[2] != "finalize"
    {
        namespace = rest[1].to_owned();
        rest = &rest[2..];
    }
    let (resource, name, sub) = match rest {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(*name), None),
        [resource, name, sub] => (*resource, Some(*name), Some(*sub)),
        _ => return Err(not_found_path()),
    };
    let res = catalog
        .find(group, version, resource)
        .ok_or_else(not_found_path)?;
    // A namespaced resource's objects are only addressed inside a namespace; a
    // cluster-scoped one never is.
    if (res.namespaced && namespace.is_empty() && name.is_some())
        || (!res.namespaced && !namespace.is_empty())
    {
        return Err(not_found_path());
    }
    let sub = match sub {
        None => Sub::None,
        Some("status") if res.has_status && !legacy_watch => Sub::Status,
        Some("scale") if res.has_scale && !legacy_watch => Sub::Scale,
        Some(_) => return Err(not_found_path()),
    };
    Ok(Target {
        res,
        namespace,
        name: name.map(str::to_owned),
        sub,
        legacy_watch,
    })
}

/// Turns the stored object into the patched one.
type PatchFn = Box<dyn FnOnce(Value) -> Result<Value, Status>>;

struct ResourceRequest<'a> {
    state: &'a State,
    method: &'a Method,
    headers: &'a HeaderMap,
    query: &'a Query,
    body: Bytes,
}

fn method_not_allowed(res: &ResourceDef, action: &str) -> Status {
    Status::failure(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        format!(
            "{action} is not supported on resources of kind \"{}\"",
            gateway_userspace::status::group_resource(res.group, res.plural)
        ),
    )
}

fn unsupported_media_type(content_type: &str, accepted: &str) -> Status {
    Status::failure(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UnsupportedMediaType",
        format!(
            "the body of the request was in an unknown format ({content_type}) - accepted media types include: {accepted}"
        ),
    )
}

fn invalid(kind: &str, group: &str, name: &str, message: &str) -> Status {
    let qualified = if group.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}.{group}")
    };
    Status::failure(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        format!("{qualified} \"{name}\" is invalid: {message}"),
    )
    .with_details(StatusDetails {
        name: name.to_owned(),
        group: group.to_owned(),
        kind: kind.to_owned(),
        retry_after_seconds: None,
    })
}

impl ResourceRequest<'_> {
    fn content_type(&self) -> String {
        header_str(self.headers, header::CONTENT_TYPE)
            .and_then(|ct| ct.split(';').next())
            .map(|ct| ct.trim().to_ascii_lowercase())
            .unwrap_or_default()
    }

    fn dry_run(&self) -> Result<bool, Status> {
        match self.query.get("dryRun") {
            None | Some("") => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(invalid(
                "CreateOptions",
                "meta.k8s.io",
                "",
                &format!("dryRun: Unsupported value: \"{other}\": supported values: \"All\""),
            )),
        }
    }

    /// Decodes a create/update body: JSON (or YAML) only; protobuf is 415 for now.
    fn decode_object(&self, res: &ResourceDef) -> Result<Value, Status> {
        let mut obj = self.decode_body()?;
        check_kind(res, &obj)?;
        store::check_types(res, &mut obj).map_err(Status::bad_request)?;
        Ok(obj)
    }

    /// Parses a create/update body (JSON or YAML; protobuf is 415 for now).
    fn decode_body(&self) -> Result<Value, Status> {
        let ct = self.content_type();
        Ok(match ct.as_str() {
            "" | "application/json" | "*/*" => serde_json::from_slice(&self.body).map_err(|e| {
                Status::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
            })?,
            "application/yaml" => serde_norway::from_slice(&self.body).map_err(|e| {
                Status::bad_request(format!("couldn't get version/kind; yaml parse error: {e}"))
            })?,
            other => {
                return Err(unsupported_media_type(
                    other,
                    "application/json, application/yaml",
                ));
            }
        })
    }

    fn serve(&self, target: Target, drain: DrainWatcher) -> Result<Response<Body>, Status> {
        let res = target.res;
        let collection = target.name.is_none();
        let is_watch = target.legacy_watch || (collection && go_bool(self.query.get("watch")));
        match (self.method.clone(), collection) {
            (Method::GET, _) if is_watch => self.watch(target, drain),
            (Method::GET, false) if target.sub == Sub::Scale => self.get_scale(&target),
            (Method::PUT, false) if target.sub == Sub::Scale => self.update_scale(&target),
            (Method::PATCH, false) if target.sub == Sub::Scale => self.patch_scale(&target),
            (Method::GET, true) => self.list(res, &target.namespace),
            (Method::GET, false) => self.get(target),
            (Method::POST, true) if res.namespaced && target.namespace.is_empty() => {
                Err(method_not_allowed(res, "create"))
            }
            (Method::POST, true) => self.create(res, &target.namespace),
            (Method::PUT, false) => self.update(target),
            (Method::PATCH, false) => self.patch(target),
            (Method::DELETE, false) if target.sub == Sub::None => self.delete(target),
            (Method::DELETE, true) if res.supports("deletecollection") => {
                self.delete_collection(res, &target.namespace)
            }
            (Method::DELETE, true) => Err(method_not_allowed(res, "deletecollection")),
            (method, _) => Err(method_not_allowed(
                res,
                &method.as_str().to_ascii_lowercase(),
            )),
        }
    }

    fn scope(
        &self,
        res: &'static ResourceDef,
        namespace: &str,
        name: Option<String>,
    ) -> Result<Scope, Status> {
        let selector = Selector::parse(
            res,
            self.query.get("labelSelector"),
            self.query.get("fieldSelector"),
        )?;
        if let (Some(url_name), Some(field_name)) = (name.as_deref(), selector.name())
            && url_name != field_name
        {
            return Err(Status::bad_request(format!(
                "fieldSelector metadata.name={field_name} does not match the name on the URL ({url_name})"
            )));
        }
        Ok(Scope {
            res,
            namespace: (!namespace.is_empty()).then(|| namespace.to_owned()),
            name,
            selector,
        })
    }

    fn get(&self, target: Target) -> Result<Response<Body>, Status> {
        let output = negotiate(header_str(self.headers, header::ACCEPT), self.query, true)?;
        let name = target.name.as_deref().unwrap_or("");
        let obj = self.state.store.get(target.res, &target.namespace, name)?;
        Ok(match output {
            Output::Table(opts) => {
                let rv = obj
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                json_response(
                    StatusCode::OK,
                    &table::table(target.res, std::slice::from_ref(&obj), rv, "", opts, true),
                )
            }
            other => encode(other, StatusCode::OK, &obj),
        })
    }

    fn list(&self, res: &'static ResourceDef, namespace: &str) -> Result<Response<Body>, Status> {
        let output = negotiate(header_str(self.headers, header::ACCEPT), self.query, true)?;
        if go_bool(self.query.get("sendInitialEvents")) {
            return Err(invalid(
                "ListOptions",
                "meta.k8s.io",
                "",
                "sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list",
            ));
        }
        if self
            .query
            .get("resourceVersionMatch")
            .is_some_and(|m| !m.is_empty())
            && self.query.get("resourceVersion").is_none_or(str::is_empty)
        {
            return Err(invalid(
                "ListOptions",
                "meta.k8s.io",
                "",
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        let scope = self.scope(res, namespace, None)?;
        let limit = match self.query.get("limit") {
            None | Some("") => None,
            Some(l) => Some(
                l.parse::<usize>()
                    .map_err(|_| Status::bad_request(format!("invalid limit \"{l}\"")))?,
            ),
        };
        let (items, rv, next) = self
            .state
            .store
            .list(&scope, limit, self.query.get("continue"))?;
        let rv = rv.to_string();
        if let Output::Table(opts) = output {
            return Ok(json_response(
                StatusCode::OK,
                &table::table(res, &items, &rv, &next, opts, true),
            ));
        }
        Ok(encode(
            output,
            StatusCode::OK,
            &list_body(res, items, &rv, &next),
        ))
    }

    fn watch(&self, target: Target, drain: DrainWatcher) -> Result<Response<Body>, Status> {
        if self.method != Method::GET {
            return Err(method_not_allowed(target.res, "watch"));
        }
        let format = match negotiate(header_str(self.headers, header::ACCEPT), self.query, false)? {
            Output::Table(opts) => WatchFormat::Table(opts),
            _ => WatchFormat::Json,
        };
        let scope = self.scope(target.res, &target.namespace, target.name.clone())?;
        let rv = self.query.get("resourceVersion").unwrap_or("");
        let send_initial = go_bool(self.query.get("sendInitialEvents"));
        if send_initial && self.query.get("resourceVersionMatch") != Some("NotOlderThan") {
            return Err(invalid(
                "ListOptions",
                "meta.k8s.io",
                "",
                "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
        let from = match rv {
            _ if send_initial => WatchFrom::Now,
            "" | "0" => WatchFrom::Now,
            other => WatchFrom::After(other.parse().map_err(|_| {
                Status::bad_request(format!("invalid resource version \"{other}\""))
            })?),
        };
        let timeout = match self.query.get("timeoutSeconds") {
            None | Some("") => watch::DEFAULT_TIMEOUT,
            Some(t) => Duration::from_secs(
                t.parse()
                    .map_err(|_| Status::bad_request(format!("invalid timeoutSeconds \"{t}\"")))?,
            ),
        };
        let sub = self.state.store.watch(&scope, from);
        Ok(watch::respond(
            WatchPlan {
                scope,
                sub,
                format,
                timeout,
                initial_events_end: send_initial,
            },
            drain,
        ))
    }

    fn create(&self, res: &'static ResourceDef, namespace: &str) -> Result<Response<Body>, Status> {
        let dry_run = self.dry_run()?;
        let obj = self.decode_object(res)?;
        let body_ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("");
        if res.namespaced && !body_ns.is_empty() && body_ns != namespace {
            return Err(Status::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let is_crd = std::ptr::eq(res, &discovery::CRDS);
        if is_crd {
            let name = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("");
            crd::parse(&obj).map_err(|e| {
                invalid("CustomResourceDefinition", "apiextensions.k8s.io", name, &e)
            })?;
        }
        let created = self.state.store.create(res, namespace, obj, dry_run)?;
        if is_crd && !dry_run {
            self.state
                .store
                .catalog
                .register(&created)
                .map_err(|e| internal(&e))?;
        }
        Ok(json_response(StatusCode::CREATED, &created))
    }

    fn update(&self, target: Target) -> Result<Response<Body>, Status> {
        let dry_run = self.dry_run()?;
        let obj = self.decode_object(target.res)?;
        let name = target.name.as_deref().unwrap_or("");
        let part = target.part();
        let updated =
            self.state
                .store
                .update(target.res, &target.namespace, name, obj, part, dry_run)?;
        Ok(json_response(StatusCode::OK, &updated))
    }

    fn patch(&self, target: Target) -> Result<Response<Body>, Status> {
        let res = target.res;
        let dry_run = self.dry_run()?;
        let name = target.name.clone().unwrap_or_default();
        if res.custom && self.content_type() == "application/strategic-merge-patch+json" {
            // Custom resources have no Go struct tags to merge by.
            return Err(unsupported_media_type(
                "application/strategic-merge-patch+json",
                "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
            ));
        }
        let (created_obj, patch_fn) =
            self.patch_function(&name, &res.api_version(), res.kind, &|obj| {
                store::check_types(res, obj).map_err(Status::bad_request)
            })?;
        let body_ns = created_obj
            .as_ref()
            .and_then(|o| o.pointer("/metadata/namespace"))
            .and_then(Value::as_str)
            .unwrap_or("");
        if res.namespaced && !body_ns.is_empty() && body_ns != target.namespace {
            return Err(Status::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let (obj, created) = self.state.store.patch(
            res,
            &target.namespace,
            &name,
            target.part(),
            dry_run,
            created_obj,
            patch_fn,
        )?;
        Ok(json_response(
            if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            &obj,
        ))
    }

    /// The request's patch as a function from the current document to the patched one,
    /// and for server-side apply also the applied configuration (what is created when the
    /// object does not exist). The document is of `api_version`/`kind` (the endpoint's kind,
    /// or `Scale` for the scale subresource); `check_types` checks an applied configuration
    /// as the decoder would.
    fn patch_function(
        &self,
        name: &str,
        api_version: &str,
        kind: &str,
        check_types: &dyn Fn(&mut Value) -> Result<(), Status>,
    ) -> Result<(Option<Value>, PatchFn), Status> {
        let ct = self.content_type();
        let apply = ct == "application/apply-patch+yaml";
        if self.query.get("force").is_some() && !apply {
            return Err(invalid(
                "PatchOptions",
                "meta.k8s.io",
                "",
                "force: Forbidden: may not be specified for non-apply patch",
            ));
        }
        let field_manager = self.query.get("fieldManager").unwrap_or("");
        if field_manager.len() > 128 {
            return Err(invalid(
                "PatchOptions",
                "meta.k8s.io",
                "",
                "fieldManager: Too long: may not be more than 128 bytes",
            ));
        }
        let parse_json = || -> Result<Value, Status> {
            serde_json::from_slice(&self.body)
                .map_err(|e| Status::bad_request(format!("error decoding patch: {e}")))
        };
        Ok(match ct.as_str() {
            "application/merge-patch+json" => {
                let p = parse_json()?;
                (
                    None,
                    Box::new(move |mut old| {
                        patch::merge_patch(&mut old, &p);
                        Ok(old)
                    }),
                )
            }
            "application/strategic-merge-patch+json" => {
                let p = parse_json()?;
                (
                    None,
                    Box::new(move |mut old| {
                        patch::strategic_merge_patch(&mut old, &p);
                        Ok(old)
                    }),
                )
            }
            "application/json-patch+json" => {
                let p = parse_json()?;
                if !p.is_array() {
                    return Err(Status::bad_request(
                        "json: cannot unmarshal object into Go value of type jsonpatch.Patch",
                    ));
                }
                (
                    None,
                    Box::new(move |old| {
                        patch::json_patch(old, &p).map_err(|e| {
                        Status::failure(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Invalid",
                            format!("the server rejected our request due to an error in our request: {e}"),
                        )
                    })
                    }),
                )
            }
            "application/apply-patch+yaml" => {
                if field_manager.is_empty() {
                    return Err(invalid(
                        "PatchOptions",
                        "meta.k8s.io",
                        "",
                        "fieldManager: Required value: is required for apply patch",
                    ));
                }
                let mut applied: Value = serde_norway::from_slice(&self.body)
                    .map_err(|e| Status::bad_request(format!("error decoding YAML: {e}")))?;
                if applied.get("apiVersion").is_none_or(Value::is_null)
                    || applied.get("kind").is_none_or(Value::is_null)
                {
                    return Err(Status::bad_request(
                        "invalid object type: apiVersion and kind must be set in an apply configuration",
                    ));
                }
                check_gvk(api_version, kind, &applied)?;
                check_types(&mut applied)?;
                let applied_name = applied
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if applied_name != name {
                    return Err(Status::bad_request(format!(
                        "the name of the object ({applied_name}) does not match the name on the URL ({name})"
                    )));
                }
                // Server-side apply, minimal: the applied configuration is merged into the
                // live object; there is no field ownership, so no conflicts and fields
                // dropped from the configuration are not removed.
                let p = applied.clone();
                (
                    Some(applied),
                    Box::new(move |mut old| {
                        patch::merge_patch(&mut old, &p);
                        Ok(old)
                    }),
                )
            }
            _ => {
                return Err(unsupported_media_type(
                    &ct,
                    "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json",
                ));
            }
        })
    }

    /// DeleteOptions from the body (JSON) or, when there is none, the query: as
    /// `DeleteResource` reads them, a body's options replace the query's entirely.
    fn delete_options(&self) -> Result<(Preconditions, bool), Status> {
        let mut pre = Preconditions::default();
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok((pre, self.dry_run()?));
        }
        let mut dry_run = false;
        let ct = self.content_type();
        if !matches!(ct.as_str(), "" | "application/json") {
            return Err(unsupported_media_type(&ct, "application/json"));
        }
        let opts: Value = serde_json::from_slice(&self.body)
            .map_err(|e| Status::bad_request(format!("error decoding DeleteOptions: {e}")))?;
        pre.uid = opts
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(str::to_owned);
        pre.resource_version = opts
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if opts
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|d| d.iter().any(|v| v == "All"))
        {
            dry_run = true;
        }
        Ok((pre, dry_run))
    }

    fn delete(&self, target: Target) -> Result<Response<Body>, Status> {
        let (pre, dry_run) = self.delete_options()?;
        let res = target.res;
        let name = target.name.as_deref().unwrap_or("");
        let deleted = self
            .state
            .store
            .delete(res, &target.namespace, name, &pre, dry_run)?;
        if std::ptr::eq(res, &discovery::CRDS) && !dry_run {
            self.state.store.catalog.unregister(name);
        }
        // Pods (ReturnDeletedObject) and namespaces (their REST Delete) answer with the
        // object; other registries answer with a Success Status naming it.
        if matches!(res.plural, "pods" | "namespaces") {
            return Ok(json_response(StatusCode::OK, &deleted));
        }
        let mut details = json!({"name": name, "kind": res.plural});
        if !res.group.is_empty() {
            details["group"] = Value::from(res.group);
        }
        if let Some(uid) = deleted.pointer("/metadata/uid") {
            details["uid"] = uid.clone();
        }
        Ok(json_response(
            StatusCode::OK,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
        ))
    }

    fn delete_collection(
        &self,
        res: &'static ResourceDef,
        namespace: &str,
    ) -> Result<Response<Body>, Status> {
        let (_, dry_run) = self.delete_options()?;
        let scope = self.scope(res, namespace, None)?;
        let deleted = self.state.store.delete_collection(&scope, dry_run);
        let rv = self.state.store.resource_version().to_string();
        Ok(json_response(
            StatusCode::OK,
            &list_body(res, deleted, &rv, ""),
        ))
    }
}

/// A `<Kind>List`. Items of built-in lists carry no kind/apiVersion on the wire.
fn list_body(res: &ResourceDef, items: Vec<Value>, rv: &str, continue_token: &str) -> Value {
    let items: Vec<Value> = items
        .into_iter()
        .map(|mut item| {
            if let Some(m) = item.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
            item
        })
        .collect();
    let mut metadata = json!({"resourceVersion": rv});
    if !continue_token.is_empty() {
        metadata["continue"] = Value::from(continue_token);
    }
    json!({"kind": res.list_kind(), "apiVersion": res.api_version(), "metadata": metadata, "items": items})
}

/// The body's kind/apiVersion, when given, must be the endpoint's.
fn check_kind(res: &ResourceDef, obj: &Value) -> Result<(), Status> {
    check_gvk(&res.api_version(), res.kind, obj)
}

/// The body's kind/apiVersion, when given, must be `api_version`/`kind`.
fn check_gvk(api_version: &str, kind: &str, obj: &Value) -> Result<(), Status> {
    if let Some(av) = obj.get("apiVersion").and_then(Value::as_str)
        && av != api_version
    {
        return Err(Status::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({api_version})"
        )));
    }
    if let Some(got) = obj.get("kind").and_then(Value::as_str)
        && got != kind
    {
        return Err(Status::bad_request(format!(
            "the kind in the data ({got}) does not match the expected kind ({kind})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
