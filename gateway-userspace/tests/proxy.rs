//! The proxy in-process, without the kernel redirect (interception mode `none`): what
//! reaches the upstream, streaming, failure behaviour and recording, over HTTP/1.1 and
//! HTTP/2. These run without root.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use chaperone_testkit::{
    apiserver::{ApiServerConfig, TestApiServer},
    local::local_config,
    protobuf::{Msg, envelope},
};
use gateway_userspace::{
    app::{self, App},
    config::{
        Config, ImpersonationConfig, ImpersonationMode, KubeconfigSource, PolicyConfig,
        UpstreamProtocol,
    },
    masking,
    policy::Action,
    recorder::{self, RequestRecord},
    tls::{self, CertificateAuthority},
};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

const GATEWAY_TOKEN: &str = "gateway-token-1";
const POLICY: &str = r#"apiVersion: chaperone.dev/v1alpha1
kind: Policy
default: allow
rules:
  - name: no-secrets
    action: deny
    message: no secrets for agents
    verbs: ["*"]
    resources: [secrets]
  - name: big-numbers-only
    action: deny
    message: k must be a small number
    verbs: [create]
    resources: [configmaps]
    namespaces: [cel-fails]
    when: ["int(object.data.k) > 3"]
  - name: protected-stays
    action: deny
    message: protected configuration stays
    verbs: [update, patch, delete]
    resources: [configmaps]
    namespaces: [bound]
    when: ["has(oldObject.metadata.labels) && 'protected' in oldObject.metadata.labels"]
  - name: open-is-never-exposed
    action: deny
    message: an open configuration may not be exposed
    verbs: [patch]
    resources: [configmaps]
    namespaces: [bound]
    when: ["has(object.data.mode) && object.data.mode == 'open' && has(object.data.exposed)"]
  - name: mask-applied
    action: mask
    verbs: ["*"]
    resources: [configmaps, deployments]
    apiGroups: ["", apps]
    namespaces: [masked-apply]
  - name: held-for-a-person
    action: approve
    verbs: [create]
    resources: [configmaps]
    namespaces: [held]
    approval:
      approvers: {users: [alice]}
"#;

struct Harness {
    app: App,
    apiserver: TestApiServer,
    dir: tempfile::TempDir,
    ca_pem: String,
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Starts the API test server and a gateway in front of it. `upstream` overrides the
/// upstream URL (to point at nothing).
async fn start(upstream: Option<String>) -> Harness {
    start_with(upstream, ImpersonationConfig::default()).await
}

async fn start_with(upstream: Option<String>, impersonate: ImpersonationConfig) -> Harness {
    start_configured(upstream, |config| config.upstream.impersonate = impersonate).await
}

/// Like [`start`], with the gateway config edited by `edit` before it starts.
async fn start_configured(upstream: Option<String>, edit: impl FnOnce(&mut Config)) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, key) = CertificateAuthority::generate("proxy-test-ca").expect("generate CA");
    let ca_pem = ca.cert_pem().to_owned();
    write(&dir.path().join("ca.crt"), &ca_pem);
    write(&dir.path().join("ca.key"), &key);
    write(&dir.path().join("token"), GATEWAY_TOKEN);
    write(&dir.path().join("policy.yaml"), POLICY);
    let apiserver = TestApiServer::start(ApiServerConfig {
        ca: Some(Arc::new(ca)),
        tokens: vec![GATEWAY_TOKEN.to_owned(), "gateway-token-2".to_owned()],
        ..ApiServerConfig::default()
    })
    .await
    .expect("start API test server");
    let url = upstream.unwrap_or_else(|| apiserver.url());
    let mut config = local_config(dir.path(), &url).expect("config");
    edit(&mut config);
    config.policy = Some(PolicyConfig::File(dir.path().join("policy.yaml")));
    let app = app::build(config).await.expect("build the gateway");
    Harness {
        app,
        apiserver,
        dir,
        ca_pem,
    }
}

type TestClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

fn client(ca_pem: &str, http2: bool) -> TestClient {
    let roots = tls::root_store_from_pem(ca_pem, "test CA").expect("roots");
    let config = tls::client_config(roots).expect("client config");
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
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

fn request(h: &Harness, method: Method, path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(format!(
            "https://127.0.0.1:{}{path}",
            h.app.local_addr().port()
        ))
        .header("authorization", "Bearer pod-token-must-not-leak")
}

/// Sends one request with `body`, panicking with `what` if it cannot be sent.
async fn send(
    c: &TestClient,
    req: http::request::Builder,
    body: Bytes,
    what: &str,
) -> http::Response<hyper::body::Incoming> {
    let req = req
        .body(Full::new(body))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    c.request(req)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

async fn body_json(resp: http::Response<hyper::body::Incoming>) -> serde_json::Value {
    let bytes = resp
        .into_body()
        .collect()
        .await
        .expect("read body")
        .to_bytes();
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
}

async fn stop(h: Harness) -> (Vec<RequestRecord>, TestApiServer, tempfile::TempDir) {
    let stats = h.app.shutdown().await.expect("shutdown");
    let rows = recorder::read_dir(&h.dir.path().join("recordings")).expect("read recordings");
    assert_eq!(
        rows.len() as u64,
        stats.rows,
        "read back a different number of rows than written"
    );
    (rows, h.apiserver, h.dir)
}

/// The API server takes a request's `Audit-ID` header as its audit event's id. The agent's
/// never reaches it; the gateway's does, so the API server's audit log, the response the
/// agent gets and the recording all name the request alike.
#[tokio::test]
async fn the_api_server_audits_the_gateways_audit_id_not_the_agents() {
    let h = start(None).await;
    let c = client(&h.ca_pem, true);
    let resp = send(
        &c,
        request(&h, Method::GET, "/api/v1/namespaces/default/pods")
            .header("audit-id", "another-requests-id"),
        Bytes::new(),
        "GET with a forged audit id",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let returned = resp.headers()["audit-id"]
        .to_str()
        .expect("text")
        .to_owned();
    let _ = body_json(resp).await;
    let (rows, _apiserver, _dir) = stop(h).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        returned, rows[0].audit_id,
        "the API server audited another id"
    );
}

#[tokio::test]
async fn forwards_with_gateway_token_over_http1_and_http2_and_records_each_request() {
    let h = start(None).await;
    for http2 in [false, true] {
        let c = client(&h.ca_pem, http2);
        let resp = send(
            &c,
            request(&h, Method::GET, "/api/v1/namespaces/default/pods?limit=500"),
            Bytes::new(),
            "GET through the gateway",
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let version = resp.version();
        assert_eq!(
            version == http::Version::HTTP_2,
            http2,
            "negotiated {version:?}"
        );
        assert_eq!(body_json(resp).await["kind"], "PodList");
    }
    let (rows, apiserver, _dir) = stop(h).await;
    let seen = apiserver.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for r in &seen {
        assert_eq!(
            r.authorization.as_deref(),
            Some(format!("Bearer {GATEWAY_TOKEN}").as_str())
        );
    }
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(
            (
                row.verb.as_str(),
                row.object_ref.resource.as_str(),
                recorder::decision_str(row.decision),
                row.outcome
            ),
            ("list", "pods", "allow", recorder::Outcome::Forwarded)
        );
        assert_eq!(row.response_code, 200);
        assert!(row.response_bytes > 0, "{row:?}");
        assert_eq!(
            row.workload.cgroup_id, 0,
            "no kernel attribution without eBPF"
        );
    }
}

#[tokio::test]
async fn watch_events_stream_through_before_the_response_ends() {
    let h = start(None).await;
    let c = client(&h.ca_pem, true);
    let resp = send(
        &c,
        request(
            &h,
            Method::GET,
            "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=0",
        ),
        Bytes::new(),
        "open watch",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    h.apiserver
        .seed(serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "streamed", "namespace": "default"}}))
        .expect("create configmap upstream");
    let mut seen = Vec::new();
    let event = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let frame = body
                .frame()
                .await
                .expect("stream ended early")
                .expect("stream error");
            if let Some(data) = frame.data_ref() {
                seen.extend_from_slice(data);
                if let Some(end) = seen.iter().position(|b| *b == b'\n') {
                    return serde_json::from_slice::<serde_json::Value>(&seen[..end])
                        .expect("event JSON");
                }
            }
        }
    })
    .await
    .expect("no watch event arrived while the stream was open: the proxy buffers");
    assert_eq!(event["type"], "ADDED");
    assert_eq!(event["object"]["metadata"]["name"], "streamed");
    drop(body);
    let (rows, _, _dir) = stop(h).await;
    let watch = rows
        .iter()
        .find(|r| r.verb == "watch")
        .expect("watch recorded");
    assert!(watch.response_bytes > 0, "{watch:?}");
}

#[tokio::test]
async fn denied_and_impersonating_requests_never_reach_upstream() {
    let h = start(None).await;
    let c = client(&h.ca_pem, true);
    let resp = send(
        &c,
        request(&h, Method::GET, "/api/v1/namespaces/default/secrets/db"),
        Bytes::new(),
        "GET secret",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let status = body_json(resp).await;
    assert_eq!(
        (
            status["kind"].as_str(),
            status["reason"].as_str(),
            status["code"].as_u64()
        ),
        (Some("Status"), Some("Forbidden"), Some(403))
    );
    assert_eq!(
        status["message"],
        "secrets \"db\" is forbidden: denied by Chaperone policy rule \"no-secrets\": no secrets for agents"
    );

    let resp = send(
        &c,
        request(&h, Method::GET, "/api/v1/namespaces/default/pods")
            .header("Impersonate-User", "system:admin"),
        Bytes::new(),
        "GET with impersonation",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let status = body_json(resp).await;
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("impersonate-user")),
        "{status}"
    );

    let (rows, apiserver, _dir) = stop(h).await;
    assert!(
        apiserver.requests().is_empty(),
        "upstream saw {:?}",
        apiserver.requests()
    );
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter().all(|r| r.decision == Some(Action::Deny)
            && r.outcome == recorder::Outcome::Denied
            && r.response_code == 403),
        "{rows:#?}"
    );
    assert_eq!(rows[0].policy_rule.as_deref(), Some("no-secrets"));
}

#[tokio::test]
async fn unreachable_upstream_answers_503_status_and_is_recorded() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let h = start(Some(format!("https://127.0.0.1:{port}"))).await;
    let c = client(&h.ca_pem, false);
    let resp = send(
        &c,
        request(&h, Method::GET, "/api/v1/namespaces"),
        Bytes::new(),
        "request",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        resp.headers().get("retry-after").is_none(),
        "client-go would retry for ten rounds"
    );
    let status = body_json(resp).await;
    assert_eq!(status["reason"], "ServiceUnavailable");
    let (rows, _, _dir) = stop(h).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].decision, rows[0].outcome, rows[0].response_code),
        (Some(Action::Allow), recorder::Outcome::UpstreamFailed, 503)
    );
    assert!(
        rows[0].error.as_deref().is_some_and(|e| !e.is_empty()),
        "{:?}",
        rows[0]
    );
}

/// kube-rs re-reads a token file once its copy is 50 to 60 seconds old (client-go: one
/// minute), so this waits for that; `upstream::tests::a_rewritten_token_file_is_not_read_again_at_once`
/// pins the other half (not at once).
#[tokio::test]
async fn rotated_gateway_token_is_used_without_restart() {
    let h = start(None).await;
    write(&h.dir.path().join("token"), "gateway-token-2");
    let c = client(&h.ca_pem, true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(75);
    loop {
        h.apiserver.clear_requests();
        let resp = send(
            &c,
            request(&h, Method::GET, "/api/v1/namespaces"),
            Bytes::new(),
            "request",
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let auth = h.apiserver.requests().pop().and_then(|r| r.authorization);
        if auth.as_deref() == Some("Bearer gateway-token-2") {
            break;
        }
        assert_eq!(
            auth.as_deref(),
            Some(format!("Bearer {GATEWAY_TOKEN}").as_str())
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotated token was never used"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop(h).await;
}

#[tokio::test]
async fn upstream_protocol_is_http1_by_default_and_http2_when_configured() {
    for (protocol, want) in [
        (UpstreamProtocol::Http1, "HTTP/1.1"),
        (UpstreamProtocol::Http2, "HTTP/2.0"),
    ] {
        let h = start_configured(None, |config| config.upstream.protocol = protocol).await;
        let c = client(&h.ca_pem, true);
        for _ in 0..2 {
            let resp = send(
                &c,
                request(&h, Method::GET, "/api/v1/namespaces"),
                Bytes::new(),
                "request",
            )
            .await;
            assert_eq!(resp.status(), StatusCode::OK);
        }
        let (_rows, apiserver, _dir) = stop(h).await;
        let versions: Vec<String> = apiserver
            .requests()
            .into_iter()
            .map(|r| r.http_version)
            .collect();
        assert_eq!(versions, [want, want], "{protocol:?}");
    }
}

#[tokio::test]
async fn a_kubeconfig_supplies_server_ca_and_credential() {
    let h = start_configured(None, |config| {
        let u = &mut config.upstream;
        let server = u.url.take().expect("local config has a url");
        let ca = u.ca_file.take().expect("local config has a CA");
        let dir = ca.parent().expect("CA in the temp dir").to_owned();
        u.token_file = None;
        // Two contexts, the current one with an exec plugin that does not exist: the
        // configured context is the one used, and the other one's plugin is never run. The CA path is relative to the kubeconfig.
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: laptop\n\
             clusters:\n- name: real\n  cluster:\n    server: {server}\n    certificate-authority: {}\n\
             users:\n- name: gateway\n  user:\n    token: gateway-token-2\n\
             - name: me\n  user:\n    exec:\n      command: aws\n\
             contexts:\n- name: gateway\n  context:\n    cluster: real\n    user: gateway\n\
             - name: laptop\n  context:\n    cluster: real\n    user: me\n",
            ca.file_name().and_then(|n| n.to_str()).expect("CA file name"),
        );
        let path = dir.join("kubeconfig");
        write(&path, &kubeconfig);
        u.kubeconfig = Some(KubeconfigSource {
            path,
            context: Some("gateway".to_owned()),
        });
    })
    .await;
    let c = client(&h.ca_pem, true);
    let resp = send(
        &c,
        request(&h, Method::GET, "/api/v1/namespaces"),
        Bytes::new(),
        "request",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let (_rows, apiserver, _dir) = stop(h).await;
    let auth = apiserver.requests().pop().and_then(|r| r.authorization);
    assert_eq!(auth.as_deref(), Some("Bearer gateway-token-2"));
}

/// Writes a kubeconfig for the harness's API server whose user runs `plugin`, and points
/// the gateway at it.
fn exec_kubeconfig(config: &mut Config, plugin: &Path) {
    let u = &mut config.upstream;
    let server = u.url.take().expect("local config has a url");
    let ca = u.ca_file.take().expect("local config has a CA");
    u.token_file = None;
    let dir = ca.parent().expect("CA in the temp dir").to_owned();
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: gateway\n\
         clusters:\n- name: real\n  cluster:\n    server: {server}\n    certificate-authority: {}\n\
         users:\n- name: gateway\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: {}\n      interactiveMode: Never\n\
         contexts:\n- name: gateway\n  context:\n    cluster: real\n    user: gateway\n",
        ca.display(),
        plugin.display(),
    );
    let path = dir.join("exec-kubeconfig");
    write(&path, &kubeconfig);
    u.kubeconfig = Some(KubeconfigSource {
        path,
        context: None,
    });
}

/// An exec credential plugin: prints `credential.json` from `dir`, fails while `fail` exists.
fn exec_plugin(dir: &Path, token: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    exec_credential(dir, token);
    let script = dir.join("plugin.sh");
    let d = dir.display();
    write(
        &script,
        &format!(
            "#!/bin/sh\nif [ -e '{d}/fail' ]; then echo 'plugin is broken' >&2; exit 3; fi\ncat '{d}/credential.json'\n"
        ),
    );
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    script
}

/// An ExecCredential expiring in 30 s: kube-rs runs the plugin again whenever asked (it
/// refreshes a minute before expiry), so the gateway's one-second refresh sees changes.
fn exec_credential(dir: &Path, token: &str) {
    let expiry = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(30);
    write(
        &dir.join("credential.json"),
        &format!(
            "{{\"apiVersion\": \"client.authentication.k8s.io/v1\", \"kind\": \"ExecCredential\", \
             \"status\": {{\"token\": \"{token}\", \"expirationTimestamp\": \"{}\"}}}}",
            expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
        ),
    );
}

/// Sends GETs until the API server sees `want` as the credential (or the deadline passes).
async fn until_upstream_sees(h: &Harness, c: &TestClient, want: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        h.apiserver.clear_requests();
        let resp = send(
            c,
            request(h, Method::GET, "/api/v1/namespaces"),
            Bytes::new(),
            "request",
        )
        .await;
        let status = resp.status();
        let auth = h.apiserver.requests().pop().and_then(|r| r.authorization);
        if auth.as_deref() == Some(want) {
            assert_eq!(status, StatusCode::OK);
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the API server never saw {want:?} (last: {auth:?}, {status})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_exec_plugin_supplies_the_credential_and_its_failure_fails_closed() {
    let plugin_dir = tempfile::tempdir().expect("tempdir");
    let plugin = exec_plugin(plugin_dir.path(), GATEWAY_TOKEN);
    let h = start_configured(None, |config| exec_kubeconfig(config, &plugin)).await;
    let c = client(&h.ca_pem, true);
    until_upstream_sees(&h, &c, &format!("Bearer {GATEWAY_TOKEN}")).await;
    // The plugin hands out a new token: kube-rs runs it again, the next requests carry it.
    exec_credential(plugin_dir.path(), "gateway-token-2");
    until_upstream_sees(&h, &c, "Bearer gateway-token-2").await;

    // The plugin breaks: requests are answered 503 naming the cause, and none is forwarded.
    write(&plugin_dir.path().join("fail"), "");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        h.apiserver.clear_requests();
        let resp = send(
            &c,
            request(&h, Method::GET, "/api/v1/namespaces"),
            Bytes::new(),
            "request",
        )
        .await;
        if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
            assert!(
                h.apiserver.requests().is_empty(),
                "forwarded without the credential"
            );
            break body_json(resp).await;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests still forwarded with a broken plugin"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status["reason"], "ServiceUnavailable");
    let message = status["message"].as_str().expect("message");
    assert!(
        message.contains("credential")
            && message.contains("exec-kubeconfig (context 'gateway')")
            && message.contains("exit status: 3"),
        "{message}"
    );
    // Upgrades (exec, attach, port-forward) share the credential and refuse the same way.
    let http1 = client(&h.ca_pem, false);
    let resp = send(
        &http1,
        request(
            &h,
            Method::GET,
            "/api/v1/namespaces/default/pods/p/exec?command=ls&stdout=1",
        )
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-protocol", "v5.channel.k8s.io"),
        Bytes::new(),
        "upgrade",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(h.apiserver.requests().is_empty(), "upgrade forwarded bare");
    // The state shows in /readyz, a metric and /status (what `chaperone status` prints).
    let ready = wait_ready(&h, 503).await;
    assert!(
        ready.contains("credential") && ready.contains("exit status: 3"),
        "{ready}"
    );
    let (_, metrics) = admin_get(&h, "/metrics").await;
    assert!(
        metrics.contains("chaperone_upstream_credential_up 0"),
        "{metrics}"
    );
    let (_, status) = admin_get(&h, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    assert!(
        status["credential"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("exit status: 3")),
        "{status}"
    );

    // Fixed, it recovers without a restart.
    std::fs::remove_file(plugin_dir.path().join("fail")).expect("fix the plugin");
    until_upstream_sees(&h, &c, "Bearer gateway-token-2").await;
    wait_ready(&h, 200).await;
    let (_, metrics) = admin_get(&h, "/metrics").await;
    assert!(
        metrics.contains("chaperone_upstream_credential_up 1"),
        "{metrics}"
    );
    let (rows, _, _dir) = stop(h).await;
    assert!(
        rows.iter()
            .any(|r| r.outcome == recorder::Outcome::UpstreamFailed
                && r.response_code == 503
                && r.error
                    .as_deref()
                    .is_some_and(|e| e.contains("credential unavailable"))),
        "the refused requests are recorded"
    );
}

#[tokio::test]
async fn impersonation_modes_set_upstream_identity_or_refuse() {
    // Fixed: the API server's RBAC and audit see the configured user and groups.
    let fixed = ImpersonationConfig {
        mode: ImpersonationMode::Fixed,
        user: Some("agent-bot".to_owned()),
        groups: vec!["agents".to_owned(), "readers".to_owned()],
    };
    let h = start_with(None, fixed).await;
    let c = client(&h.ca_pem, true);
    let resp = send(
        &c,
        request(&h, Method::GET, "/api/v1/namespaces"),
        Bytes::new(),
        "request",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let (rows, apiserver, _dir) = stop(h).await;
    let seen = apiserver.requests();
    let mut imp = seen[0].impersonation.clone();
    imp.sort();
    assert_eq!(
        imp,
        [
            ("impersonate-group".to_owned(), "agents".to_owned()),
            ("impersonate-group".to_owned(), "readers".to_owned()),
            ("impersonate-user".to_owned(), "agent-bot".to_owned()),
        ]
    );
    assert_eq!(rows[0].impersonated_user.as_deref(), Some("agent-bot"));

    // Workload and principal modes refuse what they cannot establish instead of falling
    // back to the gateway's own identity: here the workload is unknown (no kernel origin)
    // and the pod's token cannot be verified (no issuer, no TokenReview).
    for mode in [ImpersonationMode::Workload, ImpersonationMode::Principal] {
        let h = start_with(
            None,
            ImpersonationConfig {
                mode: mode.clone(),
                ..ImpersonationConfig::default()
            },
        )
        .await;
        let c = client(&h.ca_pem, true);
        let resp = send(
            &c,
            request(&h, Method::GET, "/api/v1/namespaces"),
            Bytes::new(),
            "request",
        )
        .await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{mode:?}");
        let status = body_json(resp).await;
        assert!(
            status["message"]
                .as_str()
                .is_some_and(|m| m.contains("impersonates")),
            "{status}"
        );
        let (rows, apiserver, _dir) = stop(h).await;
        assert!(
            apiserver.requests().is_empty(),
            "{mode:?}: a request reached upstream"
        );
        assert_eq!(rows[0].decision, Some(Action::Deny));
    }
}

/// ObjectMeta the way client-go's protobuf marshaller writes it (empty fields included).
fn proto_meta(name: &str) -> Msg {
    Msg::default()
        .str(1, name)
        .str(2, "")
        .str(3, "default")
        .str(5, "")
        .str(6, "")
        .varint(7, 0)
        .msg(8, Msg::default())
}

#[tokio::test]
async fn protobuf_bodies_are_transcoded_forwarded_as_json_and_recorded() {
    let h = start(None).await;
    let c = client(&h.ca_pem, true);
    // `kubectl create configmap settings --from-literal=mode=fast` (kubectl 1.32).
    let body = envelope(
        "v1",
        "ConfigMap",
        Msg::default()
            .msg(1, proto_meta("settings"))
            .str_entry(2, "mode", "fast"),
    );
    let sent = body.len() as i64;
    let resp = send(
        &c,
        request(&h, Method::POST, "/api/v1/namespaces/default/configmaps")
            .header("content-type", "application/vnd.kubernetes.protobuf")
            .header(
                "accept",
                "application/vnd.kubernetes.protobuf, application/json",
            ),
        Bytes::from(body),
        "POST configmap",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let created = body_json(resp).await;
    assert_eq!(created["data"]["mode"], "fast", "{created}");
    assert_eq!(created["metadata"]["namespace"], "default", "{created}");

    // A Secret is denied by the harness policy; what the agent tried is still recorded,
    // with the values masked.
    let secret = envelope(
        "v1",
        "Secret",
        Msg::default()
            .msg(1, proto_meta("db"))
            .msg(2, Msg::default().str(1, "password").bytes(2, b"hunter2")),
    );
    let resp = send(
        &c,
        request(&h, Method::POST, "/api/v1/namespaces/default/secrets")
            .header("content-type", "application/vnd.kubernetes.protobuf"),
        Bytes::from(secret),
        "POST secret",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // A body that cannot be transcoded faithfully is refused, never forwarded.
    let future = envelope(
        "v1",
        "ConfigMap",
        Msg::default()
            .msg(1, proto_meta("x"))
            .str(77, "from the future"),
    );
    let resp = send(
        &c,
        request(&h, Method::POST, "/api/v1/namespaces/default/configmaps")
            .header("content-type", "application/vnd.kubernetes.protobuf"),
        Bytes::from(future),
        "POST undecodable",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let status = body_json(resp).await;
    assert_eq!(status["reason"], "UnsupportedMediaType");
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("field number 77")),
        "{status}"
    );

    // Reads a typed client makes accept protobuf first; the gateway records the response,
    // so it asks upstream for JSON (the client decodes by the response's Content-Type).
    let resp = send(
        &c,
        request(
            &h,
            Method::GET,
            "/api/v1/namespaces/default/configmaps/settings",
        )
        .header(
            "accept",
            "application/vnd.kubernetes.protobuf, application/json",
        ),
        Bytes::new(),
        "GET configmap",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/json");
    drop(body_json(resp).await);

    let (rows, apiserver, _dir) = stop(h).await;
    let requests = apiserver.requests();
    let seen: Vec<_> = requests.iter().filter(|r| r.method == "POST").collect();
    assert_eq!(
        seen.len(),
        1,
        "only the configmap reaches upstream: {seen:?}"
    );
    assert_eq!(seen[0].content_type.as_deref(), Some("application/json"));
    let get = requests
        .iter()
        .find(|r| r.method == "GET")
        .expect("the GET reached upstream");
    assert_eq!(get.accept.as_deref(), Some("application/json"));

    assert_eq!(rows.len(), 4, "{rows:#?}");
    let read = &rows[3];
    let object: serde_json::Value = serde_json::from_str(
        read.response_object
            .as_deref()
            .expect("response object recorded"),
    )
    .expect("recorded response is JSON");
    assert_eq!(object["data"]["mode"], "fast", "{object}");
    assert!(!read.response_object_truncated);
    let created: serde_json::Value = serde_json::from_str(
        rows[0]
            .response_object
            .as_deref()
            .expect("create response recorded"),
    )
    .expect("JSON");
    assert_eq!(created["metadata"]["name"], "settings");
    let configmap = &rows[0];
    assert_eq!(
        configmap.request_content_type.as_deref(),
        Some("application/vnd.kubernetes.protobuf")
    );
    assert_eq!(configmap.request_bytes, sent, "bytes the client sent");
    let object: serde_json::Value = serde_json::from_str(
        configmap
            .request_object
            .as_deref()
            .expect("configmap object recorded"),
    )
    .expect("recorded object is JSON");
    assert_eq!(
        (&object["kind"], &object["data"]["mode"]),
        (&serde_json::json!("ConfigMap"), &serde_json::json!("fast"))
    );

    let secret = &rows[1];
    assert_eq!(secret.decision, Some(Action::Deny));
    let object = secret.request_object.as_deref().expect("secret recorded");
    assert!(object.contains(masking::MASK), "{object}");
    assert!(
        !object.contains("aHVudGVyMg") && !object.contains("hunter2"),
        "secret value leaked into the recording: {object}"
    );
    assert_eq!(secret.masked_fields, 1);

    assert_eq!(
        (rows[2].decision, rows[2].outcome),
        (None, recorder::Outcome::Invalid)
    );
    assert_eq!(rows[2].response_code, 415);
    assert!(rows[2].request_object.is_none());
}

#[tokio::test]
async fn bodies_beyond_the_inspection_limit_stream_through_and_slow_bodies_time_out() {
    let h = start_configured(None, |config| {
        config.limits.max_inspected_body_bytes = 1024;
        config.limits.body_read_timeout = Duration::from_millis(300);
    })
    .await;
    let c = client(&h.ca_pem, false);
    let big = "x".repeat(64 * 1024);
    let configmap = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "big", "namespace": "default"},
        "data": {"blob": big},
    })
    .to_string();
    let resp = send(
        &c,
        request(&h, Method::POST, "/api/v1/namespaces/default/configmaps")
            .header("content-type", "application/json"),
        Bytes::from(configmap.clone()),
        "POST big configmap",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let created = body_json(resp).await;
    assert_eq!(
        created["data"]["blob"].as_str().map(str::len),
        Some(big.len())
    );

    // The same without a Content-Length (chunked): read up to the limit, then streamed.
    let (mut tx, body) = futures_channel_body();
    let sender = tokio::spawn({
        let configmap = configmap.replace("\"big\"", "\"big-chunked\"");
        async move {
            for chunk in configmap.as_bytes().chunks(4096) {
                tx.send(Bytes::copy_from_slice(chunk)).await;
            }
        }
    });
    let resp = streaming_client(&h.ca_pem)
        .request(
            request(&h, Method::POST, "/api/v1/namespaces/default/configmaps")
                .header("content-type", "application/json")
                .body(body)
                .expect("req"),
        )
        .await
        .expect("POST chunked configmap");
    sender.await.expect("sender");
    assert_eq!(resp.status(), StatusCode::CREATED);

    // A client that announces a body and then stalls gets a 408, not a hung request.
    let (tx, body) = futures_channel_body();
    let started = std::time::Instant::now();
    let resp = streaming_client(&h.ca_pem)
        .request(
            request(&h, Method::POST, "/api/v1/namespaces/default/configmaps")
                .header("content-type", "application/json")
                .body(body)
                .expect("req"),
        )
        .await
        .expect("POST stalled");
    assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(tx);

    let (rows, _apiserver, _dir) = stop(h).await;
    assert_eq!(rows.len(), 3, "{rows:#?}");
    for row in &rows[..2] {
        assert!(row.request_object_truncated, "{row:#?}");
        assert!(row.request_object.is_none());
        assert_eq!(row.response_code, 201);
        assert!(row.request_bytes >= configmap.len() as i64, "{row:#?}");
    }
    assert_eq!(rows[2].response_code, 408);
    assert_eq!(
        (rows[2].decision, rows[2].outcome),
        (None, recorder::Outcome::Invalid)
    );
}

/// A request body fed from a channel, for clients that send slowly or stall.
struct ChannelSender(tokio::sync::mpsc::Sender<Bytes>);

impl ChannelSender {
    async fn send(&mut self, data: Bytes) {
        self.0.send(data).await.expect("body receiver gone");
    }
}

type ChannelBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

fn futures_channel_body() -> (ChannelSender, ChannelBody) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|data| (Ok(hyper::body::Frame::data(data)), rx))
    });
    (
        ChannelSender(tx),
        http_body_util::StreamBody::new(stream).boxed(),
    )
}

fn streaming_client(
    ca_pem: &str,
) -> Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    ChannelBody,
> {
    let roots = tls::root_store_from_pem(ca_pem, "test CA").expect("roots");
    let config = tls::client_config(roots).expect("client config");
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

/// A GET against the admin endpoint: (status code, body).
async fn admin_get(h: &Harness, path: &str) -> (u16, String) {
    chaperone_testkit::local::admin_get(h.app.admin_addr(), path)
        .await
        .unwrap_or_else(|| panic!("the admin endpoint did not answer {path}"))
}

fn configmap(name: &str) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "default"},
            "data": {"k": "v"}
        })
        .to_string(),
    )
}

async fn create_configmap(
    h: &Harness,
    c: &TestClient,
    name: &str,
) -> (StatusCode, serde_json::Value) {
    let resp = send(
        c,
        request(h, Method::POST, "/api/v1/namespaces/default/configmaps")
            .header("content-type", "application/json"),
        configmap(name),
        "create configmap",
    )
    .await;
    (resp.status(), body_json(resp).await)
}

/// Waits (up to 10 s) until the admin endpoint's `/readyz` answers `code`.
async fn wait_ready(h: &Harness, code: u16) -> String {
    for _ in 0..200 {
        let (got, body) = admin_get(h, "/readyz").await;
        if got == code {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("/readyz never answered {code}");
}

/// Breaks the recording directory: the next file the recorder opens fails. Returns the
/// function that repairs it.
fn break_recordings(h: &Harness) -> impl FnOnce() {
    let table = h.dir.path().join("recordings/table=requests");
    let aside = h.dir.path().join("recordings-aside");
    std::fs::rename(&table, &aside).expect("move the table away");
    write(&table, "not a directory");
    move || {
        std::fs::remove_file(&table).expect("remove the blocker");
        std::fs::rename(&aside, &table).expect("restore the table");
    }
}

/// Fail closed: while rows cannot be written, nothing that must be recorded is forwarded;
/// the state shows in /readyz, /metrics and /status; recording recovers by itself.
#[tokio::test]
async fn while_recording_is_down_requests_are_refused_and_it_recovers() {
    let h = start_configured(None, |c| {
        c.recording.max_file_age = Duration::from_millis(100);
    })
    .await;
    let c = client(&h.ca_pem, false);
    let (code, _) = create_configmap(&h, &c, "before").await;
    assert_eq!(code, StatusCode::CREATED);
    assert_eq!(admin_get(&h, "/readyz").await, (200, "ok\n".to_owned()));
    // Its row reaches a published file (files rotate every 100 ms here).
    for _ in 0..200 {
        if !recorder::list_files(&h.dir.path().join("recordings"))
            .unwrap_or_default()
            .is_empty()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let repair = break_recordings(&h);
    // The next row's file cannot be opened: recording goes down.
    let (code, _) = create_configmap(&h, &c, "lost-row").await;
    assert_eq!(
        code,
        StatusCode::CREATED,
        "forwarded before the failure was known"
    );
    let reason = wait_ready(&h, 503).await;
    assert!(
        reason.contains("recording is down") && reason.contains("Not a directory"),
        "{reason}"
    );

    let (code, status) = create_configmap(&h, &c, "refused").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{status}");
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "ServiceUnavailable");
    let message = status["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("recording is down") && message.contains("Not a directory"),
        "{message}"
    );
    assert!(
        h.apiserver
            .object("configmaps", "default", "refused")
            .is_none(),
        "a mutation passed unrecorded"
    );
    // Reads are refused too by default (recording.readsWhileDown: refuse).
    let read = send(
        &c,
        request(&h, Method::GET, "/api/v1/namespaces/default/configmaps"),
        Bytes::new(),
        "list",
    )
    .await;
    assert_eq!(read.status(), StatusCode::SERVICE_UNAVAILABLE);
    // A write a content rule judges is refused before the rule reads anything: no dry run
    // or read of the stored object reaches the API server for a request refused anyway.
    let judged = send(
        &c,
        request(&h, Method::PATCH, "/api/v1/namespaces/bound/configmaps/cm")
            .header("content-type", "application/merge-patch+json"),
        Bytes::from_static(br#"{"data": {"k": "1"}}"#),
        "patch judged by content",
    )
    .await;
    assert_eq!(judged.status(), StatusCode::SERVICE_UNAVAILABLE);
    let asked: Vec<_> = h
        .apiserver
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query.contains("/namespaces/bound/"))
        .collect();
    assert!(
        asked.is_empty(),
        "the content rule asked the API server: {asked:?}"
    );
    // Nor is anyone asked to approve what could not be recorded once approved (this
    // gateway has no approvals configured: a held request would be refused with 403).
    let held = send(
        &c,
        request(&h, Method::POST, "/api/v1/namespaces/held/configmaps")
            .header("content-type", "application/json"),
        configmap("held"),
        "create held for approval",
    )
    .await;
    assert_eq!(held.status(), StatusCode::SERVICE_UNAVAILABLE);

    let (_, metrics) = admin_get(&h, "/metrics").await;
    assert!(metrics.contains("chaperone_recording_up 0"), "{metrics}");
    assert!(
        metrics.contains("chaperone_recording_outages_total 1"),
        "{metrics}"
    );
    let (_, status) = admin_get(&h, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    assert_eq!(status["recording"]["up"], false, "{status}");
    let rules = POLICY
        .lines()
        .filter(|l| l.trim_start().starts_with("- name: "))
        .count();
    assert_eq!(status["policy"]["rules"], rules, "{status}");
    // `chaperone status` says so, and exits 1 for scripts and probes.
    // Off the test's runtime thread, which also serves the admin endpoint.
    let admin = h.app.admin_addr().to_string();
    let cli_status = move || {
        let admin = admin.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_chaperone"))
                    .args(["status", "--admin", &admin])
                    .output()
                    .expect("run chaperone status")
            })
            .await
            .expect("join")
        }
    };
    let out = cli_status().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("recording: DOWN"), "{stdout}");

    repair();
    wait_ready(&h, 200).await;
    let out = cli_status().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("recording: up"), "{stdout}");
    // The serving certificate and its CA, with their ends (the test CA has a year).
    assert!(
        stdout.contains("tls:       serving certificate until") && !stdout.contains("CA EXPIRES"),
        "{stdout}"
    );
    let (_, metrics) = admin_get(&h, "/metrics").await;
    let expiry = |certificate: &str| -> u64 {
        let prefix = format!(
            "chaperone_tls_certificate_expiry_timestamp_seconds{{certificate=\"{certificate}\"}} "
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in {metrics}"))
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(expiry("serving") > now + 80 * 24 * 3600, "{metrics}");
    assert!(expiry("ca") >= expiry("serving"), "{metrics}");
    let (_, status) = admin_get(&h, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    assert!(status["tls"]["ca_expires"].is_string(), "{status}");
    // The forwarded "lost-row" and the four refusals: each logged with its audit id.
    assert!(
        metrics.contains("chaperone_recording_rows_lost_total 5"),
        "{metrics}"
    );
    let (code, _) = create_configmap(&h, &c, "after").await;
    assert_eq!(code, StatusCode::CREATED);
    let (rows, apiserver, _dir) = stop(h).await;
    let created: Vec<String> = rows
        .iter()
        .filter(|r| r.verb == "create" && r.response_code == 201)
        .filter_map(|r| r.request_object.as_deref())
        .filter_map(|o| serde_json::from_str::<serde_json::Value>(o).ok())
        .map(|o| {
            o["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    // "lost-row" was forwarded before the failure showed and its row is lost (logged with
    // its audit id); the write-ahead log (recording evidence issue) closes that window.
    assert_eq!(created, ["before", "after"]);

    assert!(apiserver.object("configmaps", "default", "after").is_some());
}

#[tokio::test]
async fn reads_may_pass_while_recording_is_down_when_configured() {
    let h = start_configured(None, |c| {
        c.recording.max_file_age = Duration::from_millis(100);
        c.recording.reads_while_down = gateway_userspace::config::ReadsWhileDown::Allow;
    })
    .await;
    let c = client(&h.ca_pem, false);
    let repair = break_recordings(&h);
    let (code, _) = create_configmap(&h, &c, "trigger").await;
    assert_eq!(code, StatusCode::CREATED);
    wait_ready(&h, 503).await;
    let read = send(
        &c,
        request(&h, Method::GET, "/api/v1/namespaces/default/configmaps"),
        Bytes::new(),
        "list",
    )
    .await;
    assert_eq!(read.status(), StatusCode::OK);
    let (code, _) = create_configmap(&h, &c, "refused").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    repair();
    wait_ready(&h, 200).await;
    let _ = stop(h).await;
}

/// A `when:` condition that fails at run time (here `int()` of a word) denies the request
/// with the reason, fails closed (nothing reaches the API server), is recorded as a
/// denial and is counted in `chaperone_policy_condition_failures_total`; one that
/// evaluates is not counted.
#[tokio::test]
async fn a_condition_that_fails_at_run_time_denies_and_is_counted() {
    let h = start(None).await;
    let c = client(&h.ca_pem, true);
    let create = async |k: &str| {
        let body = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("k-{k}"), "namespace": "cel-fails"}, "data": {"k": k}});
        let resp = send(
            &c,
            request(&h, Method::POST, "/api/v1/namespaces/cel-fails/configmaps")
                .header("content-type", "application/json"),
            Bytes::from(body.to_string()),
            "create configmap",
        )
        .await;
        (resp.status(), body_json(resp).await)
    };
    let failures = async || {
        let (_, metrics) = admin_get(&h, "/metrics").await;
        metrics
            .lines()
            .find(|l| l.starts_with("chaperone_policy_condition_failures_total"))
            .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no condition failure counter in {metrics}"))
    };
    assert_eq!(failures().await, 0);

    let (code, status) = create("many").await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{status}");
    let message = status["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("big-numbers-only") && message.contains("int(object.data.k) > 3"),
        "{status}"
    );
    assert_eq!(failures().await, 1);

    // Evaluated (true): the rule's own denial, not a failure.
    let (code, status) = create("7").await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{status}");
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("k must be a small number")),
        "{status}"
    );
    assert_eq!(failures().await, 1);

    let (rows, apiserver, _dir) = stop(h).await;
    assert!(
        apiserver
            .requests()
            .iter()
            .all(|r| !r.path_and_query.contains("cel-fails")),
        "a denied create reached the API server"
    );
    let denied: Vec<_> = rows
        .iter()
        .filter(|r| r.object_ref.namespace == "cel-fails")
        .collect();
    assert_eq!(denied.len(), 2);
    assert!(
        denied
            .iter()
            .all(|r| r.policy_rule.as_deref() == Some("big-numbers-only"))
    );
}

/// An upgrade request (WebSocket or SPDY) carries no body: one that does would reach a
/// proxied service uninspected and unrecorded, so it is refused before anything is sent.
#[tokio::test]
async fn an_upgrade_request_with_a_body_is_refused() {
    let h = start(None).await;
    let http1 = client(&h.ca_pem, false);
    let resp = send(
        &http1,
        request(
            &h,
            Method::POST,
            "/api/v1/namespaces/default/services/admin/proxy/reset",
        )
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("content-type", "application/json"),
        Bytes::from_static(br#"{"drop":"everything"}"#),
        "upgrade with a body",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let status = body_json(resp).await;
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("must not carry a body")),
        "{status}"
    );
    assert!(h.apiserver.requests().is_empty(), "forwarded");
    let (rows, _, _dir) = stop(h).await;
    assert!(
        rows.iter()
            .any(|r| r.outcome == recorder::Outcome::Invalid && r.response_code == 400),
        "the refusal is recorded"
    );
}

/// A write judged by the stored object goes bound to the version the policy read: another
/// write that lands between the gateway's read and the API server's turns the request
/// into a 409 Conflict, instead of a change applied to an object no decision covered.
#[tokio::test]
async fn writes_judged_by_the_stored_object_apply_only_to_the_version_read() {
    use serde_json::json;
    let h = start(None).await;
    let c = client(&h.ca_pem, true);
    let api = &h.apiserver;
    let cm = |name: &str, labels: serde_json::Value, data: serde_json::Value| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "bound", "labels": labels}, "data": data})
    };
    let stored = |name: &str| api.object("configmaps", "bound", name);
    let real = |method: &'static str, name: &str| {
        let path = format!("/api/v1/namespaces/bound/configmaps/{name}");
        move |r: &chaperone_testkit::apiserver::SeenRequest| {
            r.method == method
                && r.path_and_query.starts_with(&path)
                && !r.path_and_query.contains("dryRun")
        }
    };
    let call = async |method: Method, name: &str, content_type: &str, body: String| {
        let mut req = request(
            &h,
            method,
            &format!("/api/v1/namespaces/bound/configmaps/{name}"),
        );
        if !content_type.is_empty() {
            req = req.header("content-type", content_type);
        }
        let resp = send(&c, req, Bytes::from(body), "write").await;
        (resp.status(), body_json(resp).await)
    };

    // A delete judged on an unprotected object; the label lands just before the delete.
    let doomed = api
        .seed(cm("doomed", json!({}), json!({"k": "v"})))
        .expect("seed");
    let mut protected = doomed.clone();
    protected["metadata"]["labels"] = json!({"protected": "yes"});
    api.seed_on(real("DELETE", "doomed"), protected);
    let (code, status) = call(Method::DELETE, "doomed", "", String::new()).await;
    assert_eq!(code, StatusCode::CONFLICT, "{status}");
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("Precondition failed: ResourceVersion")),
        "the API server's own precondition refused it: {status}"
    );
    let kept = stored("doomed").expect("the protected object is still there");
    assert_eq!(kept["metadata"]["labels"]["protected"], "yes");
    // Judged again, it is protected now.
    let (code, status) = call(Method::DELETE, "doomed", "", String::new()).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{status}");

    // Patches judged by their dry run; `mode: open` lands before the real patch.
    let closed = api
        .seed(cm("cfg", json!({}), json!({"mode": "closed"})))
        .expect("seed");
    for (content_type, patch) in [
        (
            "application/merge-patch+json",
            json!({"data": {"exposed": "yes"}}),
        ),
        (
            "application/json-patch+json",
            json!([{"op": "add", "path": "/data/exposed", "value": "yes"}]),
        ),
        (
            "application/strategic-merge-patch+json",
            json!({"data": {"exposed": "yes"}}),
        ),
    ] {
        let mut reset = closed.clone();
        reset["metadata"]
            .as_object_mut()
            .expect("metadata")
            .remove("resourceVersion");
        api.seed(reset).expect("reset");
        let mut open = stored("cfg").expect("cfg");
        open["data"]["mode"] = json!("open");
        api.seed_on(real("PATCH", "cfg"), open);
        let (code, status) = call(Method::PATCH, "cfg", content_type, patch.to_string()).await;
        assert_eq!(code, StatusCode::CONFLICT, "{content_type}: {status}");
        let message = status["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("has been modified") && !message.contains("chaperone"),
            "the API server's own precondition refused it: {status}"
        );
        let now = stored("cfg").expect("cfg");
        assert_eq!(
            now["data"],
            json!({"mode": "open"}),
            "{content_type}: {now}"
        );
    }

    // An update judged by oldObject; the label lands before the real update.
    let mut protect = stored("cfg").expect("cfg");
    protect["metadata"]["labels"] = json!({"protected": "yes"});
    api.seed_on(real("PUT", "cfg"), protect);
    let (code, status) = call(
        Method::PUT,
        "cfg",
        "application/json",
        cm("cfg", json!({}), json!({"mode": "replaced"})).to_string(),
    )
    .await;
    assert_eq!(code, StatusCode::CONFLICT, "{status}");
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("has been modified") && !m.contains("chaperone")),
        "the API server's own precondition refused it: {status}"
    );
    assert_eq!(stored("cfg").expect("cfg")["data"]["mode"], "open");
    let mut unprotect = stored("cfg").expect("cfg");
    unprotect["metadata"]["labels"] = json!({});
    api.seed(unprotect).expect("unprotect");

    // An apply judged as a change of one object, which is deleted before the real apply:
    // unbound, the apply would create a new object from its body alone.
    api.delete_on(real("PATCH", "cfg"), "configmaps", "bound", "cfg");
    let (code, status) = call(
        Method::PATCH,
        "cfg?fieldManager=agent&force=true",
        "application/apply-patch+yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cfg\n  namespace: bound\ndata:\n  applied: \"yes\"\n".to_owned(),
    )
    .await;
    assert_eq!(code, StatusCode::CONFLICT, "{status}");
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("uid mismatch")),
        "{status}"
    );
    assert!(
        stored("cfg").is_none(),
        "the apply created the deleted object again"
    );
    api.seed(cm("cfg", json!({}), json!({"mode": "open"})))
        .expect("seed");

    // A bodiless delete keeps its query's options in the body it gains: still a dry run.
    api.seed(cm("kept", json!({}), json!({}))).expect("seed");
    let (code, status) = call(Method::DELETE, "kept?dryRun=All", "", String::new()).await;
    assert_eq!(code, StatusCode::OK, "{status}");
    assert!(
        stored("kept").is_some(),
        "a dry-run delete deleted the object"
    );

    // Without a race the same requests go through, bound or not.
    let (code, status) = call(
        Method::PATCH,
        "cfg",
        "application/json-patch+json",
        json!([{"op": "add", "path": "/data/note", "value": "n"}]).to_string(),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{status}");
    assert_eq!(stored("cfg").expect("cfg")["data"]["note"], "n");
    let (code, status) = call(
        Method::PUT,
        "cfg",
        "application/json",
        cm("cfg", json!({}), json!({"mode": "closed"})).to_string(),
    )
    .await;
    assert_eq!(
        code,
        StatusCode::OK,
        "an update sent without a version: {status}"
    );
    api.seed(cm("plain", json!({}), json!({}))).expect("seed");
    let (code, status) = call(Method::DELETE, "plain", "", String::new()).await;
    assert_eq!(code, StatusCode::OK, "{status}");
    assert!(stored("plain").is_none());

    // Under masking, a server-side apply must be forced.
    api.seed(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "masked-apply"}}),
    )
    .expect("seed");
    let apply = async |query: &str| {
        let resp = send(
            &c,
            request(
                &h,
                Method::PATCH,
                &format!("/api/v1/namespaces/masked-apply/configmaps/applied?{query}"),
            )
            .header("content-type", "application/apply-patch+yaml"),
            Bytes::from(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\ndata:\n  k: guess\n",
            ),
            "apply",
        )
        .await;
        (resp.status(), body_json(resp).await)
    };
    let (code, status) = apply("fieldManager=agent&force=false").await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{status}");
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("--force-conflicts")),
        "{status}"
    );
    assert!(
        api.requests()
            .iter()
            .all(|r| !r.path_and_query.contains("masked-apply")),
        "an unforced apply under masking reached the API server"
    );
    let (code, status) = apply("fieldManager=agent&force=true").await;
    assert!(code.is_success(), "{code}: {status}");
    // A masked dry-run write's answer has no generation (it would tell whether the write
    // changes the spec) and no managedFields.
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    spec:\n      containers:\n      - name: web\n        image: nginx\n        env:\n        - {name: PASSWORD, value: guess}\n";
    let resp = send(
        &c,
        request(
            &h,
            Method::PATCH,
            "/apis/apps/v1/namespaces/masked-apply/deployments/web?fieldManager=agent&force=true&dryRun=All",
        )
        .header("content-type", "application/apply-patch+yaml"),
        Bytes::from(deployment),
        "dry-run apply",
    )
    .await;
    assert!(resp.status().is_success(), "{}", resp.status());
    let answer = body_json(resp).await;
    assert_eq!(answer["kind"], "Deployment", "{answer}");
    assert!(answer["metadata"].get("generation").is_none(), "{answer}");
    assert!(
        answer["metadata"].get("managedFields").is_none(),
        "{answer}"
    );

    let (rows, apiserver, _dir) = stop(h).await;
    // The dry runs and reads happened, and the writes went bound.
    let seen = apiserver.requests();
    assert!(
        seen.iter()
            .any(|r| r.method == "PATCH" && r.path_and_query.ends_with("cfg?dryRun=All")),
        "{seen:?}"
    );
    let bound: Vec<_> = rows
        .iter()
        .filter(|r| r.object_ref.namespace == "bound" && r.object_ref.name == "cfg")
        .collect();
    let refused = bound.iter().filter(|r| r.response_code == 409).count();
    assert_eq!(refused, 5, "three patches, an update and an apply raced");
    let note = bound
        .iter()
        .find(|r| {
            r.request_object
                .as_deref()
                .is_some_and(|o| o.contains("/data/note"))
        })
        .expect("the JSON patch's row");
    assert!(
        note.request_object
            .as_deref()
            .is_some_and(|o| o.contains("/metadata/resourceVersion")),
        "the row records the request as sent: {:?}",
        note.request_object
    );
    let masked_apply: Vec<_> = rows
        .iter()
        .filter(|r| r.object_ref.namespace == "masked-apply")
        .collect();
    assert_eq!(masked_apply.len(), 3);
    assert_eq!(masked_apply[0].decision, Some(Action::Deny));
}

/// Fail closed: a token the gateway cannot check now (TokenReview refused or out of reach)
/// is not decided as an invalid token, which rules for its principal would not match.
#[tokio::test]
async fn a_token_that_cannot_be_checked_now_is_refused_not_decided() {
    let h = start_configured(None, |c| c.identity.token_review = true).await;
    let c = client(&h.ca_pem, false);
    let list = |h: &Harness| request(h, Method::GET, "/api/v1/namespaces/default/configmaps");
    // Every review while `down` (the client behind the reviewer retries some).
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    for _ in 0..10 {
        let down = down.clone();
        h.apiserver.refuse_on(
            move |r| {
                down.load(std::sync::atomic::Ordering::SeqCst)
                    && r.path_and_query.contains("/tokenreviews")
            },
            gateway_userspace::status::Status::service_unavailable("etcd is overloaded", 1),
        );
    }
    let resp = send(&c, list(&h), Bytes::new(), "list").await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let status = body_json(resp).await;
    let message = status["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("cannot be verified now") && message.contains("TokenReview"),
        "{status}"
    );
    // Reviews work again: the token is checked (the API server does not know it: invalid),
    // and the policy decides (default allow).
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    let resp = send(&c, list(&h), Bytes::new(), "list").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let (rows, apiserver, _dir) = stop(h).await;
    let listed: Vec<_> = apiserver
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query.contains("/configmaps"))
        .collect();
    assert_eq!(
        listed.len(),
        1,
        "only the second list was forwarded: {listed:?}"
    );
    assert_eq!(rows.len(), 2, "both are recorded: {rows:?}");
    assert_eq!(rows[0].response_code, 503);
}

/// Fail closed: an answer the policy masks that is not JSON (text from an aggregated API or
/// an error page) cannot be read, so it does not pass.
#[tokio::test]
async fn a_masked_answer_that_is_not_json_is_refused() {
    let h = start(None).await;
    let c = client(&h.ca_pem, false);
    let path = "/api/v1/namespaces/masked-apply/configmaps/settings";
    h.apiserver.answer_on(
        move |r| r.path_and_query.starts_with(path),
        StatusCode::OK,
        "text/plain; charset=utf-8",
        "password=hunter2\n",
    );
    let resp = send(&c, request(&h, Method::GET, path), Bytes::new(), "get").await;
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let text =
        String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(
        text.contains("text/plain") && text.contains("not JSON"),
        "{text}"
    );
    let (_, metrics) = admin_get(&h, "/metrics").await;
    assert!(
        metrics.contains("chaperone_masking_failures_total 1"),
        "{metrics}"
    );
}
