//! The whole data path on one machine: the Kubernetes API test server as the "real" API
//! server, a sandbox pod, and the gateway with its eBPF redirect, wired exactly as on a
//! node. The demo and the end-to-end tests both stand on it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Output,
    sync::Arc,
    time::Duration,
};

use gateway_userspace::{
    app::{self, App, AppError},
    config::{
        AdminConfig, Config, InterceptionConfig, InterceptionMode, ListenConfig, PolicyConfig,
        RecordingConfig, ServingTlsConfig, UpstreamConfig, default_server_names,
    },
    identity::IdentityConfig,
    recorder::RecorderStats,
    tls::{CertificateAuthority, TlsError},
};

use crate::{
    apiserver::{ApiServerConfig, TestApiServer},
    sandbox::{CgroupLayout, SandboxError, SandboxPod, cleanup_stale},
};

/// Namespace the sandbox pod is reported in (standalone identity).
pub const SANDBOX_NAMESPACE: &str = "agents";
/// Pod name the sandbox pod is reported as.
pub const SANDBOX_POD: &str = "cursor-agent-0";
/// Service account the sandbox pod is reported to run as.
pub const SANDBOX_SERVICE_ACCOUNT: &str = "cursor";

/// Port the gateway listens on, on the node side of the sandbox's veth.
pub const PROXY_PORT: u16 = 15443;

/// Errors assembling the stack.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// Writing a file in the work directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The cluster CA could not be created.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The sandbox pod could not be created.
    #[error("sandbox pod: {0}")]
    Sandbox(#[from] SandboxError),
    /// The API test server did not start.
    #[error("API test server: {0}")]
    ApiServer(String),
    /// The gateway did not start.
    #[error("gateway: {0}")]
    App(#[from] AppError),
    /// The generated config was rejected.
    #[error("gateway config: {0}")]
    Config(#[from] gateway_userspace::config::ConfigError),
}

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct StackOptions {
    /// Policy YAML; `None` configures `policy: allowAll`.
    pub policy_yaml: Option<String>,
    /// Where recordings go; `None`: inside the stack's temporary directory.
    pub recordings_dir: Option<PathBuf>,
    /// Objects to seed into the API test server (JSON, with kind/apiVersion/metadata).
    pub seed: Vec<serde_json::Value>,
    /// Just-in-time approval: register the AccessRequest CRD, create the gateway's
    /// namespace ([`APPROVAL_NAMESPACE`]) and a seal key, and configure `approval:`
    /// (without the approvals API; tests decide with [`Stack::decide`]).
    pub approval: bool,
    /// With `approval`: also serve the approvals API on the node side of the sandbox's
    /// veth, port [`APPROVALS_PORT`] (certificate from the cluster CA, [`Stack::ca_file`]).
    pub approvals_api: bool,
    /// Extra bearer tokens the API test server accepts and who they authenticate as
    /// (approvers, verified by TokenReview).
    pub token_users: Vec<(String, crate::apiserver::UserInfo)>,
}

/// The namespace AccessRequests live in when [`StackOptions::approval`] is set.
pub const APPROVAL_NAMESPACE: &str = "chaperone-system";
/// Port of the approvals API when [`StackOptions::approvals_api`] is set.
pub const APPROVALS_PORT: u16 = 15444;

/// A running stack. Call [`Stack::stop`] to flush recordings; dropping it still removes the
/// sandbox pod and stops the servers.
pub struct Stack {
    /// The stand-in for kube-apiserver.
    pub apiserver: TestApiServer,
    /// The gateway.
    pub app: App,
    /// The sandbox pod (dropped last: its cgroup and namespace go with it).
    pub pod: SandboxPod,
    /// The credential the gateway injects upstream.
    pub gateway_token: String,
    /// The token the pod presents (never valid upstream).
    pub pod_token: String,
    /// The Pod object the sandbox stands for (as the pod watch would list it).
    pub pod_object: k8s_openapi::api::core::v1::Pod,
    dir: tempfile::TempDir,
    recordings: PathBuf,
    seal_key: Option<gateway_userspace::approval::seal::SealKey>,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// The Pod object the sandbox stands for, as the API server would list it for this node.
fn sandbox_pod_object(
    uid: &str,
    container_id: &str,
    pod_ip: std::net::Ipv4Addr,
) -> Result<k8s_openapi::api::core::v1::Pod, StackError> {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": SANDBOX_POD, "namespace": SANDBOX_NAMESPACE, "uid": uid,
                     "labels": {"app": "coding-agent"}},
        "spec": {"nodeName": "sandbox-node", "serviceAccountName": SANDBOX_SERVICE_ACCOUNT,
                 "containers": [{"name": "agent", "image": "cursor-agent:1"}]},
        "status": {"phase": "Running", "podIP": pod_ip.to_string(), "podIPs": [{"ip": pod_ip.to_string()}],
                   "containerStatuses": [{
            "name": "agent", "ready": true, "restartCount": 0, "image": "cursor-agent:1", "imageID": "",
            "containerID": format!("containerd://{container_id}"),
            "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}
    }))
    .map_err(|e| StackError::ApiServer(format!("building the sandbox Pod object: {e}")))
}

fn write(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), StackError> {
    std::fs::write(path, contents).map_err(|source| StackError::Io {
        path: path.to_owned(),
        source,
    })
}

impl Stack {
    /// Creates the CA, API test server, sandbox pod, config and gateway. Needs root.
    pub async fn start(opts: StackOptions) -> Result<Self, StackError> {
        cleanup_stale();
        let dir = tempfile::Builder::new()
            .prefix("chaperone-stack-")
            .tempdir()
            .map_err(|source| StackError::Io {
                path: std::env::temp_dir(),
                source,
            })?;
        let root = dir.path();
        let (ca, ca_key) = CertificateAuthority::generate("chaperone-demo-cluster-ca")?;
        let ca_file = root.join("cluster-ca.crt");
        let ca_key_file = root.join("cluster-ca.key");
        write(&ca_file, ca.cert_pem())?;
        write(&ca_key_file, &ca_key)?;
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let gateway_token = format!("gateway-{suffix}");
        let pod_token = format!("pod-{suffix}");
        let token_file = root.join("gateway-token");
        write(&token_file, &gateway_token)?;

        let apiserver = TestApiServer::start(ApiServerConfig {
            ca: Some(Arc::new(ca)),
            tokens: vec![gateway_token.clone()],
            token_users: opts.token_users.iter().cloned().collect(),
            ..ApiServerConfig::default()
        })
        .await
        .map_err(|e| StackError::ApiServer(e.to_string()))?;
        for object in opts.seed {
            apiserver
                .seed(object)
                .map_err(|e| StackError::ApiServer(e.to_string()))?;
        }
        let approval = if opts.approval {
            Some(approval_setup(&apiserver, root)?)
        } else {
            None
        };

        // The sandbox's cgroup sits where kubelet would put a containerd container, and the
        // pod store learns the matching Pod object, as the node-scoped pod watch would.
        let pod_uid = uuid::Uuid::now_v7().to_string();
        let container_id = format!("{suffix}{suffix}");
        let pod = SandboxPod::create_with(CgroupLayout::Kubelet {
            pod_uid: pod_uid.clone(),
            container_id: container_id.clone(),
        })?;
        let policy = match &opts.policy_yaml {
            Some(yaml) => {
                let path = root.join("policy.yaml");
                write(&path, yaml)?;
                PolicyConfig::File(path)
            }
            None => PolicyConfig::AllowAll,
        };
        let recordings = opts
            .recordings_dir
            .clone()
            .unwrap_or_else(|| root.join("recordings"));
        let upstream_url = apiserver
            .url()
            .parse()
            .map_err(|e| StackError::ApiServer(format!("bad URL {}: {e}", apiserver.url())))?;
        let config = Config {
            node: Some("sandbox-node".to_owned()),
            cluster: "sandbox".to_owned(),
            listen: ListenConfig {
                address: (pod.host_ip(), PROXY_PORT).into(),
                workers: 0,
            },
            interception: InterceptionConfig {
                mode: InterceptionMode::Ebpf,
                targets: vec![pod.virtual_api_server().into()],
                // Each stack pins under its own directory and removes it when it stops.
                pin_path: PathBuf::from(format!(
                    "/sys/fs/bpf/{}{}-{suffix}",
                    super::sandbox::TEST_PIN_PREFIX,
                    std::process::id()
                )),
                detach_on_exit: true,
                ..InterceptionConfig::default()
            },
            upstream: UpstreamConfig {
                url: Some(upstream_url),
                ca_file: Some(ca_file.clone()),
                kubeconfig: None,
                in_cluster: false,
                protocol: Default::default(),
                token_file: Some(token_file),
                client_cert_file: None,
                client_key_file: None,
                tls_server_name: None,
                impersonate: Default::default(),
                connect_timeout: Duration::from_secs(2),
            },
            tls: ServingTlsConfig {
                ca_cert_file: ca_file.clone(),
                ca_key_file,
                server_names: default_server_names(),
                server_ips: Vec::new(),
                create_ca_if_missing: false,
            },
            identity: IdentityConfig::default(),
            policy: Some(policy),
            recording: RecordingConfig {
                dir: recordings.clone(),
                max_rows_per_file: 100_000,
                max_file_age: Duration::from_secs(60),
                max_object_bytes: 256 * 1024,
                response_bodies: true,
                reads_while_down: Default::default(),
                wal_dir: None,
                signing_key_file: None,
                upload: None,
                max_session_bytes: gateway_userspace::recorder::DEFAULT_MAX_SESSION_BYTES,
            },
            admin: AdminConfig {
                address: SocketAddr::from(([127, 0, 0, 1], 0)),
            },
            shutdown_grace: Duration::from_secs(5),
            limits: Default::default(),
            approval: approval.as_ref().map(|(config, _)| {
                let mut config = config.clone();
                if opts.approvals_api {
                    config.api = Some(gateway_userspace::approval::config::ApprovalApiConfig {
                        listen: (pod.host_ip(), APPROVALS_PORT).into(),
                        cert_file: None,
                        key_file: None,
                        server_names: gateway_userspace::approval::config::default_api_names(),
                        server_ips: vec![pod.host_ip().into()],
                        idle_timeout: gateway_userspace::approval::config::DEFAULT_API_IDLE_TIMEOUT,
                    });
                }
                config
            }),
        };
        // Round-trip through YAML so the demo's config is exactly what a user would write.
        let yaml = serde_norway::to_string(&config)
            .map_err(|e| StackError::ApiServer(format!("serialising config: {e}")))?;
        let config_file = root.join("chaperone.yaml");
        write(&config_file, &yaml)?;
        let config = Config::load(&config_file)?;
        let app = app::build(config).await?;
        let pod_object = sandbox_pod_object(&pod_uid, &container_id, pod.pod_ip())?;
        app.identity().pods().apply(&pod_object);

        // What an in-cluster agent sees: the API server's virtual address, the cluster CA
        // it already trusts, and its own (useless upstream) token.
        let server = pod.virtual_api_server();
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: in-cluster\n  cluster:\n    server: https://{server}\n    certificate-authority: {ca}\n\
             users:\n- name: pod\n  user:\n    token: {pod_token}\ncontexts:\n- name: pod\n  context:\n    cluster: in-cluster\n    user: pod\n    namespace: default\n\
             current-context: pod\n",
            ca = ca_file.display()
        );
        write(&root.join("kubeconfig"), kubeconfig)?;
        Ok(Self {
            apiserver,
            app,
            pod,
            gateway_token,
            pod_token,
            pod_object,
            dir,
            recordings,
            seal_key: approval.map(|(_, key)| key),
        })
    }

    /// Another gateway ("node B") on 127.0.0.1 in front of the same API test server, with
    /// the same policy and seal key and the approvals API listening (no interception: it
    /// holds nobody's requests here, it decides). Recordings go to `recordings-node-b`.
    pub async fn second_gateway(&self) -> Result<App, StackError> {
        let root = self.dir.path();
        let mut config = Config::load(&root.join("chaperone.yaml"))?;
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        config.node = Some("node-b".to_owned());
        config.listen = ListenConfig {
            address: loopback,
            workers: 0,
        };
        config.admin = AdminConfig { address: loopback };
        config.interception = InterceptionConfig {
            mode: InterceptionMode::None,
            ..InterceptionConfig::default()
        };
        config.tls.server_ips = vec![loopback.ip()];
        config.recording.dir = root.join("recordings-node-b");
        let approval = config.approval.as_mut().ok_or_else(|| {
            StackError::ApiServer("the stack was started without approval".into())
        })?;
        approval.api = Some(gateway_userspace::approval::config::ApprovalApiConfig {
            listen: loopback,
            cert_file: None,
            key_file: None,
            server_names: vec!["localhost".to_owned()],
            server_ips: vec![loopback.ip()],
            idle_timeout: gateway_userspace::approval::config::DEFAULT_API_IDLE_TIMEOUT,
        });
        Ok(app::build(config).await?)
    }

    /// A kubeconfig for an approver outside the sandbox: the API test server directly,
    /// with the gateway's token (`system:admin`, in `system:masters`).
    pub fn admin_kubeconfig(&self) -> Result<PathBuf, StackError> {
        let root = self.dir.path();
        let path = root.join("admin-kubeconfig");
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
             users:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: admin\n  context:\n    cluster: test\n    user: admin\n\
             current-context: admin\n",
            server = self.apiserver.url(),
            ca = root.join("cluster-ca.crt").display(),
            token = self.gateway_token,
        );
        write(&path, kubeconfig)?;
        Ok(path)
    }

    /// The AccessRequests waiting or decided, oldest first.
    pub fn access_requests(&self) -> Vec<serde_json::Value> {
        let mut all = self.apiserver.objects("accessrequests", APPROVAL_NAMESPACE);
        all.sort_by(|a, b| {
            let created = |o: &serde_json::Value| {
                o.pointer("/spec/createdAt")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            created(a).cmp(&created(b))
        });
        all
    }

    /// Waits (up to 30 s) until `count` AccessRequests exist and returns the newest's name.
    pub async fn wait_for_access_requests(&self, count: usize) -> Result<String, StackError> {
        for _ in 0..600 {
            let all = self.access_requests();
            if all.len() >= count
                && let Some(name) = all
                    .last()
                    .and_then(|o| o.pointer("/metadata/name"))
                    .and_then(serde_json::Value::as_str)
            {
                return Ok(name.to_owned());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(StackError::ApiServer(format!(
            "{count} AccessRequests never appeared (have {})",
            self.access_requests().len()
        )))
    }

    /// Writes a decision into an AccessRequest's status as the approvals API does, sealed
    /// with the gateways' key; `sealed == false` writes it as someone editing the status
    /// directly at the API server would (no valid seal).
    pub fn decide(
        &self,
        name: &str,
        decision: Decision<'_>,
        sealed: bool,
    ) -> Result<(), StackError> {
        use gateway_userspace::approval::resource::{AccessRequest, AccessRequestStatus};
        let fail = |why: String| StackError::ApiServer(format!("deciding {name}: {why}"));
        let key = self
            .seal_key
            .as_ref()
            .ok_or_else(|| fail("the stack was started without approval".into()))?;
        let object = self
            .apiserver
            .object("accessrequests", APPROVAL_NAMESPACE, name)
            .ok_or_else(|| fail("no such AccessRequest".into()))?;
        let mut ar: AccessRequest =
            serde_json::from_value(object.clone()).map_err(|e| fail(e.to_string()))?;
        let mut status = AccessRequestStatus {
            phase: decision.phase,
            decided_by: Some(decision.by.to_owned()),
            decided_at: Some(jiff::Timestamp::now().to_string()),
            comment: decision.comment.map(str::to_owned),
            grant_until: decision.grant_for.map(|d| {
                (jiff::Timestamp::now() + jiff::SignedDuration::try_from(d).unwrap_or_default())
                    .to_string()
            }),
            ..AccessRequestStatus::default()
        };
        if sealed {
            status.seal = Some(key.seal(&ar, &status).map_err(|e| fail(e.to_string()))?);
        }
        ar.status = Some(status);
        let mut value = serde_json::to_value(&ar).map_err(|e| fail(e.to_string()))?;
        // Keep what the server stored (resourceVersion, creationTimestamp, ...).
        value["metadata"] = object["metadata"].clone();
        self.apiserver
            .seed(value)
            .map(|_| ())
            .map_err(|e| fail(e.to_string()))
    }

    /// The stack's working directory (config, certificates, kubeconfig).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cluster CA certificate (it also signs the approvals API's certificate).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("cluster-ca.crt")
    }

    /// The gateways' seal key, when approval is on.
    pub fn seal_key(&self) -> Option<&gateway_userspace::approval::seal::SealKey> {
        self.seal_key.as_ref()
    }

    /// Root of the recordings dataset.
    pub fn recordings(&self) -> &Path {
        &self.recordings
    }

    /// The kubeconfig the pod uses.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Runs real `kubectl` inside the sandbox pod (fresh discovery cache each call), with a
    /// 60 s limit.
    pub async fn kubectl(&self, args: &[&str]) -> std::io::Result<Output> {
        let cache = tempfile::tempdir_in(self.dir.path())?;
        let mut cmd = tokio::process::Command::from(self.pod.command("kubectl"));
        // Flags before the caller's arguments: after `--` they would go to the remote command.
        cmd.arg("--cache-dir")
            .arg(cache.path())
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.dir.path())
            .kill_on_drop(true);
        match tokio::time::timeout(Duration::from_secs(60), cmd.output()).await {
            Ok(out) => out,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("kubectl {args:?} took over 60 s"),
            )),
        }
    }

    /// Shuts the gateway down (flushing recordings) and hands back what tests inspect
    /// afterwards; the sandbox pod and work directory go when that is dropped.
    pub async fn stop(self) -> Result<Stopped, StackError> {
        let Self {
            apiserver,
            app,
            pod,
            gateway_token,
            pod_token,
            pod_object: _,
            dir,
            recordings,
            seal_key: _,
        } = self;
        let stats = app.shutdown().await?;
        Ok(Stopped {
            stats,
            apiserver,
            gateway_token,
            pod_token,
            recordings,
            _pod: pod,
            _dir: dir,
        })
    }
}

/// A decision for [`Stack::decide`].
#[derive(Debug, Clone, Copy)]
pub struct Decision<'a> {
    /// Approved or Denied.
    pub phase: gateway_userspace::approval::resource::Phase,
    /// The approver.
    pub by: &'a str,
    /// The approver's comment.
    pub comment: Option<&'a str>,
    /// A lasting grant: the identical (or rule-scoped) request passes for this long.
    pub grant_for: Option<Duration>,
}

/// Registers the AccessRequest CRD, creates the gateway's namespace and a seal key; returns
/// the `approval:` config section and the key.
fn approval_setup(
    apiserver: &TestApiServer,
    root: &Path,
) -> Result<
    (
        gateway_userspace::approval::ApprovalConfig,
        gateway_userspace::approval::seal::SealKey,
    ),
    StackError,
> {
    use std::io::Read as _;
    let crd: serde_json::Value = gateway_userspace::approval::resource::crd_yaml()
        .map_err(|e| StackError::ApiServer(e.to_string()))
        .and_then(|y| {
            serde_norway::from_str(&y).map_err(|e| StackError::ApiServer(e.to_string()))
        })?;
    for object in [
        crd,
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": APPROVAL_NAMESPACE}}),
    ] {
        apiserver
            .seed(object)
            .map_err(|e| StackError::ApiServer(e.to_string()))?;
    }
    let mut bytes = [0u8; 32];
    let urandom = Path::new("/dev/urandom");
    std::fs::File::open(urandom)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| StackError::Io {
            path: urandom.to_owned(),
            source,
        })?;
    let key_file = root.join("approval-seal.key");
    write(&key_file, bytes)?;
    let key = gateway_userspace::approval::seal::SealKey::from_file(&key_file)
        .map_err(|e| StackError::ApiServer(e.to_string()))?;
    Ok((
        gateway_userspace::approval::ApprovalConfig {
            namespace: APPROVAL_NAMESPACE.to_owned(),
            seal_key_file: key_file,
            api: None,
            notify: Default::default(),
            max_pending_per_workload: 10,
            max_waiting_per_workload: 32,
            retention: gateway_userspace::approval::config::DEFAULT_RETENTION,
        },
        key,
    ))
}

/// A stopped stack: the gateway has flushed its recordings.
pub struct Stopped {
    /// What the recorder wrote.
    pub stats: RecorderStats,
    /// The API test server (still answering, so tests can read what it received).
    pub apiserver: TestApiServer,
    /// The credential the gateway injected.
    pub gateway_token: String,
    /// The token the pod presented.
    pub pod_token: String,
    /// Root of the recordings dataset.
    pub recordings: PathBuf,
    _pod: SandboxPod,
    _dir: tempfile::TempDir,
}
