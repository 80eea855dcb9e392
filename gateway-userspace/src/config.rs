//! The daemon's configuration: one YAML file, validated completely before any port is bound.
//!
//! Unknown keys are errors that name the key's path (`upstream.tokenFiel: unknown field`),
//! durations are written as `5s`, `250ms` or `1m 30s`, and every file the config names is
//! checked for readability at load time so the daemon fails at start-up, not on the first
//! request.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use jiff::SignedDuration;
use serde::{Deserialize, Serialize};

/// Errors loading the configuration; each names the file and the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML did not parse or did not fit the schema.
    #[error("{file}: {location}{path}: {message}")]
    Parse {
        /// The config file.
        file: String,
        /// `line:column: ` where known.
        location: String,
        /// Path of the offending key, e.g. `upstream.tokenFile`.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A value is well-formed YAML but not acceptable.
    #[error("{file}: {path}: {message}")]
    Invalid {
        /// The config file.
        file: String,
        /// Path of the offending key.
        path: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// This node's name (recorded with every row); defaults to the host name.
    #[serde(default)]
    pub node: Option<String>,
    /// The cluster's name, recorded with every row.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// Where the proxy listens.
    pub listen: ListenConfig,
    /// Which connections the kernel redirects to the proxy.
    #[serde(default)]
    pub interception: InterceptionConfig,
    /// The real API server.
    pub upstream: UpstreamConfig,
    /// The certificate the proxy serves to agents.
    pub tls: ServingTlsConfig,
    /// How workloads and the principals behind bearer tokens are identified.
    #[serde(default)]
    pub identity: crate::identity::IdentityConfig,
    /// The policy: a file, or `allowAll` said explicitly. Required: a forgotten policy must
    /// not mean "allow everything".
    #[serde(default)]
    pub policy: Option<PolicyConfig>,
    /// Where and how requests are recorded.
    pub recording: RecordingConfig,
    /// The admin endpoint (`/metrics`, `/healthz`, `/readyz`, `/status`).
    #[serde(default)]
    pub admin: AdminConfig,
    /// How long in-flight requests get to finish on SIGTERM before the process exits.
    #[serde(default = "default_grace", with = "duration")]
    pub shutdown_grace: Duration,
    /// Limits the proxy enforces against slow, greedy or hostile clients.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Just-in-time human approval: where AccessRequests live, the seal key, the approvals
    /// API and notifications. Absent: no approvals API is served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<crate::approval::ApprovalConfig>,
}

/// Limits the proxy enforces on every client connection (docs/admin-guide.md, "Limits").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request head (request line and headers) a client may send; larger ones get
    /// 431 (HTTP/1.1 read buffer, HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE`).
    #[serde(default = "default_max_request_header_bytes")]
    pub max_request_header_bytes: u32,
    /// How long an HTTP/1.1 client gets to send a complete request head, also while a
    /// keep-alive connection waits for its next request (slowloris guard).
    #[serde(default = "default_header_read_timeout", with = "duration")]
    pub header_read_timeout: Duration,
    /// How long a client gets to finish the TLS handshake.
    #[serde(default = "default_tls_handshake_timeout", with = "duration")]
    pub tls_handshake_timeout: Duration,
    /// A connection with no request in progress is closed after this long.
    #[serde(default = "default_idle_timeout", with = "duration")]
    pub idle_timeout: Duration,
    /// HTTP/2 streams one connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`);
    /// excess streams are refused with `REFUSED_STREAM`.
    #[serde(default = "default_http2_max_concurrent_streams")]
    pub http2_max_concurrent_streams: u32,
    /// Interval of HTTP/2 keep-alive pings to the client (`0s`: no pings).
    #[serde(default = "default_http2_keep_alive_interval", with = "duration")]
    pub http2_keep_alive_interval: Duration,
    /// A client that does not answer a keep-alive ping within this long is disconnected.
    #[serde(default = "default_http2_keep_alive_timeout", with = "duration")]
    pub http2_keep_alive_timeout: Duration,
    /// Concurrent connections one workload (cgroup; source IP without the kernel redirect)
    /// may hold; excess connections are closed right after accept. `0`: no limit.
    #[serde(default = "default_max_connections_per_workload")]
    pub max_connections_per_workload: u32,
    /// Request bodies up to this size are read whole and decoded (protobuf transcoded to
    /// JSON) so policy and recording see the object; larger bodies are streamed through
    /// uninspected, never buffered whole. The API server's own limit is 3 MiB.
    #[serde(default = "default_max_inspected_body_bytes")]
    pub max_inspected_body_bytes: u32,
    /// Largest body of a create, update or patch of a resource (other than the `proxy`
    /// subresource), as kube-apiserver's own `MaxRequestBodyBytes` (3 MiB): a larger one
    /// gets the API server's 413 `Status` from the gateway and is never forwarded, so the
    /// answer does not depend on a race with the upstream closing the connection. `0`: no
    /// limit (bodies beyond the inspection limit stream through).
    #[serde(default = "default_max_request_body_bytes")]
    pub max_request_body_bytes: u32,
    /// How long a client gets to send a request body the gateway inspects (slow-body guard);
    /// after it, the request is answered with a 408 `Status`.
    #[serde(default = "default_body_read_timeout", with = "duration")]
    pub body_read_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_request_header_bytes: default_max_request_header_bytes(),
            header_read_timeout: default_header_read_timeout(),
            tls_handshake_timeout: default_tls_handshake_timeout(),
            idle_timeout: default_idle_timeout(),
            http2_max_concurrent_streams: default_http2_max_concurrent_streams(),
            http2_keep_alive_interval: default_http2_keep_alive_interval(),
            http2_keep_alive_timeout: default_http2_keep_alive_timeout(),
            max_connections_per_workload: default_max_connections_per_workload(),
            max_inspected_body_bytes: default_max_inspected_body_bytes(),
            max_request_body_bytes: default_max_request_body_bytes(),
            body_read_timeout: default_body_read_timeout(),
        }
    }
}

/// Smallest accepted `limits.maxRequestHeaderBytes` (hyper's minimum read buffer).
pub const MIN_REQUEST_HEADER_BYTES: u32 = 8192;
/// Largest accepted `limits.maxRequestHeaderBytes`.
pub const MAX_REQUEST_HEADER_BYTES: u32 = 16 * 1024 * 1024;

/// Admin endpoint settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminConfig {
    /// Where `/metrics`, `/healthz`, `/readyz` and `/status` are served.
    pub address: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([127, 0, 0, 1], DEFAULT_ADMIN_PORT)),
        }
    }
}

/// The shortest `interception.failOpenAfter`: three missed heartbeats.
const MIN_FAIL_OPEN_AFTER: Duration = Duration::from_secs(3);
/// The shortest `identity.cgroupRescanInterval`.
const MIN_CGROUP_RESCAN_INTERVAL: Duration = Duration::from_millis(100);

/// Default port of the admin endpoint.
pub const DEFAULT_ADMIN_PORT: u16 = 15000;

/// Proxy listener settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenConfig {
    /// A node address reachable from pod network namespaces (never 127.0.0.1 when eBPF
    /// interception is on: a pod's loopback is its own), e.g. `10.0.0.5:15443`.
    pub address: SocketAddr,
    /// Data-path threads, each with its own single-threaded runtime and upstream
    /// connections; an accepted connection stays on one of them for its life. `0` (the
    /// default): one per CPU the process may use.
    #[serde(default)]
    pub workers: usize,
}

/// How connections reach the proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum InterceptionMode {
    /// cgroup/connect4 + sock_ops redirect (production).
    #[default]
    Ebpf,
    /// No kernel redirect: clients connect to the listener directly (tests without root,
    /// or a workstation). Requests are then not attributed to a cgroup.
    None,
}

/// Kernel redirect settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InterceptionConfig {
    /// `ebpf` (default) or `none`.
    #[serde(default)]
    pub mode: InterceptionMode,
    /// API server addresses whose connections are redirected: the `kubernetes` Service
    /// ClusterIP:port and the endpoint addresses, IPv4 or IPv6 (`[fd00::1]:443`).
    #[serde(default)]
    pub targets: Vec<SocketAddr>,
    /// bpffs directory where programs and maps are pinned.
    #[serde(default = "default_pin_path")]
    pub pin_path: PathBuf,
    /// Remove the programs when the daemon exits. The default (false) keeps them, so
    /// intercepted pods fail closed while the daemon is down and a restart adopts them.
    #[serde(default)]
    pub detach_on_exit: bool,
    /// Fail-open cgroups connect directly once the daemon has been silent this long.
    #[serde(default = "default_fail_open_after", with = "duration")]
    pub fail_open_after: Duration,
    /// Capacity of the connection attribution maps (LRU).
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Which workloads are not intercepted, and which fail open.
    #[serde(default)]
    pub scope: crate::scope::ScopeConfig,
    /// Also redirect the `default/kubernetes` Service and its EndpointSlice addresses,
    /// watched through the API server and updated as they change.
    #[serde(default)]
    pub discover_kubernetes_service: bool,
    /// External API server names (`host:port`, e.g. a load balancer), resolved at start
    /// and every `resolveEvery`.
    #[serde(default)]
    pub target_hosts: Vec<String>,
    /// How often `targetHosts` are re-resolved.
    #[serde(default = "default_resolve_every", with = "duration")]
    pub resolve_every: Duration,
}

impl Default for InterceptionConfig {
    fn default() -> Self {
        Self {
            mode: InterceptionMode::default(),
            targets: Vec::new(),
            pin_path: default_pin_path(),
            detach_on_exit: false,
            fail_open_after: default_fail_open_after(),
            max_connections: default_max_connections(),
            scope: crate::scope::ScopeConfig::default(),
            discover_kubernetes_service: false,
            target_hosts: Vec::new(),
            resolve_every: default_resolve_every(),
        }
    }
}

/// The upstream API server and the gateway's credential for it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `https://host:port` of the real API server (or take it from `kubeconfig`).
    #[serde(default)]
    pub url: Option<url::Url>,
    /// PEM bundle the upstream's certificate is verified against (the cluster CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A kubeconfig to take the server, CA and credential from, in place of `url`,
    /// `caFile`, `tokenFile`, `clientCertFile`/`clientKeyFile` and `tlsServerName`.
    #[serde(default)]
    pub kubeconfig: Option<KubeconfigSource>,
    /// Take the server, CA and credential from the pod's own service account instead.
    #[serde(default)]
    pub in_cluster: bool,
    /// File holding the gateway's bearer token (re-read when it changes).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Client certificate (PEM) the gateway authenticates with instead of, or besides, a token.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Overrides the name verified in the upstream certificate (default: the URL host).
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// Whose identity the API server's own RBAC and audit see (`Impersonate-*` headers).
    #[serde(default)]
    pub impersonate: ImpersonationConfig,
    /// The HTTP version spoken to the API server (`http1`, the default, or `http2`).
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Connect timeout; an unreachable upstream answers 503 after this.
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
}

/// `upstream.protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 over a keep-alive pool: one connection per request in flight. Measured
    /// cheaper per request than HTTP/2 through hyper (docs/benchmarks.md), as in nginx.
    #[default]
    Http1,
    /// HTTP/2 by ALPN: requests multiplexed over few connections (falls back to HTTP/1.1
    /// when the server does not offer h2).
    Http2,
}

/// `upstream.kubeconfig`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeconfigSource {
    /// The kubeconfig file.
    pub path: PathBuf,
    /// The context to use (default: the file's `current-context`).
    #[serde(default)]
    pub context: Option<String>,
}

impl UpstreamConfig {
    /// Resolves the server, CA and user through kube-rs: from the kubeconfig, from the
    /// pod's service account, or from the explicit settings. Reads the kubeconfig and the
    /// CA; runs no exec plugin and reads no token file yet (that is [`crate::app::build`]'s
    /// job). Errors name the config key and the file or context at fault.
    pub fn resolve(&self) -> Result<crate::upstream::Upstream, crate::upstream::UpstreamError> {
        use crate::upstream::{Settings, Upstream, UpstreamError};
        if let Some(source) = &self.kubeconfig {
            return Upstream::from_kubeconfig(&source.path, source.context.as_deref());
        }
        if self.in_cluster {
            return Upstream::in_cluster();
        }
        let url = self.url.as_ref().ok_or(UpstreamError::Setting {
            key: "upstream.url",
            reason: "is required (or set upstream.kubeconfig or upstream.inCluster)".to_owned(),
        })?;
        let ca_file = self.ca_file.as_deref().ok_or(UpstreamError::Setting {
            key: "upstream.caFile",
            reason: "is required (or set upstream.kubeconfig or upstream.inCluster)".to_owned(),
        })?;
        let client_certificate = match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => {
                return Err(UpstreamError::Setting {
                    key: "upstream.clientCertFile",
                    reason: "clientCertFile and clientKeyFile go together".to_owned(),
                });
            }
        };
        Upstream::from_settings(Settings {
            url,
            ca_file,
            token_file: self.token_file.as_deref(),
            client_certificate,
            tls_server_name: self.tls_server_name.as_deref(),
        })
    }
}

/// How the gateway impersonates on upstream requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ImpersonationMode {
    /// Requests run as the gateway's own identity.
    #[default]
    None,
    /// As the kernel-attributed workload's service account
    /// (`system:serviceaccount:<ns>:<name>` with its service-account groups).
    Workload,
    /// As the verified principal of the presented token (OIDC user, service account).
    Principal,
    /// As a fixed user and groups from this config.
    Fixed,
}

/// `upstream.impersonate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImpersonationConfig {
    /// none (default) | workload | principal | fixed.
    #[serde(default)]
    pub mode: ImpersonationMode,
    /// The user for `fixed`.
    #[serde(default)]
    pub user: Option<String>,
    /// The groups for `fixed`.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The serving certificate, minted from the cluster CA for the API server's names.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServingTlsConfig {
    /// CA certificate (PEM) that agent pods already trust.
    pub ca_cert_file: PathBuf,
    /// Its private key (PEM).
    pub ca_key_file: PathBuf,
    /// DNS names for the serving certificate.
    #[serde(default = "default_server_names")]
    pub server_names: Vec<String>,
    /// IP addresses for the serving certificate; the interception targets' addresses are
    /// always added (clients that dial an IP verify it against IP SANs only).
    #[serde(default)]
    pub server_ips: Vec<IpAddr>,
    /// Gateway-CA mode: when the CA files do not exist, generate a CA there (key mode 0600).
    /// The deployment then distributes `caCertFile` into agent pods' trust bundle.
    #[serde(default)]
    pub create_ca_if_missing: bool,
}

/// Where the policy comes from (`policy:` in the config file).
///
/// There is no default: a config names a policy file (`policy: {file: PATH}`) or says
/// `policy: allowAll` in so many words, and `chaperone status` shows which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyConfig {
    /// `policy: allowAll`: forward every request the identity guards let through; every
    /// request is still recorded.
    AllowAll,
    /// `policy: {file: PATH}`: the policy file (docs/policy-reference.md).
    File(PathBuf),
}

impl PolicyConfig {
    /// The policy file, when there is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            PolicyConfig::AllowAll => None,
            PolicyConfig::File(path) => Some(path),
        }
    }
}

/// The mapping form of [`PolicyConfig`].
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    file: PathBuf,
}

const ALLOW_ALL: &str = "allowAll";

impl<'de> Deserialize<'de> for PolicyConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = PolicyConfig;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "`{ALLOW_ALL}` or a mapping with `file: PATH`")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PolicyConfig, E> {
                if v == ALLOW_ALL {
                    Ok(PolicyConfig::AllowAll)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
                }
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<PolicyConfig, A::Error> {
                PolicyFile::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(|f| PolicyConfig::File(f.file))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Serialize for PolicyConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PolicyConfig::AllowAll => s.serialize_str(ALLOW_ALL),
            PolicyConfig::File(file) => PolicyFile { file: file.clone() }.serialize(s),
        }
    }
}

/// Recording settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RecordingConfig {
    /// Root directory of the Parquet dataset.
    pub dir: PathBuf,
    /// Rotate after this many rows.
    #[serde(default = "default_max_rows")]
    pub max_rows_per_file: usize,
    /// Rotate after this long, so analysts see recent requests.
    #[serde(default = "default_max_file_age", with = "duration")]
    pub max_file_age: Duration,
    /// Largest recorded `request_object` (masked JSON); a larger one is left out and
    /// flagged `request_object_truncated`, so what is recorded is always valid JSON.
    #[serde(default = "default_max_object_bytes")]
    pub max_object_bytes: usize,
    /// Record response bodies (`response_object`, masked). For it the gateway asks the API
    /// server for JSON where a client accepts protobuf. Watches and streams are not recorded
    /// as objects.
    #[serde(default = "default_true")]
    pub response_bodies: bool,
    /// What happens to reads while recording is down (disk full, I/O errors): `refuse`
    /// (the default: nothing passes unrecorded) or `allow` (reads pass, each logged with
    /// its audit id). Mutating requests are always refused then, with a `Status` 503.
    #[serde(default)]
    pub reads_while_down: ReadsWhileDown,
    /// The write-ahead log's directory, where mutating requests are made durable before
    /// they are forwarded; default `<dir>/.wal`. Put it on the same disk as `dir` (or one
    /// at least as reliable): while it cannot be written, mutating requests are refused.
    #[serde(default)]
    pub wal_dir: Option<PathBuf>,
    /// The ed25519 private key (PKCS#8 PEM, `openssl genpkey -algorithm ed25519`) that
    /// signs the manifest entries listing each finished file; without one, entries are
    /// hash-chained but unsigned. Mount it from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_file: Option<PathBuf>,
    /// Upload finished files and manifests to S3-compatible object storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadConfig>,
    /// Payload bytes of one exec or attach session stored in `exec_frames`; past it,
    /// frames are counted but not stored and a `truncated` row marks the point.
    #[serde(default = "default_max_session_bytes")]
    pub max_session_bytes: u64,
}

/// `recording.upload`: copies of finished files and manifests in S3-compatible storage.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UploadConfig {
    /// `http(s)://host:port` of an S3-compatible endpoint; absent: AWS S3 in `region`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Bucket name.
    pub bucket: String,
    /// Key prefix, e.g. the cluster name.
    #[serde(default)]
    pub prefix: String,
    /// Signing region.
    #[serde(default = "default_region")]
    pub region: String,
    /// A file holding the access key id (a mounted Secret); absent: `AWS_ACCESS_KEY_ID`.
    #[serde(default)]
    pub access_key_id_file: Option<PathBuf>,
    /// A file holding the secret access key; absent: `AWS_SECRET_ACCESS_KEY`.
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
    /// CA bundle for an https endpoint; absent: the system bundle.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// How often the recording directory is scanned for new files.
    #[serde(default = "default_upload_every", with = "duration")]
    pub every: Duration,
    /// Keep at most this many bytes of finished files on the node: the oldest files whose
    /// upload is confirmed are deleted beyond it. Absent: nothing is deleted.
    #[serde(default)]
    pub max_local_bytes: Option<u64>,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}
fn default_upload_every() -> Duration {
    Duration::from_secs(30)
}

/// `recording.readsWhileDown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ReadsWhileDown {
    /// Refuse reads too, with a `Status` 503.
    #[default]
    Refuse,
    /// Forward reads; their rows are lost (and logged).
    Allow,
}

fn default_resolve_every() -> Duration {
    Duration::from_secs(30)
}
fn default_pin_path() -> PathBuf {
    PathBuf::from(crate::ebpf::DEFAULT_PIN_PATH)
}
fn default_fail_open_after() -> Duration {
    Duration::from_secs(5)
}
fn default_max_connections() -> u32 {
    gateway_common::CONNECTIONS_MAX
}
fn default_cluster() -> String {
    "default".to_owned()
}
fn default_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_rows() -> usize {
    100_000
}
fn default_max_file_age() -> Duration {
    Duration::from_secs(60)
}
fn default_max_request_header_bytes() -> u32 {
    64 * 1024
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_tls_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(90)
}
fn default_http2_max_concurrent_streams() -> u32 {
    250
}
fn default_http2_keep_alive_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_http2_keep_alive_timeout() -> Duration {
    Duration::from_secs(20)
}
fn default_max_connections_per_workload() -> u32 {
    256
}
fn default_max_inspected_body_bytes() -> u32 {
    3 * 1024 * 1024
}
fn default_max_request_body_bytes() -> u32 {
    3 * 1024 * 1024
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_true() -> bool {
    true
}
fn default_max_object_bytes() -> usize {
    256 * 1024
}
fn default_max_session_bytes() -> u64 {
    crate::recorder::DEFAULT_MAX_SESSION_BYTES
}
/// The names in-cluster clients use for the API server.
pub fn default_server_names() -> Vec<String> {
    [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Durations as `5s`, `250ms`, `1m 30s` or ISO 8601, never negative (serde `with`).
pub(crate) mod duration {
    use super::*;

    /// Deserializes a non-negative duration.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let signed = SignedDuration::deserialize(d)?;
        Duration::try_from(signed).map_err(|_| {
            serde::de::Error::custom(format!("duration {signed:#} must not be negative"))
        })
    }

    /// Serializes in the friendly format (`1m 30s`).
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        let signed = SignedDuration::try_from(*d).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&format!("{signed:#}"))
    }
}

impl LimitsConfig {
    /// Checks the values hyper would reject (or panic on) and ones that disable a guard.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(MIN_REQUEST_HEADER_BYTES..=MAX_REQUEST_HEADER_BYTES)
            .contains(&self.max_request_header_bytes)
        {
            return Err((
                "limits.maxRequestHeaderBytes",
                format!(
                    "{} is out of range: must be between {MIN_REQUEST_HEADER_BYTES} and {MAX_REQUEST_HEADER_BYTES}",
                    self.max_request_header_bytes
                ),
            ));
        }
        for (path, value) in [
            ("limits.headerReadTimeout", self.header_read_timeout),
            ("limits.tlsHandshakeTimeout", self.tls_handshake_timeout),
            ("limits.idleTimeout", self.idle_timeout),
            ("limits.bodyReadTimeout", self.body_read_timeout),
            (
                "limits.http2KeepAliveTimeout",
                self.http2_keep_alive_timeout,
            ),
        ] {
            if value.is_zero() {
                return Err((path, "must be longer than 0s".to_owned()));
            }
        }
        if self.http2_max_concurrent_streams == 0 {
            return Err((
                "limits.http2MaxConcurrentStreams",
                "must be at least 1".to_owned(),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn from_yaml(text: &str, file: &str) -> Result<Self, ConfigError> {
        let de = serde_norway::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let location = inner
                .location()
                .map(|l| format!("{}:{}: ", l.line(), l.column()))
                .unwrap_or_default();
            let message = inner.to_string();
            // serde_norway appends " at line N column M"; the location is already in front.
            let message = message
                .split(" at line ")
                .next()
                .unwrap_or(&message)
                .to_owned();
            ConfigError::Parse {
                file: file.to_owned(),
                location,
                path,
                message,
            }
        })?;
        config.validate(file)?;
        Ok(config)
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let invalid = |path, message: String| ConfigError::Invalid {
            file: file.to_owned(),
            path,
            message,
        };
        if self.upstream.kubeconfig.is_some() && self.upstream.in_cluster {
            return Err(invalid(
                "upstream.inCluster",
                "conflicts with upstream.kubeconfig; choose one".to_owned(),
            ));
        }
        if let Some(source) = ["upstream.kubeconfig", "upstream.inCluster"]
            .into_iter()
            .zip([self.upstream.kubeconfig.is_some(), self.upstream.in_cluster])
            .find_map(|(key, set)| set.then_some(key))
        {
            let u = &self.upstream;
            for (key, set) in [
                ("upstream.url", u.url.is_some()),
                ("upstream.caFile", u.ca_file.is_some()),
                ("upstream.tokenFile", u.token_file.is_some()),
                ("upstream.clientCertFile", u.client_cert_file.is_some()),
                ("upstream.clientKeyFile", u.client_key_file.is_some()),
                ("upstream.tlsServerName", u.tls_server_name.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        key,
                        format!("conflicts with {source}, which supplies it"),
                    ));
                }
            }
        }
        if let Some(url) = &self.upstream.url
            && url.scheme() != "https"
        {
            return Err(invalid(
                "upstream.url",
                format!("must be https://, got {url}"),
            ));
        }
        let upstream = self
            .upstream
            .resolve()
            .map_err(|e| invalid(e.config_key(), e.message()))?;
        if upstream.credential_kind() == "none" {
            return Err(invalid(
                "upstream",
                format!(
                    "needs a credential for the gateway: tokenFile, clientCertFile and clientKeyFile, or a kubeconfig user with a token, tokenFile, client certificate or exec plugin ({} has none)",
                    upstream.source
                ),
            ));
        }
        if self.interception.mode == InterceptionMode::Ebpf {
            if self.interception.targets.is_empty()
                && self.interception.target_hosts.is_empty()
                && !self.interception.discover_kubernetes_service
            {
                return Err(invalid(
                    "interception.targets",
                    "must list at least one API server address when mode is ebpf (or set targetHosts or discoverKubernetesService)".to_owned(),
                ));
            }
            if self.listen.address.ip().is_loopback()
                || self.listen.address.ip().is_unspecified()
                || !self.listen.address.is_ipv4()
            {
                return Err(invalid(
                    "listen.address",
                    format!(
                        "{} is not reachable from pod network namespaces; use an IPv4 node address",
                        self.listen.address
                    ),
                ));
            }
        }
        if self.interception.mode == InterceptionMode::Ebpf {
            let i = &self.interception;
            if i.resolve_every.is_zero() {
                return Err(invalid(
                    "interception.resolveEvery",
                    "must be longer than 0s".to_owned(),
                ));
            }
            // The heartbeat is written every second: a shorter window would let pods of
            // fail-open namespaces bypass a gateway that is up.
            if i.fail_open_after < MIN_FAIL_OPEN_AFTER {
                return Err(invalid(
                    "interception.failOpenAfter",
                    format!(
                        "must be at least {}s (the heartbeat is written every second)",
                        MIN_FAIL_OPEN_AFTER.as_secs()
                    ),
                ));
            }
            // The scope is decided on workloads' names: without a source of names every
            // pod stays in scope, whatever the scope says.
            if !i.scope.is_empty()
                && !self.identity.watch_pods
                && self.identity.workloads.is_empty()
            {
                return Err(invalid(
                    "interception.scope",
                    "needs workloads' names to decide who is in scope: set identity.watchPods: true".to_owned(),
                ));
            }
        } else if !self.listen.address.ip().is_loopback() {
            // Without the kernel redirect, no connection carries an origin the gateway can
            // check: anyone who reaches the port would act with the gateway's credential.
            return Err(invalid(
                "listen.address",
                format!(
                    "{} is not a loopback address; without interception (mode: none) the gateway must listen on loopback only",
                    self.listen.address
                ),
            ));
        }
        if self.interception.max_connections < 1024 {
            return Err(invalid(
                "interception.maxConnections",
                "must be at least 1024".to_owned(),
            ));
        }
        if self.upstream.impersonate.mode == ImpersonationMode::Fixed
            && self
                .upstream
                .impersonate
                .user
                .as_deref()
                .is_none_or(str::is_empty)
        {
            return Err(invalid(
                "upstream.impersonate.user",
                "is required when mode is fixed".to_owned(),
            ));
        }
        if self.upstream.impersonate.mode == ImpersonationMode::Fixed {
            let fixed = &self.upstream.impersonate;
            let names = fixed.user.iter().map(|u| ("upstream.impersonate.user", u));
            let groups = fixed
                .groups
                .iter()
                .map(|g| ("upstream.impersonate.groups", g));
            if let Some((field, name)) = names
                .chain(groups)
                .find(|(_, name)| http::HeaderValue::from_bytes(name.as_bytes()).is_err())
            {
                return Err(invalid(
                    field,
                    format!(
                        "{name:?} holds a control character, so it cannot be sent as an Impersonate header"
                    ),
                ));
            }
        }
        if let Err(e) = self.identity.validate() {
            return Err(invalid("identity", e.to_string()));
        }
        if self.recording.max_rows_per_file == 0 {
            return Err(invalid(
                "recording.maxRowsPerFile",
                "must be at least 1".to_owned(),
            ));
        }
        if self
            .recording
            .upload
            .as_ref()
            .is_some_and(|u| u.every.is_zero())
        {
            return Err(invalid(
                "recording.upload.every",
                "must be longer than 0s".to_owned(),
            ));
        }
        if self.upstream.connect_timeout.is_zero() {
            return Err(invalid(
                "upstream.connectTimeout",
                "must be longer than 0s (every connection to the API server would time out)"
                    .to_owned(),
            ));
        }
        if self.identity.cgroup_rescan_interval < MIN_CGROUP_RESCAN_INTERVAL {
            return Err(invalid(
                "identity.cgroupRescanInterval",
                format!(
                    "must be at least {MIN_CGROUP_RESCAN_INTERVAL:?}: it bounds how often connections from unknown cgroups make the gateway walk the cgroup tree"
                ),
            ));
        }
        self.limits
            .validate()
            .map_err(|(path, message)| invalid(path, message))?;
        if let Some(approval) = &self.approval {
            approval
                .validate()
                .map_err(|(path, message)| invalid(path, message))?;
        }
        let u = &self.upstream;
        if u.client_cert_file.is_some() != u.client_key_file.is_some() {
            return Err(invalid(
                "upstream.clientCertFile",
                "clientCertFile and clientKeyFile go together".to_owned(),
            ));
        }
        let mut required = Vec::new();
        for (path, file) in [
            ("upstream.tokenFile", &u.token_file),
            ("upstream.clientCertFile", &u.client_cert_file),
            ("upstream.clientKeyFile", &u.client_key_file),
        ] {
            if let Some(file) = file {
                required.push((path, file));
            }
        }
        if !self.tls.create_ca_if_missing {
            required.push(("tls.caCertFile", &self.tls.ca_cert_file));
            required.push(("tls.caKeyFile", &self.tls.ca_key_file));
        }
        for (path, file_path) in required {
            if let Err(e) = std::fs::metadata(file_path) {
                return Err(invalid(path, format!("{}: {e}", file_path.display())));
            }
        }
        match &self.policy {
            None => {
                return Err(invalid(
                    "policy",
                    format!(
                        "is required: name a policy file (`policy: {{file: /etc/chaperone/policy.yaml}}`) or write `policy: {ALLOW_ALL}` to forward every request"
                    ),
                ));
            }
            Some(PolicyConfig::File(policy)) => {
                if let Err(e) = std::fs::metadata(policy) {
                    return Err(invalid("policy.file", format!("{}: {e}", policy.display())));
                }
            }
            Some(PolicyConfig::AllowAll) => {}
        }
        Ok(())
    }

    /// Validates the config again after command-line overrides were applied.
    pub fn revalidate(&self, file: &str) -> Result<(), ConfigError> {
        self.validate(file)
    }

    /// This node's name: the configured one, else the host name.
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "unknown".to_owned())
        })
    }

    /// IP SANs for the serving certificate: configured ones plus the interception targets.
    pub fn serving_ips(&self) -> Vec<IpAddr> {
        let mut ips = self.tls.server_ips.clone();
        for target in &self.interception.targets {
            let ip = target.ip();
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        ips
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        // kube-rs parses the upstream CA when the config is validated: a real certificate.
        let (ca, key) = crate::tls::CertificateAuthority::generate("config-test-ca").unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
        std::fs::write(dir.path().join("ca.key"), key).unwrap();
        std::fs::write(dir.path().join("token"), "x").unwrap();
        let d = dir.path().display();
        let yaml = format!(
            "listen:\n  address: 169.254.10.1:15443\n\
             interception:\n  targets: [\"169.254.10.100:443\"]\n\
             upstream:\n  url: https://127.0.0.1:6443\n  caFile: {d}/ca.crt\n  tokenFile: {d}/token\n  connectTimeout: 250ms\n\
             tls:\n  caCertFile: {d}/ca.crt\n  caKeyFile: {d}/ca.key\n\
             recording:\n  dir: {d}/rec\n  maxFileAge: 1m 30s\n\
             policy: allowAll\n"
        );
        (dir, yaml)
    }

    /// The configuration deploy/ ships: every key exists (unknown keys are refused).
    #[test]
    fn the_shipped_configuration_parses() {
        let text = include_str!("../../deploy/config/chaperone.yaml");
        let config: Config = serde_norway::from_str(text).unwrap();
        assert_eq!(
            config.interception.scope.intercept_namespaces,
            ["ai-agents"]
        );
        assert!(
            config.identity.watch_pods,
            "the scope needs the pods' names"
        );
    }

    #[test]
    fn dangerous_interception_settings_are_refused() {
        let (_dir, yaml) = fixture();
        let interception = "interception:\n  targets: [\"169.254.10.100:443\"]\n";
        assert!(yaml.contains(interception));
        for (extra, path, says) in [
            (
                "  resolveEvery: 0s\n",
                "interception.resolveEvery",
                "longer than 0s",
            ),
            (
                "  failOpenAfter: 1s\n",
                "interception.failOpenAfter",
                "at least 3s",
            ),
            (
                "  scope:\n    interceptNamespaces: [ai-agents]\n",
                "interception.scope",
                "identity.watchPods",
            ),
        ] {
            let bad = yaml.replace(interception, &format!("{interception}{extra}"));
            let err = Config::from_yaml(&bad, "c.yaml").unwrap_err().to_string();
            assert!(err.contains(path) && err.contains(says), "{extra}: {err}");
        }
        // Without the redirect, only loopback.
        let none = yaml.replace(interception, "interception:\n  mode: none\n");
        let err = Config::from_yaml(&none, "c.yaml").unwrap_err().to_string();
        assert!(
            err.contains("listen.address") && err.contains("loopback"),
            "{err}"
        );
        let local = none.replace("169.254.10.1:15443", "127.0.0.1:15443");
        assert!(Config::from_yaml(&local, "c.yaml").is_ok());
    }

    /// Durations that parse but would break a part of the gateway (every connect timing
    /// out, the cgroup rescan guard off, an upload loop without a pause).
    #[test]
    fn durations_that_break_a_part_are_refused() {
        let (_dir, yaml) = fixture();
        for (from, to, path) in [
            (
                "connectTimeout: 250ms",
                "connectTimeout: 0s",
                "upstream.connectTimeout",
            ),
            (
                "policy: allowAll\n",
                "policy: allowAll\nidentity:\n  cgroupRescanInterval: 10ms\n",
                "identity.cgroupRescanInterval",
            ),
            (
                "maxFileAge: 1m 30s\n",
                "maxFileAge: 1m 30s\n  upload:\n    bucket: b\n    every: 0s\n",
                "recording.upload.every",
            ),
        ] {
            assert!(yaml.contains(from), "{from}");
            let bad = yaml.replace(from, to);
            let err = Config::from_yaml(&bad, "c.yaml").unwrap_err().to_string();
            assert!(err.contains(path), "{to}: {err}");
        }
        // Five minutes between uploads is fine (its backoff once panicked on it).
        let upload = yaml.replace(
            "maxFileAge: 1m 30s\n",
            "maxFileAge: 1m 30s\n  upload:\n    bucket: b\n    every: 5m\n",
        );
        assert!(Config::from_yaml(&upload, "c.yaml").is_ok());
    }

    /// A fixed impersonation is checked at load: every request would otherwise be refused
    /// for a name that cannot be a header value.
    #[test]
    fn a_fixed_impersonation_needs_names_that_can_be_headers() {
        let (_dir, yaml) = fixture();
        let upstream = "upstream:\n";
        let with = |user: &str, group: &str| {
            yaml.replace(
                upstream,
                &format!(
                    "{upstream}  impersonate:\n    mode: fixed\n    user: {user}\n    groups: [{group}]\n"
                ),
            )
        };
        Config::from_yaml(&with("agents", "\"équipe\""), "c.yaml").expect("valid names");
        for (user, group, field) in [
            ("\"agent\\u0001\"", "sre", "upstream.impersonate.user"),
            ("agent", "\"sre\\nx\"", "upstream.impersonate.groups"),
        ] {
            let err = Config::from_yaml(&with(user, group), "c.yaml")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(field) && err.contains("control character"),
                "{user} {group}: {err}"
            );
        }
    }

    #[test]
    fn the_policy_is_required_and_allow_all_must_be_said() {
        let (dir, yaml) = fixture();
        let c = Config::from_yaml(&yaml, "c.yaml").unwrap();
        assert_eq!(c.policy, Some(PolicyConfig::AllowAll));

        let without = yaml.replace("policy: allowAll\n", "");
        let err = Config::from_yaml(&without, "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("policy: is required") && err.contains("allowAll"),
            "{err}"
        );

        let file = dir.path().join("policy.yaml");
        std::fs::write(&file, "x").unwrap();
        let with_file = yaml.replace(
            "policy: allowAll\n",
            &format!("policy:\n  file: {}\n", file.display()),
        );
        let c = Config::from_yaml(&with_file, "c.yaml").unwrap();
        assert_eq!(c.policy, Some(PolicyConfig::File(file.clone())));
        assert_eq!(c.policy.as_ref().and_then(PolicyConfig::file), Some(&*file));
        // The effective config logged at start-up says which.
        let logged = serde_json::to_value(&c).unwrap();
        assert_eq!(logged["policy"]["file"], file.display().to_string());

        for (bad, expected) in [
            ("policy: allowall\n", "allowall"),
            ("policy: true\n", "policy"),
            ("policy:\n  files: /x\n", "files"),
            ("policy:\n  file: /nonexistent/policy.yaml\n", "policy.file"),
        ] {
            let err = Config::from_yaml(&yaml.replace("policy: allowAll\n", bad), "c.yaml")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(expected),
                "{bad:?}: expected {expected:?} in {err}"
            );
        }
    }

    #[test]
    fn parses_a_complete_config_with_defaults() {
        let (_dir, yaml) = fixture();
        let c = Config::from_yaml(&yaml, "config.yaml").unwrap();
        assert_eq!(c.upstream.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.recording.max_file_age, Duration::from_secs(90));
        assert_eq!(c.shutdown_grace, Duration::from_secs(10));
        assert_eq!(c.interception.mode, InterceptionMode::Ebpf);
        assert_eq!(
            c.serving_ips(),
            vec!["169.254.10.100".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(c.tls.server_names.len(), 4);
        assert_eq!(c.limits, LimitsConfig::default());
    }

    #[test]
    fn limits_parse_and_bad_limits_name_the_key() {
        let (_dir, yaml) = fixture();
        let with = |limits: &str| format!("{yaml}limits:\n{limits}");
        let c = Config::from_yaml(
            &with("  maxRequestHeaderBytes: 16384\n  idleTimeout: 2s\n  maxConnectionsPerWorkload: 0\n"),
            "c.yaml",
        )
        .unwrap();
        assert_eq!(c.limits.max_request_header_bytes, 16384);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(2));
        assert_eq!(c.limits.max_connections_per_workload, 0);
        assert_eq!(c.limits.header_read_timeout, Duration::from_secs(30));
        let cases: &[(&str, &str)] = &[
            (
                "  maxRequestHeaderBytes: 100\n",
                "limits.maxRequestHeaderBytes",
            ),
            (
                "  maxRequestHeaderBytes: 99999999\n",
                "limits.maxRequestHeaderBytes",
            ),
            ("  headerReadTimeout: 0s\n", "limits.headerReadTimeout"),
            ("  tlsHandshakeTimeout: 0s\n", "limits.tlsHandshakeTimeout"),
            ("  idleTimeout: -1s\n", "limits.idleTimeout"),
            (
                "  http2MaxConcurrentStreams: 0\n",
                "limits.http2MaxConcurrentStreams",
            ),
            ("  maxHeaderBytes: 1\n", "limits.maxHeaderBytes"),
        ];
        for (limits, expected) in cases {
            let err = Config::from_yaml(&with(limits), "c.yaml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
    }

    #[test]
    fn errors_name_the_key_path() {
        let (_dir, yaml) = fixture();
        let cases: &[(&str, &str, &str)] = &[
            ("  tokenFile:", "  tokenFiel:", "upstream.tokenFiel"),
            (
                "  connectTimeout: 250ms",
                "  connectTimeout: soon",
                "upstream.connectTimeout",
            ),
            (
                "  maxFileAge: 1m 30s",
                "  maxFileAge: -5s",
                "recording.maxFileAge",
            ),
            (
                "url: https://",
                "url: http://",
                "upstream.url: must be https://",
            ),
            (
                "address: 169.254.10.1:15443",
                "address: 127.0.0.1:15443",
                "listen.address",
            ),
            ("  dir:", "  dri:", "recording.dri"),
        ];
        for (from, to, expected) in cases {
            let bad = yaml.replacen(from, to, 1);
            assert_ne!(bad, yaml, "fixture does not contain {from:?}");
            let err = Config::from_yaml(&bad, "config.yaml")
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("config.yaml:"), "{err}");
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        }
    }

    #[test]
    fn a_kubeconfig_replaces_the_explicit_upstream_settings() {
        let (dir, yaml) = fixture();
        let d = dir.path().display();
        let explicit = format!(
            "  url: https://127.0.0.1:6443\n  caFile: {d}/ca.crt\n  tokenFile: {d}/token\n"
        );
        let write_kubeconfig = |user: &str, ca: &str| {
            std::fs::write(
                dir.path().join("kubeconfig"),
                format!(
                    "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
                     clusters:\n- name: k\n  cluster:\n    server: https://192.0.2.1:6443\n{ca}\
                     users:\n- name: u\n  user:\n{user}\
                     contexts:\n- name: c\n  context:\n    cluster: k\n    user: u\n"
                ),
            )
            .unwrap();
        };
        let with_kubeconfig = |extra: &str| {
            yaml.replacen(
                &explicit,
                &format!("{extra}  kubeconfig:\n    path: {d}/kubeconfig\n"),
                1,
            )
        };
        write_kubeconfig(
            "    tokenFile: token\n",
            "    certificate-authority: ca.crt\n",
        );
        let c = Config::from_yaml(&with_kubeconfig(""), "c.yaml").unwrap();
        let u = c.upstream.resolve().unwrap();
        assert_eq!(u.config.cluster_url.to_string(), "https://192.0.2.1:6443/");
        let ca_pem = std::fs::read(dir.path().join("ca.crt")).unwrap();
        let ca_der =
            <rustls_pki_types::CertificateDer as rustls_pki_types::pem::PemObject>::from_pem_slice(
                &ca_pem,
            )
            .unwrap();
        assert_eq!(u.config.root_cert, Some(vec![ca_der.to_vec()]));
        // The relative tokenFile is resolved against the kubeconfig's directory.
        assert_eq!(
            u.config.auth_info.token_file.as_deref(),
            Some(dir.path().join("token").to_str().unwrap())
        );
        assert_eq!(u.credential_kind(), "tokenFile");

        let cases = [
            (
                with_kubeconfig("  url: https://127.0.0.1:6443\n"),
                "upstream.url: conflicts with upstream.kubeconfig",
            ),
            (
                with_kubeconfig(&format!("  tokenFile: {d}/token\n")),
                "upstream.tokenFile: conflicts with upstream.kubeconfig",
            ),
            (
                with_kubeconfig("  inCluster: true\n"),
                "upstream.inCluster: conflicts with upstream.kubeconfig",
            ),
            (
                yaml.replacen(&explicit, "  inCluster: true\n  caFile: /x\n", 1),
                "upstream.caFile: conflicts with upstream.inCluster",
            ),
        ];
        for (text, want) in cases {
            let err = Config::from_yaml(&text, "c.yaml").unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        write_kubeconfig("    token: abc\n", "");
        let err = Config::from_yaml(&with_kubeconfig(""), "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("upstream.kubeconfig")
                && err.contains("no certificate-authority")
                && err.contains("context 'c'")
                && err.contains(&format!("{d}/kubeconfig")),
            "{err}"
        );
        // Exec plugins are kube-rs's job now: validating the config does not run them (the
        // gateway runs them when it starts), so a config naming one loads.
        write_kubeconfig(
            "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /nonexistent/plugin\n",
            "    certificate-authority: ca.crt\n",
        );
        let c = Config::from_yaml(&with_kubeconfig(""), "c.yaml").unwrap();
        assert_eq!(
            c.upstream.resolve().unwrap().credential_kind(),
            "exec plugin"
        );
        // A user without any credential is refused, naming the kubeconfig and context.
        write_kubeconfig("    {}\n", "    certificate-authority: ca.crt\n");
        let err = Config::from_yaml(&with_kubeconfig(""), "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("needs a credential") && err.contains("(context 'c') has none"),
            "{err}"
        );
    }

    #[test]
    fn the_gateway_needs_a_credential_and_a_certificate_needs_its_key() {
        let (dir, yaml) = fixture();
        let d = dir.path().display();
        let no_token = yaml.replacen(&format!("  tokenFile: {d}/token\n"), "", 1);
        assert_ne!(no_token, yaml);
        let err = Config::from_yaml(&no_token, "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a credential"), "{err}");
        let cert_only = no_token.replacen(
            "  caFile:",
            &format!("  clientCertFile: {d}/ca.crt\n  caFile:"),
            1,
        );
        let err = Config::from_yaml(&cert_only, "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("clientKeyFile go together"), "{err}");
        let cert_and_key = cert_only.replacen(
            "  caFile:",
            &format!("  clientKeyFile: {d}/ca.key\n  caFile:"),
            1,
        );
        let cfg = Config::from_yaml(&cert_and_key, "c.yaml").unwrap();
        assert!(cfg.upstream.token_file.is_none() && cfg.upstream.client_cert_file.is_some());
    }

    #[test]
    fn missing_files_are_reported_at_load() {
        let (dir, yaml) = fixture();
        std::fs::remove_file(dir.path().join("token")).unwrap();
        let err = Config::from_yaml(&yaml, "c.yaml").unwrap_err().to_string();
        assert!(
            err.contains("upstream.tokenFile") && err.contains("No such file"),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_rejected_not_panicked_on() {
        for garbage in ["", "[]", "{{{", "listen: 5", "\u{0}"] {
            assert!(
                Config::from_yaml(garbage, "g.yaml").is_err(),
                "{garbage:?} was accepted"
            );
        }
    }
}
