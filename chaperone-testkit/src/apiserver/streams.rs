//! `pods/exec`, `pods/attach`, `pods/portforward` and `pods/log`, served the way the API
//! server and the kubelet behind it serve them (`shared/k8s-wire-reference.md` 7 and 8).
//!
//! * exec and attach over WebSocket (`v5.channel.k8s.io`, `v4.channel.k8s.io`,
//!   `v3`/`v2`/`channel.k8s.io`) and SPDY/3.1 (`X-Stream-Protocol-Version` negotiation,
//!   kubelet's preference `v4.channel.k8s.io` first). Commands run on the host (see
//!   [`super::exec`]) in a per-pod temporary directory; attach runs `cat`.
//! * port-forward over SPDY/3.1 (POST), SPDY inside WebSocket (`SPDY/3.1+portforward.k8s.io`,
//!   kubectl's default) and WebSocket v4 with `?ports=` (the Python client); remote port P
//!   is `127.0.0.1:P` on the host.
//! * log: `200 text/plain` with what tests appended through
//!   [`super::TestApiServer::append_pod_log`]; `follow=true` streams later appends until
//!   the client leaves or the server shuts down. Other log options are ignored.
//!
//! The pod must exist (404 Status) and be `Running` (400 Status); `container`, if given,
//! must name one of its containers.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    sync::{broadcast, mpsc},
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        handshake::derive_accept_key,
        protocol::{CloseFrame, Role, frame::coding::CloseCode},
    },
};

use super::{
    Body, State,
    exec::{self, ExecSpec, OutStream},
    full, header_str, portforward, spdy, status_response,
};
use gateway_userspace::{drain::DrainWatcher, status::Status};

/// WebSocket subprotocols for exec/attach, the server's preference first.
const WS_EXEC_PROTOCOLS: [&str; 5] = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
/// WebSocket subprotocols for port-forward.
const WS_PORTFORWARD_PROTOCOLS: [&str; 2] = ["SPDY/3.1+portforward.k8s.io", "v4.channel.k8s.io"];
/// SPDY stream protocols for exec/attach (the kubelet's order).
const SPDY_EXEC_PROTOCOLS: [&str; 4] = [
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
/// SPDY stream protocols for port-forward.
const SPDY_PORTFORWARD_PROTOCOLS: [&str; 1] = ["portforward.k8s.io"];
/// How long the client gets to open every stream it asked for (kubelet: 30 s).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// One pod's log: what was appended so far, and followers.
struct PodLog {
    text: Mutex<Vec<u8>>,
    tx: broadcast::Sender<Bytes>,
}

/// Per-pod runtime state: working directories and logs.
#[derive(Default)]
pub(crate) struct PodRuntime {
    dirs: Mutex<HashMap<String, tempfile::TempDir>>,
    logs: Mutex<HashMap<String, Arc<PodLog>>>,
}

impl PodRuntime {
    /// The pod's working directory, created on first use.
    pub fn dir(&self, namespace: &str, pod: &str) -> std::io::Result<PathBuf> {
        let mut dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        let key = format!("{namespace}/{pod}");
        if let Some(d) = dirs.get(&key) {
            return Ok(d.path().to_owned());
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("pod-{namespace}-{pod}-"))
            .tempdir()?;
        let path = dir.path().to_owned();
        dirs.insert(key, dir);
        Ok(path)
    }

    fn log(&self, namespace: &str, pod: &str) -> Arc<PodLog> {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.entry(format!("{namespace}/{pod}"))
            .or_insert_with(|| {
                Arc::new(PodLog {
                    text: Mutex::new(Vec::new()),
                    tx: broadcast::channel(1024).0,
                })
            })
            .clone()
    }

    /// Appends to a pod's log and wakes followers.
    pub fn append_log(&self, namespace: &str, pod: &str, text: &[u8]) {
        let log = self.log(namespace, pod);
        let mut stored = log.text.lock().unwrap_or_else(|e| e.into_inner());
        stored.extend_from_slice(text);
        // No followers is fine.
        let _ = log.tx.send(Bytes::copy_from_slice(text));
    }
}

/// Handles `/api/v1/namespaces/<ns>/pods/<name>/{exec,attach,portforward,log}`; `None`
/// for every other path.
pub(super) fn route(
    state: &Arc<State>,
    segs: &[&str],
    req: &mut Request<Incoming>,
    drain: &DrainWatcher,
) -> Option<Response<Body>> {
    let ["api", "v1", "namespaces", ns, "pods", name, sub] = segs else {
        return None;
    };
    if !matches!(*sub, "exec" | "attach" | "portforward" | "log") {
        return None;
    }
    Some(
        serve(state, ns, name, sub, req, drain).unwrap_or_else(|status| {
            tracing::debug!(pod = %name, sub, message = status.message(), "test API server: stream request refused");
            status_response(status)
        }),
    )
}

fn serve(
    state: &Arc<State>,
    ns: &str,
    name: &str,
    sub: &str,
    req: &mut Request<Incoming>,
    drain: &DrainWatcher,
) -> Result<Response<Body>, Status> {
    let allowed = match sub {
        "log" => req.method() == Method::GET,
        _ => req.method() == Method::GET || req.method() == Method::POST,
    };
    if !allowed {
        return Err(Status::failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!(
                "the server does not allow this method on the requested resource ({} pods/{sub})",
                req.method()
            ),
        ));
    }
    let pods =
        super::discovery::find("", "v1", "pods").ok_or_else(|| super::internal("no pods"))?;
    let pod = state.store.get(pods, ns, name)?;
    let query = req.uri().query().map(str::to_owned);
    let container = url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "container")
        .map(|(_, v)| v.into_owned());
    check_container(&pod, name, container.as_deref())?;
    if sub == "log" {
        let follow = super::go_bool(
            url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
                .find(|(k, _)| k == "follow")
                .map(|(_, v)| v.into_owned())
                .as_deref(),
        );
        return Ok(logs(&state.runtime.log(ns, name), follow, drain.clone()));
    }
    let phase = pod
        .pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("Pending");
    if phase != "Running" {
        return Err(Status::bad_request(match (sub, phase) {
            ("exec", "Succeeded" | "Failed") => {
                format!("cannot exec into a container in a completed pod; current phase is {phase}")
            }
            _ => format!("pod {name} is not running (phase {phase})"),
        }));
    }
    let cwd = state
        .runtime
        .dir(ns, name)
        .map_err(|e| super::internal(&format!("pod directory: {e}")))?;
    let mut spec = ExecSpec::from_query(query.as_deref());
    if sub == "attach" {
        spec.command = vec!["cat".to_owned()];
    } else if sub == "exec" && spec.command.is_empty() {
        return Err(Status::bad_request("you must specify at least 1 command"));
    }
    let upgrade = header_str(req.headers(), header::UPGRADE)
        .unwrap_or("")
        .to_ascii_lowercase();
    match upgrade.as_str() {
        "websocket" => websocket(req, sub, spec, cwd, query),
        "spdy/3.1" => spdy_upgrade(req, sub, spec, cwd),
        _ => Err(Status::bad_request("Upgrade request required")),
    }
}

fn check_container(pod: &Value, name: &str, container: Option<&str>) -> Result<(), Status> {
    let Some(wanted) = container.filter(|c| !c.is_empty()) else {
        return Ok(());
    };
    let known = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.get("name").and_then(Value::as_str) == Some(wanted))
        });
    if known {
        Ok(())
    } else {
        Err(Status::bad_request(format!(
            "container {wanted} is not valid for pod {name}"
        )))
    }
}

/// Every value of a possibly repeated, comma-separated header.
fn header_list(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect()
}

fn switching(upgrade: &'static str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static(upgrade));
    response
}

fn websocket(
    req: &mut Request<Incoming>,
    sub: &str,
    spec: ExecSpec,
    cwd: PathBuf,
    query: Option<String>,
) -> Result<Response<Body>, Status> {
    let key = header_str(req.headers(), header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| Status::bad_request("missing Sec-WebSocket-Key"))?
        .to_owned();
    let offered = header_list(req.headers(), "sec-websocket-protocol");
    let supported: &[&str] = if sub == "portforward" {
        &WS_PORTFORWARD_PROTOCOLS
    } else {
        &WS_EXEC_PROTOCOLS
    };
    let chosen = if offered.is_empty() && sub != "portforward" {
        String::new()
    } else {
        supported
            .iter()
            .find(|p| offered.iter().any(|o| o.eq_ignore_ascii_case(p)))
            .map(|p| (*p).to_owned())
            .ok_or_else(|| {
                Status::bad_request(format!(
                    "unable to upgrade: unsupported WebSocket subprotocols {offered:?}; supported: {supported:?}"
                ))
            })?
    };
    let ports: Vec<u16> = url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .filter(|(k, _)| k == "ports")
        .flat_map(|(_, v)| {
            v.split(',')
                .map(|p| p.trim().parse::<u16>())
                .collect::<Vec<_>>()
        })
        .collect::<Result<_, _>>()
        .map_err(|e| Status::bad_request(format!("invalid port in ports: {e}")))?;
    if sub == "portforward" && chosen == "v4.channel.k8s.io" && ports.is_empty() {
        return Err(Status::bad_request("query parameter \"ports\" is required"));
    }
    let on_upgrade = hyper::upgrade::on(req);
    let mut response = switching("websocket");
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if !chosen.is_empty()
        && let Ok(v) = HeaderValue::from_str(&chosen)
    {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
    }
    let sub = sub.to_owned();
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "test API server: WebSocket upgrade failed");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        match (sub.as_str(), chosen.as_str()) {
            ("portforward", "v4.channel.k8s.io") => portforward::serve_websocket(ws, ports).await,
            ("portforward", _) => tunnel(ws).await,
            _ => exec_websocket(ws, &chosen, spec, cwd).await,
        }
    });
    Ok(response)
}

fn spdy_upgrade(
    req: &mut Request<Incoming>,
    sub: &str,
    spec: ExecSpec,
    cwd: PathBuf,
) -> Result<Response<Body>, Status> {
    let offered = header_list(req.headers(), "x-stream-protocol-version");
    let supported: &[&str] = if sub == "portforward" {
        &SPDY_PORTFORWARD_PROTOCOLS
    } else {
        &SPDY_EXEC_PROTOCOLS
    };
    let chosen = if offered.is_empty() {
        None
    } else {
        match supported.iter().find(|p| offered.iter().any(|o| o == *p)) {
            Some(p) => Some(*p),
            None => {
                let mut response = Response::new(full(format!(
                    "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server accepts {supported:?}"
                )));
                *response.status_mut() = StatusCode::FORBIDDEN;
                if let Ok(v) = HeaderValue::from_str(&supported.join(", ")) {
                    response
                        .headers_mut()
                        .insert("x-accepted-stream-protocol-versions", v);
                }
                return Ok(response);
            }
        }
    };
    let on_upgrade = hyper::upgrade::on(req);
    let mut response = switching("SPDY/3.1");
    if let Some(c) = chosen {
        response
            .headers_mut()
            .insert("x-stream-protocol-version", HeaderValue::from_static(c));
    }
    let sub = sub.to_owned();
    let version = chosen.unwrap_or("channel.k8s.io");
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "test API server: SPDY upgrade failed");
                return;
            }
        };
        let io = TokioIo::new(upgraded);
        if sub == "portforward" {
            portforward::serve_spdy(io).await;
        } else {
            exec_spdy(io, version, spec, cwd).await;
        }
    });
    Ok(response)
}

/// exec/attach over WebSocket channels.
async fn exec_websocket<S>(ws: WebSocketStream<S>, protocol: &str, spec: ExecSpec, cwd: PathBuf)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let json_errors = matches!(protocol, "v4.channel.k8s.io" | "v5.channel.k8s.io");
    let (mut sink, mut stream) = ws.split();
    let first = if spec.stdout {
        1u8
    } else if spec.stderr {
        2
    } else {
        3
    };
    if sink
        .send(Message::Binary(vec![first].into()))
        .await
        .is_err()
    {
        return;
    }
    let (stdin_tx, stdin_rx) = if spec.stdin {
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let reader = tokio::spawn(async move {
        let mut stdin_tx = stdin_tx;
        while let Some(msg) = stream.next().await {
            match msg {
                Ok(Message::Binary(b)) => match b.first() {
                    Some(0) => {
                        if let Some(tx) = &stdin_tx {
                            let _ = tx.send(b.slice(1..));
                        }
                    }
                    // v5 CLOSE of stdin: EOF for the process.
                    Some(255) if b.get(1) == Some(&0) => stdin_tx = None,
                    _ => {}
                },
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    });
    let (out_tx, mut out_rx) = mpsc::unbounded_channel();
    let command = spec.command.clone();
    let run = tokio::spawn(async move { exec::run(&spec, &cwd, stdin_rx, out_tx).await });
    let mut client_gone = false;
    let mut reader = reader;
    loop {
        // A client that closes (or loses) its connection ends the stream, as the API server
        // ends the kubelet stream behind it; the command does not keep it open.
        let (stream, bytes) = tokio::select! {
            out = out_rx.recv() => match out {
                Some(out) => out,
                None => break,
            },
            _ = &mut reader => {
                client_gone = true;
                break;
            }
        };
        let ch = match stream {
            OutStream::Stdout => 1u8,
            OutStream::Stderr => 2,
        };
        let mut msg = Vec::with_capacity(bytes.len() + 1);
        msg.push(ch);
        msg.extend_from_slice(&bytes);
        if sink.send(Message::Binary(msg.into())).await.is_err() {
            client_gone = true;
            break;
        }
    }
    if client_gone {
        run.abort();
        reader.abort();
        return;
    }
    let outcome = run
        .await
        .unwrap_or_else(|e| exec::Outcome::Failed(format!("Internal error occurred: {e}")));
    let payload = if json_errors {
        serde_json::to_vec(&outcome.status(&command)).unwrap_or_default()
    } else {
        outcome.text(&command).into_bytes()
    };
    if json_errors || !payload.is_empty() {
        let mut msg = vec![3u8];
        msg.extend_from_slice(&payload);
        let _ = sink.send(Message::Binary(msg.into())).await;
    }
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
    // The client answers the close; give it a moment, then drop the connection.
    if tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .is_err()
    {
        tracing::debug!("test API server: WebSocket client did not answer the close");
    }
}

/// exec/attach over a SPDY session.
async fn exec_spdy<IO>(io: IO, version: &str, spec: ExecSpec, cwd: PathBuf)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let mut session = spdy::start(io);
    let json_errors = version == "v4.channel.k8s.io";
    let resize = !matches!(version, "channel.k8s.io" | "v2.channel.k8s.io");
    let mut needed = vec!["error"];
    if spec.stdin {
        needed.push("stdin");
    }
    if spec.stdout {
        needed.push("stdout");
    }
    if spec.stderr && !spec.tty {
        needed.push("stderr");
    }
    if spec.tty && resize {
        needed.push("resize");
    }
    let mut streams: HashMap<String, spdy::IncomingStream> = HashMap::new();
    let deadline = tokio::time::Instant::now() + STREAM_CREATION_TIMEOUT;
    while !needed.iter().all(|n| streams.contains_key(*n)) {
        match tokio::time::timeout_at(deadline, session.streams.recv()).await {
            Ok(Some(s)) => {
                let kind = s.header("streamtype").unwrap_or("").to_owned();
                streams.insert(kind, s);
            }
            _ => {
                tracing::debug!(?needed, "test API server: SPDY exec streams missing");
                session.close();
                return;
            }
        }
    }
    let id = |name: &str| streams.get(name).map(|s| s.id);
    let (error_id, stdout_id, stderr_id) = (id("error"), id("stdout"), id("stderr"));
    let stdin_rx = streams.remove("stdin").map(|s| s.data);
    if let Some(mut r) = streams.remove("resize").map(|s| s.data) {
        // Resize events are accepted and ignored (no pty).
        tokio::spawn(async move { while r.recv().await.is_some() {} });
    }
    let (out_tx, mut out_rx) = mpsc::unbounded_channel();
    let command = spec.command.clone();
    let run = tokio::spawn(async move { exec::run(&spec, &cwd, stdin_rx, out_tx).await });
    while let Some((stream, bytes)) = out_rx.recv().await {
        let target = match stream {
            OutStream::Stdout => stdout_id,
            OutStream::Stderr => stderr_id,
        };
        if let Some(target) = target {
            session.data(target, bytes);
        }
    }
    let outcome = run
        .await
        .unwrap_or_else(|e| exec::Outcome::Failed(format!("Internal error occurred: {e}")));
    let payload = if json_errors {
        serde_json::to_vec(&outcome.status(&command)).unwrap_or_default()
    } else {
        outcome.text(&command).into_bytes()
    };
    if let Some(e) = error_id {
        if !payload.is_empty() {
            session.data(e, Bytes::from(payload));
        }
        session.fin(e);
    }
    for s in [stdout_id, stderr_id].into_iter().flatten() {
        session.fin(s);
    }
    session.close();
}

/// Port-forward's SPDY session carried in WebSocket binary messages.
async fn tunnel<S>(ws: WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (near, far) = tokio::io::duplex(256 * 1024);
    tokio::spawn(portforward::serve_spdy(far));
    let (mut near_r, mut near_w) = tokio::io::split(near);
    let (mut sink, mut stream) = ws.split();
    let to_spdy = async move {
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Binary(b) if near_w.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = near_w.shutdown().await;
    };
    let from_spdy = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match near_r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink
                        .send(Message::Binary(buf[..n].to_vec().into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
    };
    tokio::select! {
        () = to_spdy => {}
        () = from_spdy => {}
    }
}

fn logs(log: &Arc<PodLog>, follow: bool, drain: DrainWatcher) -> Response<Body> {
    let (snapshot, mut rx) = {
        let text = log.text.lock().unwrap_or_else(|e| e.into_inner());
        (Bytes::copy_from_slice(&text), log.tx.subscribe())
    };
    let body = if follow {
        let (tx, mut body_rx) = mpsc::channel::<Bytes>(64);
        tokio::spawn(async move {
            if !snapshot.is_empty() && tx.send(snapshot).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    () = drain.signaled() => return,
                    () = tx.closed() => return,
                    next = rx.recv() => match next {
                        Ok(b) => {
                            if tx.send(b).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        let stream = futures_util::stream::poll_fn(move |cx| {
            body_rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        });
        StreamBody::new(stream).boxed_unsync()
    } else {
        full(snapshot)
    };
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
