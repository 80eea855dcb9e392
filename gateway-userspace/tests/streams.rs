//! Upgraded streams with real kubectl (v1.32, `/usr/bin/kubectl`): exec, cp, attach,
//! port-forward and logs, over WebSocket and SPDY, directly against the Kubernetes API
//! test server and through the gateway (in process, no kernel redirect, no root).

use std::{
    path::{Path, PathBuf},
    process::Output,
    sync::{Arc, Mutex},
    time::Duration,
};

use chaperone_testkit::apiserver::{ApiServerConfig, TestApiServer};
use gateway_userspace::{
    admin::Metrics,
    drain::{self, DrainTrigger},
    identity::{IdentityConfig, principal::PrincipalVerifier},
    policy::Policy,
    proxy::{
        Proxy, ProxySettings, UpstreamCredential,
        upgrade::{Direction, FrameEvent, FrameSink, StreamStats},
    },
    recorder::{self, Recorder, RecorderConfig, RequestRecord},
    scope::ScopeConfig,
    tls::{self, CertificateAuthority},
};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    process::Command,
};

const KUBECTL: &str = "/usr/bin/kubectl";
const DIRECT_TOKEN: &str = "direct-token-0123";
const GATEWAY_TOKEN: &str = "gateway-token-4567";
const POD_TOKEN: &str = "pod-token-must-not-leak";
const NS: &str = "default";
const POD: &str = "box";

/// Frame totals per stream, as the gateway's tap reported them.
#[derive(Default)]
struct Collect {
    frames: Mutex<u64>,
    finished: Mutex<Vec<(String, StreamStats)>>,
}

impl FrameSink for Collect {
    fn frame(&self, _event: &FrameEvent<'_>) {
        *self.frames.lock().expect("lock") += 1;
    }
    fn finished(&self, audit_id: &str, stats: &StreamStats) {
        self.finished
            .lock()
            .expect("lock")
            .push((audit_id.to_owned(), stats.clone()));
    }
}

struct Gateway {
    port: u16,
    proxy: Arc<Proxy>,
    drain: DrainTrigger,
    recorder: Recorder,
    sink: Arc<Collect>,
}

struct Env {
    server: TestApiServer,
    dir: tempfile::TempDir,
    gateway: Option<Gateway>,
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

impl Env {
    /// The API test server with a running pod, and (if `gateway`) the gateway in front.
    async fn start(gateway: bool, policy: Option<&str>) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, key) = CertificateAuthority::generate("streams-test-ca").expect("CA");
        let ca = Arc::new(ca);
        write(&dir.path().join("ca.crt"), ca.cert_pem());
        let server = TestApiServer::start(ApiServerConfig {
            ca: Some(ca.clone()),
            tokens: vec![DIRECT_TOKEN.to_owned(), GATEWAY_TOKEN.to_owned()],
            ..ApiServerConfig::default()
        })
        .await
        .expect("start API test server");
        server
            .seed(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": POD, "namespace": NS},
                "spec": {"containers": [{"name": "main", "image": "busybox"}]},
                "status": {"phase": "Running", "containerStatuses": [
                    {"name": "main", "ready": true, "restartCount": 0, "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}}}
                ]}
            }))
            .expect("seed pod");
        let mut env = Env {
            server,
            dir,
            gateway: None,
        };
        env.kubeconfig("direct", &env.server.url(), DIRECT_TOKEN);
        if gateway {
            let _ = key;
            let gw = env.start_gateway(&ca, policy).await;
            env.kubeconfig(
                "gateway",
                &format!("https://127.0.0.1:{}", gw.port),
                POD_TOKEN,
            );
            env.gateway = Some(gw);
        }
        env
    }

    async fn start_gateway(&self, ca: &CertificateAuthority, policy: Option<&str>) -> Gateway {
        write(&self.dir.path().join("token"), GATEWAY_TOKEN);
        let policy = match policy {
            Some(p) => Policy::from_yaml(p, "test policy").expect("policy"),
            None => Policy::allow_all(),
        };
        let (recorder_drain, recorder_watch) = drain::channel();
        // Kept alive by the recorder until join.
        std::mem::forget(recorder_drain);
        let (recorder, handle) = Recorder::start(
            RecorderConfig::new(self.dir.path().join("recordings"), "test-node"),
            recorder_watch,
        )
        .expect("recorder");
        let roots = tls::root_store_from_pem(ca.cert_pem(), "test CA").expect("roots");
        let mut token_file_config = kube::Config::new(self.server.url().parse().expect("url"));
        token_file_config.auth_info.token_file = Some(
            self.dir
                .path()
                .join("token")
                .to_str()
                .expect("UTF-8 path")
                .to_owned(),
        );
        let proxy = Proxy::new(ProxySettings {
            policy,
            upstream_url: self.server.url().parse().expect("url"),
            upstream_tls: tls::client_config(roots).expect("client config"),
            upstream_server_name: None,
            connect_timeout: Duration::from_secs(2),
            upstream_protocol: Default::default(),
            credential: Some(
                UpstreamCredential::from_kube(&token_file_config, "test token file")
                    .await
                    .expect("token"),
            ),
            recorder: handle,
            interceptor: None,
            node: "test-node".to_owned(),
            cluster: "test".to_owned(),
            identity: None,
            principals: Arc::new(
                PrincipalVerifier::from_config(&IdentityConfig::default(), None).expect("verifier"),
            ),
            scope: ScopeConfig::default(),
            metrics: Metrics::new(None, None),
            limits: Default::default(),
            impersonate: Default::default(),
            max_object_bytes: 256 * 1024,
            record_responses: true,
            reads_while_down: Default::default(),
            workers: 0,
        });
        let sink = Arc::new(Collect::default());
        proxy.set_frame_sink(sink.clone());
        let (chain, key) = ca
            .issue_server_cert(
                &["localhost".to_owned()],
                &["127.0.0.1".parse().expect("ip")],
                Duration::from_secs(3600),
            )
            .expect("serving cert");
        let server_tls = tls::server_config(chain, key).expect("server TLS");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (drain, watch) = drain::channel();
        tokio::spawn(proxy.clone().serve(listener, server_tls, watch));
        Gateway {
            port,
            proxy,
            drain,
            recorder,
            sink,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn kubeconfig(&self, name: &str, server: &str, token: &str) {
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: test\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: default\ncurrent-context: test\n",
            self.path("ca.crt").display()
        );
        write(&self.path(name), &kubeconfig);
    }

    fn command(&self, via: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(KUBECTL);
        cmd.arg("--kubeconfig")
            .arg(self.path(via))
            .arg("--cache-dir")
            .arg(self.path(&format!("cache-{via}")))
            .args(args)
            .env_clear()
            .env("HOME", self.dir.path())
            .env("PATH", "/usr/bin:/bin")
            .current_dir(self.dir.path())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    async fn run(
        &self,
        via: &str,
        args: &[&str],
        env: &[(&str, &str)],
        stdin: Option<&[u8]>,
    ) -> Output {
        let mut cmd = self.command(via, args, env);
        cmd.stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn kubectl {args:?}: {e}"));
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(data).await.expect("write kubectl stdin");
            drop(pipe);
        }
        match tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => panic!("kubectl {args:?}: {e}"),
            Err(_) => panic!("kubectl {args:?} did not finish within 60 s"),
        }
    }

    async fn ok(
        &self,
        via: &str,
        args: &[&str],
        env: &[(&str, &str)],
        stdin: Option<&[u8]>,
    ) -> String {
        let out = self.run(via, args, env, stdin).await;
        assert!(
            out.status.success(),
            "kubectl {args:?} via {via} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops the gateway, returning its rows and the frame totals per audit id.
    async fn stop(
        self,
    ) -> (
        Vec<RequestRecord>,
        Vec<(String, StreamStats)>,
        TestApiServer,
    ) {
        let (rows, finished, server, _) = self.stop_with_frames().await;
        (rows, finished, server)
    }

    /// Stops the gateway and keeps the recording: returns the directory that holds it
    /// (`recordings/` inside) and the gateway's `requests` rows.
    async fn stop_keep(mut self) -> (tempfile::TempDir, Vec<RequestRecord>) {
        let gw = self.gateway.take().expect("gateway");
        gw.drain.drain(Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(gw.proxy);
        tokio::time::timeout(Duration::from_secs(20), gw.recorder.join())
            .await
            .expect("recorder did not stop")
            .expect("recorder");
        let rows = recorder::read_dir(&self.path("recordings")).expect("read recordings");
        (self.dir, rows)
    }

    /// [`Env::stop`], also returning the `exec_frames` rows.
    async fn stop_with_frames(
        mut self,
    ) -> (
        Vec<RequestRecord>,
        Vec<(String, StreamStats)>,
        TestApiServer,
        Vec<recorder::ExecFrameRecord>,
    ) {
        let gw = self.gateway.take().expect("gateway");
        gw.drain.drain(Duration::from_secs(5)).await;
        // Rows of streams are written by their relay tasks; give them a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(gw.proxy);
        let stats = tokio::time::timeout(Duration::from_secs(20), gw.recorder.join())
            .await
            .expect("recorder did not stop")
            .expect("recorder");
        let rows = recorder::read_dir(&self.path("recordings")).expect("read recordings");
        assert_eq!(rows.len() as u64, stats.rows);
        let finished = gw.sink.finished.lock().expect("lock").clone();
        let frames =
            recorder::read_exec_frames(&self.path("recordings")).expect("read exec_frames");
        assert_eq!(frames.len() as u64, stats.exec_frame_rows);
        (rows, finished, self.server, frames)
    }
}

const VIAS: [&str; 2] = ["direct", "gateway"];
const SPDY: [(&str, &str); 1] = [("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_over_websocket_and_spdy_with_exit_codes_and_stdin() {
    let env = Env::start(true, None).await;
    for via in VIAS {
        for transport in [&[][..], &SPDY[..]] {
            let what = format!("via {via}, env {transport:?}");
            let out = env
                .ok(via, &["exec", POD, "--", "echo", "hi"], transport, None)
                .await;
            assert_eq!(out, "hi\n", "{what}");

            let out = env
                .run(
                    via,
                    &[
                        "exec",
                        POD,
                        "--",
                        "sh",
                        "-c",
                        "echo out; echo err >&2; exit 3",
                    ],
                    transport,
                    None,
                )
                .await;
            assert_eq!(out.status.code(), Some(3), "{what}: {out:?}");
            assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n", "{what}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("err\n"), "{what}: {stderr}");
            assert!(
                stderr.contains("command terminated with exit code 3"),
                "{what}: {stderr}"
            );

            let input = b"line one\nline two\n".repeat(2000);
            let out = env
                .ok(
                    via,
                    &["exec", "-i", POD, "--", "cat"],
                    transport,
                    Some(&input),
                )
                .await;
            assert_eq!(out.as_bytes(), &input[..], "{what}: stdin round trip");

            let out = env
                .ok(
                    via,
                    &["exec", "-i", "-t", POD, "--", "cat"],
                    transport,
                    Some(b"tty\n"),
                )
                .await;
            assert!(out.contains("tty"), "{what}: -t: {out:?}");
        }
        let out = env
            .run(via, &["exec", "nope", "--", "true"], &[], None)
            .await;
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("pods \"nope\" not found"),
            "{out:?}"
        );
    }

    let (rows, finished, server, frames) = env.stop_with_frames().await;
    for r in server.requests() {
        assert_ne!(
            r.authorization.as_deref(),
            Some(format!("Bearer {POD_TOKEN}").as_str()),
            "the pod's token reached the API server: {r:?}"
        );
    }
    let execs: Vec<&RequestRecord> = rows
        .iter()
        .filter(|r| r.object_ref.subresource == "exec" && r.response_code == 101)
        .collect();
    // 4 commands over WebSocket (GET) and 4 over SPDY (POST).
    let verbs: Vec<&str> = execs.iter().map(|r| r.verb.as_str()).collect();
    assert_eq!(
        verbs.iter().filter(|v| **v == "get").count(),
        4,
        "{verbs:?}"
    );
    assert_eq!(
        verbs.iter().filter(|v| **v == "create").count(),
        4,
        "{verbs:?}"
    );
    for row in &execs {
        assert!(row.request_bytes > 0 && row.response_bytes > 0, "{row:?}");
        assert_eq!(row.error, None, "{row:?}");
        let (_, stats) = finished
            .iter()
            .find(|(id, _)| *id == row.audit_id)
            .unwrap_or_else(|| panic!("no frame totals for {}", row.audit_id));
        assert!(
            stats.frames_to_client > 0 && stats.payload("error", Direction::ToClient) > 0,
            "{row:?}: {stats:?}"
        );
        assert_eq!(stats.decode_error, None, "{stats:?}");
        assert_eq!(row.object_ref.name, POD);
    }
    // The stdin round trip is visible in the decoded frames.
    let big = (b"line one\nline two\n".len() * 2000) as u64;
    let with_stdin = finished
        .iter()
        .filter(|(_, s)| s.payload("stdin", Direction::ToServer) == big)
        .count();
    assert_eq!(with_stdin, 2, "{finished:?}");

    // Each session's frames are in exec_frames, joined by audit id, ending with `end`.
    let session = |audit_id: &str, stream: &str| -> Vec<u8> {
        frames
            .iter()
            .filter(|f| f.audit_id == audit_id && f.stream.as_deref() == Some(stream))
            .filter(|f| f.event == recorder::FrameEventKind::Frame)
            .flat_map(|f| f.data.clone().unwrap_or_default())
            .collect()
    };
    let mut exit_3 = 0;
    let mut stdin_sessions = 0;
    for row in &execs {
        let own: Vec<_> = frames
            .iter()
            .filter(|f| f.audit_id == row.audit_id)
            .collect();
        assert_eq!(
            own.last().map(|f| f.event),
            Some(recorder::FrameEventKind::End),
            "{row:?}: {own:?}"
        );
        let seqs: Vec<i64> = own.iter().map(|f| f.seq).collect();
        assert_eq!(seqs, (0..own.len() as i64).collect::<Vec<_>>(), "no gaps");
        if row.request_uri.contains("exit+3") || row.request_uri.contains("exit%203") {
            assert_eq!(session(&row.audit_id, "stdout"), b"out\n", "{row:?}");
            assert_eq!(session(&row.audit_id, "stderr"), b"err\n", "{row:?}");
            assert!(
                own.iter()
                    .any(|f| f.event == recorder::FrameEventKind::Exit && f.exit_code == Some(3)),
                "{own:?}"
            );
            exit_3 += 1;
        }
        if session(&row.audit_id, "stdin") == b"line one\nline two\n".repeat(2000) {
            assert_eq!(
                session(&row.audit_id, "stdout"),
                b"line one\nline two\n".repeat(2000),
                "cat echoes its recorded stdin"
            );
            stdin_sessions += 1;
        }
    }
    assert_eq!(
        exit_3,
        2,
        "{:?}",
        execs.iter().map(|r| &r.request_uri).collect::<Vec<_>>()
    );
    assert_eq!(stdin_sessions, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_both_directions() {
    let env = Env::start(true, None).await;
    let pod_dir = env.server.pod_dir(NS, POD).expect("pod dir");
    for via in VIAS {
        for transport in [&[][..], &SPDY[..]] {
            let what = format!("via {via}, env {transport:?}");
            let content = format!("payload {what}\n").repeat(500);
            write(&env.path("up.txt"), &content);
            env.ok(
                via,
                &["cp", "up.txt", &format!("{POD}:uploaded.txt")],
                transport,
                None,
            )
            .await;
            let there = std::fs::read_to_string(pod_dir.join("uploaded.txt")).expect("uploaded");
            assert_eq!(there, content, "{what}");

            write(&pod_dir.join("down.txt"), &content);
            let _ = std::fs::remove_file(env.path("down.txt"));
            env.ok(
                via,
                &["cp", &format!("{POD}:down.txt"), "down.txt"],
                transport,
                None,
            )
            .await;
            let here = std::fs::read_to_string(env.path("down.txt")).expect("downloaded");
            assert_eq!(here, content, "{what}");
        }
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_echoes_stdin() {
    let env = Env::start(true, None).await;
    for via in VIAS {
        for transport in [&[][..], &SPDY[..]] {
            let out = env
                .ok(
                    via,
                    &["attach", "-i", POD],
                    transport,
                    Some(b"hello attach\n"),
                )
                .await;
            assert!(
                out.contains("hello attach"),
                "via {via} {transport:?}: {out:?}"
            );
        }
    }
    env.stop().await;
}

/// Runs `kubectl port-forward` to a local echo listener and talks through it.
async fn port_forward_round_trip(env: &Env, via: &str, transport: &[(&str, &str)]) {
    let target = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let remote = target.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = target.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let local = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("pick port");
        l.local_addr().expect("addr").port()
    };
    let mut child = env
        .command(
            via,
            &["port-forward", POD, &format!("{local}:{remote}")],
            transport,
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn port-forward");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("Forwarding from") {
            let n = stdout.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(
        ready.is_ok() && String::from_utf8_lossy(&seen).contains("Forwarding from"),
        "port-forward via {via} {transport:?} did not start: {}",
        String::from_utf8_lossy(&seen)
    );
    for round in 0..2 {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", local))
            .await
            .expect("connect to the forwarded port");
        let msg = format!("ping {round} via {via}");
        conn.write_all(msg.as_bytes()).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut back))
            .await
            .unwrap_or_else(|_| panic!("no echo via {via} {transport:?}"))
            .expect("read echo");
        assert_eq!(back, msg.as_bytes());
    }
    let _ = child.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_over_websocket_tunnel_and_spdy() {
    let env = Env::start(true, None).await;
    for via in VIAS {
        port_forward_round_trip(&env, via, &[]).await;
        port_forward_round_trip(&env, via, &[("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")]).await;
    }
    let (rows, finished, _server, frames) = env.stop_with_frames().await;
    let pf: Vec<&RequestRecord> = rows
        .iter()
        .filter(|r| r.object_ref.subresource == "portforward" && r.response_code == 101)
        .collect();
    assert_eq!(pf.len(), 2, "{rows:?}");
    for row in pf {
        let (_, stats) = finished
            .iter()
            .find(|(id, _)| *id == row.audit_id)
            .expect("frame totals");
        let data: u64 = stats
            .payload_bytes
            .iter()
            .filter(|(c, _, _)| c.starts_with("portforward-data"))
            .map(|(_, _, n)| n)
            .sum();
        assert!(data > 0, "{row:?} {stats:?}");
        assert_eq!(stats.decode_error, None, "{stats:?}");
        // exec_frames holds the byte counts per stream and direction, never a payload.
        let own: Vec<_> = frames
            .iter()
            .filter(|f| f.audit_id == row.audit_id)
            .collect();
        assert!(own.iter().all(|f| f.data.is_none()), "{own:?}");
        let recorded: i64 = own
            .iter()
            .filter(|f| {
                f.event == recorder::FrameEventKind::Bytes
                    && f.stream
                        .as_deref()
                        .is_some_and(|s| s.starts_with("portforward-data"))
            })
            .map(|f| f.size)
            .sum();
        assert_eq!(recorded as u64, data, "{own:?}");
        assert_eq!(
            own.last().map(|f| f.event),
            Some(recorder::FrameEventKind::End)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_and_follow() {
    let env = Env::start(true, None).await;
    env.server.append_pod_log(NS, POD, "first line\n");
    for via in VIAS {
        let out = env.ok(via, &["logs", POD], &[], None).await;
        assert_eq!(out, "first line\n", "via {via}");
    }
    for via in VIAS {
        let mut child = env
            .command(via, &["logs", "-f", POD], &[])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn logs -f");
        let mut stdout = child.stdout.take().expect("stdout");
        let mut seen = Vec::new();
        let line = format!("followed via {via}\n");
        let got = tokio::time::timeout(Duration::from_secs(20), async {
            let mut buf = [0u8; 256];
            let mut appended = false;
            loop {
                if String::from_utf8_lossy(&seen).contains("first line") && !appended {
                    env.server.append_pod_log(NS, POD, &line);
                    appended = true;
                }
                if String::from_utf8_lossy(&seen).contains(line.as_str()) {
                    return;
                }
                let n = stdout.read(&mut buf).await.expect("read");
                assert!(
                    n > 0,
                    "logs -f ended early: {}",
                    String::from_utf8_lossy(&seen)
                );
                seen.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        assert!(got.is_ok(), "via {via}: {}", String::from_utf8_lossy(&seen));
        let _ = child.kill().await;
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_denying_pods_exec_makes_kubectl_exec_fail() {
    let policy = r#"apiVersion: chaperone.dev/v1alpha1
kind: Policy
default: allow
rules:
  - name: no-exec
    action: deny
    message: no exec for agents
    verbs: ["*"]
    resources: ["pods/exec"]
"#;
    let env = Env::start(true, Some(policy)).await;
    for transport in [&[][..], &SPDY[..]] {
        let out = env
            .run(
                "gateway",
                &["exec", POD, "--", "echo", "hi"],
                transport,
                None,
            )
            .await;
        assert!(!out.status.success(), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("Forbidden") && stderr.contains("no exec for agents"),
            "{transport:?}: {stderr}"
        );
        assert!(out.stdout.is_empty());
    }
    let (rows, _, server) = env.stop().await;
    assert!(
        !server
            .requests()
            .iter()
            .any(|r| r.path_and_query.contains("/exec")),
        "a denied exec reached the API server"
    );
    assert!(
        rows.iter().any(|r| r.object_ref.subresource == "exec"
            && r.decision == Some(gateway_userspace::policy::Action::Deny)),
        "{rows:?}"
    );
}

/// The Python client's port-forward: WebSocket `v4.channel.k8s.io` with `?ports=`.
async fn python_style_port_forward(env: &Env, port: u16, token: &str, remote: u16) {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::{Message, handshake::client::generate_key};

    let roots = tls::root_store_from_pem(
        &std::fs::read_to_string(env.path("ca.crt")).expect("ca"),
        "CA",
    )
    .expect("roots");
    let mut config = tls::client_config(roots).expect("client config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into()),
            tcp,
        )
        .await
        .expect("TLS");
    let request = http::Request::builder()
        .uri(format!(
            "wss://127.0.0.1:{port}/api/v1/namespaces/{NS}/pods/{POD}/portforward?ports={remote}"
        ))
        .header("host", format!("127.0.0.1:{port}"))
        .header("authorization", format!("Bearer {token}"))
        .header("sec-websocket-protocol", "v4.channel.k8s.io")
        .header("sec-websocket-key", generate_key())
        .header("sec-websocket-version", "13")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .body(())
        .expect("request");
    let (mut ws, response) = tokio_tungstenite::client_async(request, tls)
        .await
        .expect("WebSocket handshake");
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("v4.channel.k8s.io")
    );
    let [lo, hi] = remote.to_le_bytes();
    for (want, what) in [
        (vec![0, lo, hi], "data channel port prefix"),
        (vec![1, lo, hi], "error channel port prefix"),
    ] {
        let got = loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .expect("no message within 10 s")
            {
                Some(Ok(Message::Binary(b))) => break b.to_vec(),
                Some(Ok(_)) => continue,
                other => panic!("stream ended: {other:?}"),
            }
        };
        assert_eq!(got, want, "{what}");
    }
    ws.send(Message::Binary(b"\x00python ping".to_vec().into()))
        .await
        .expect("send");
    let mut echoed = Vec::new();
    while echoed.len() < b"python ping".len() {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no echo within 10 s")
        {
            Some(Ok(Message::Binary(b))) => {
                assert_eq!(b.first(), Some(&0), "echo on the data channel: {b:?}");
                echoed.extend_from_slice(&b[1..]);
            }
            Some(Ok(_)) => {}
            other => panic!("stream ended: {other:?}"),
        }
    }
    assert_eq!(echoed, b"python ping");
    let _ = ws.close(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_websocket_v4_as_the_python_client_does() {
    let env = Env::start(true, None).await;
    let target = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let remote = target.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = target.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    python_style_port_forward(&env, env.server.addr().port(), DIRECT_TOKEN, remote).await;
    let gw_port = env.gateway.as_ref().expect("gateway").port;
    python_style_port_forward(&env, gw_port, POD_TOKEN, remote).await;
    let (rows, finished, _server) = env.stop().await;
    let row = rows
        .iter()
        .find(|r| r.object_ref.subresource == "portforward" && r.response_code == 101)
        .expect("port-forward row");
    assert_eq!(row.verb, "get");
    let (_, stats) = finished
        .iter()
        .find(|(id, _)| *id == row.audit_id)
        .expect("frame totals");
    assert_eq!(
        stats.payload(&format!("portforward-data:{remote}"), Direction::ToServer),
        b"python ping".len() as u64,
        "{stats:?}"
    );
}

/// `chaperone` with arguments; returns its output.
fn chaperone(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_chaperone"))
        .args(args)
        .output()
        .expect("run chaperone")
}

/// Masks credentials in everything, exec output included.
const MASK_ALL: &str = "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules:\n  - name: mask-everything\n    action: mask\n    verbs: [\"*\"]\n    resources: [\"*\", \"*/*\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tty_exec_session_replays_as_kubectl_showed_it_and_exports_to_asciicast() {
    let env = Env::start(true, Some(MASK_ALL)).await;
    let token = ["gh", "p_u8jzPde0IgxLd6GncfBAepfJBd0Kh8oOOL8d"].concat();
    let pod_dir = env.server.pod_dir(NS, POD).expect("pod dir");
    write(
        &pod_dir.join("env.sh"),
        &format!("export GITHUB_TOKEN={token}\n"),
    );

    // Real kubectl exec -it on a pty (script(1)), typed into line by line.
    let kubectl = format!(
        "{KUBECTL} --kubeconfig {} --cache-dir {} exec -it {POD} -- sh",
        env.path("gateway").display(),
        env.path("cache-gateway").display()
    );
    let mut child = Command::new("/usr/bin/script")
        .args(["-q", "-f", "-e", "-c", &kubectl, "/dev/null"])
        .env_clear()
        .env("HOME", env.path(""))
        .env("PATH", "/usr/bin:/bin")
        .env("TERM", "xterm")
        .current_dir(env.path(""))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn script");
    let mut stdin = child.stdin.take().expect("stdin");
    for line in [
        "echo hello from the agent\n",
        "cat env.sh\n",
        "printf 'caf\\303\\251 %s\\n' done\n",
        "exit 0\n",
    ] {
        tokio::time::sleep(Duration::from_millis(400)).await;
        stdin.write_all(line.as_bytes()).await.expect("type");
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("kubectl exec -it did not end")
        .expect("script");
    drop(stdin);
    let shown = out.stdout;
    let shown_text = String::from_utf8_lossy(&shown).into_owned();
    assert!(
        shown_text.contains("hello from the agent")
            && shown_text.contains("GITHUB_TOKEN=**masked:github-token**")
            && shown_text.contains("café done")
            && !shown_text.contains(&token),
        "what kubectl showed: {shown_text:?} (stderr {:?})",
        String::from_utf8_lossy(&out.stderr)
    );

    let (dir, _rows) = env.stop_keep().await;
    let recordings = dir.path().join("recordings");
    let recordings = recordings.to_str().expect("utf-8 path");

    // sessions -o json lists it, with its command and exit status.
    let listed = chaperone(&[
        "sessions", "--dir", recordings, "-o", "json", "--kind", "exec",
    ]);
    assert!(listed.status.success(), "{listed:?}");
    let sessions: serde_json::Value =
        serde_json::from_slice(&listed.stdout).expect("sessions JSON");
    let list = sessions.as_array().expect("a list");
    assert_eq!(list.len(), 1, "{sessions:#}");
    assert_eq!(list[0]["command"], "sh", "{sessions:#}");
    assert_eq!(list[0]["outcome"], "exit 0", "{sessions:#}");
    assert_eq!(list[0]["target"], "default/box:main", "{sessions:#}");
    assert!(
        list[0]["duration_ms"].as_i64().unwrap_or(0) >= 1200,
        "{sessions:#}"
    );
    let id = list[0]["id"].as_str().expect("id").to_owned();
    let table = chaperone(&["sessions", "--dir", recordings]);
    assert!(table.status.success(), "{table:?}");
    assert!(String::from_utf8_lossy(&table.stdout).contains(&id));

    // replay shows exactly what kubectl showed, masked.
    let replayed = chaperone(&[
        "replay",
        &id,
        "--dir",
        recordings,
        "--no-wait",
        "--no-requests",
    ]);
    assert!(replayed.status.success(), "{replayed:?}");
    assert_eq!(
        String::from_utf8_lossy(&replayed.stdout),
        shown_text,
        "the replay shows what kubectl showed"
    );
    // With its timing: four lines typed 400 ms apart, played at twice the speed.
    let started = std::time::Instant::now();
    let timed = chaperone(&["replay", &id, "--dir", recordings, "--speed", "2"]);
    assert!(timed.status.success(), "{timed:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "played too fast: {:?}",
        started.elapsed()
    );
    assert!(String::from_utf8_lossy(&timed.stdout).contains("hello from the agent"));

    // asciicast export that asciinema plays.
    let cast = dir.path().join("session.cast");
    let cast_path = cast.to_str().expect("utf-8 path");
    let exported = chaperone(&[
        "export",
        &id,
        "--dir",
        recordings,
        "--format",
        "asciicast",
        "-o",
        cast_path,
        "--no-requests",
    ]);
    assert!(exported.status.success(), "{exported:?}");
    let asciinema = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into())
        .join(".cache/chaperone-pytools/bin/asciinema");
    if asciinema.exists() {
        let cat = std::process::Command::new(&asciinema)
            .args(["cat", cast_path])
            .output()
            .expect("asciinema cat");
        assert!(cat.status.success(), "asciinema cat: {cat:?}");
        assert_eq!(
            String::from_utf8_lossy(&cat.stdout),
            shown_text,
            "asciinema cat"
        );
        // play needs a terminal: give it one.
        let play = std::process::Command::new("/usr/bin/script")
            .args([
                "-q",
                "-e",
                "-c",
                &format!("{} play -s 4 {cast_path}", asciinema.display()),
                "/dev/null",
            ])
            .env("TERM", "xterm")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("asciinema play");
        assert!(play.status.success(), "asciinema play: {play:?}");
        assert!(
            String::from_utf8_lossy(&play.stdout).contains("hello from the agent"),
            "asciinema play: {play:?}"
        );
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "asciinema is not installed at {}",
            asciinema.display()
        );
        eprintln!(
            "skipping the asciinema check: {} is not installed (cargo xtask setup)",
            asciinema.display()
        );
    }

    // Bad input: an unknown session and a corrupted file give errors, not panics.
    let unknown = chaperone(&[
        "replay",
        "no-such-session",
        "--dir",
        recordings,
        "--no-wait",
    ]);
    assert_eq!(unknown.status.code(), Some(1), "{unknown:?}");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no session no-such-session"));
    let file = recorder::list_table_files(Path::new(recordings), "exec_frames")
        .expect("list")
        .into_iter()
        .next()
        .expect("an exec_frames file");
    let bytes = std::fs::read(&file).expect("read");
    std::fs::write(&file, &bytes[..bytes.len() / 2]).expect("truncate");
    let corrupted = chaperone(&["replay", &id, "--dir", recordings, "--no-wait"]);
    assert_eq!(corrupted.status.code(), Some(1), "{corrupted:?}");
    let err = String::from_utf8_lossy(&corrupted.stderr);
    assert!(
        err.contains(file.file_name().and_then(|n| n.to_str()).unwrap_or("?")),
        "the error names the file: {err}"
    );
}
