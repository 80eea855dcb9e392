//! The upstream API server and the gateway's credential for it, resolved by kube-rs.
//!
//! Every upstream source becomes one [`kube::Config`]: a kubeconfig file and context
//! (`upstream.kubeconfig`), the pod's service account (`upstream.inCluster`), or the explicit
//! `url`/`caFile`/`tokenFile`/`clientCertFile` settings. kube-rs then does what kubectl does
//! with it: relative paths, `-data` fields, token files re-read on rotation, exec credential
//! plugins (run again before their token expires), client certificates (from files or from
//! an exec plugin), `tls-server-name`, and CA files re-read on rotation in-cluster.
//!
//! This module is the thin part on top: clear errors naming the kubeconfig file and context,
//! and the few refusals the gateway adds because it forwards other clients' requests:
//!
//! * `insecure-skip-tls-verify: true`: the gateway always verifies the API server;
//! * no certificate authority: the gateway has no system trust store to fall back on;
//! * `as`/`as-*` impersonation: the gateway has its own (`upstream.impersonate`);
//! * `username`/`password`: API servers dropped basic authentication in 1.19;
//! * `auth-provider`: removed from kubectl in favour of exec plugins;
//! * `proxy-url`: the forwarding path connects directly, and silently ignoring it would send
//!   traffic somewhere the admin did not intend. `HTTPS_PROXY` in the environment is ignored
//!   for the same reason (the gateway's environment is not the cluster's network path).

use std::path::{Path, PathBuf};

use kube::config::{Kubeconfig, NamedAuthInfo};

/// Why the upstream could not be resolved; every variant names the file or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The kubeconfig file cannot be read or parsed, or names no usable context.
    #[error("kubeconfig {}: {reason}", path.display())]
    Kubeconfig {
        /// The kubeconfig file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The selected context, its cluster or its user cannot be used.
    #[error("kubeconfig {} context '{context}': {reason}", path.display())]
    Context {
        /// The kubeconfig file.
        path: PathBuf,
        /// The selected context.
        context: String,
        /// What went wrong, naming the cluster or user entry.
        reason: String,
    },
    /// An explicit `upstream.*` setting is unusable.
    #[error("{key}: {reason}")]
    Setting {
        /// The config key, e.g. `upstream.caFile`.
        key: &'static str,
        /// What went wrong, naming the file.
        reason: String,
    },
    /// The pod's service account configuration is not available.
    #[error("in-cluster configuration: {reason}")]
    InCluster {
        /// kube-rs's reason.
        reason: String,
    },
    /// kube-rs could not build the TLS client or obtain the credential (a client
    /// certificate that does not parse, an exec plugin that fails, an unreadable token file).
    #[error("{source_name}: {reason}")]
    Credential {
        /// Where the upstream came from, e.g. `kubeconfig /etc/k (context 'gw')`.
        source_name: String,
        /// kube-rs's reason, with its causes.
        reason: String,
    },
}

impl UpstreamError {
    /// The gateway config key the error is about.
    pub fn config_key(&self) -> &'static str {
        match self {
            Self::Kubeconfig { .. } | Self::Context { .. } => "upstream.kubeconfig",
            Self::Setting { key, .. } => key,
            Self::InCluster { .. } => "upstream.inCluster",
            Self::Credential { .. } => "upstream",
        }
    }

    /// The message without the config key (for errors that put the key in front).
    pub fn message(&self) -> String {
        match self {
            Self::Setting { reason, .. } => reason.clone(),
            other => other.to_string(),
        }
    }
}

/// The explicit upstream settings, turned into a kube-rs config by [`Upstream::from_settings`].
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    /// `upstream.url`.
    pub url: &'a url::Url,
    /// `upstream.caFile`.
    pub ca_file: &'a Path,
    /// `upstream.tokenFile`.
    pub token_file: Option<&'a Path>,
    /// `upstream.clientCertFile` and `upstream.clientKeyFile`.
    pub client_certificate: Option<(&'a Path, &'a Path)>,
    /// `upstream.tlsServerName`.
    pub tls_server_name: Option<&'a str>,
}

/// The upstream API server as kube-rs sees it, checked for what the gateway refuses.
#[derive(Clone)]
pub struct Upstream {
    /// Server, CA, TLS name and user, for the forwarding path and the gateway's own watches.
    pub config: kube::Config,
    /// Names the source in errors and logs, e.g. `kubeconfig /etc/k (context 'gw')`.
    pub source: String,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // kube::Config's own Debug output would show an inline token.
        f.debug_struct("Upstream")
            .field("source", &self.source)
            .field("url", &self.config.cluster_url.to_string())
            .field("tls_server_name", &self.config.tls_server_name)
            .field("credential", &self.credential_kind())
            .finish()
    }
}

impl Upstream {
    /// Loads `path` and selects `context` (default: its `current-context`). Reads the
    /// kubeconfig and its CA; runs no exec plugin and reads no token file yet.
    pub fn from_kubeconfig(path: &Path, context: Option<&str>) -> Result<Self, UpstreamError> {
        let file_error = |reason: String| UpstreamError::Kubeconfig {
            path: path.to_owned(),
            reason,
        };
        // kube-rs resolves relative paths against the file's directory; an absolute name
        // makes that the directory kubectl would use, whatever the working directory.
        let absolute = std::path::absolute(path)
            .map_err(|e| file_error(format!("resolving its directory: {e}")))?;
        precheck(&absolute).map_err(file_error)?;
        let mut kubeconfig = Kubeconfig::read_from(&absolute).map_err(|e| {
            // The YAML parser quotes the offending source lines after the first line of its
            // message; they may hold a token or key, so only the first line is kept.
            let text = crate::error_chain(&e);
            file_error(text.lines().next().unwrap_or_default().to_owned())
        })?;
        // kube-rs accepts any apiVersion and kind; a different one is not a kubeconfig.
        if let Some(v) = kubeconfig.api_version.as_deref().filter(|v| *v != "v1") {
            return Err(file_error(format!(
                "apiVersion '{v}' is not supported; expected v1"
            )));
        }
        if let Some(k) = kubeconfig.kind.as_deref().filter(|k| *k != "Config") {
            return Err(file_error(format!(
                "kind '{k}' is not supported; expected Config"
            )));
        }
        // kube-rs takes the first of two entries with one name; client-go refuses them,
        // since which one wins would be arbitrary.
        for (list, names) in [
            (
                "contexts",
                kubeconfig
                    .contexts
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>(),
            ),
            (
                "clusters",
                kubeconfig
                    .clusters
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect(),
            ),
            (
                "users",
                kubeconfig
                    .auth_infos
                    .iter()
                    .map(|u| u.name.as_str())
                    .collect(),
            ),
        ] {
            let mut seen = std::collections::HashSet::new();
            if let Some(dup) = names.into_iter().find(|n| !seen.insert(*n)) {
                return Err(file_error(format!("{list}: duplicate name '{dup}'")));
            }
        }
        let context_name = match context.filter(|c| !c.is_empty()) {
            Some(name) => name.to_owned(),
            None => kubeconfig
                .current_context
                .clone()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    file_error(
                        "current-context is not set; set it or name a context in upstream.kubeconfig.context"
                            .to_owned(),
                    )
                })?,
        };
        let context_error = |reason: String| UpstreamError::Context {
            path: path.to_owned(),
            context: context_name.clone(),
            reason,
        };
        let Some(ctx) = kubeconfig.contexts.iter().find(|c| c.name == context_name) else {
            return Err(file_error(format!(
                "no context named '{context_name}' (contexts: {})",
                names(kubeconfig.contexts.iter().map(|c| c.name.as_str()))
            )));
        };
        let Some(ctx) = ctx.context.as_ref() else {
            return Err(context_error("the context entry has no body".to_owned()));
        };
        let Some(cluster) = kubeconfig.clusters.iter().find(|c| c.name == ctx.cluster) else {
            return Err(context_error(format!(
                "no cluster named '{}' (clusters: {})",
                ctx.cluster,
                names(kubeconfig.clusters.iter().map(|c| c.name.as_str()))
            )));
        };
        let cluster_name = cluster.name.clone();
        let Some(cluster_body) = cluster.cluster.as_ref() else {
            return Err(context_error(format!(
                "cluster '{cluster_name}' has no body"
            )));
        };
        if cluster_body
            .proxy_url
            .as_deref()
            .is_some_and(|p| !p.is_empty())
        {
            return Err(context_error(format!(
                "cluster '{cluster_name}': proxy-url is not supported; the gateway connects to the API server directly"
            )));
        }
        warn_unknown(
            path,
            &format!("cluster '{cluster_name}'"),
            cluster_body.other.keys(),
        );
        // client-go tolerates a context naming a missing user (it goes anonymous); for a
        // gateway that is almost always a typo, so it is named here.
        let user: Option<&NamedAuthInfo> = match ctx.user.as_deref().filter(|u| !u.is_empty()) {
            None => None,
            Some(name) => Some(
                kubeconfig
                    .auth_infos
                    .iter()
                    .find(|u| u.name == name)
                    .ok_or_else(|| {
                        context_error(format!(
                            "no user named '{name}' (users: {})",
                            names(kubeconfig.auth_infos.iter().map(|u| u.name.as_str()))
                        ))
                    })?,
            ),
        };
        let user_name = user.map_or_else(|| "(none)".to_owned(), |u| u.name.clone());
        if let Some(body) = user.and_then(|u| u.auth_info.as_ref()) {
            warn_unknown(path, &format!("user '{user_name}'"), body.other.keys());
        }
        // Config::try_from selects the current context, synchronously (the async
        // from_custom_kubeconfig does the same with no I/O to await).
        kubeconfig.current_context = Some(context_name.clone());
        let mut config = kube::Config::try_from(kubeconfig)
            .map_err(|e| context_error(crate::error_chain(&e)))?;
        // HTTPS_PROXY from the environment, which kube-rs would apply: see the module docs.
        config.proxy_url = None;
        let source = format!("kubeconfig {} (context '{context_name}')", path.display());
        check(&config, &source, &cluster_name, &user_name).map_err(context_error)?;
        Ok(Self { config, source })
    }

    /// The pod's own service account (token and CA both re-read by kube-rs on rotation).
    pub fn in_cluster() -> Result<Self, UpstreamError> {
        let config = kube::Config::incluster().map_err(|e| UpstreamError::InCluster {
            reason: crate::error_chain(&e),
        })?;
        let source = "the pod's service account (in-cluster)".to_owned();
        check(&config, &source, "in-cluster", "service account")
            .map_err(|reason| UpstreamError::InCluster { reason })?;
        Ok(Self { config, source })
    }

    /// The explicit `upstream.*` settings as a kube-rs config: the CA file is re-read on
    /// rotation like in-cluster's, the token file like any kubeconfig `tokenFile`.
    pub fn from_settings(s: Settings<'_>) -> Result<Self, UpstreamError> {
        let setting = |key, reason| UpstreamError::Setting { key, reason };
        let cluster_url: http::Uri = s
            .url
            .as_str()
            .parse()
            .map_err(|e| setting("upstream.url", format!("{}: {e}", s.url)))?;
        let pem = std::fs::read(s.ca_file)
            .map_err(|e| setting("upstream.caFile", format!("{}: {e}", s.ca_file.display())))?;
        let mut config = kube::Config::new(cluster_url);
        config.root_cert =
            Some(pem_certificates(&pem).map_err(|e| {
                setting("upstream.caFile", format!("{}: {e}", s.ca_file.display()))
            })?);
        config.root_cert_file = Some(s.ca_file.to_owned());
        config.tls_server_name = s.tls_server_name.map(str::to_owned);
        let path_text = |key, p: &Path| {
            p.to_str()
                .map(str::to_owned)
                .ok_or_else(|| setting(key, format!("{}: not UTF-8", p.display())))
        };
        if let Some(token) = s.token_file {
            config.auth_info.token_file = Some(path_text("upstream.tokenFile", token)?);
        }
        if let Some((cert, key)) = s.client_certificate {
            config.auth_info.client_certificate = Some(path_text("upstream.clientCertFile", cert)?);
            config.auth_info.client_key = Some(path_text("upstream.clientKeyFile", key)?);
        }
        let source = format!("upstream.url {}", s.url);
        check(&config, &source, "upstream", "upstream").map_err(|r| setting("upstream.url", r))?;
        Ok(Self { config, source })
    }

    /// What kind of credential the user has, without its value (for logs and checks).
    pub fn credential_kind(&self) -> &'static str {
        let a = &self.config.auth_info;
        let cert = a.client_certificate.is_some() || a.client_certificate_data.is_some();
        match (
            a.token.is_some(),
            a.token_file.is_some(),
            a.exec.is_some(),
            cert,
        ) {
            (true, _, _, false) => "token",
            (true, _, _, true) => "token and client certificate",
            (false, true, _, false) => "tokenFile",
            (false, true, _, true) => "tokenFile and client certificate",
            (false, false, true, _) => "exec plugin",
            (false, false, false, true) => "client certificate",
            (false, false, false, false) => "none",
        }
    }

    /// The rustls client config kube-rs builds: the cluster CA (re-read on rotation when it
    /// comes from a file) and the client certificate, from files or an exec plugin. ALPN is
    /// left to the HTTP connector. Blocking: an exec plugin may run.
    pub fn tls_client_config(&self) -> Result<rustls::ClientConfig, UpstreamError> {
        use kube::client::ConfigExt as _;
        self.config
            .rustls_client_config()
            .map_err(|e| UpstreamError::Credential {
                source_name: self.source.clone(),
                reason: format!("TLS client: {}", crate::error_chain(&e)),
            })
    }

    /// The name verified in (and sent as SNI to) the server certificate, if overridden.
    pub fn server_name(
        &self,
    ) -> Result<Option<rustls_pki_types::ServerName<'static>>, UpstreamError> {
        self.config
            .tls_server_name
            .as_ref()
            .map(|n| {
                rustls_pki_types::ServerName::try_from(n.clone()).map_err(|e| {
                    UpstreamError::Credential {
                        source_name: self.source.clone(),
                        reason: format!("tls-server-name {n:?}: {e}"),
                    }
                })
            })
            .transpose()
    }
}

/// Largest kubeconfig read; guards against pointing at a huge file.
const MAX_KUBECONFIG_BYTES: usize = 4 << 20;

/// Refuses what kube-rs would choke on: not a regular file (a FIFO would block), a huge
/// file, and UTF-16 text with an odd number of bytes (kube-rs 4.2 panics on it).
fn precheck(path: &Path) -> Result<(), String> {
    use std::io::Read as _;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| {
            f.take(MAX_KUBECONFIG_BYTES as u64 + 1)
                .read_to_end(&mut bytes)
        })
        .map_err(|e| e.to_string())?;
    if bytes.len() > MAX_KUBECONFIG_BYTES {
        return Err(format!("larger than {MAX_KUBECONFIG_BYTES} bytes"));
    }
    let utf16 = bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]);
    if utf16 && bytes.len() % 2 != 0 {
        return Err(
            "not valid UTF-16 text (odd number of bytes after its byte-order mark)".to_owned(),
        );
    }
    Ok(())
}

/// What the gateway refuses on top of kube-rs; `Err` is the reason, naming the entry.
fn check(config: &kube::Config, source: &str, cluster: &str, user: &str) -> Result<(), String> {
    let url = &config.cluster_url;
    if url.scheme_str() != Some("https") {
        return Err(format!(
            "cluster '{cluster}': server {url} is not https; the gateway only talks TLS to the API server"
        ));
    }
    let Some(authority) = url.authority() else {
        return Err(format!("cluster '{cluster}': server {url} has no host"));
    };
    if authority.as_str().contains('@') {
        return Err(format!(
            "cluster '{cluster}': the server URL must not carry credentials; use the user entry"
        ));
    }
    if url.query().is_some() {
        return Err(format!(
            "cluster '{cluster}': server {url} must not have a query"
        ));
    }
    if config.accept_invalid_certs {
        return Err(format!(
            "cluster '{cluster}': insecure-skip-tls-verify is not supported; the gateway never skips verifying the API server (set certificate-authority or certificate-authority-data)"
        ));
    }
    match &config.root_cert {
        None => {
            return Err(format!(
                "cluster '{cluster}' has no certificate-authority(-data); the gateway verifies the API server against the cluster CA and has no system trust store to fall back on"
            ));
        }
        Some(roots) if roots.is_empty() => {
            return Err(format!(
                "cluster '{cluster}': the certificate authority holds no PEM certificate"
            ));
        }
        Some(_) => {}
    }
    if let Some(name) = &config.tls_server_name
        && rustls_pki_types::ServerName::try_from(name.as_str()).is_err()
    {
        return Err(format!(
            "cluster '{cluster}': tls-server-name '{name}' is not a DNS name or IP address"
        ));
    }
    let a = &config.auth_info;
    let refused = [
        (
            a.impersonate.is_some()
                || a.impersonate_uid.is_some()
                || a.impersonate_groups.as_ref().is_some_and(|g| !g.is_empty())
                || a.impersonate_user_extra
                    .as_ref()
                    .is_some_and(|e| !e.is_empty()),
            "as/as-* impersonation is not supported; configure it in the gateway's upstream.impersonate",
        ),
        (
            a.username.as_deref().is_some_and(|u| !u.is_empty()) || a.password.is_some(),
            "basic authentication (username/password) is not supported; API servers dropped it in 1.19: use a token, tokenFile, client certificate or exec plugin",
        ),
        (
            a.auth_provider.is_some(),
            "auth-provider plugins are not supported (kubectl removed them); use an exec credential plugin",
        ),
    ];
    if let Some((_, reason)) = refused.iter().find(|(refused, _)| *refused) {
        return Err(format!("user '{user}': {reason}"));
    }
    tracing::debug!(%source, "upstream resolved through kube-rs");
    Ok(())
}

/// The DER of every certificate in a PEM bundle (what kube-rs keeps as `root_cert`).
fn pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::{CertificateDer, pem::PemObject as _};
    let certs = CertificateDer::pem_slice_iter(pem)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".to_owned());
    }
    Ok(certs)
}

/// Logs keys kube-rs did not recognise, so a typo such as `token-file` does not go unnoticed.
fn warn_unknown<'k>(path: &Path, entry: &str, keys: impl Iterator<Item = &'k String>) {
    for key in keys {
        tracing::warn!(kubeconfig = %path.display(), %entry, %key, "ignoring unknown kubeconfig key");
    }
}

fn names<'n>(names: impl Iterator<Item = &'n str>) -> String {
    let list: Vec<String> = names.map(|n| format!("'{n}'")).collect();
    if list.is_empty() {
        "none".to_owned()
    } else {
        list.join(", ")
    }
}

#[cfg(test)]
#[path = "upstream_tests.rs"]
mod tests;
