//! The approvals API against the API test server: authentication (TokenReview),
//! authorization (SubjectAccessReview for `approve`, the request's approvers list), no
//! self-approval, no decisions from intercepted pods, 409 for decided requests and racing
//! approvers, sealed status writes, recorded decisions, and the `chaperone` CLI (also as
//! the `kubectl chaperone` plugin found by real kubectl) end to end.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use chaperone_testkit::{
    apiserver::{ApiServerConfig, Authorizer, Denial, ResourceMatch, TestApiServer, UserInfo},
    local,
};
use gateway_userspace::{
    app::{self, App},
    approval::{
        ApprovalConfig,
        api::BASE_PATH,
        client::Connection,
        config::ApprovalApiConfig,
        resource::{
            AccessRequest, AccessRequestSpec, Approvers, Grant, Phase, Requester, WorkloadRef,
        },
        seal::{SPEC_SEAL_ANNOTATION, SealKey},
    },
    recorder,
    tls::CertificateAuthority,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, CustomResourceExt as _, api::PostParams};

const NS: &str = "chaperone-system";
const GATEWAY_TOKEN: &str = "gateway-token";
const AGENT_SA: &str = "system:serviceaccount:agents:cursor";

fn user(token: &str) -> (&'static str, UserInfo) {
    match token {
        // `approvers` stands for the group the chaperone-approver ClusterRole is bound to.
        "alice" => ("alice", UserInfo::new("alice", ["sre", "approvers"])),
        "bob" => ("bob", UserInfo::new("bob", ["sre", "approvers"])),
        "carol" => ("carol", UserInfo::new("carol", ["dev", "approvers"])),
        // In the rule's approver group, but without the RBAC binding.
        "mallory" => ("mallory", UserInfo::new("mallory", ["sre"])),
        // The agent's service account, mistakenly bound too.
        _ => (
            "agent",
            UserInfo::new(AGENT_SA, ["system:serviceaccounts", "approvers"]),
        ),
    }
}

struct Harness {
    apiserver: TestApiServer,
    app: App,
    dir: tempfile::TempDir,
    key: SealKey,
    admin: kube::Client,
}

impl Harness {
    async fn start() -> Self {
        Self::start_idle(gateway_userspace::approval::config::DEFAULT_API_IDLE_TIMEOUT).await
    }

    /// [`Harness::start`] with `approval.api.idleTimeout` set to `idle_timeout`.
    async fn start_idle(idle_timeout: std::time::Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (ca, ca_key) = CertificateAuthority::generate("approvals-test-ca").unwrap();
        std::fs::write(dir.path().join(local::CA_CERT), ca.cert_pem()).unwrap();
        std::fs::write(dir.path().join(local::CA_KEY), &ca_key).unwrap();
        std::fs::write(dir.path().join(local::TOKEN), GATEWAY_TOKEN).unwrap();
        std::fs::write(dir.path().join("seal.key"), [7u8; 32]).unwrap();
        let mut config = ApiServerConfig {
            ca: Some(Arc::new(ca)),
            tokens: vec![GATEWAY_TOKEN.to_owned()],
            ..ApiServerConfig::default()
        }
        // The role table: `approve` on AccessRequests is bound to group `approvers` only.
        .with_authorizer(
            Authorizer::allow_all().deny(
                Denial::only_group(
                    "approvers",
                    "approve",
                    ResourceMatch::new("accessrequests").in_api_group("chaperone.dev"),
                )
                .because("no RBAC policy matched"),
            ),
        );
        for token in ["alice", "bob", "carol", "mallory", "agent"] {
            config = config.with_token_user(token, user(token).1);
        }
        let apiserver = TestApiServer::start(config).await.unwrap();
        apiserver
            .seed(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}))
            .unwrap();
        let mut cfg = local::local_config(dir.path(), &apiserver.url()).unwrap();
        cfg.approval = Some(ApprovalConfig {
            namespace: NS.to_owned(),
            seal_key_file: dir.path().join("seal.key"),
            api: Some(ApprovalApiConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                cert_file: None,
                key_file: None,
                server_names: vec!["localhost".to_owned()],
                server_ips: vec!["127.0.0.1".parse().unwrap()],
                idle_timeout,
            }),
            notify: Default::default(),
            max_pending_per_workload: 10,
            max_waiting_per_workload: 32,
            retention: gateway_userspace::approval::config::DEFAULT_RETENTION,
        });
        let app = app::build(cfg).await.unwrap();
        let admin = client_for(dir.path(), &apiserver.url(), GATEWAY_TOKEN).await;
        let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
        crds.create(&PostParams::default(), &AccessRequest::crd())
            .await
            .unwrap();
        Self {
            apiserver,
            app,
            dir,
            key: SealKey::new(vec![7; 32]).unwrap(),
            admin,
        }
    }

    fn approvals_url(&self) -> String {
        format!(
            "https://127.0.0.1:{}",
            self.app.approvals_addr().unwrap().port()
        )
    }

    /// A kubeconfig for `token` naming the API test server, with the approvals API in the
    /// cluster's `chaperone.dev/approvals` extension (the CLI's default source).
    fn kubeconfig(&self, token: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{token}.kubeconfig"));
        let ca = self.dir.path().join(local::CA_CERT);
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n    extensions:\n    - name: chaperone.dev/approvals\n      extension:\n        server: {approvals}\n\
                 users:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: u\ncurrent-context: test\n",
                server = self.apiserver.url(),
                ca = ca.display(),
                approvals = self.approvals_url(),
            ),
        )
        .unwrap();
        path
    }

    async fn approver(&self, token: &str) -> kube::Client {
        Connection {
            kubeconfig: Some(self.kubeconfig(token)),
            ..Connection::default()
        }
        .client()
        .await
        .unwrap()
    }

    /// Creates a pending AccessRequest from the agent, approvable by group `sre` and by
    /// the agent's own service account (to show self-approval is still refused).
    async fn pending(&self, name: &str, grant: Option<&str>) -> AccessRequest {
        let now = jiff::Timestamp::now();
        let mut r = AccessRequest::new(
            name,
            AccessRequestSpec {
                requester: Requester {
                    workload: WorkloadRef {
                        namespace: "agents".into(),
                        pod: "cursor-agent-0".into(),
                        service_account: Some("cursor".into()),
                        uid: None,
                    },
                    principal: Some(AGENT_SA.into()),
                },
                request: gateway_userspace::approval::resource::RequestedAction {
                    verb: "patch".into(),
                    resource: "apps/deployments".into(),
                    subresource: Some("scale".into()),
                    namespace: Some("prod".into()),
                    name: Some("web".into()),
                    path: "/apis/apps/v1/namespaces/prod/deployments/web/scale".into(),
                    summary: "scale prod/web to 0 replicas".into(),
                },
                fingerprint: format!("fp-{name}"),
                rule: "scale-prod".into(),
                approvers: Approvers {
                    groups: vec!["sre".into()],
                    users: vec![AGENT_SA.into()],
                },
                grant: Grant {
                    duration: grant.map(str::to_owned),
                    ..Default::default()
                },
                node: "test-node".into(),
                created_at: now.to_string(),
                expires_at: (now + jiff::SignedDuration::from_mins(5)).to_string(),
            },
        );
        r.metadata.namespace = Some(NS.into());
        // As a gateway creates it: its spec sealed.
        r.metadata.annotations = Some(
            [(
                SPEC_SEAL_ANNOTATION.to_owned(),
                self.key.seal_spec(&r).unwrap(),
            )]
            .into(),
        );
        let api: Api<AccessRequest> = Api::namespaced(self.admin.clone(), NS);
        api.create(&PostParams::default(), &r).await.unwrap()
    }

    async fn stored(&self, name: &str) -> AccessRequest {
        let api: Api<AccessRequest> = Api::namespaced(self.admin.clone(), NS);
        api.get(name).await.unwrap()
    }
}

async fn client_for(dir: &std::path::Path, server: &str, token: &str) -> kube::Client {
    let kubeconfig = dir.join("admin.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: t\n  context: {{cluster: t, user: u}}\ncurrent-context: t\n",
            dir.join(local::CA_CERT).display()
        ),
    )
    .unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    // As `chaperone approve` builds it: a decision is not retried behind the user's back.
    let mut config = config;
    config.default_retry = false;
    kube::Client::try_from(config).unwrap()
}

/// POSTs a decision; the status code and the body (an AccessRequest or a Status).
async fn post(
    client: &kube::Client,
    name: &str,
    action: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let req = http::Request::post(format!("{BASE_PATH}/{name}/{action}"))
        .header("content-type", "application/json")
        .body(body.as_bytes().to_vec())
        .unwrap();
    match client.request_text(req).await {
        Ok(text) => (200, serde_json::from_str(&text).unwrap()),
        Err(kube::Error::Api(s)) => (s.code, serde_json::to_value(&*s).unwrap()),
        Err(e) => panic!("{action} {name}: {e}"),
    }
}

fn message(v: &serde_json::Value) -> &str {
    v["message"].as_str().unwrap_or("")
}

#[tokio::test]
async fn only_authorized_approvers_other_than_the_requester_decide() {
    let h = Harness::start().await;
    h.pending("ar-1", Some("15m")).await;

    // RBAC: mallory is in group sre but has no `approve` permission.
    let (code, body) = post(&h.approver("mallory").await, "ar-1", "approve", "{}").await;
    assert_eq!(code, 403, "{body}");
    assert!(
        message(&body).contains(
            "User \"mallory\" cannot approve resource \"accessrequests\" in API group \"chaperone.dev\" in the namespace \"chaperone-system\""
        ),
        "{body}"
    );
    assert!(message(&body).contains("no RBAC policy matched"), "{body}");
    // The rule's approvers: carol may approve by RBAC but is not listed.
    let (code, body) = post(&h.approver("carol").await, "ar-1", "approve", "{}").await;
    assert_eq!(code, 403, "{body}");
    assert!(
        message(&body).contains("not among the request's approvers"),
        "{body}"
    );
    // The agent's own service account is listed, and still may not approve itself.
    let (code, body) = post(&h.approver("agent").await, "ar-1", "approve", "{}").await;
    assert_eq!(code, 403, "{body}");
    assert!(message(&body).contains("its own request"), "{body}");
    // A token the API server does not know.
    let (code, body) = post(
        &h.approver("nobody-knows-this").await,
        "ar-1",
        "approve",
        "{}",
    )
    .await;
    assert_eq!(code, 401, "{body}");
    assert_eq!(
        h.stored("ar-1")
            .await
            .status
            .map(|s| s.phase)
            .unwrap_or_default(),
        Phase::Pending
    );

    // alice decides; the status is sealed and verifies with the gateways' key.
    let (code, body) = post(
        &h.approver("alice").await,
        "ar-1",
        "approve",
        r#"{"for": "10m", "comment": "ok for the rollout"}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let stored = h.stored("ar-1").await;
    let status = stored.status.clone().unwrap();
    assert_eq!(status.phase, Phase::Approved);
    assert_eq!(status.decided_by.as_deref(), Some("alice"));
    assert_eq!(status.comment.as_deref(), Some("ok for the rollout"));
    assert!(status.grant_until.is_some());
    assert_eq!(h.key.verify(&stored, &status), Ok(()));
    assert!(
        SealKey::new(vec![8; 32])
            .unwrap()
            .verify(&stored, &status)
            .is_err(),
        "another key must not verify"
    );

    // Decided once: bob's later denial is a conflict.
    let (code, body) = post(
        &h.approver("bob").await,
        "ar-1",
        "deny",
        r#"{"comment":"no"}"#,
    )
    .await;
    assert_eq!(code, 409, "{body}");
    assert!(
        message(&body).contains("already Approved (by alice"),
        "{body}"
    );

    // A `for` longer than the rule's grant.
    h.pending("ar-2", Some("15m")).await;
    let (code, body) = post(
        &h.approver("bob").await,
        "ar-2",
        "approve",
        r#"{"for":"2h"}"#,
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        message(&body).contains("longer than the rule grants"),
        "{body}"
    );

    // Counted by verb and result.
    let exposition = h.app.metrics().encode();
    for line in [
        "chaperone_approval_decisions_total{verb=\"approve\",result=\"written\"} 1",
        "chaperone_approval_decisions_total{verb=\"deny\",result=\"refused\"} 1",
    ] {
        assert!(exposition.contains(line), "{line} missing in {exposition}");
    }

    // Every attempt is recorded: who, from where, what became of it.
    let dir = h.app.recording_dir().to_owned();
    drop(h.admin);
    h.app.shutdown().await.unwrap();
    let rows = recorder::read_dir(&dir).unwrap();
    let decisions: Vec<_> = rows
        .iter()
        .filter(|r| r.object_ref.resource == "accessrequests")
        .collect();
    assert!(decisions.len() >= 6, "{decisions:#?}");
    let approved = decisions
        .iter()
        .find(|r| r.principal.subject.as_deref() == Some("alice"))
        .expect("alice's decision recorded");
    assert_eq!(approved.verb.as_str(), "approve");
    assert_eq!(approved.response_code, 200);
    assert!(
        approved.source_addr.starts_with("127.0.0.1:"),
        "{}",
        approved.source_addr
    );
    assert!(
        approved
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("approved by alice")
    );
    let refused = decisions
        .iter()
        .find(|r| r.principal.subject.as_deref() == Some("mallory"))
        .expect("mallory's attempt recorded");
    assert_eq!(refused.response_code, 403);
    let denied = decisions
        .iter()
        .find(|r| r.principal.subject.as_deref() == Some("bob") && r.verb.as_str() == "deny")
        .expect("bob's late denial recorded");
    assert_eq!(denied.response_code, 409);
    drop(h.apiserver);
}

#[tokio::test]
async fn racing_approvers_one_wins() {
    let h = Harness::start().await;
    // What makes the race safe: a status write carrying a stale resourceVersion is refused.
    let stale = h.pending("stale", None).await;
    let api: Api<AccessRequest> = Api::namespaced(h.admin.clone(), NS);
    let mut first = stale.clone();
    first.status = Some(Default::default());
    api.replace_status("stale", &PostParams::default(), &first)
        .await
        .unwrap();
    let err = api
        .replace_status("stale", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err}"
    );

    for round in 0..3 {
        let name = format!("race-{round}");
        h.pending(&name, None).await;
        let (alice, bob) = (h.approver("alice").await, h.approver("bob").await);
        let (a, b) = tokio::join!(
            post(&alice, &name, "approve", "{}"),
            post(&bob, &name, "deny", "{}")
        );
        let mut codes = [a.0, b.0];
        codes.sort();
        assert_eq!(codes, [200, 409], "{a:?} {b:?}");
        let status = h.stored(&name).await.status.unwrap();
        let winner = if a.0 == 200 { "alice" } else { "bob" };
        assert_eq!(status.decided_by.as_deref(), Some(winner));
    }
}

#[tokio::test]
async fn connections_from_intercepted_pods_are_refused() {
    use k8s_openapi::api::core::v1::{Pod, PodIP};
    let h = Harness::start().await;
    h.pending("ar-1", None).await;
    // A pod of this node with address 127.0.0.5 (the pod watch would report it).
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "cursor-agent-0", "namespace": "agents", "uid": "u-agent"},
        "spec": {"serviceAccountName": "cursor", "nodeName": "test-node", "containers": []},
        "status": {"podIP": "127.0.0.5", "podIPs": [{"ip": "127.0.0.5"}]}
    }))
    .unwrap();
    assert!(
        pod.status.as_ref().unwrap().pod_ips.as_ref().unwrap()[0]
            == PodIP {
                ip: "127.0.0.5".into()
            }
    );
    h.app.identity().pods().apply(&pod);

    let (code, body) = raw_post_from(
        "127.0.0.5".parse().unwrap(),
        h.app.approvals_addr().unwrap(),
        &h.dir.path().join(local::CA_CERT),
        "alice",
        "/v1/accessrequests/ar-1/approve",
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("intercepted workloads may not use the approvals API"),
        "{body}"
    );
    assert!(body.contains("agents/cursor-agent-0"), "{body}");
    // The same approver from another address is served.
    let (code, body) = raw_post_from(
        "127.0.0.6".parse().unwrap(),
        h.app.approvals_addr().unwrap(),
        &h.dir.path().join(local::CA_CERT),
        "alice",
        "/v1/accessrequests/ar-1/approve",
    )
    .await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    use std::time::Duration;
    use tokio::io::AsyncReadExt as _;
    let h = Harness::start().await;
    h.pending("ar-cap", None).await;
    let addr = h.app.approvals_addr().unwrap();
    let ca = h.dir.path().join(local::CA_CERT);
    let tcp_from = |from: &str| {
        let from: std::net::IpAddr = from.parse().unwrap();
        async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(from, 0)).unwrap();
            socket.connect(addr).await.unwrap()
        }
    };
    // Whether the server closes a fresh connection at once rather than wait for its
    // handshake.
    let closed_at_once = |mut tcp: tokio::net::TcpStream| async move {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_millis(500), tcp.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    };
    // One address opens connections and says nothing: 128 are held, the next is closed.
    let mut held = Vec::new();
    for _ in 0..128 {
        held.push(tcp_from("127.0.0.7").await);
    }
    assert!(
        closed_at_once(tcp_from("127.0.0.7").await).await,
        "a 129th connection from one address was kept open"
    );
    // An approver at another address is served meanwhile.
    let (code, body) = raw_post_from(
        "127.0.0.8".parse().unwrap(),
        addr,
        &ca,
        "alice",
        "/v1/accessrequests/ar-cap/approve",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    // Closed connections give their slots back.
    drop(held);
    let mut reopened = false;
    for _ in 0..20 {
        if !closed_at_once(tcp_from("127.0.0.7").await).await {
            reopened = true;
            break;
        }
    }
    assert!(reopened, "the address's slots were not given back");
}

/// A TLS POST to the approvals API from source address `from`.
async fn raw_post_from(
    from: std::net::IpAddr,
    to: SocketAddr,
    ca: &std::path::Path,
    token: &str,
    path: &str,
) -> (u16, String) {
    use http_body_util::{BodyExt as _, Full};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let tcp = socket.connect(to).await.unwrap();
    let roots = gateway_userspace::tls::root_store_from_file(ca).unwrap();
    let mut tls = gateway_userspace::tls::client_config(roots).unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let stream = connector
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(path)
        .header("host", "127.0.0.1")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(bytes::Bytes::from_static(b"{}")))
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    let code = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (code, String::from_utf8_lossy(&body).into_owned())
}

fn chaperone(args: &[&str], kubeconfig: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_chaperone"))
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .output()
        .unwrap()
}

#[tokio::test]
async fn the_cli_and_the_kubectl_plugin_decide() {
    let h = Harness::start().await;
    h.pending("ar-cli", Some("15m")).await;
    h.pending("ar-plugin", None).await;
    let alice = h.kubeconfig("alice");

    let listed = tokio::task::spawn_blocking({
        let alice = alice.clone();
        move || chaperone(&["requests"], &alice)
    })
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(
        out.contains("NAME") && out.contains("ar-cli") && out.contains("Pending"),
        "{out}"
    );
    assert!(out.contains("scale prod/web to 0 replicas"), "{out}");

    let json = tokio::task::spawn_blocking({
        let alice = alice.clone();
        move || chaperone(&["requests", "ar-cli", "-o", "json"], &alice)
    })
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["spec"]["rule"], "scale-prod");

    let approved = tokio::task::spawn_blocking({
        let alice = alice.clone();
        move || {
            chaperone(
                &["approve", "ar-cli", "--for", "5m", "--comment", "go"],
                &alice,
            )
        }
    })
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&approved.stdout);
    assert!(
        approved.status.success(),
        "{}",
        String::from_utf8_lossy(&approved.stderr)
    );
    assert!(
        out.contains("accessrequest.chaperone.dev/ar-cli approved (granted until"),
        "{out}"
    );

    // Refused decisions print the server's Status the way kubectl does, and exit 1.
    let mallory = h.kubeconfig("mallory");
    let refused = tokio::task::spawn_blocking(move || chaperone(&["deny", "ar-plugin"], &mallory))
        .await
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("Error from server (Forbidden)") && err.contains("cannot approve"),
        "{err}"
    );

    // Real kubectl finds `kubectl-chaperone` on PATH and runs it as `kubectl chaperone`.
    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_chaperone"),
        bin.path().join("kubectl-chaperone"),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let kubectl_plugin = async |args: &'static [&'static str], token: &str| {
        let (path, kubeconfig) = (path.clone(), h.kubeconfig(token));
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("kubectl")
                .args(args)
                .env("PATH", path)
                .env("KUBECONFIG", kubeconfig)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    // The requesting agent's own service account, through the plugin: refused, and the
    // request stays pending.
    let own = kubectl_plugin(&["chaperone", "approve", "ar-plugin"], "agent").await;
    let err = String::from_utf8_lossy(&own.stderr);
    assert_eq!(own.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Error from server (Forbidden)") && err.contains("its own request"),
        "{err}"
    );
    let status = h.stored("ar-plugin").await.status;
    assert!(
        status.as_ref().is_none_or(|s| s.phase == Phase::Pending),
        "{status:?}"
    );
    let plugin = kubectl_plugin(
        &["chaperone", "deny", "ar-plugin", "--comment", "not today"],
        "bob",
    )
    .await;
    let out = String::from_utf8_lossy(&plugin.stdout);
    assert!(
        plugin.status.success(),
        "{}",
        String::from_utf8_lossy(&plugin.stderr)
    );
    assert_eq!(out.trim(), "accessrequest.chaperone.dev/ar-plugin denied");
    let status = h.stored("ar-plugin").await.status.unwrap();
    assert_eq!(status.phase, Phase::Denied);
    assert_eq!(status.decided_by.as_deref(), Some("bob"));
    assert_eq!(status.comment.as_deref(), Some("not today"));
    assert_eq!(h.key.verify(&h.stored("ar-plugin").await, &status), Ok(()));
}

#[tokio::test]
async fn requests_watch_streams_decisions() {
    use tokio::io::AsyncBufReadExt as _;
    let h = Harness::start().await;
    h.pending("ar-watched", None).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_chaperone"))
        .args(["requests", "-w", "--kubeconfig"])
        .arg(h.kubeconfig("alice"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || {
        tokio::time::timeout(std::time::Duration::from_secs(20), lines.next_line())
            .await
            .expect("the watch printed nothing for 20 s")
            .unwrap()
            .expect("the watch ended")
    };
    assert!(next().await.starts_with("NAME"));
    let first = next().await;
    assert!(
        first.contains("ar-watched") && first.contains("Pending"),
        "{first}"
    );
    let (code, body) = post(&h.approver("bob").await, "ar-watched", "deny", "{}").await;
    assert_eq!(code, 200, "{body}");
    let changed = next().await;
    assert!(
        changed.contains("ar-watched") && changed.contains("Denied"),
        "{changed}"
    );
    child.kill().await.unwrap();
}

/// Watches AccessRequests through the approvals API (`timeoutSeconds=timeout`) until the
/// watch ends, within `limit` seconds: its text and its events.
async fn watch_to_its_end(
    client: &kube::Client,
    timeout: u32,
    limit: u64,
    what: &str,
) -> (String, Vec<serde_json::Value>) {
    let req = http::Request::get(format!("{BASE_PATH}?watch=true&timeoutSeconds={timeout}"))
        .body(Vec::new())
        .unwrap();
    let text = tokio::time::timeout(
        std::time::Duration::from_secs(limit),
        client.request_text(req),
    )
    .await
    .expect(what)
    .expect("watch");
    let events = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (text, events)
}

/// A watch ends when its time is up, as the API server's do (`timeoutSeconds`, or half an
/// hour to an hour): the caller then watches again and is authorised again. Garbage in
/// `timeoutSeconds` is a 400 naming it.
#[tokio::test]
async fn a_watch_ends_when_its_time_is_up() {
    let h = Harness::start().await;
    h.pending("ar-timed", None).await;
    let alice = h.approver("alice").await;
    let (text, events) = watch_to_its_end(&alice, 3, 30, "the watch did not end").await;
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "ADDED" && e["object"]["metadata"]["name"] == "ar-timed"),
        "{text}"
    );
    let req = http::Request::get(format!("{BASE_PATH}?watch=true&timeoutSeconds=soon"))
        .body(Vec::new())
        .unwrap();
    match alice.request_text(req).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 400);
            assert!(s.message.contains("timeoutSeconds"), "{}", s.message);
        }
        other => panic!("expected a 400, got {other:?}"),
    }
}

/// The gateway's own watch of AccessRequests fails: the approver's watch does not go
/// quiet, it ends with an `ERROR` event carrying a `Status`, as the API server's do.
#[tokio::test]
async fn a_watch_the_gateway_cannot_continue_ends_with_an_error_event() {
    let h = Harness::start().await;
    h.pending("ar-err", None).await;
    let is_watch = |r: &chaperone_testkit::apiserver::SeenRequest| {
        r.method == "GET"
            && r.path_and_query.contains("/accessrequests?")
            && r.path_and_query.contains("watch=true")
    };
    // The holder's own watch is up first, so the one refused below is the approver's.
    for _ in 0..200 {
        if h.apiserver.requests().iter().any(is_watch) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(
        h.apiserver.requests().iter().any(is_watch),
        "no holder watch"
    );
    h.apiserver.refuse_on(
        is_watch,
        gateway_userspace::status::Status::failure(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "etcdserver: request timed out",
        ),
    );
    let alice = h.approver("alice").await;
    let (text, events) =
        watch_to_its_end(&alice, 60, 20, "the watch went quiet instead of ending").await;
    assert!(
        events.first().is_some_and(|e| e["type"] == "ADDED"),
        "{text}"
    );
    let last = events.last().expect("events");
    assert_eq!(last["type"], "ERROR", "{text}");
    assert_eq!(last["object"]["kind"], "Status", "{text}");
    assert!(
        last["object"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("etcdserver: request timed out")),
        "{text}"
    );
}

/// The signature checks the approver guide shows (Python and shell) accept what the
/// notifier sends, and the Python one rejects another key.
#[test]
fn the_guides_signature_checks_accept_the_webhook() {
    use gateway_userspace::approval::notify::signature;
    let guide = include_str!("../../docs/approver-guide.md");
    let block = |fence: &str| -> String {
        let start = guide.find(fence).expect(fence) + fence.len();
        let end = start + guide[start..].find("```").expect("closing fence");
        guide[start..end].to_owned()
    };
    let dir = tempfile::tempdir().unwrap();
    let body = br#"{"kind":"AccessRequestEvent","type":"Created","accessRequest":{"metadata":{"name":"ar-1"}}}"#;
    std::fs::write(dir.path().join("body.json"), body).unwrap();
    std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
    let header = signature(b"s3cret", body);

    let script = format!(
        "{}\nimport sys\nbody = open(sys.argv[1], 'rb').read()\nprint(verified(b's3cret', body, sys.argv[2]), verified(b'other', body, sys.argv[2]))\n",
        block("```python\n")
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .arg(dir.path().join("body.json"))
        .arg(&header)
        .output()
        .expect("python3");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "True False",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(block("```sh\n"))
        .current_dir(dir.path())
        .output()
        .expect("sh");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        header,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How long an approval takes from the approver's call to the sealed status stored (token
/// review cached after the first call; a SubjectAccessReview, a read and a status write
/// against the API test server each time). Printed for docs/benchmarks.md; bounded so a
/// pathological slowdown fails.
#[tokio::test]
async fn approval_round_trip_latency() {
    let h = Harness::start().await;
    let alice = h.approver("alice").await;
    let mut times = Vec::new();
    for i in 0..40 {
        let name = format!("lat-{i}");
        h.pending(&name, None).await;
        let started = std::time::Instant::now();
        let (code, body) = post(&alice, &name, "approve", "{}").await;
        times.push(started.elapsed());
        assert_eq!(code, 200, "{body}");
    }
    times.sort();
    let (p50, max) = (times[times.len() / 2], times[times.len() - 1]);
    eprintln!(
        "approve round trip over {} decisions: p50 {p50:?}, max {max:?}",
        times.len()
    );
    assert!(max < std::time::Duration::from_secs(2), "{times:?}");
}

/// A connection with no call in progress is closed after `approval.api.idleTimeout`, so
/// connections left open (HTTP/2 keeps itself alive with pings) cannot hold the slots
/// approvers need; a watch is a call in progress and runs its full time.
#[tokio::test]
async fn idle_connections_are_closed_and_watches_run_on() {
    use http_body_util::{BodyExt as _, Empty};
    use std::time::{Duration, Instant};
    let h = Harness::start_idle(Duration::from_secs(1)).await;
    h.pending("ar-idle", None).await;

    // An HTTP/2 connection that made one call and then sat idle.
    let addr = h.app.approvals_addr().unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let roots =
        gateway_userspace::tls::root_store_from_file(&h.dir.path().join(local::CA_CERT)).unwrap();
    let mut tls = gateway_userspace::tls::client_config(roots).unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let closed = tokio::spawn(conn);
    let req = http::Request::get(format!("https://127.0.0.1{BASE_PATH}"))
        .header("authorization", "Bearer alice")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    // Closed by the idle timer: long before the 30 s keep-alive ping, or ever.
    tokio::time::timeout(Duration::from_secs(20), closed)
        .await
        .expect("an idle HTTP/2 connection was left open")
        .unwrap()
        .expect("the connection closed cleanly (GOAWAY)");

    // A watch outlasts the idle timeout, and the grace a closing connection gets: it ends
    // at its own timeoutSeconds, whole.
    let alice = h.approver("alice").await;
    let started = Instant::now();
    let req = http::Request::get(format!("{BASE_PATH}?watch=true&timeoutSeconds=13"))
        .body(Vec::new())
        .unwrap();
    let text = alice
        .request_text(req)
        .await
        .expect("the watch ran to its end");
    assert!(
        started.elapsed() >= Duration::from_secs(12),
        "the watch ended after {:?}, before its timeoutSeconds",
        started.elapsed()
    );
    assert!(text.contains("ar-idle"), "{text}");
}

/// A decision write the API server fails with a 5xx may have been applied: it is answered
/// 504 ("may or may not have been written"), not refused, and recorded `unknown`.
#[tokio::test]
async fn a_decision_write_that_failed_midway_is_unknown_not_refused() {
    let h = Harness::start().await;
    h.pending("ar-5xx", None).await;
    h.apiserver.refuse_on(
        |r| r.method == "PUT" && r.path_and_query.contains("accessrequests/ar-5xx/status"),
        gateway_userspace::status::Status::failure(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "etcdserver: leader changed",
        ),
    );
    let (code, body) = post(&h.approver("alice").await, "ar-5xx", "approve", "{}").await;
    assert_eq!(code, 504, "{body}");
    assert!(
        message(&body).contains("may or may not have been written")
            && message(&body).contains("chaperone requests ar-5xx"),
        "{body}"
    );
}
