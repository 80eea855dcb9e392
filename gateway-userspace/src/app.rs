//! Wires the subsystems into a running gateway and shuts it down cleanly.
//!
//! Start-up validates everything that can be validated (policy, certificates, credential,
//! recording directory) before binding the listener, binds the listener before attaching
//! the kernel redirect (so a redirected connect always finds it), and shutdown runs in the
//! reverse order: stop accepting, let in-flight requests finish, then flush recordings.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    admin::{Admin, Metrics},
    config::{Config, InterceptionMode, PolicyConfig},
    drain::{self, DrainOutcome, DrainTrigger},
    ebpf::{EbpfError, Interceptor, InterceptorSettings, PinGuard},
    identity::{
        Identity,
        pods::{KubePodSource, PodSource as _, PodStore},
        principal::PrincipalVerifier,
        resolver::{CgroupResolver, ResolverLimits},
        tokenreview::{KubeTokenReviewer, TokenReviewer},
    },
    policy::{Policy, PolicyError},
    proxy::{CredentialError, Proxy, ProxySettings, UpstreamCredential},
    recorder::{Recorder, RecorderConfig, RecorderError, RecorderStats},
    tls::{self, CertificateAuthority, ServingCert, TlsError},
};

/// Validity of the minted serving certificate.
const SERVING_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// How often the serving certificate's remaining validity is checked.
const CERT_RENEWAL_CHECK: Duration = Duration::from_secs(3600);
/// How often kube-rs is asked for the current gateway credential (it re-reads a token file
/// or re-runs an exec plugin only when due; this bounds how late the request path sees it).
const CREDENTIAL_REFRESH: Duration = Duration::from_secs(1);
/// How often workloads are classified into the bypass and fail-open maps.
const CLASSIFY_EVERY: Duration = Duration::from_secs(2);
/// How often the daemon tells the kernel side it is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How often each gateway deletes its node's AccessRequests past `approval.retention`.
const ACCESS_REQUEST_SWEEP: Duration = Duration::from_secs(3600);
/// How long a starting gateway waits for another one to let go of its recording directory
/// (the pod it replaces, still draining) before it gives up: less than the liveness
/// probe's three failed checks, so the kubelet restarts it with the reason in its log.
const RECORDING_DIR_LOCK_WAIT: Duration = Duration::from_secs(25);

/// Errors building or running the app; each names the subsystem at fault.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// TLS material is unusable.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The policy does not load.
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
    /// The gateway credential cannot be obtained through kube-rs.
    #[error("upstream credential: {0}")]
    Credential(#[from] CredentialError),
    /// The upstream API server settings are unusable.
    #[error("{}: {}", .0.config_key(), .0.message())]
    Upstream(#[from] crate::upstream::UpstreamError),
    /// The recorder cannot start or failed.
    #[error("recording: {0}")]
    Recorder(#[from] RecorderError),
    /// The recording directory cannot be had for this gateway alone.
    #[error("recording: {0}")]
    RecordingDir(#[from] crate::recorder::DirLockError),
    /// The kernel redirect cannot be attached.
    #[error("eBPF interception: {0}")]
    Ebpf(#[from] EbpfError),
    /// The listener cannot be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Workload or principal identity cannot be set up.
    #[error("identity: {0}")]
    Identity(#[from] crate::identity::IdentityError),
    /// A configuration value is unusable.
    #[error("{0}")]
    Config(String),
}

/// A running gateway.
pub struct App {
    local_addr: SocketAddr,
    approvals_addr: Option<SocketAddr>,
    notifier: Option<crate::approval::notify::Notifier>,
    identity: Arc<Identity>,
    admin_addr: SocketAddr,
    metrics: Arc<Metrics>,
    interceptor: Option<Arc<Interceptor>>,
    proxy: Arc<Proxy>,
    proxy_drain: DrainTrigger,
    proxy_task: JoinHandle<()>,
    recorder: Recorder,
    recorder_drain: DrainTrigger,
    /// The uploader's drain trigger and task, when files are uploaded.
    upload: Option<(DrainTrigger, JoinHandle<()>)>,
    recording_dir: PathBuf,
    /// This gateway's hold on `recording_dir`: let go when the app is dropped, or, after a
    /// signal, when the process exits.
    recording_lock: Option<crate::recorder::DirLock>,
    grace: Duration,
    /// Removes the pins when the app goes away (shut down, or dropped in a failing test).
    detach_on_exit: PinGuard,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

/// Loads the configured policy: its file, or the allow-all policy the config asked for.
pub fn load_policy(source: &PolicyConfig) -> Result<Policy, PolicyError> {
    match source {
        PolicyConfig::AllowAll => Ok(Policy::allow_all()),
        PolicyConfig::File(file) => Policy::from_file(file),
    }
}

/// Builds and starts the gateway described by `cfg`.
pub async fn build(cfg: Config) -> Result<App, AppError> {
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "starting chaperone");
    if cfg.interception.mode == InterceptionMode::Ebpf {
        // One sentence naming what is missing, before anything is bound or loaded.
        crate::ebpf::preflight()?;
    }
    // Config::load refuses a config without a policy; a Config built in code is checked here.
    let policy_source = cfg.policy.clone().ok_or_else(|| {
        AppError::Config("policy: is required (a file, or allowAll said explicitly)".to_owned())
    })?;
    let policy = load_policy(&policy_source)?;
    if cfg.approval.is_none() {
        let asking: Vec<&str> = policy.approve_rules().collect();
        if !asking.is_empty() {
            tracing::warn!(rules = ?asking, "these rules ask for approval, but the config has no `approval` section: every request they match is refused (403)");
        }
    }
    if cfg.tls.create_ca_if_missing && !cfg.tls.ca_cert_file.exists() {
        tls::create_ca_files(
            &cfg.tls.ca_cert_file,
            &cfg.tls.ca_key_file,
            "chaperone-gateway-ca",
        )?;
        tracing::info!(cert = %cfg.tls.ca_cert_file.display(), "created a gateway CA; distribute this certificate to agent pods");
    }
    let ca = CertificateAuthority::from_files(&cfg.tls.ca_cert_file, &cfg.tls.ca_key_file)?;
    let serving_cert = ServingCert::new(
        ca,
        cfg.tls.server_names.clone(),
        cfg.serving_ips(),
        SERVING_CERT_VALIDITY,
    )?;
    let server_tls = tls::server_config_rotating(serving_cert.clone())?;
    let upstream = cfg.upstream.resolve()?;
    // kube-rs builds the TLS client (CA, client certificate from files or an exec plugin)
    // and the credential; both may run an exec plugin, which blocks.
    let tls_upstream = upstream.clone();
    let upstream_tls = tokio::task::spawn_blocking(move || tls_upstream.tls_client_config())
        .await
        .map_err(|e| AppError::Config(format!("upstream TLS task failed: {e}")))??;
    let upstream_server_name = upstream.server_name()?;
    let upstream_url = upstream.config.cluster_url.clone();
    let credential = UpstreamCredential::from_kube(&upstream.config, &upstream.source).await?;
    tracing::info!(source = %upstream.source, credential = upstream.credential_kind(), "upstream credential ready");
    let node = cfg.node_name();

    let approvals_api = cfg.approval.as_ref().and_then(|a| a.api.clone());
    let kube_client = if cfg.identity.watch_pods
        || cfg.identity.token_review
        || cfg.interception.discover_kubernetes_service
        || cfg.approval.is_some()
    {
        // The same kube-rs config as the forwarding path: one server, one credential.
        // Without kube-rs's own retries (up to 15, backing off for minutes on 429 and
        // 503): a TokenReview on the request path must fail fast, and the watches back
        // off by themselves.
        let mut config = upstream.config.clone();
        config.default_retry = false;
        Some(
            kube::Client::try_from(config).map_err(|e| {
                AppError::Config(format!(
                    "connecting to the API server ({}) for pods, TokenReview, targets or approvals: {e}",
                    upstream.source
                ))
            })?,
        )
    } else {
        None
    };
    let (identity, principals) = build_identity(&cfg, &node, kube_client.as_ref())?;

    // Before anything in the directory is opened; held until the app is dropped.
    let holder = format!(
        "node {node}, pod {}, pid {}",
        std::env::var("POD_NAME").unwrap_or_else(|_| "unnamed".to_owned()),
        std::process::id()
    );
    let recording_lock =
        crate::recorder::lock_dir(&cfg.recording.dir, RECORDING_DIR_LOCK_WAIT, &holder).await?;
    let (recorder_drain, recorder_watch) = drain::channel();
    let (recorder, recorder_handle) = Recorder::start(
        RecorderConfig {
            max_rows_per_file: cfg.recording.max_rows_per_file,
            max_file_age: cfg.recording.max_file_age,
            wal_dir: Some(
                cfg.recording
                    .wal_dir
                    .clone()
                    .unwrap_or_else(|| cfg.recording.dir.join(crate::recorder::DEFAULT_WAL_DIR)),
            ),
            signing_key_file: cfg.recording.signing_key_file.clone(),
            max_session_bytes: cfg.recording.max_session_bytes,
            ..RecorderConfig::new(cfg.recording.dir.clone(), node.clone())
        },
        recorder_watch,
    )?;

    let upload = match &cfg.recording.upload {
        Some(upload) => {
            let uploader = build_uploader(&cfg.recording.dir, upload)?;
            recorder_handle.attach_upload(uploader.stats());
            let (trigger, watcher) = drain::channel();
            let task = tokio::spawn(uploader.run(watcher));
            Some((trigger, task))
        }
        None => None,
    };

    let listener = TcpListener::bind(cfg.listen.address)
        .await
        .map_err(|source| AppError::Bind {
            addr: cfg.listen.address,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| AppError::Bind {
        addr: cfg.listen.address,
        source,
    })?;

    let interceptor = match cfg.interception.mode {
        InterceptionMode::Ebpf => Some(Arc::new(Interceptor::attach(&InterceptorSettings {
            targets: cfg.interception.targets.clone(),
            proxy: local_addr,
            pin_path: cfg.interception.pin_path.clone(),
            fail_open_after: cfg.interception.fail_open_after,
            connections_max: cfg.interception.max_connections,
        })?)),
        InterceptionMode::None => None,
    };

    let admin_listener = TcpListener::bind(cfg.admin.address)
        .await
        .map_err(|source| AppError::Bind {
            addr: cfg.admin.address,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| AppError::Bind {
            addr: cfg.admin.address,
            source,
        })?;
    let recorder_status = recorder_handle.status();
    let metrics = Metrics::new(interceptor.clone(), Some(recorder_status.clone()));

    let approvals_recorder = recorder_handle.clone();
    let proxy = Proxy::new(ProxySettings {
        policy,
        upstream_url: upstream_url.clone(),
        upstream_tls,
        upstream_server_name,
        connect_timeout: cfg.upstream.connect_timeout,
        upstream_protocol: cfg.upstream.protocol,
        credential: Some(credential.clone()),
        recorder: recorder_handle,
        interceptor: interceptor.clone(),
        node: node.clone(),
        cluster: cfg.cluster.clone(),
        identity: Some(identity.clone()),
        principals,
        scope: cfg.interception.scope.clone(),
        metrics: metrics.clone(),
        limits: cfg.limits.clone(),
        impersonate: cfg.upstream.impersonate.clone(),
        max_object_bytes: cfg.recording.max_object_bytes,
        record_responses: cfg.recording.response_bodies,
        reads_while_down: cfg.recording.reads_while_down,
        workers: cfg.listen.workers,
    });
    let reloader = match &policy_source {
        PolicyConfig::File(path) => {
            let live = proxy.live_streams();
            let closed = metrics.policy_streams_closed.clone();
            Some(Arc::new(
                crate::policy::reload::Reloader::new(
                    path.clone(),
                    proxy.policy.clone(),
                    metrics.policy_reload.clone(),
                )
                // Open watches and sessions the new policy denies are closed.
                .on_applied(move |policy| {
                    let n = live.recheck(policy);
                    closed.inc_by(n as u64);
                }),
            ))
        }
        PolicyConfig::AllowAll => None,
    };
    let admin = Arc::new(Admin {
        metrics: metrics.clone(),
        interceptor: interceptor.clone(),
        listen: local_addr,
        upstream: upstream_url.to_string(),
        policy: proxy.policy.clone(),
        reloader: reloader.clone(),
        recorder: recorder_status,
        credential: Some(credential.clone()),
        pods: Some(identity.pods().clone()),
        serving_cert: Some(serving_cert.clone()),
        approvals: std::sync::OnceLock::new(),
    });
    let (proxy_drain, proxy_watch) = drain::channel();
    if let Some(reloader) = reloader {
        tokio::spawn(reloader.run(proxy_watch.clone()));
    }
    tokio::spawn(credential.refresh_loop(CREDENTIAL_REFRESH, proxy_watch.clone()));
    tokio::spawn(serving_cert.renewal_loop(CERT_RENEWAL_CHECK, proxy_watch.clone()));
    if let (true, Some(client)) = (cfg.identity.watch_pods, kube_client.clone()) {
        let source = KubePodSource::new(client, node.clone())
            .counting_errors_in(metrics.pod_watch_errors.clone());
        let store = identity.pods().clone();
        let drain = proxy_watch.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = drain.signaled() => {}
                result = source.run(store) => if let Err(e) = result {
                    tracing::error!(error = %e, "the pod watch ended; new pods will not be named");
                },
            }
        });
    }
    if let Some(interceptor) = &interceptor
        && (cfg.interception.discover_kubernetes_service
            || !cfg.interception.target_hosts.is_empty())
    {
        let sources = crate::k8s::TargetSources {
            fixed: cfg.interception.targets.clone(),
            hosts: cfg.interception.target_hosts.clone(),
            resolve_every: cfg.interception.resolve_every,
            client: kube_client
                .clone()
                .filter(|_| cfg.interception.discover_kubernetes_service),
            errors: metrics.redirect_target_errors.clone(),
        };
        tokio::spawn(crate::k8s::target_loop(
            sources,
            interceptor.clone(),
            proxy_watch.clone(),
        ));
    }
    if let Some(interceptor) = &interceptor {
        tokio::spawn(crate::scope::classify_loop(
            cfg.interception.scope.clone(),
            identity.clone(),
            interceptor.clone(),
            CLASSIFY_EVERY,
            proxy_watch.clone(),
        ));
    }
    tokio::spawn(admin.clone().serve(admin_listener, proxy_watch.clone()));
    let notifier = match &cfg.approval {
        Some(approval) => crate::approval::notify::Notifier::start_counting(
            &approval.notify,
            proxy_watch.clone(),
            metrics.approval_notifications_dropped.clone(),
            metrics.approval_notifications_failed.clone(),
        )
        .map_err(|e| AppError::Config(e.to_string()))?,
        None => None,
    };
    if let (Some(approval), Some(client)) = (&cfg.approval, kube_client.clone()) {
        // Requests decided `approve` are held here; the watcher releases them.
        let seal_key = crate::approval::seal::SealKey::from_file(&approval.seal_key_file)
            .map_err(|e| AppError::Config(format!("approval.sealKeyFile: {e}")))?;
        // Kept beside the recordings: the node's own disk, outlasting the gateway's pod.
        let used = crate::approval::used::UsedLog::open(
            &cfg.recording.dir.join(crate::approval::used::USED_LOG_PATH),
            jiff::Timestamp::now(),
        )
        .map_err(|e| AppError::Config(format!("approval: the record of used approvals: {e}")))?;
        let holder = crate::approval::holder::Holder::with_notifier(
            client,
            crate::approval::holder::HolderConfig {
                namespace: approval.namespace.clone(),
                node: node.clone(),
                seal_key,
                max_pending_per_workload: approval.max_pending_per_workload,
                max_waiting_per_workload: approval.max_waiting_per_workload,
                decision_poll: crate::approval::holder::DEFAULT_DECISION_POLL,
                used: Some(used),
            },
            notifier.clone(),
        );
        holder.count_tampering_in(metrics.approval_tampering.clone());
        holder.count_waiting_in(metrics.approval_waiting.clone());
        holder.count_cleanup_in(
            metrics.approval_requests_deleted.clone(),
            metrics.approval_cleanup_failures.clone(),
        );
        let watch_drain = proxy_watch.clone();
        let watcher = holder.clone();
        let janitor = holder.clone();
        let retention = approval.retention;
        tokio::spawn(async move {
            tokio::select! {
                () = watcher.run_watcher() => {}
                () = janitor.run_janitor(retention, ACCESS_REQUEST_SWEEP) => {}
                _ = watch_drain.signaled() => {}
            }
        });
        let _ = admin.approvals.set(holder.clone());
        proxy.set_approvals(holder);
    }
    let approvals_addr = match (&cfg.approval, approvals_api, kube_client.clone()) {
        (Some(approval), Some(api), Some(client)) => Some(
            start_approvals_api(
                &cfg,
                approval,
                &api,
                ApprovalsParts {
                    client,
                    identity: identity.clone(),
                    interceptor: interceptor.clone(),
                    recorder: approvals_recorder,
                    node: node.clone(),
                    notifier: notifier.clone(),
                    metrics: metrics.clone(),
                },
                proxy_watch.clone(),
            )
            .await?,
        ),
        _ => None,
    };
    if let Some(interceptor) = &interceptor {
        tokio::spawn(heartbeat_loop(interceptor.clone(), proxy_watch.clone()));
    }
    let proxy_task = tokio::spawn(proxy.clone().serve(listener, server_tls, proxy_watch));
    let detach_on_exit = if cfg.interception.detach_on_exit && interceptor.is_some() {
        PinGuard::new(cfg.interception.pin_path.clone())
    } else {
        PinGuard::disarmed()
    };
    tracing::info!(%local_addr, %admin_addr, ?approvals_addr, upstream = %upstream_url, "chaperone is ready");
    Ok(App {
        local_addr,
        approvals_addr,
        notifier,
        identity,
        admin_addr,
        metrics,
        interceptor,
        proxy,
        proxy_drain,
        proxy_task,
        recorder,
        recorder_drain,
        upload,
        recording_dir: cfg.recording.dir,
        recording_lock: Some(recording_lock),
        grace: cfg.shutdown_grace,
        detach_on_exit,
    })
}

/// What the approvals API takes from the rest of the gateway.
struct ApprovalsParts {
    client: kube::Client,
    identity: Arc<Identity>,
    interceptor: Option<Arc<Interceptor>>,
    recorder: crate::recorder::RecorderHandle,
    node: String,
    notifier: Option<crate::approval::notify::Notifier>,
    metrics: Arc<Metrics>,
}

/// Binds the approvals API and starts serving it; returns its address.
async fn start_approvals_api(
    cfg: &Config,
    approval: &crate::approval::ApprovalConfig,
    api: &crate::approval::config::ApprovalApiConfig,
    parts: ApprovalsParts,
    drain: drain::DrainWatcher,
) -> Result<SocketAddr, AppError> {
    use crate::approval::{api::ApprovalApi, seal::SealKey};
    let seal = SealKey::from_file(&approval.seal_key_file)
        .map_err(|e| AppError::Config(format!("approval.sealKeyFile: {e}")))?;
    let tls = match (&api.cert_file, &api.key_file) {
        (Some(cert), Some(key)) => {
            let (chain, key) = tls::load_client_identity(cert, key)?;
            tls::server_config(chain, key)?
        }
        _ => {
            let ca = CertificateAuthority::from_files(&cfg.tls.ca_cert_file, &cfg.tls.ca_key_file)?;
            let mut ips = api.server_ips.clone();
            if !api.listen.ip().is_unspecified() && !ips.contains(&api.listen.ip()) {
                ips.push(api.listen.ip());
            }
            let cert = ServingCert::new(ca, api.server_names.clone(), ips, SERVING_CERT_VALIDITY)?;
            tokio::spawn(cert.clone().renewal_loop(CERT_RENEWAL_CHECK, drain.clone()));
            tls::server_config_rotating(cert)?
        }
    };
    // Approvers are verified like agents' tokens (the same OIDC issuers), and Kubernetes
    // tokens always through TokenReview.
    let reviewer: Arc<dyn TokenReviewer> = Arc::new(KubeTokenReviewer::new(
        parts.client.clone(),
        cfg.identity.token_review_audiences.clone(),
    ));
    let principals = Arc::new(PrincipalVerifier::from_config(
        &cfg.identity,
        Some(reviewer),
    )?);
    let listener = TcpListener::bind(api.listen)
        .await
        .map_err(|source| AppError::Bind {
            addr: api.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| AppError::Bind {
        addr: api.listen,
        source,
    })?;
    if cfg.interception.mode == crate::config::InterceptionMode::Ebpf && !cfg.identity.watch_pods {
        tracing::warn!(
            "the approvals API recognises intercepted pods only by redirected connections: without identity.watchPods it does not know their addresses, so a pod dialling it directly is not refused by address"
        );
    }
    let server = ApprovalApi::new(crate::approval::api::ApiSettings {
        namespace: approval.namespace.clone(),
        client: parts.client,
        principals,
        seal,
        identity: Some(parts.identity),
        pods_watched: cfg.identity.watch_pods,
        scope: cfg.interception.scope.clone(),
        interceptor: parts.interceptor,
        recorder: Some(parts.recorder),
        node: parts.node,
        cluster: cfg.cluster.clone(),
        notifier: parts.notifier,
        metrics: Some(parts.metrics),
        idle_timeout: api.idle_timeout,
    });
    tokio::spawn(server.serve(listener, tls, drain));
    tracing::info!(%addr, namespace = %approval.namespace, "approvals API listening");
    Ok(addr)
}

/// The uploader for `recording.upload`, with credentials read from their files.
fn build_uploader(
    dir: &std::path::Path,
    upload: &crate::config::UploadConfig,
) -> Result<crate::recorder::upload::Uploader, AppError> {
    use crate::recorder::upload::{UploadSettings, Uploader, tls_for};
    let read = |file: &Option<PathBuf>, field: &str| -> Result<Option<String>, AppError> {
        file.as_ref()
            .map(|f| {
                std::fs::read_to_string(f)
                    .map(|s| s.trim().to_owned())
                    .map_err(|e| {
                        AppError::Config(format!("recording.upload.{field}: {}: {e}", f.display()))
                    })
            })
            .transpose()
    };
    let settings = UploadSettings {
        endpoint: upload.endpoint.clone(),
        bucket: upload.bucket.clone(),
        prefix: upload.prefix.clone(),
        region: upload.region.clone(),
        access_key_id: read(&upload.access_key_id_file, "accessKeyIdFile")?,
        secret_access_key: read(&upload.secret_access_key_file, "secretAccessKeyFile")?,
        every: upload.every,
        max_local_bytes: upload.max_local_bytes,
        max_retries: 3,
    };
    let tls = tls_for(upload.ca_file.as_deref())
        .map_err(|e| AppError::Config(format!("recording.upload.caFile: {e}")))?;
    Uploader::new(dir, settings, tls)
        .map_err(|e| AppError::Config(format!("recording.upload: {e}")))
}

/// Builds workload identity (cgroup resolver, pod store, static workloads) and the token
/// verifier.
fn build_identity(
    cfg: &Config,
    node: &str,
    client: Option<&kube::Client>,
) -> Result<(Arc<Identity>, Arc<PrincipalVerifier>), AppError> {
    let resolver = match cfg.interception.mode {
        InterceptionMode::Ebpf => Some(CgroupResolver::for_host(ResolverLimits {
            min_rescan_interval: cfg.identity.cgroup_rescan_interval,
            ..ResolverLimits::default()
        })?),
        InterceptionMode::None => None,
    };
    let identity = Arc::new(Identity::new(
        &cfg.identity,
        node,
        resolver,
        PodStore::new(),
    )?);
    let reviewer: Option<Arc<dyn TokenReviewer>> = match (client, cfg.identity.token_review) {
        (Some(c), true) => Some(Arc::new(KubeTokenReviewer::new(
            c.clone(),
            cfg.identity.token_review_audiences.clone(),
        ))),
        _ => None,
    };
    let principals = Arc::new(PrincipalVerifier::from_config(&cfg.identity, reviewer)?);
    Ok((identity, principals))
}

/// Keeps the kernel side's view of "the daemon is alive" fresh, for fail-open cgroups.
async fn heartbeat_loop(interceptor: Arc<Interceptor>, drain: drain::DrainWatcher) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = drain.signaled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = interceptor.heartbeat() {
            tracing::warn!(error = %e, "eBPF heartbeat failed");
        }
    }
}

impl App {
    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The approvals API's address, when it is served.
    pub fn approvals_addr(&self) -> Option<SocketAddr> {
        self.approvals_addr
    }

    /// The notifier (webhooks, Slack), when any target is configured; the holding side
    /// tells it about new AccessRequests.
    pub fn notifier(&self) -> Option<&crate::approval::notify::Notifier> {
        self.notifier.as_ref()
    }

    /// The admin endpoint's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Workload identity (its pod store is fed by the pod watch, or by tests).
    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    /// The proxy (for tests that install a frame sink).
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The kernel redirect, when attached.
    pub fn interceptor(&self) -> Option<&Arc<Interceptor>> {
        self.interceptor.as_ref()
    }

    /// Root of the Parquet dataset.
    pub fn recording_dir(&self) -> &std::path::Path {
        &self.recording_dir
    }

    /// Replaces the policy in force; new requests see it at once.
    pub fn set_policy(&self, policy: Policy) {
        self.proxy.policy.store(Arc::new(policy));
    }

    /// Runs until SIGTERM or SIGINT, then shuts down cleanly.
    pub async fn wait_termination(mut self) -> Result<RecorderStats, AppError> {
        wait_for_signal().await;
        // Held until the process exits, when the kernel lets go of it: a connection task
        // past the grace period, the write-ahead log's thread or the uploader may still be
        // writing to the directory when `shutdown` returns, and a gateway waiting to take
        // over must not start writing beside them.
        if let Some(lock) = self.recording_lock.take() {
            std::mem::forget(lock);
        }
        tracing::info!(grace = ?self.grace, "shutting down");
        self.shutdown().await
    }

    /// Stops accepting, lets in-flight requests finish (bounded by the grace period),
    /// detaches the redirect, then flushes every recorded row to Parquet.
    pub async fn shutdown(self) -> Result<RecorderStats, AppError> {
        let Self {
            proxy_drain,
            proxy_task,
            proxy,
            recorder,
            recorder_drain,
            interceptor,
            grace,
            detach_on_exit,
            upload,
            ..
        } = self;
        if proxy_drain.drain(grace).await == DrainOutcome::TimedOut {
            tracing::warn!(
                ?grace,
                "in-flight requests did not finish within the grace period"
            );
        }
        proxy_task.abort();
        let _ = proxy_task.await;
        // The recorder stops once every handle (held by the proxy and by rows still on their
        // way) is gone; the drain signal is only the last resort if one is stuck.
        drop(proxy);
        if interceptor.is_some() {
            if detach_on_exit.is_armed() {
                drop(detach_on_exit);
                tracing::info!("eBPF programs detached");
            } else {
                tracing::info!(
                    "eBPF programs stay attached: intercepted pods fail closed until the next start"
                );
            }
        }
        let join = recorder.join();
        tokio::pin!(join);
        let stats = tokio::select! {
            stats = &mut join => stats,
            _ = tokio::time::sleep(grace) => {
                tracing::warn!("recorder still has writers after the grace period; flushing now");
                let _ = recorder_drain.drain(grace).await;
                join.await
            }
        }?;
        tracing::info!(
            rows = stats.rows,
            files = stats.files.len(),
            "recordings flushed"
        );
        // One last upload round for the files just closed, within the grace period.
        if let Some((trigger, task)) = upload {
            drop(trigger);
            if tokio::time::timeout(grace, task).await.is_err() {
                tracing::warn!(
                    "the last upload round did not finish within the grace period; the next start uploads the rest"
                );
            }
        }
        Ok(stats)
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
