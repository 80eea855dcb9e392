//! The pool against real TLS servers on loopback: reuse, HTTP/2 sharing, servers that
//! close connections, bodies dropped half-way, unreachable upstreams.

use std::{
    convert::Infallible,
    sync::atomic::{AtomicUsize, Ordering},
};

use http_body_util::{BodyExt as _, Empty, Full};
use rustls_pki_types::pem::PemObject as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::{proxy::BoxError, tls::CertificateAuthority};

/// How the test server answers.
#[derive(Clone)]
enum Serve {
    /// hyper's server: keep-alive, HTTP/2 when negotiated; the body echoes the `Host`
    /// header, the request target and the version.
    Echo,
    /// One response per connection, then close (no `Connection: close`: the client only
    /// learns it from the closed socket).
    CloseAfterEach,
    /// A response head announcing 10 bytes, 2 of them, then nothing.
    Stall,
    /// One keep-alive response; the connection closes when `.0` is notified, which the
    /// server confirms through `.1`.
    CloseWhenTold(Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>),
    /// Keep-alive responses of this many bytes (`x`), far more than socket buffers hold.
    Big(usize),
}

struct Server {
    base: Uri,
    accepted: Arc<AtomicUsize>,
    client_tls: rustls::ClientConfig,
}

async fn server(serve: Serve, alpn: &[&[u8]]) -> Server {
    let (ca, _) = CertificateAuthority::generate("pool-test-ca").expect("CA");
    let (chain, key) = ca
        .issue_server_cert(
            &[],
            &["127.0.0.1".parse().expect("ip")],
            Duration::from_secs(3600),
        )
        .expect("server certificate");
    let mut tls = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("root");
    }
    let client_tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let serve = serve.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                match serve {
                    Serve::Echo => echo(tls).await,
                    Serve::CloseAfterEach => {
                        raw(tls, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true).await
                    }
                    Serve::Stall => {
                        raw(
                            tls,
                            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nok",
                            false,
                        )
                        .await
                    }
                    Serve::CloseWhenTold(close, closed) => {
                        let mut tls = tls;
                        respond(&mut tls, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                        close.notified().await;
                        let _ = tls.shutdown().await;
                        drop(tls);
                        closed.notify_one();
                    }
                    Serve::Big(len) => {
                        let mut tls = tls;
                        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                        let chunk = vec![b'x'; 64 * 1024];
                        loop {
                            respond(&mut tls, head.as_bytes()).await;
                            let mut left = len;
                            while left > 0 {
                                let n = left.min(chunk.len());
                                if tls.write_all(&chunk[..n]).await.is_err() {
                                    return;
                                }
                                left -= n;
                            }
                            if tls.flush().await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Server {
        base: format!("https://127.0.0.1:{port}").parse().expect("base"),
        accepted,
        client_tls,
    }
}

async fn echo(tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>) {
    let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let text = format!("{host} {} {:?}", req.uri(), req.version());
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tls), service)
        .await;
}

type ServerTls = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// Reads one request head and writes `response`.
async fn respond(tls: &mut ServerTls, response: &[u8]) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tls.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let _ = tls.write_all(response).await;
    let _ = tls.flush().await;
}

/// [`respond`]s once; then closes, or holds the connection open.
async fn raw(mut tls: ServerTls, response: &[u8], close: bool) {
    respond(&mut tls, response).await;
    let mut buf = [0u8; 64];
    if close {
        let _ = tls.shutdown().await;
    } else {
        // Held until the client goes away.
        let _ = tls.read(&mut buf).await;
    }
}

fn pool(server: &Server, alpn: &[&[u8]]) -> Arc<UpstreamPool> {
    pool_closing_idle_after(server, alpn, Duration::from_secs(90))
}

fn pool_closing_idle_after(
    server: &Server,
    alpn: &[&[u8]],
    idle_timeout: Duration,
) -> Arc<UpstreamPool> {
    let dialer = Dialer::new(
        server.client_tls.clone(),
        &server.base,
        None,
        Duration::from_secs(2),
        alpn,
    );
    Arc::new(UpstreamPool::new(
        Arc::new(dialer),
        &server.base,
        idle_timeout,
    ))
}

/// A pool (closing connections idle for `idle_timeout`) with one parked HTTP/1.1
/// connection, which its server has just closed.
async fn parked_connection_the_server_closed(
    idle_timeout: Duration,
) -> (Server, Arc<UpstreamPool>) {
    let close = Arc::new(tokio::sync::Notify::new());
    let closed = Arc::new(tokio::sync::Notify::new());
    let server = server(
        Serve::CloseWhenTold(close.clone(), closed.clone()),
        &[b"http/1.1"],
    )
    .await;
    let pool = pool_closing_idle_after(&server, &[b"http/1.1"], idle_timeout);
    let first = pool.request(get(&server.base, "/a")).await.expect("first");
    assert_eq!(text(first).await, "ok");
    assert_eq!(pool.idle_http1(), 1);
    close.notify_one();
    closed.notified().await;
    (server, pool)
}

fn get(base: &Uri, path: &str) -> Request<ProxyBody> {
    let body: ProxyBody = Empty::<Bytes>::new()
        .map_err(|never| -> BoxError { match never {} })
        .boxed();
    Request::get(format!("{base}{}", path.trim_start_matches('/')))
        .body(body)
        .expect("request")
}

async fn text(response: Response<PooledBody>) -> String {
    let body = response.into_body().collect().await.expect("body");
    String::from_utf8(body.to_bytes().to_vec()).expect("UTF-8")
}

/// Sequential requests over HTTP/1.1 share one connection, which is back in the pool as
/// soon as each response has been read; each request goes in origin form with the
/// upstream's `Host`.
#[tokio::test]
async fn an_http1_connection_is_reused_once_its_response_is_read() {
    let server = server(Serve::Echo, &[b"http/1.1"]).await;
    let pool = pool(&server, &[b"http/1.1"]);
    let host = server.base.authority().expect("authority").to_string();
    for i in 0..3 {
        let response = pool
            .request(get(&server.base, &format!("/api/v1/pods?i={i}")))
            .await
            .expect("response");
        assert_eq!(
            text(response).await,
            format!("{host} /api/v1/pods?i={i} HTTP/1.1")
        );
        assert_eq!(pool.idle_http1(), 1, "request {i}");
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
}

/// With HTTP/2 negotiated, requests in flight at once share one connection.
#[tokio::test]
async fn concurrent_requests_share_one_http2_connection() {
    let server = server(Serve::Echo, &[b"h2", b"http/1.1"]).await;
    let pool = pool(&server, &[b"h2", b"http/1.1"]);
    let host = server.base.authority().expect("authority").to_string();
    // The first request opens the connection; the next ones find it.
    let first = pool.request(get(&server.base, "/a")).await.expect("first");
    let (b, c) = tokio::join!(
        pool.request(get(&server.base, "/b")),
        pool.request(get(&server.base, "/c")),
    );
    // HTTP/2 has no Host header: the authority travels as `:authority`.
    assert_eq!(text(first).await, format!("- https://{host}/a HTTP/2.0"));
    assert!(text(b.expect("b")).await.ends_with("/b HTTP/2.0"));
    assert!(text(c.expect("c")).await.ends_with("/c HTTP/2.0"));
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(pool.idle_http1(), 0);
}

/// A server that closes every connection after one response (as an API server does when
/// it restarts or sheds idle connections) costs a new connection per request, never a
/// failed request: one that meets a closed pooled connection is sent again.
#[tokio::test]
async fn a_pooled_connection_the_server_closed_is_replaced_not_failed() {
    let server = server(Serve::CloseAfterEach, &[b"http/1.1"]).await;
    let pool = pool(&server, &[b"http/1.1"]);
    for i in 0..5 {
        let response = pool
            .request(get(&server.base, "/healthz"))
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(text(response).await, "ok");
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 5);
}

/// The race the previous test cannot force: the server closes a pooled connection just
/// before a request takes it, so the connection still looks ready. The request comes
/// back unsent and goes again on a new connection.
#[tokio::test]
async fn a_request_that_meets_a_connection_closing_under_it_is_sent_again() {
    let (server, pool) = parked_connection_the_server_closed(Duration::from_secs(90)).await;
    let second = pool
        .request(get(&server.base, "/b"))
        .await
        .unwrap_or_else(|e| panic!("second request: {e}"));
    assert_eq!(text(second).await, "ok");
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
}

/// A body many times the socket buffers (read while the connection keeps filling them)
/// arrives whole, and the connection then carries the next request.
#[tokio::test]
async fn a_body_larger_than_the_socket_buffers_arrives_whole_and_its_connection_is_reused() {
    const LEN: usize = 8 * 1024 * 1024;
    let server = server(Serve::Big(LEN), &[b"http/1.1"]).await;
    let pool = pool(&server, &[b"http/1.1"]);
    for i in 0..2 {
        let exchange = async {
            let response = pool.request(get(&server.base, "/big")).await.expect("head");
            response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes()
        };
        let body = tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .expect("the body stalled");
        assert_eq!(body.len(), LEN, "request {i}");
        assert!(body.iter().all(|&b| b == b'x'), "request {i}");
        assert_eq!(pool.idle_http1(), 1, "request {i}");
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
}

/// A parked connection the server closed leaves the pool at the reaper's next round, well
/// before it would time out, rather than waiting in the pool for a request to find it.
#[tokio::test]
async fn the_reaper_drops_a_parked_connection_the_server_closed() {
    // Reaped every 2 s, timed out after 8 s.
    let (_server, pool) = parked_connection_the_server_closed(Duration::from_secs(8)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.idle_http1() > 0 {
        assert!(
            Instant::now() < deadline,
            "the closed connection is still parked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A response dropped before its end (the client went away) takes its connection with it:
/// the connection is mid-exchange and cannot carry another request.
#[tokio::test]
async fn a_response_dropped_before_its_end_does_not_return_its_connection() {
    let server = server(Serve::Stall, &[b"http/1.1"]).await;
    let pool = pool(&server, &[b"http/1.1"]);
    let response = pool.request(get(&server.base, "/a")).await.expect("head");
    assert_eq!(response.status(), http::StatusCode::OK);
    drop(response);
    assert_eq!(pool.idle_http1(), 0);
    let response = pool.request(get(&server.base, "/b")).await.expect("head");
    drop(response);
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
}

/// Nothing listening: a connect error that names the address, not a hang.
#[tokio::test]
async fn an_unreachable_upstream_is_a_connect_error_naming_the_address() {
    let server = server(Serve::Echo, &[b"http/1.1"]).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("address").port();
    drop(closed);
    let base: Uri = format!("https://127.0.0.1:{port}").parse().expect("base");
    let pool = pool(
        &Server {
            base: base.clone(),
            accepted: server.accepted.clone(),
            client_tls: server.client_tls.clone(),
        },
        &[b"http/1.1"],
    );
    let Err(error) = pool.request(get(&base, "/")).await else {
        panic!("a response without a server");
    };
    assert!(matches!(error, PoolError::Connect(_)), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with(&format!("connect 127.0.0.1:{port}: ")),
        "{error}"
    );
}

#[test]
fn upstream_host_names_the_port_only_when_it_is_not_the_default() {
    for (base, want) in [
        ("https://127.0.0.1:6443", Some("127.0.0.1:6443")),
        (
            "https://kubernetes.default.svc:443/",
            Some("kubernetes.default.svc"),
        ),
        (
            "https://kubernetes.default.svc",
            Some("kubernetes.default.svc"),
        ),
        ("https://[fd00::1]:6443", Some("[fd00::1]:6443")),
        ("http://127.0.0.1:80", Some("127.0.0.1")),
    ] {
        let base: Uri = base.parse().unwrap();
        assert_eq!(
            upstream_host(&base).as_ref().map(|v| v.to_str().unwrap()),
            want,
            "{base}"
        );
    }
}
