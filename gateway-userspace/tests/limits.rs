//! Limits and failure behaviour, each exercised by a hostile or unlucky client against the
//! gateway in-process (interception mode `none`, no root): oversized headers, slowloris,
//! silent connections, HTTP/2 stream floods, connection floods from one workload, huge
//! bodies (streamed, never buffered), an unreachable upstream, and draining on shutdown.

use std::{
    convert::Infallible,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use chaperone_testkit::{
    apiserver::{ApiServerConfig, TestApiServer},
    local::local_config,
};
use gateway_userspace::{
    app::{self, App},
    config::{LimitsConfig, default_server_names},
    recorder::{self, RequestRecord},
    tls::{self, CertificateAuthority},
};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt as _, StreamBody, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsConnector, client::TlsStream};

const GATEWAY_TOKEN: &str = "gateway-token-1";
/// Generous: every limit below is a second or two, so a pass is never a near miss.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// The memory test measures this process's RSS, so it runs alone: every other test holds
/// a read guard for its whole run, the memory test the write guard.
static SERIAL: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

struct Harness {
    _serial: Option<tokio::sync::RwLockReadGuard<'static, ()>>,
    app: App,
    apiserver: TestApiServer,
    dir: tempfile::TempDir,
    ca_pem: String,
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Starts the API test server and a gateway with `limits` in front of it, or in front of
/// `upstream` when given.
async fn start(limits: LimitsConfig, upstream: Option<String>) -> Harness {
    let serial = SERIAL.read().await;
    let ca = CertificateAuthority::generate("limits-test-ca").expect("generate CA");
    let mut h = start_on(limits, upstream, ca).await;
    h._serial = Some(serial);
    h
}

/// Like [`start`], with a given CA (which then also signs an upstream stand-in).
async fn start_on(
    limits: LimitsConfig,
    upstream: Option<String>,
    (ca, ca_key): (CertificateAuthority, String),
) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_pem = ca.cert_pem().to_owned();
    write(&dir.path().join("ca.crt"), &ca_pem);
    write(&dir.path().join("ca.key"), &ca_key);
    write(&dir.path().join("token"), GATEWAY_TOKEN);
    let apiserver = TestApiServer::start(ApiServerConfig {
        ca: Some(Arc::new(ca)),
        tokens: vec![GATEWAY_TOKEN.to_owned()],
        ..ApiServerConfig::default()
    })
    .await
    .expect("start API test server");
    let url = upstream.unwrap_or_else(|| apiserver.url());
    let mut config = local_config(dir.path(), &url).expect("config");
    config.shutdown_grace = SHUTDOWN_GRACE;
    config.limits = limits;
    let app = app::build(config).await.expect("build the gateway");
    Harness {
        _serial: None,
        app,
        apiserver,
        dir,
        ca_pem,
    }
}

async fn stop(app: App, dir: &Path) -> Vec<RequestRecord> {
    let stats = app.shutdown().await.expect("shutdown");
    let rows = recorder::read_dir(&dir.join("recordings")).expect("read recordings");
    assert_eq!(rows.len() as u64, stats.rows, "rows written != rows read");
    rows
}

fn client_tls(ca_pem: &str, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let roots = tls::root_store_from_pem(ca_pem, "test CA").expect("roots");
    let mut config = tls::client_config(roots).expect("client config");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// A raw TLS connection to the gateway, for clients that misbehave below HTTP.
async fn try_tls_connect(h: &Harness, alpn: &[&[u8]]) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(h.app.local_addr()).await?;
    let connector = TlsConnector::from(Arc::new(client_tls(&h.ca_pem, alpn)));
    let name = rustls_pki_types::ServerName::try_from("kubernetes").expect("server name");
    connector.connect(name, tcp).await
}

async fn tls_connect(h: &Harness, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    try_tls_connect(h, alpn)
        .await
        .expect("TLS connection to the gateway")
}

/// Reads until the gateway closes the connection; panics if it is still open after
/// `within`. Returns what was read and how long it took.
async fn read_until_closed<R: AsyncRead + Unpin>(
    r: &mut R,
    within: Duration,
) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = tokio::time::timeout(within, async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the gateway kept the connection open for {within:?} (read {} bytes: {:?})",
        out.len(),
        String::from_utf8_lossy(&out[..out.len().min(200)])
    );
    (out, started.elapsed())
}

type TestBody = BoxBody<Bytes, Infallible>;
type TestClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    TestBody,
>;

fn client(ca_pem: &str, http2: bool) -> TestClient {
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls(ca_pem, &[]))
        .https_only();
    let connector = if http2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    let mut b = Client::builder(TokioExecutor::new());
    b.http2_only(http2);
    b.build(connector)
}

fn empty() -> TestBody {
    http_body_util::Empty::new().boxed()
}

fn request(h: &Harness, method: Method, path: &str) -> http::request::Builder {
    Request::builder().method(method).uri(format!(
        "https://127.0.0.1:{}{path}",
        h.app.local_addr().port()
    ))
}

fn in_range(elapsed: Duration, low: Duration, high: Duration, what: &str) {
    assert!(
        elapsed >= low && elapsed < high,
        "{what} after {elapsed:?}, expected between {low:?} and {high:?}"
    );
}

#[tokio::test]
async fn oversized_request_headers_get_431_and_never_reach_upstream() {
    let h = start(
        LimitsConfig {
            max_request_header_bytes: 16 * 1024,
            ..LimitsConfig::default()
        },
        None,
    )
    .await;

    // HTTP/1.1: a client that keeps sending one endless header line.
    let (mut rd, mut wr) = tokio::io::split(tls_connect(&h, &[b"http/1.1"]).await);
    let writer = tokio::spawn(async move {
        let _ = wr
            .write_all(b"GET /api/v1/namespaces HTTP/1.1\r\nHost: kubernetes\r\nX-Big: ")
            .await;
        let chunk = [b'a'; 4096];
        for _ in 0..1024 {
            if wr.write_all(&chunk).await.is_err() || wr.flush().await.is_err() {
                return;
            }
        }
    });
    let (answer, _) = read_until_closed(&mut rd, Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    writer.abort();

    // A header just under the limit still passes.
    let c1 = client(&h.ca_pem, false);
    let resp = c1
        .request(
            request(&h, Method::GET, "/api/v1/namespaces")
                .header("x-fits", "a".repeat(8 * 1024))
                .body(empty())
                .expect("req"),
        )
        .await
        .expect("GET with an 8 KiB header");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(h.apiserver.requests().len(), 1);

    // HTTP/2: a header list over SETTINGS_MAX_HEADER_LIST_SIZE gets 431 on its stream...
    let c2 = client(&h.ca_pem, true);
    let resp = c2
        .request(
            request(&h, Method::GET, "/api/v1/namespaces")
                .header("x-big", "a".repeat(20 * 1024))
                .body(empty())
                .expect("req"),
        )
        .await
        .expect("HTTP/2 request with a 20 KiB header");
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // ...and one far over it ends the connection (GOAWAY ENHANCE_YOUR_CALM).
    let err = c2
        .request(
            request(&h, Method::GET, "/api/v1/namespaces")
                .header("x-big", "a".repeat(256 * 1024))
                .body(empty())
                .expect("req"),
        )
        .await
        .expect_err("a 256 KiB header was accepted over HTTP/2");
    // The server sends GOAWAY and closes; a client still writing the header's frames may
    // see its write fail (broken pipe, reset) before it reads the GOAWAY. Either way the
    // connection ended and nothing went upstream (checked below).
    let err = format!("{err:?}");
    assert!(
        err.contains("ENHANCE_YOUR_CALM")
            || err.contains("BrokenPipe")
            || err.contains("ConnectionReset"),
        "{err}"
    );
    assert_eq!(
        h.apiserver.requests().len(),
        1,
        "an oversized request reached the upstream"
    );
    stop(h.app, h.dir.path()).await;
}

#[tokio::test]
async fn slowloris_header_dribble_is_disconnected() {
    let h = start(
        LimitsConfig {
            header_read_timeout: Duration::from_secs(1),
            ..LimitsConfig::default()
        },
        None,
    )
    .await;
    let (mut rd, mut wr) = tokio::io::split(tls_connect(&h, &[b"http/1.1"]).await);
    let writer = tokio::spawn(async move {
        let _ = wr
            .write_all(b"GET /api/v1/namespaces HTTP/1.1\r\nHost: kubernetes\r\n")
            .await;
        // One byte every 100 ms, for up to a minute, never finishing the head.
        for b in b"X-Slow: ".iter().cycle().take(600) {
            if wr.write_all(&[*b]).await.is_err() || wr.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let (answer, elapsed) = read_until_closed(&mut rd, Duration::from_secs(10)).await;
    in_range(
        elapsed,
        Duration::from_millis(900),
        Duration::from_secs(5),
        "slowloris client disconnected",
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(!answer.contains(" 200 "), "{answer}");
    writer.abort();
    assert!(h.apiserver.requests().is_empty());
    stop(h.app, h.dir.path()).await;
}

#[tokio::test]
async fn silent_and_idle_clients_are_closed() {
    let h = start(
        LimitsConfig {
            tls_handshake_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            ..LimitsConfig::default()
        },
        None,
    )
    .await;
    let window = (Duration::from_millis(900), Duration::from_secs(5));

    // TCP only: never starts the TLS handshake.
    let mut tcp = TcpStream::connect(h.app.local_addr())
        .await
        .expect("connect");
    let (_, elapsed) = read_until_closed(&mut tcp, Duration::from_secs(10)).await;
    in_range(elapsed, window.0, window.1, "no-TLS client closed");

    // TLS done, then not a single byte of HTTP.
    let mut tls = tls_connect(&h, &[b"http/1.1"]).await;
    let (_, elapsed) = read_until_closed(&mut tls, Duration::from_secs(10)).await;
    in_range(elapsed, window.0, window.1, "silent TLS client closed");

    // HTTP/1.1 keep-alive after one request: closed once idle.
    let mut tls = tls_connect(&h, &[b"http/1.1"]).await;
    tls.write_all(b"GET /api/v1/namespaces HTTP/1.1\r\nHost: kubernetes\r\n\r\n")
        .await
        .expect("send request");
    tls.flush().await.expect("flush");
    let (answer, elapsed) = read_until_closed(&mut tls, Duration::from_secs(10)).await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    in_range(
        elapsed,
        window.0,
        window.1,
        "idle HTTP/1.1 connection closed",
    );

    // HTTP/2: preface and SETTINGS, then nothing.
    let mut tls = tls_connect(&h, &[b"h2"]).await;
    tls.write_all(H2_PREFACE).await.expect("preface");
    tls.write_all(&frame(FRAME_SETTINGS, 0, 0, &[]))
        .await
        .expect("settings");
    tls.flush().await.expect("flush");
    let (answer, elapsed) = read_until_closed(&mut tls, Duration::from_secs(10)).await;
    in_range(elapsed, window.0, window.1, "idle HTTP/2 connection closed");
    assert!(
        frames(&answer).iter().any(|f| f.kind == FRAME_GOAWAY),
        "no GOAWAY before the close: {:?}",
        frames(&answer)
    );
    stop(h.app, h.dir.path()).await;
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_ACK: u8 = 0x1;
const REFUSED_STREAM: u32 = 0x7;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame length");
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A HEADERS block of HPACK literals without indexing (no Huffman, short strings only).
fn hpack(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0x00);
        for s in [name, value] {
            out.push(
                u8::try_from(s.len())
                    .ok()
                    .filter(|l| *l < 127)
                    .expect("short string"),
            );
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

#[derive(Debug)]
struct RawFrame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// Splits complete frames off the front of `bytes`.
fn frames(bytes: &[u8]) -> Vec<RawFrame> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        if rest.len() < 9 + len {
            break;
        }
        out.push(RawFrame {
            kind: rest[3],
            flags: rest[4],
            stream: u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff,
            payload: rest[9..9 + len].to_vec(),
        });
        rest = &rest[9 + len..];
    }
    out
}

#[tokio::test]
async fn http2_streams_beyond_the_limit_are_refused() {
    let h = start(
        LimitsConfig {
            http2_max_concurrent_streams: 2,
            ..LimitsConfig::default()
        },
        None,
    )
    .await;
    let mut tls = tls_connect(&h, &[b"h2"]).await;
    let mut out = H2_PREFACE.to_vec();
    out.extend(frame(FRAME_SETTINGS, 0, 0, &[]));
    // Three watches at once, ignoring the server's SETTINGS_MAX_CONCURRENT_STREAMS.
    for stream in [1, 3, 5] {
        let block = hpack(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", "kubernetes"),
            (":path", "/api/v1/namespaces/default/configmaps?watch=true"),
        ]);
        out.extend(frame(
            FRAME_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            stream,
            &block,
        ));
    }
    tls.write_all(&out).await.expect("send streams");
    tls.flush().await.expect("flush");

    let mut seen = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let (mut answered, mut refused) = (Vec::new(), Vec::new());
    let mut acked = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while answered.len() != 2 || refused.is_empty() {
        let n = tokio::time::timeout_at(deadline.into(), tls.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("timed out: answered {answered:?}, refused {refused:?}"))
            .expect("read");
        assert_ne!(
            n, 0,
            "connection closed: answered {answered:?}, refused {refused:?}"
        );
        seen.extend_from_slice(&buf[..n]);
        let parsed = frames(&seen);
        answered = parsed
            .iter()
            .filter(|f| f.kind == FRAME_HEADERS)
            .map(|f| f.stream)
            .collect();
        refused = parsed
            .iter()
            .filter(|f| f.kind == FRAME_RST_STREAM)
            .map(|f| {
                let code = u32::from_be_bytes(f.payload[..4].try_into().expect("RST payload"));
                (f.stream, code)
            })
            .collect();
        if !acked
            && parsed
                .iter()
                .any(|f| f.kind == FRAME_SETTINGS && f.flags & FLAG_ACK == 0)
        {
            // Acknowledge the server's settings like a real client would.
            acked = true;
            let _ = tls
                .write_all(&frame(FRAME_SETTINGS, FLAG_ACK, 0, &[]))
                .await;
        }
    }
    // Each watch has its own upstream request; their answers may arrive in either order.
    answered.sort_unstable();
    assert_eq!(answered, vec![1, 3], "the first two streams are served");
    assert_eq!(refused, vec![(5, REFUSED_STREAM)]);
    drop(tls);
    stop(h.app, h.dir.path()).await;
}

#[tokio::test]
async fn one_workload_cannot_hold_more_than_its_connections() {
    let h = start(
        LimitsConfig {
            max_connections_per_workload: 2,
            ..LimitsConfig::default()
        },
        None,
    )
    .await;
    let mut first = tls_connect(&h, &[b"http/1.1"]).await;
    let _second = tls_connect(&h, &[b"http/1.1"]).await;
    // The third is accepted by the kernel and closed by the gateway before TLS completes.
    assert!(
        try_tls_connect(&h, &[b"http/1.1"]).await.is_err(),
        "a third connection from 127.0.0.1 got through"
    );
    let metrics = h.app.metrics().encode();
    assert!(
        metrics.contains("chaperone_connections_rejected_total 1"),
        "{metrics}"
    );
    // The connections within the limit still work.
    first
        .write_all(
            b"GET /api/v1/namespaces HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("send");
    first.flush().await.expect("flush");
    let (answer, _) = read_until_closed(&mut first, Duration::from_secs(10)).await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    drop(first);
    // A closed connection gives its slot back.
    let deadline = Instant::now() + Duration::from_secs(5);
    while try_tls_connect(&h, &[b"http/1.1"]).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the closed connection's slot was never freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(h.app, h.dir.path()).await;
}

/// Resident set size of this process (the gateway runs in-process), in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/self/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unreadable {line:?}"));
    kib * 1024
}

/// An upstream that only counts request body bytes (the API test server caps bodies at
/// 3 MiB like the real one); answers `{"received": N}`.
async fn counting_upstream(ca_pem: &str, ca_key: &str) -> String {
    let ca = CertificateAuthority::from_pem(ca_pem, ca_key, "ca.crt", "ca.key").expect("CA");
    let (chain, key) = ca
        .issue_server_cert(
            &default_server_names(),
            &["127.0.0.1".parse().expect("ip")],
            Duration::from_secs(3600),
        )
        .expect("upstream cert");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(chain, key).expect("tls"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let mut body = req.into_body();
                    let mut received = 0u64;
                    while let Some(frame) = body.frame().await {
                        if let Some(data) = frame?.data_ref() {
                            received += data.len() as u64;
                        }
                    }
                    let json = serde_json::json!({ "received": received }).to_string();
                    Ok::<_, hyper::Error>(Response::new(http_body_util::Full::new(Bytes::from(
                        json,
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    format!("https://127.0.0.1:{}", addr.port())
}

static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];

/// `chunks` × 64 KiB, produced lazily so the test client holds no copy of the body.
fn generated_body(chunks: usize) -> TestBody {
    let stream = futures_util::stream::iter(
        (0..chunks).map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from_static(&CHUNK)))),
    );
    StreamBody::new(stream).boxed()
}

async fn post_body(h: &Harness, c: &TestClient, chunks: usize) -> serde_json::Value {
    let resp = c
        .request(
            request(h, Method::POST, "/api/v1/namespaces/default/configmaps")
                .header("content-type", "application/json")
                .body(generated_body(chunks))
                .expect("req"),
        )
        .await
        .expect("POST through the gateway");
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice(&bytes).expect("JSON")
}

#[tokio::test]
async fn a_64_mib_body_streams_through_without_the_gateway_buffering_it() {
    let _alone = SERIAL.write().await;
    let (ca, ca_key) = CertificateAuthority::generate("limits-test-ca").expect("generate CA");
    let upstream = counting_upstream(ca.cert_pem(), &ca_key).await;
    // No body limit: this is about streaming, for requests the API server's limit does not
    // cover (or an admin who raised it).
    let unlimited = LimitsConfig {
        max_request_body_bytes: 0,
        ..LimitsConfig::default()
    };
    let h = start_on(unlimited, Some(upstream), (ca, ca_key)).await;
    for http2 in [false, true] {
        let c = client(&h.ca_pem, http2);
        // Warm-up: connection pools, TLS buffers and allocator arenas reach steady state.
        assert_eq!(post_body(&h, &c, 64).await["received"], 64 * 64 * 1024);
        let baseline = rss_bytes();
        let peak = Arc::new(AtomicU64::new(baseline));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        let received = post_body(&h, &c, 1024).await;
        sampler.abort();
        peak.fetch_max(rss_bytes(), Ordering::Relaxed);
        assert_eq!(received["received"], 64 * 1024 * 1024, "http2={http2}");
        let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
        eprintln!(
            "http2={http2}: RSS {} MiB before, peak growth {} KiB",
            baseline / (1024 * 1024),
            growth / 1024
        );
        assert!(
            growth < 32 * 1024 * 1024,
            "RSS grew by {} MiB while 64 MiB streamed through (http2={http2}): the body is buffered",
            growth / (1024 * 1024)
        );
    }
    let rows = stop(h.app, h.dir.path()).await;
    let big: Vec<_> = rows
        .iter()
        .filter(|r| r.request_bytes == 64 * 1024 * 1024)
        .collect();
    assert_eq!(big.len(), 2, "{rows:#?}");
    assert!(
        big.iter()
            .all(|r| r.verb == "create" && r.response_code == 200),
        "{big:#?}"
    );
}

/// A create over the API server's body limit gets its 413 `Status` every time, whether the
/// length is declared, the body is chunked, or it streams past the limit after inspection:
/// never a 503 from racing the upstream's close.
#[tokio::test]
async fn oversized_bodies_always_get_the_api_servers_413() {
    async fn create(h: &Harness, c: &TestClient, chunks: usize, declared: bool) -> StatusCode {
        let mut req = request(h, Method::POST, "/api/v1/namespaces/default/configmaps")
            .header("content-type", "application/json");
        if declared {
            req = req.header("content-length", chunks * CHUNK.len());
        }
        let resp = c
            .request(req.body(generated_body(chunks)).expect("req"))
            .await
            .expect("POST through the gateway");
        let code = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let status: serde_json::Value = serde_json::from_slice(&bytes).expect("Status JSON");
        assert_eq!(status["reason"], "RequestEntityTooLarge", "{status}");
        assert!(
            status["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Request entity too large: limit is ")),
            "{status}"
        );
        code
    }
    let h = start(LimitsConfig::default(), None).await;
    let c = client(&h.ca_pem, true);
    for round in 0..5 {
        // 256 MiB declared: refused before a byte of it is read.
        assert_eq!(
            create(&h, &c, 4096, true).await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "round {round}"
        );
        // 16 MiB chunked: refused once 3 MiB were read.
        assert_eq!(
            create(&h, &c, 256, false).await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "round {round}"
        );
    }
    assert!(
        h.apiserver.requests().iter().all(|r| r.method != "POST"),
        "an oversized body reached the API server"
    );
    let rows = stop(h.app, h.dir.path()).await;
    assert_eq!(rows.len(), 10);
    assert!(
        rows.iter().all(|r| r.response_code == 413
            && r.outcome == gateway_userspace::recorder::Outcome::Invalid),
        "{rows:#?}"
    );

    // The limit above the inspection limit: the body streams, and is cut off at the limit.
    let h = start(
        LimitsConfig {
            max_inspected_body_bytes: 1024 * 1024,
            max_request_body_bytes: 2 * 1024 * 1024,
            ..LimitsConfig::default()
        },
        None,
    )
    .await;
    let c = client(&h.ca_pem, true);
    for round in 0..5 {
        assert_eq!(
            create(&h, &c, 64, false).await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "round {round}"
        );
    }
    let rows = stop(h.app, h.dir.path()).await;
    assert!(rows.iter().all(|r| r.response_code == 413), "{rows:#?}");
}

async fn next_frame(body: &mut Incoming, what: &str) -> Option<Frame<Bytes>> {
    match tokio::time::timeout(Duration::from_secs(5), body.frame()).await {
        Err(_) => panic!("{what}: no frame and no end within 5s"),
        Ok(None) => None,
        Ok(Some(Ok(frame))) => Some(frame),
        Ok(Some(Err(e))) => panic!("{what}: the stream failed instead of ending cleanly: {e}"),
    }
}

#[tokio::test]
async fn shutdown_ends_watches_cleanly_and_lets_in_flight_requests_finish() {
    let h = start(LimitsConfig::default(), None).await;
    let watch_path = "/api/v1/namespaces/default/configmaps?watch=true";
    let mut watches = Vec::new();
    for http2 in [false, true] {
        let c = client(&h.ca_pem, http2);
        let resp = c
            .request(
                request(&h, Method::GET, watch_path)
                    .body(empty())
                    .expect("req"),
            )
            .await
            .expect("open watch");
        assert_eq!(resp.status(), StatusCode::OK);
        watches.push((http2, resp.into_body()));
    }
    // A create whose body is still arriving when the drain starts.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|frame| (frame, rx))
    }))
    .boxed();
    let slow = {
        let c = client(&h.ca_pem, false);
        let req = request(&h, Method::POST, "/api/v1/namespaces/default/configmaps")
            .header("content-type", "application/json")
            .body(body)
            .expect("req");
        tokio::spawn(async move { c.request(req).await })
    };
    tx.send(Ok(Frame::data(Bytes::from_static(
        br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"slow","namespace":"default"},"#,
    ))))
    .await
    .expect("send first half");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let Harness {
        app,
        apiserver,
        dir,
        ..
    } = h;
    let started = Instant::now();
    let shutdown = tokio::spawn(app.shutdown());
    for (http2, body) in &mut watches {
        let what = format!("watch over {}", if *http2 { "HTTP/2" } else { "HTTP/1.1" });
        while next_frame(body, &what).await.is_some() {}
    }
    assert!(
        !shutdown.is_finished(),
        "shutdown finished while a request was still in flight"
    );
    tx.send(Ok(Frame::data(Bytes::from_static(br#""data":{"k":"v"}}"#))))
        .await
        .expect("send second half");
    drop(tx);
    let resp = tokio::time::timeout(Duration::from_secs(5), slow)
        .await
        .expect("the in-flight create did not finish")
        .expect("task")
        .expect("the in-flight create failed");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let stats = shutdown.await.expect("shutdown task").expect("shutdown");
    let took = started.elapsed();
    assert!(
        took < SHUTDOWN_GRACE - Duration::from_secs(2),
        "shutdown took {took:?}: the drain waited for the grace period instead of ending the watches"
    );
    assert!(apiserver.object("configmaps", "default", "slow").is_some());
    let rows = recorder::read_dir(&dir.path().join("recordings")).expect("read recordings");
    assert_eq!(rows.len() as u64, stats.rows);
    let mut seen: Vec<(&str, i32)> = rows
        .iter()
        .map(|r| (r.verb.as_str(), r.response_code))
        .collect();
    seen.sort();
    assert_eq!(seen, vec![("create", 201), ("watch", 200), ("watch", 200)]);
}

#[tokio::test]
async fn unreachable_upstream_answers_503_quickly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let h = start(
        LimitsConfig::default(),
        Some(format!("https://127.0.0.1:{port}")),
    )
    .await;
    let c = client(&h.ca_pem, true);
    let started = Instant::now();
    let resp = c
        .request(
            request(&h, Method::GET, "/api/v1/namespaces")
                .body(empty())
                .expect("req"),
        )
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "503 took {:?}",
        started.elapsed()
    );
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let status: serde_json::Value = serde_json::from_slice(&bytes).expect("Status JSON");
    assert_eq!(
        (status["kind"].as_str(), status["reason"].as_str()),
        (Some("Status"), Some("ServiceUnavailable"))
    );
    stop(h.app, h.dir.path()).await;
}

#[tokio::test]
async fn shutdown_closes_exec_streams_in_order_and_records_them() {
    use futures_util::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;

    let h = start(LimitsConfig::default(), None).await;
    seed_pod(&h);
    let mut ws = open_exec(&h, "stdout=true&stderr=true").await;

    let Harness { app, dir, .. } = h;
    let started = Instant::now();
    let shutdown = tokio::spawn(app.shutdown());
    // The stream ends, in order (no reset, no TLS error), well before the grace period.
    let ended = tokio::time::timeout(SHUTDOWN_GRACE, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(frame)))) => {
                    break Ok((u16::from(frame.code), frame.reason.to_string()));
                }
                Some(Ok(Message::Close(None))) | None => break Err("no close code".to_owned()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => break Err(e.to_string()),
            }
        }
    })
    .await
    .expect("the exec stream was still open at the end of the grace period");
    assert_eq!(
        ended,
        Ok((1001, "the gateway is shutting down".to_owned())),
        "the exec stream broke instead of closing with 1001 Going Away"
    );
    let stats = shutdown.await.expect("shutdown task").expect("shutdown");
    assert!(
        started.elapsed() < SHUTDOWN_GRACE - Duration::from_secs(2),
        "shutdown took {:?}: it waited out the grace period",
        started.elapsed()
    );
    let rows = recorder::read_dir(&dir.path().join("recordings")).expect("read recordings");
    assert_eq!(rows.len() as u64, stats.rows);
    let exec = rows
        .iter()
        .find(|r| r.object_ref.subresource == "exec")
        .unwrap_or_else(|| panic!("the exec stream was not recorded: {rows:#?}"));
    assert_eq!(exec.response_code, 101);
    assert_eq!(
        exec.error.as_deref(),
        Some("stream closed by the gateway's shutdown")
    );
}

#[tokio::test]
async fn upgraded_streams_keep_counting_against_the_workload_limit() {
    let h = start(
        LimitsConfig {
            max_connections_per_workload: 2,
            ..LimitsConfig::default()
        },
        None,
    )
    .await;
    seed_pod(&h);
    // Two exec streams use up the workload's two slots, although their HTTP connections
    // have been handed over to the streams.
    let first = open_exec(&h, "stdout=true").await;
    let _second = open_exec(&h, "stdout=true").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        try_tls_connect(&h, &[b"http/1.1"]).await.is_err(),
        "a third connection got through while two exec streams were open"
    );
    // Ending a stream gives its slot back.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    while try_tls_connect(&h, &[b"http/1.1"]).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the ended exec stream's slot was never freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(h.app, h.dir.path()).await;
}

/// The pod the exec tests run `sleep` in.
fn seed_pod(h: &Harness) {
    h.apiserver
        .seed(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "box", "namespace": "default"},
            "spec": {"containers": [{"name": "main", "image": "busybox"}]},
            "status": {"phase": "Running"}
        }))
        .expect("seed pod");
}

/// Opens `sleep 60` in the pod as `kubectl exec` does (WebSocket v5) through the gateway;
/// `streams` are the exec query's stream flags.
async fn open_exec(
    h: &Harness,
    streams: &str,
) -> tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>> {
    use tokio_tungstenite::tungstenite::handshake::client::generate_key;

    let tls = tls_connect(h, &[b"http/1.1"]).await;
    let port = h.app.local_addr().port();
    let request = http::Request::builder()
        .uri(format!(
            "wss://127.0.0.1:{port}/api/v1/namespaces/default/pods/box/exec?command=sleep&command=60&{streams}"
        ))
        .header("host", format!("127.0.0.1:{port}"))
        .header("sec-websocket-protocol", "v5.channel.k8s.io")
        .header("sec-websocket-key", generate_key())
        .header("sec-websocket-version", "13")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .body(())
        .expect("request");
    let (ws, response) = tokio_tungstenite::client_async(request, tls)
        .await
        .expect("WebSocket handshake through the gateway");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

/// Two gateways never write one recording directory (their write-ahead logs, manifests and
/// used-approval records would interleave): a second one, as a DaemonSet rolled with
/// `maxSurge` starts, waits for the first to let go and only then starts.
#[tokio::test]
async fn a_second_gateway_on_one_recording_directory_waits_for_the_first() {
    let h = start(LimitsConfig::default(), None).await;
    let mut config = local_config(h.dir.path(), &h.apiserver.url()).expect("config");
    config.shutdown_grace = SHUTDOWN_GRACE;
    let locked = recorder::lock_dir(&config.recording.dir, Duration::ZERO, "a test").await;
    assert!(
        matches!(locked, Err(recorder::DirLockError::InUse { .. })),
        "the running gateway does not hold its recording directory: {locked:?}"
    );
    let waited = tokio::time::timeout(Duration::from_secs(1), app::build(config.clone())).await;
    assert!(
        waited.is_err(),
        "a second gateway started on the first one's recording directory"
    );
    h.app.shutdown().await.expect("stop the first gateway");
    let second = tokio::time::timeout(Duration::from_secs(10), app::build(config))
        .await
        .expect("started once the first let go")
        .expect("the second gateway");
    second.shutdown().await.expect("stop the second gateway");
}
