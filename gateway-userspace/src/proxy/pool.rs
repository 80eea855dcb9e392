//! Connections to the API server: the [`Dialer`] that opens them (TCP, then TLS) and the
//! [`UpstreamPool`] of one data-path thread that keeps them between requests.
//!
//! Each data-path thread has its own pool, so a request, the upstream connection it uses
//! and that connection's task all run on the thread that accepted the client. The pool is
//! small on purpose: an idle HTTP/1.1 connection goes back to it when its response body has
//! been read to the end (by then the connection's task has already turned idle, so nothing
//! waits for it), an HTTP/2 connection is shared by every request, and a request that meets
//! a pooled connection the server has just closed is sent again on a fresh one. hyper-util's
//! general-purpose client, which this replaces on the request path, hashed a pool key,
//! locked a pool shared by every thread, raced a boxed checkout against a connect, and for
//! HTTP/1.1 spawned a task per request to wait for the connection to become idle again
//! (docs/benchmarks.md, session 9).

use std::{
    pin::Pin,
    sync::{Arc, Mutex, PoisonError, Weak},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri, header, uri::Scheme};
use http_body::{Body, Frame, SizeHint};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::ProxyBody;
use crate::error_chain;

/// Idle HTTP/1.1 connections one data-path thread keeps at most; more are closed when
/// their response ends.
const MAX_IDLE_PER_THREAD: usize = 128;

/// Opens connections to the API server: TCP with a timeout, then TLS.
pub(super) struct Dialer {
    tls: tokio_rustls::TlsConnector,
    server_name: Result<rustls_pki_types::ServerName<'static>, String>,
    /// `host:port` (IPv6 in brackets), as dialled and as the upgrade's `Host` header.
    pub(super) authority: String,
    connect_timeout: Duration,
}

impl Dialer {
    /// A dialer for `base` (`https://host[:port]`) offering `alpn` in the TLS handshake.
    pub(super) fn new(
        mut tls: rustls::ClientConfig,
        base: &Uri,
        server_name: Option<rustls_pki_types::ServerName<'static>>,
        connect_timeout: Duration,
        alpn: &[&[u8]],
    ) -> Self {
        tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let host = base.host().unwrap_or_default();
        let port = base.port_u16().unwrap_or(443);
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name = match server_name {
            Some(n) => Ok(n),
            None => rustls_pki_types::ServerName::try_from(bare.clone())
                .map_err(|e| format!("upstream host {host:?} is not a TLS server name: {e}")),
        };
        let authority = if bare.contains(':') {
            format!("[{bare}]:{port}")
        } else {
            format!("{bare}:{port}")
        };
        Self {
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            server_name,
            authority,
            connect_timeout,
        }
    }

    /// A new TLS connection to the API server; the error says which step failed.
    pub(super) async fn connect(
        &self,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
        let name = self.server_name.clone()?;
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect(&self.authority),
        )
        .await
        .map_err(|_| format!("connect {}: timed out", self.authority))?
        .map_err(|e| format!("connect {}: {e}", self.authority))?;
        let _ = tcp.set_nodelay(true);
        tokio::time::timeout(self.connect_timeout, self.tls.connect(name, tcp))
            .await
            .map_err(|_| format!("TLS handshake with {}: timed out", self.authority))?
            .map_err(|e| format!("TLS handshake with {}: {e}", self.authority))
    }
}

/// Why a request could not be sent upstream or its response head did not arrive.
#[derive(Debug)]
pub(super) enum PoolError {
    /// No connection: the dial or the TLS or HTTP handshake failed.
    Connect(String),
    /// The connection failed while the request was sent or its response head awaited.
    Request(hyper::Error),
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolError::Connect(why) => f.write_str(why),
            PoolError::Request(e) => write!(f, "request failed: {}", error_chain(e)),
        }
    }
}

impl std::error::Error for PoolError {}

/// One data-path thread's connections to the API server.
pub(super) struct UpstreamPool {
    dialer: Arc<Dialer>,
    /// `Host` of requests sent over HTTP/1.1.
    host: Option<HeaderValue>,
    scheme: Scheme,
    authority: Option<http::uri::Authority>,
    idle_timeout: Duration,
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    /// Most recently used last: a warm connection is reused first, a cold one ages out.
    http1: Vec<Parked>,
    http2: Option<http2::SendRequest<ProxyBody>>,
    /// A task closes connections idle for longer than the timeout while any are parked.
    reaping: bool,
}

struct Parked {
    sender: http1::SendRequest<ProxyBody>,
    since: Instant,
}

/// A connection taken from the pool or just opened.
enum Conn {
    Http1(http1::SendRequest<ProxyBody>),
    Http2(http2::SendRequest<ProxyBody>),
}

impl UpstreamPool {
    /// An empty pool whose connections `dialer` opens to `base`; idle HTTP/1.1 connections
    /// are closed after `idle_timeout`.
    pub(super) fn new(dialer: Arc<Dialer>, base: &Uri, idle_timeout: Duration) -> Self {
        Self {
            host: upstream_host(base),
            scheme: base.scheme().cloned().unwrap_or(Scheme::HTTPS),
            authority: base.authority().cloned(),
            dialer,
            idle_timeout,
            idle: Mutex::new(Idle::default()),
        }
    }

    /// Sends `req` (an absolute URI) and returns the response head; its body gives the
    /// connection back when read to the end. A request that meets a pooled connection the
    /// server closed before it was written goes once more, on a new connection.
    pub(super) async fn request(
        self: &Arc<Self>,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, PoolError> {
        loop {
            let (conn, fresh) = match self.checkout() {
                Some(conn) => (conn, false),
                // Boxed: dialing is rare (a pooled connection serves most requests),
                // and its state machine, TLS handshake included, is 6.5 KiB that every
                // request's future would otherwise carry and copy.
                None => (Box::pin(self.connect()).await?, true),
            };
            let failed = match conn {
                Conn::Http1(mut sender) => {
                    self.http1_form(&mut req);
                    match sender.try_send_request(req).await {
                        // A response without a body (204, 304, an empty object) is over
                        // already: its connection goes back now, as its body may never
                        // be read.
                        Ok(response) if response.body().is_end_stream() => {
                            self.clone().checkin(sender);
                            return Ok(response.map(|inner| PooledBody { inner, back: None }));
                        }
                        Ok(response) => {
                            return Ok(response.map(|inner| PooledBody {
                                inner,
                                back: Some((sender, Arc::downgrade(self))),
                            }));
                        }
                        Err(failed) => failed,
                    }
                }
                Conn::Http2(mut sender) => {
                    self.http2_form(&mut req);
                    match sender.try_send_request(req).await {
                        Ok(response) => {
                            return Ok(response.map(|inner| PooledBody { inner, back: None }));
                        }
                        Err(failed) => failed,
                    }
                }
            };
            let mut failed = failed;
            match failed.take_message() {
                Some(unsent) if !fresh => req = unsent,
                _ => return Err(PoolError::Request(failed.into_error())),
            }
        }
    }

    /// A live connection from the pool: the shared HTTP/2 one, else the most recently used
    /// HTTP/1.1 one; closed ones found on the way are dropped.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(h2) = &idle.http2 {
            if !h2.is_closed() {
                return Some(Conn::Http2(h2.clone()));
            }
            idle.http2 = None;
        }
        while let Some(parked) = idle.http1.pop() {
            if parked.sender.is_ready() {
                return Some(Conn::Http1(parked.sender));
            }
        }
        None
    }

    /// Opens a connection and starts its task on the calling thread.
    async fn connect(&self) -> Result<Conn, PoolError> {
        let tls = self.dialer.connect().await.map_err(PoolError::Connect)?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        if h2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| {
                    PoolError::Connect(format!("HTTP/2 handshake: {}", error_chain(&e)))
                })?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
                }
            });
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            idle.http2 = Some(sender.clone());
            return Ok(Conn::Http2(sender));
        }
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| PoolError::Connect(format!("HTTP/1.1 handshake: {}", error_chain(&e))))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Conn::Http1(sender))
    }

    /// Parks an HTTP/1.1 connection whose exchange is over, once it can take another
    /// request.
    fn checkin(self: Arc<Self>, mut sender: http1::SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        if !sender.is_ready() {
            // Its task has not yet taken in the end of the exchange (rare: the body ended
            // before the connection was polled again); park it once it has.
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            runtime.spawn(async move {
                if sender.ready().await.is_ok() {
                    self.park(sender);
                }
            });
            return;
        }
        self.park(sender);
    }

    fn park(self: Arc<Self>, sender: http1::SendRequest<ProxyBody>) {
        let start_reaper = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.http1.len() >= MAX_IDLE_PER_THREAD {
                return;
            }
            idle.http1.push(Parked {
                sender,
                since: Instant::now(),
            });
            !std::mem::replace(&mut idle.reaping, true)
        };
        if start_reaper && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(reap(Arc::downgrade(&self), self.idle_timeout));
        } else if start_reaper {
            self.idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .reaping = false;
        }
    }

    /// HTTP/1.1 wants the path and query in the request line, and a `Host` header.
    fn http1_form(&self, req: &mut Request<ProxyBody>) {
        if req.uri().scheme().is_some() {
            let origin = req.uri().path_and_query().cloned();
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = origin;
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        if let Some(host) = &self.host {
            req.headers_mut().insert(header::HOST, host.clone());
        }
    }

    /// HTTP/2 carries the scheme and authority as pseudo-headers: the URI is absolute.
    fn http2_form(&self, req: &mut Request<ProxyBody>) {
        req.headers_mut().remove(header::HOST);
        if req.uri().scheme().is_none() {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(self.scheme.clone());
            parts.authority = self.authority.clone();
            parts.path_and_query = req.uri().path_and_query().cloned();
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        *req.version_mut() = http::Version::HTTP_2;
    }

    /// Idle HTTP/1.1 connections (for tests).
    #[cfg(test)]
    pub(super) fn idle_http1(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .http1
            .len()
    }
}

/// The `Host` header for requests to `base`, as HTTP clients write it (the port only when
/// it is not the scheme's default); set once, where the client would format it per request.
fn upstream_host(base: &Uri) -> Option<HeaderValue> {
    let host = base.host()?;
    let default_port = match base.scheme_str() {
        Some("http") => 80,
        _ => 443,
    };
    let value = match base.port_u16() {
        Some(port) if port != default_port => format!("{host}:{port}"),
        _ => host.to_owned(),
    };
    HeaderValue::try_from(value).ok()
}

/// Closes connections idle for longer than `timeout`, checking every quarter of it, until
/// none is left parked.
async fn reap(pool: Weak<UpstreamPool>, timeout: Duration) {
    let every = (timeout / 4).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.http1
            .retain(|p| !p.sender.is_closed() && p.since.elapsed() < timeout);
        if idle.http1.is_empty() {
            idle.reaping = false;
            return;
        }
    }
}

/// A response body from the API server; over HTTP/1.1 it gives its connection back to the
/// pool when read to the end (dropped before that, the connection closes: its exchange is
/// unfinished).
pub(super) struct PooledBody {
    inner: Incoming,
    back: Option<(http1::SendRequest<ProxyBody>, Weak<UpstreamPool>)>,
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some((sender, pool)) = self.back.take()
            && let Some(pool) = pool.upgrade()
        {
            pool.checkin(sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            // A broken exchange leaves the connection unusable.
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
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
#[path = "pool_tests.rs"]
mod tests;
