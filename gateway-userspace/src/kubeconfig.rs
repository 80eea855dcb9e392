//! A kubeconfig file as the gateway's upstream credential, resolved as kubectl would.
//!
//! Supported, for the selected context only (its `current-context` or a named one):
//!
//! * cluster: `server` (must be `https://`), `certificate-authority` or
//!   `certificate-authority-data`, `tls-server-name`;
//! * user: `token`, `tokenFile`, `client-certificate`/`client-key` (paths or `-data`), and a
//!   token together with a client certificate.
//!
//! Relative paths are resolved against the kubeconfig file's directory, as kubectl does.
//! A `tokenFile` is only checked here; the caller re-reads it when it rotates.
//!
//! Refused, with an error naming the file and the key: `exec` and `auth-provider` users,
//! because a DaemonSet must not run arbitrary binaries (or browser logins) to obtain a
//! cluster credential: its credential must be a file the deployment mounts, which an admin
//! can audit and rotate. Also refused: `username`/`password`, `as`/`as-*` impersonation
//! (the gateway has its own impersonation config), `insecure-skip-tls-verify: true` (the
//! gateway always verifies the upstream), `proxy-url` (the gateway connects directly, and
//! silently ignoring it would send traffic somewhere the admin did not intend), and any
//! ambiguity kubectl itself rejects (a `-data` field next to its path, a certificate without
//! its key). Other keys (`preferences`, `extensions`, `namespace`, ...) are ignored, since
//! kubeconfigs in the wild carry them; unknown keys in the selected cluster and user are
//! logged so a typo such as `token-file` does not go unnoticed.

use std::{
    collections::HashMap,
    fmt,
    io::Read as _,
    path::{Path, PathBuf},
};

use base64::Engine as _;
use serde::Deserialize;
use serde_norway::Value;

/// Largest kubeconfig or referenced file read; guards against pointing at a huge file.
const MAX_FILE_BYTES: usize = 4 << 20;

/// Keys of a cluster entry we know (supported, refused or deliberately ignored).
const CLUSTER_KEYS: &[&str] = &[
    "server",
    "tls-server-name",
    "insecure-skip-tls-verify",
    "certificate-authority",
    "certificate-authority-data",
    "proxy-url",
    "disable-compression",
    "extensions",
];

/// Keys of a user entry we know (supported, refused or deliberately ignored).
const USER_KEYS: &[&str] = &[
    "token",
    "tokenFile",
    "client-certificate",
    "client-certificate-data",
    "client-key",
    "client-key-data",
    "username",
    "password",
    "exec",
    "auth-provider",
    "as",
    "as-uid",
    "as-groups",
    "as-user-extra",
    "extensions",
];

const EXEC_REFUSED: &str = "exec credential plugins are not supported; use token, tokenFile or \
     client-certificate (a DaemonSet must not run programs to get its credential: mount it as a file)";
const AUTH_PROVIDER_REFUSED: &str = "auth-provider plugins are not supported; use token, tokenFile \
     or client-certificate (a DaemonSet must not run programs to get its credential: mount it as a file)";
const BASIC_REFUSED: &str =
    "basic authentication is not supported; use token, tokenFile or client-certificate";
const IMPERSONATION_REFUSED: &str = "impersonation in the kubeconfig is not supported; \
     configure it in the gateway's upstream.impersonate";

/// The upstream API server and credential selected from a kubeconfig.
#[derive(Clone, PartialEq, Eq)]
pub struct ResolvedKubeconfig {
    /// Name of the selected context.
    pub context: String,
    /// Name of the context's cluster entry.
    pub cluster: String,
    /// Name of the context's user entry.
    pub user: String,
    /// The API server URL (always `https`; may carry a path prefix).
    pub server: url::Url,
    /// PEM bundle to verify the server against; `None` means the system roots (kubectl's default).
    pub ca_pem: Option<Vec<u8>>,
    /// Name verified in (and sent as SNI to) the server certificate instead of the URL host.
    pub tls_server_name: Option<String>,
    /// Always `false`: `insecure-skip-tls-verify: true` is refused.
    pub insecure_skip_tls_verify: bool,
    /// How the gateway authenticates to the API server.
    pub credential: KubeconfigCredential,
}

impl fmt::Debug for ResolvedKubeconfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolvedKubeconfig")
            .field("context", &self.context)
            .field("cluster", &self.cluster)
            .field("user", &self.user)
            .field("server", &self.server.as_str())
            .field("ca_pem", &self.ca_pem.as_ref().map(|p| ByteCount(p.len())))
            .field("tls_server_name", &self.tls_server_name)
            .field("insecure_skip_tls_verify", &self.insecure_skip_tls_verify)
            .field("credential", &self.credential)
            .finish()
    }
}

/// Where a bearer token comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum BearerToken {
    /// `user.token`, verbatim.
    Token(String),
    /// `user.tokenFile`, an absolute path; re-read (whitespace-trimmed) when it changes.
    TokenFile(PathBuf),
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The gateway credential never reaches a log line.
        match self {
            Self::Token(_) => f.write_str("Token(<redacted>)"),
            Self::TokenFile(path) => f.debug_tuple("TokenFile").field(path).finish(),
        }
    }
}

/// The credential of the selected kubeconfig user.
#[derive(Clone, PartialEq, Eq)]
pub enum KubeconfigCredential {
    /// No credential at all: requests go upstream anonymously.
    None,
    /// `user.token`, verbatim.
    Token(String),
    /// `user.tokenFile`, an absolute path; re-read (whitespace-trimmed) when it changes.
    TokenFile(PathBuf),
    /// A client certificate and its private key (PEM, as found in the file or `-data`).
    ClientCertificate {
        /// The certificate chain (PEM).
        cert_pem: Vec<u8>,
        /// The private key (PEM).
        key_pem: Vec<u8>,
    },
    /// A bearer token sent over a connection authenticated with a client certificate.
    TokenAndClientCertificate {
        /// The bearer token or its file.
        token: BearerToken,
        /// The certificate chain (PEM).
        cert_pem: Vec<u8>,
        /// The private key (PEM).
        key_pem: Vec<u8>,
    },
}

impl KubeconfigCredential {
    /// The bearer token source, if the user has one.
    pub fn bearer(&self) -> Option<BearerToken> {
        match self {
            Self::Token(token) => Some(BearerToken::Token(token.clone())),
            Self::TokenFile(path) => Some(BearerToken::TokenFile(path.clone())),
            Self::TokenAndClientCertificate { token, .. } => Some(token.clone()),
            Self::None | Self::ClientCertificate { .. } => None,
        }
    }

    /// The client certificate and key (PEM), if the user has them.
    pub fn client_certificate(&self) -> Option<(&[u8], &[u8])> {
        match self {
            Self::ClientCertificate { cert_pem, key_pem }
            | Self::TokenAndClientCertificate {
                cert_pem, key_pem, ..
            } => Some((cert_pem, key_pem)),
            Self::None | Self::Token(_) | Self::TokenFile(_) => None,
        }
    }
}

impl fmt::Debug for KubeconfigCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The gateway credential never reaches a log line: show only its shape.
        match self {
            Self::None => f.write_str("None"),
            Self::Token(_) => f.write_str("Token(<redacted>)"),
            Self::TokenFile(path) => f.debug_tuple("TokenFile").field(path).finish(),
            Self::ClientCertificate { cert_pem, .. } => f
                .debug_struct("ClientCertificate")
                .field("cert_pem", &ByteCount(cert_pem.len()))
                .field("key_pem", &Redacted)
                .finish(),
            Self::TokenAndClientCertificate {
                token, cert_pem, ..
            } => f
                .debug_struct("TokenAndClientCertificate")
                .field("token", token)
                .field("cert_pem", &ByteCount(cert_pem.len()))
                .field("key_pem", &Redacted)
                .finish(),
        }
    }
}

struct ByteCount(usize);

impl fmt::Debug for ByteCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0)
    }
}

struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Why a kubeconfig could not be used; every variant names the kubeconfig file.
#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    /// The kubeconfig file itself could not be read.
    #[error("kubeconfig {}: {reason}", path.display())]
    Read {
        /// The kubeconfig file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The YAML is malformed or a key has the wrong type.
    #[error("kubeconfig {}: {key}: {message}", path.display())]
    Parse {
        /// The kubeconfig file.
        path: PathBuf,
        /// Path of the offending key, e.g. `users[0].user.token`.
        key: String,
        /// The parser's complaint.
        message: String,
    },
    /// A kubeconfig feature the gateway deliberately does not support.
    #[error("kubeconfig {}: {key}: {reason}", path.display())]
    Unsupported {
        /// The kubeconfig file.
        path: PathBuf,
        /// The refused key, e.g. `users[0].user.exec`.
        key: String,
        /// Why, and what to use instead.
        reason: String,
    },
    /// A context, cluster, user or required field is absent.
    #[error("kubeconfig {}: {key}: {reason}", path.display())]
    Missing {
        /// The kubeconfig file.
        path: PathBuf,
        /// The key that is absent or names something absent.
        key: String,
        /// What is missing.
        reason: String,
    },
    /// A value is present but unusable (wrong scheme, conflicting keys, bad token...).
    #[error("kubeconfig {}: {key}: {reason}", path.display())]
    Invalid {
        /// The kubeconfig file.
        path: PathBuf,
        /// The offending key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `-data` field is not valid base64.
    #[error("kubeconfig {}: {key}: invalid base64 (expected the base64 of the PEM file): {source}", path.display())]
    Base64 {
        /// The kubeconfig file.
        path: PathBuf,
        /// The `-data` key.
        key: String,
        /// The decoder's complaint.
        source: base64::DecodeError,
    },
    /// A file the kubeconfig refers to could not be read.
    #[error("kubeconfig {}: {key}: {}: {reason}", path.display(), file.display())]
    File {
        /// The kubeconfig file.
        path: PathBuf,
        /// The key holding the file name, e.g. `users[0].user.client-key`.
        key: String,
        /// The referenced file, resolved against the kubeconfig's directory.
        file: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Loads `path` and resolves `context` (or its `current-context`) to a server and credential.
pub fn load(path: &Path, context: Option<&str>) -> Result<ResolvedKubeconfig, KubeconfigError> {
    let bytes = read_bounded(path).map_err(|reason| KubeconfigError::Read {
        path: path.to_owned(),
        reason,
    })?;
    let text = String::from_utf8(bytes).map_err(|_| KubeconfigError::Read {
        path: path.to_owned(),
        reason: "not UTF-8 text".to_owned(),
    })?;
    // kubectl resolves relative paths against the absolute directory of the file.
    let absolute = std::path::absolute(path).map_err(|e| KubeconfigError::Read {
        path: path.to_owned(),
        reason: format!("resolving its directory: {e}"),
    })?;
    let base = absolute
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    Resolver { path, base: &base }.resolve(&text, context)
}

#[derive(Deserialize)]
#[serde(expecting = "a kubeconfig mapping (apiVersion, kind, clusters, users, contexts)")]
struct RawConfig {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(rename = "current-context")]
    current_context: Option<String>,
    clusters: Option<Vec<NamedCluster>>,
    users: Option<Vec<NamedUser>>,
    contexts: Option<Vec<NamedContext>>,
}

#[derive(Deserialize)]
#[serde(expecting = "a mapping with name and cluster")]
struct NamedCluster {
    name: String,
    cluster: Option<Value>,
}

#[derive(Deserialize)]
#[serde(expecting = "a mapping with name and user")]
struct NamedUser {
    name: String,
    user: Option<Value>,
}

#[derive(Deserialize)]
#[serde(expecting = "a mapping with name and context")]
struct NamedContext {
    name: String,
    context: Option<Value>,
}

#[derive(Deserialize)]
#[serde(expecting = "a context mapping (cluster, user)")]
struct RawContext {
    cluster: Option<String>,
    user: Option<String>,
}

#[derive(Deserialize)]
#[serde(
    rename_all = "kebab-case",
    expecting = "a cluster mapping (server, certificate-authority, ...)"
)]
struct RawCluster {
    server: Option<String>,
    tls_server_name: Option<String>,
    insecure_skip_tls_verify: Option<bool>,
    certificate_authority: Option<String>,
    certificate_authority_data: Option<String>,
    proxy_url: Option<String>,
}

// Refused keys are kept as raw values so a refusal is reported as such, whatever their shape.
#[derive(Deserialize)]
#[serde(
    rename_all = "kebab-case",
    expecting = "a user mapping (token, tokenFile, client-certificate, ...)"
)]
struct RawUser {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<String>,
    client_certificate: Option<String>,
    client_certificate_data: Option<String>,
    client_key: Option<String>,
    client_key_data: Option<String>,
    username: Option<Value>,
    password: Option<Value>,
    exec: Option<Value>,
    auth_provider: Option<Value>,
    #[serde(rename = "as")]
    as_user: Option<Value>,
    as_uid: Option<Value>,
    as_groups: Option<Value>,
    as_user_extra: Option<Value>,
}

/// The validated parts of the selected cluster entry.
struct ResolvedCluster {
    server: url::Url,
    ca_pem: Option<Vec<u8>>,
    tls_server_name: Option<String>,
}

/// Entries of one list by name: their position (for error keys) and body.
type Index<'n> = HashMap<&'n str, (usize, Option<&'n Value>)>;

/// Resolution state: the kubeconfig's name (for errors) and directory (for relative paths).
struct Resolver<'a> {
    path: &'a Path,
    base: &'a Path,
}

impl Resolver<'_> {
    fn resolve(
        &self,
        text: &str,
        context: Option<&str>,
    ) -> Result<ResolvedKubeconfig, KubeconfigError> {
        if text.trim().is_empty() {
            return Err(self.missing("(file)", "the file is empty"));
        }
        let raw: RawConfig =
            serde_path_to_error::deserialize(serde_norway::Deserializer::from_str(text))
                .map_err(|e| self.parse_error("", &e))?;
        // Absent apiVersion/kind are accepted, as client-go defaults them.
        if let Some(v) = raw.api_version.as_deref().filter(|v| *v != "v1") {
            return Err(self.invalid("apiVersion", format!("'{v}' is not supported; expected v1")));
        }
        if let Some(k) = raw.kind.as_deref().filter(|k| *k != "Config") {
            return Err(self.invalid("kind", format!("'{k}' is not supported; expected Config")));
        }
        let clusters = raw.clusters.unwrap_or_default();
        let users = raw.users.unwrap_or_default();
        let contexts = raw.contexts.unwrap_or_default();
        // client-go refuses duplicate names, since which entry wins would be arbitrary.
        let cluster_index = self.index(
            "clusters",
            clusters
                .iter()
                .map(|c| (c.name.as_str(), c.cluster.as_ref())),
        )?;
        let user_index = self.index(
            "users",
            users.iter().map(|u| (u.name.as_str(), u.user.as_ref())),
        )?;
        let context_index = self.index(
            "contexts",
            contexts
                .iter()
                .map(|c| (c.name.as_str(), c.context.as_ref())),
        )?;

        let (context_name, selector_key) = match context.filter(|c| !c.is_empty()) {
            Some(name) => (name.to_owned(), "contexts"),
            None => match raw.current_context.filter(|c| !c.is_empty()) {
                Some(name) => (name, "current-context"),
                None => {
                    return Err(self.missing(
                        "current-context",
                        "not set; set it or name a context explicitly",
                    ));
                }
            },
        };
        let Some(&(ci, ctx_value)) = context_index.get(context_name.as_str()) else {
            return Err(self.missing(
                selector_key,
                format!(
                    "no context named '{context_name}' (contexts: {})",
                    names(contexts.iter().map(|c| c.name.as_str()))
                ),
            ));
        };
        let ctx_key = format!("contexts[{ci}].context");
        let ctx: RawContext = self.body(&ctx_key, ctx_value)?;
        let (cluster_name, ki, cluster_value) =
            self.reference(&ctx_key, "cluster", ctx.cluster, &cluster_index)?;
        let (user_name, ui, user_value) =
            self.reference(&ctx_key, "user", ctx.user, &user_index)?;

        let cluster_key = format!("clusters[{ki}].cluster");
        self.warn_unknown(&cluster_key, cluster_value, CLUSTER_KEYS);
        let cluster: RawCluster = self.body(&cluster_key, cluster_value)?;

        let user_key = format!("users[{ui}].user");
        self.warn_unknown(&user_key, user_value, USER_KEYS);
        let user: RawUser = self.body(&user_key, user_value)?;

        let ResolvedCluster {
            server,
            ca_pem,
            tls_server_name,
        } = self.cluster(&cluster_key, cluster)?;
        let credential = self.user(&user_key, user)?;
        Ok(ResolvedKubeconfig {
            context: context_name,
            cluster: cluster_name,
            user: user_name,
            server,
            ca_pem,
            tls_server_name,
            insecure_skip_tls_verify: false,
            credential,
        })
    }

    fn cluster(&self, key: &str, c: RawCluster) -> Result<ResolvedCluster, KubeconfigError> {
        if c.insecure_skip_tls_verify == Some(true) {
            return Err(self.unsupported(
                &format!("{key}.insecure-skip-tls-verify"),
                "the gateway never skips verifying the upstream API server; \
                 set certificate-authority or certificate-authority-data instead",
            ));
        }
        if non_empty(c.proxy_url.as_deref()).is_some() {
            return Err(self.unsupported(
                &format!("{key}.proxy-url"),
                "the gateway connects to the API server directly; remove proxy-url",
            ));
        }
        let server_key = format!("{key}.server");
        let Some(server) = non_empty(c.server.as_deref()) else {
            return Err(self.missing(
                &server_key,
                "not set; the cluster needs an https:// server URL",
            ));
        };
        let server = self.server_url(&server_key, server)?;
        let ca_pem = self.file_or_data(
            key,
            "certificate-authority",
            c.certificate_authority,
            c.certificate_authority_data,
        )?;
        let tls_server_name = match non_empty(c.tls_server_name.as_deref()) {
            None => None,
            Some(name) => {
                if rustls_pki_types::ServerName::try_from(name).is_err() {
                    return Err(self.invalid(
                        &format!("{key}.tls-server-name"),
                        format!("'{name}' is not a DNS name or IP address"),
                    ));
                }
                Some(name.to_owned())
            }
        };
        Ok(ResolvedCluster {
            server,
            ca_pem,
            tls_server_name,
        })
    }

    fn server_url(&self, key: &str, server: &str) -> Result<url::Url, KubeconfigError> {
        let url = url::Url::parse(server)
            .map_err(|e| self.invalid(key, format!("'{server}' is not an https:// URL: {e}")))?;
        if url.scheme() != "https" {
            return Err(self.invalid(
                key,
                format!("'{server}' is not https; the gateway only talks TLS to the API server"),
            ));
        }
        if url.host().is_none() {
            return Err(self.invalid(key, format!("'{server}' has no host")));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(self.invalid(key, "must not carry credentials; use the user entry"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(self.invalid(key, format!("'{server}' must not have a query or fragment")));
        }
        Ok(url)
    }

    fn user(&self, key: &str, u: RawUser) -> Result<KubeconfigCredential, KubeconfigError> {
        let refusals = [
            ("exec", present(u.exec.as_ref()), EXEC_REFUSED),
            (
                "auth-provider",
                present(u.auth_provider.as_ref()),
                AUTH_PROVIDER_REFUSED,
            ),
            ("username", set(u.username.as_ref()), BASIC_REFUSED),
            ("password", set(u.password.as_ref()), BASIC_REFUSED),
            ("as", set(u.as_user.as_ref()), IMPERSONATION_REFUSED),
            ("as-uid", set(u.as_uid.as_ref()), IMPERSONATION_REFUSED),
            (
                "as-groups",
                set(u.as_groups.as_ref()),
                IMPERSONATION_REFUSED,
            ),
            (
                "as-user-extra",
                set(u.as_user_extra.as_ref()),
                IMPERSONATION_REFUSED,
            ),
        ];
        if let Some((field, _, reason)) = refusals.iter().find(|(_, refused, _)| *refused) {
            return Err(self.unsupported(&format!("{key}.{field}"), *reason));
        }

        let token = non_empty(u.token.as_deref());
        let token_file = non_empty(u.token_file.as_deref());
        let bearer = match (token, token_file) {
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    &format!("{key}.tokenFile"),
                    "both token and tokenFile are set; use one",
                ));
            }
            (Some(token), None) => {
                if !is_token(token) {
                    return Err(self.invalid(
                        &format!("{key}.token"),
                        "contains whitespace or characters not allowed in an HTTP header",
                    ));
                }
                Some(BearerToken::Token(token.to_owned()))
            }
            (None, Some(file)) => Some(BearerToken::TokenFile(self.token_file(key, file)?)),
            (None, None) => None,
        };

        let cert = self.file_or_data(
            key,
            "client-certificate",
            u.client_certificate,
            u.client_certificate_data,
        )?;
        let client_key = self.file_or_data(key, "client-key", u.client_key, u.client_key_data)?;
        let pair = match (cert, client_key) {
            (Some(cert_pem), Some(key_pem)) => Some((cert_pem, key_pem)),
            (Some(_), None) => {
                return Err(self.missing(
                    &format!("{key}.client-key"),
                    "client-certificate is set but neither client-key nor client-key-data",
                ));
            }
            (None, Some(_)) => {
                return Err(self.missing(
                    &format!("{key}.client-certificate"),
                    "client-key is set but neither client-certificate nor client-certificate-data",
                ));
            }
            (None, None) => None,
        };
        Ok(match (bearer, pair) {
            (None, None) => KubeconfigCredential::None,
            (Some(BearerToken::Token(t)), None) => KubeconfigCredential::Token(t),
            (Some(BearerToken::TokenFile(f)), None) => KubeconfigCredential::TokenFile(f),
            (None, Some((cert_pem, key_pem))) => {
                KubeconfigCredential::ClientCertificate { cert_pem, key_pem }
            }
            (Some(token), Some((cert_pem, key_pem))) => {
                KubeconfigCredential::TokenAndClientCertificate {
                    token,
                    cert_pem,
                    key_pem,
                }
            }
        })
    }

    /// Checks the token file is usable now, so a bad mount fails at start-up, not per request.
    fn token_file(&self, key: &str, file: &str) -> Result<PathBuf, KubeconfigError> {
        let key = format!("{key}.tokenFile");
        let resolved = self.base.join(file);
        let bytes =
            read_bounded(&resolved).map_err(|reason| self.file_error(&key, &resolved, reason))?;
        let token = std::str::from_utf8(&bytes)
            .map_err(|_| self.file_error(&key, &resolved, "not UTF-8 text".to_owned()))?
            .trim();
        if token.is_empty() {
            return Err(self.file_error(&key, &resolved, "holds no token".to_owned()));
        }
        if !is_token(token) {
            return Err(self.file_error(
                &key,
                &resolved,
                "the token contains whitespace or characters not allowed in an HTTP header"
                    .to_owned(),
            ));
        }
        Ok(resolved)
    }

    /// Reads `<item>` (a path) or `<item>-data` (base64), refusing both at once.
    fn file_or_data(
        &self,
        key: &str,
        item: &str,
        file: Option<String>,
        data: Option<String>,
    ) -> Result<Option<Vec<u8>>, KubeconfigError> {
        match (non_empty(file.as_deref()), non_empty(data.as_deref())) {
            (Some(_), Some(_)) => Err(self.invalid(
                &format!("{key}.{item}-data"),
                format!("both {item} and {item}-data are set; use one"),
            )),
            (Some(file), None) => {
                let file_key = format!("{key}.{item}");
                let resolved = self.base.join(file);
                read_bounded(&resolved)
                    .map(Some)
                    .map_err(|reason| self.file_error(&file_key, &resolved, reason))
            }
            (None, Some(data)) => {
                let data_key = format!("{key}.{item}-data");
                // YAML folding may have turned the line breaks of long values into spaces.
                let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(compact)
                    .map_err(|source| KubeconfigError::Base64 {
                        path: self.path.to_owned(),
                        key: data_key.clone(),
                        source,
                    })?;
                if bytes.is_empty() {
                    return Err(self.invalid(&data_key, "decodes to nothing"));
                }
                Ok(Some(bytes))
            }
            (None, None) => Ok(None),
        }
    }

    /// Maps names to (position, body), refusing duplicates.
    fn index<'n>(
        &self,
        list: &str,
        entries: impl Iterator<Item = (&'n str, Option<&'n Value>)>,
    ) -> Result<Index<'n>, KubeconfigError> {
        let mut index = HashMap::new();
        for (i, (name, body)) in entries.enumerate() {
            if let Some((first, _)) = index.insert(name, (i, body)) {
                return Err(self.invalid(
                    &format!("{list}[{i}].name"),
                    format!("duplicate name '{name}' (also {list}[{first}])"),
                ));
            }
        }
        Ok(index)
    }

    /// Follows `context.<field>` to a named cluster or user entry.
    fn reference<'n>(
        &self,
        ctx_key: &str,
        field: &str,
        name: Option<String>,
        index: &Index<'n>,
    ) -> Result<(String, usize, Option<&'n Value>), KubeconfigError> {
        let key = format!("{ctx_key}.{field}");
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            return Err(self.missing(&key, format!("not set; the context needs a {field}")));
        };
        let Some(&(position, body)) = index.get(name.as_str()) else {
            let mut known: Vec<&str> = index.keys().copied().collect();
            known.sort_unstable();
            return Err(self.missing(
                &key,
                format!(
                    "no {field} named '{name}' ({field}s: {})",
                    names(known.into_iter())
                ),
            ));
        };
        Ok((name, position, body))
    }

    fn body<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
        value: Option<&Value>,
    ) -> Result<T, KubeconfigError> {
        let Some(value) = value.filter(|v| !v.is_null()) else {
            return Err(self.missing(key, "not set"));
        };
        serde_path_to_error::deserialize(value.clone()).map_err(|e| self.parse_error(key, &e))
    }

    fn warn_unknown(&self, key: &str, value: Option<&Value>, known: &[&str]) {
        let Some(Value::Mapping(map)) = value else {
            return;
        };
        for k in map.keys() {
            let name = k.as_str().unwrap_or("<non-string key>");
            if !known.contains(&name) {
                tracing::warn!(
                    kubeconfig = %self.path.display(),
                    key = %format!("{key}.{name}"),
                    "ignoring unknown kubeconfig key"
                );
            }
        }
    }

    fn parse_error(
        &self,
        prefix: &str,
        e: &serde_path_to_error::Error<serde_norway::Error>,
    ) -> KubeconfigError {
        let inner = e.path().to_string();
        // "." is the document root; "?" is a position the parser failed before naming.
        let at_root = inner == "." || inner == "?";
        let key = match (prefix.is_empty(), at_root) {
            (true, true) => "(top level)".to_owned(),
            (true, false) => inner.clone(),
            (false, true) => prefix.to_owned(),
            (false, false) => format!("{prefix}.{inner}"),
        };
        let message = if prefix.starts_with("users[") {
            // Type errors quote the offending value, which here may be a token or key.
            "wrong type or shape (value not shown: it may be a secret)".to_owned()
        } else {
            let message = e.inner().to_string();
            // serde_norway may already prefix its message with the path.
            match message.strip_prefix(&format!("{inner}: ")) {
                Some(rest) => rest.to_owned(),
                None => message,
            }
        };
        KubeconfigError::Parse {
            path: self.path.to_owned(),
            key,
            message,
        }
    }

    fn unsupported(&self, key: &str, reason: impl Into<String>) -> KubeconfigError {
        KubeconfigError::Unsupported {
            path: self.path.to_owned(),
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    fn missing(&self, key: &str, reason: impl Into<String>) -> KubeconfigError {
        KubeconfigError::Missing {
            path: self.path.to_owned(),
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    fn invalid(&self, key: &str, reason: impl Into<String>) -> KubeconfigError {
        KubeconfigError::Invalid {
            path: self.path.to_owned(),
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    fn file_error(&self, key: &str, file: &Path, reason: String) -> KubeconfigError {
        KubeconfigError::File {
            path: self.path.to_owned(),
            key: key.to_owned(),
            file: file.to_owned(),
            reason,
        }
    }
}

/// Reads a regular file of at most `MAX_FILE_BYTES`; never blocks on a FIFO or device.
fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES as u64 + 1).read_to_end(&mut bytes))
        .map_err(|e| e.to_string())?;
    if bytes.len() > MAX_FILE_BYTES {
        return Err(format!("larger than {MAX_FILE_BYTES} bytes"));
    }
    if bytes.is_empty() {
        return Err("the file is empty".to_owned());
    }
    Ok(bytes)
}

/// client-go treats an empty string like an absent key.
fn non_empty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

/// Whether a refused pointer-like key (exec, auth-provider) is present: client-go only treats null as absent.
fn present(v: Option<&Value>) -> bool {
    v.is_some_and(|v| !v.is_null())
}

/// Whether a refused scalar/list/map key is set: client-go treats empty values as absent.
fn set(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Sequence(s)) => !s.is_empty(),
        Some(Value::Mapping(m)) => !m.is_empty(),
        Some(_) => true,
    }
}

/// A bearer token must fit in an `Authorization` header as one word.
fn is_token(token: &str) -> bool {
    token.bytes().all(|b| b.is_ascii_graphic())
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
mod tests {
    use super::*;

    const CERT: &[u8] = b"-----BEGIN CERTIFICATE-----\nclient\n-----END CERTIFICATE-----\n";
    const KEY: &[u8] = b"-----BEGIN PRIVATE KEY-----\nkey\n-----END PRIVATE KEY-----\n";
    const CA: &[u8] = b"-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n";
    const SERVER: &str = "https://127.0.0.1:6443";

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// A directory with the files the kubeconfigs below refer to (relative to it).
    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("create temp dir");
        let files: [(&str, &[u8]); 7] = [
            ("certs/client.crt", CERT),
            ("certs/client.key", KEY),
            ("ca.crt", CA),
            ("secrets/token", b"file-token\n"),
            ("secrets/empty", b""),
            ("secrets/blank", b" \n"),
            ("secrets/two-words", b"two words\n"),
        ];
        for (name, content) in files {
            let path = dir.path().join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("create fixture dir");
            }
            std::fs::write(&path, content).expect("write fixture file");
        }
        dir
    }

    /// One cluster `prod`, one user `admin`, context `main` selecting them.
    fn config(cluster: &str, user: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\npreferences: {{}}\nextensions: []\n\
             current-context: main\n\
             clusters:\n- name: prod\n  cluster: {{{cluster}}}\n\
             users:\n- name: admin\n  user: {{{user}}}\n\
             contexts:\n- name: main\n  context: {{cluster: prod, user: admin, namespace: default}}\n"
        )
    }

    fn write(dir: &Path, name: &str, yaml: &str) -> PathBuf {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create kubeconfig dir");
        }
        std::fs::write(&path, yaml).expect("write kubeconfig");
        path
    }

    struct Expect {
        context: &'static str,
        server: &'static str,
        ca: Option<&'static [u8]>,
        tls_server_name: Option<&'static str>,
        credential: KubeconfigCredential,
    }

    fn expect(credential: KubeconfigCredential) -> Expect {
        Expect {
            context: "main",
            server: SERVER,
            ca: None,
            tls_server_name: None,
            credential,
        }
    }

    #[test]
    fn resolves_supported_configs() {
        let dir = fixture();
        let d = dir.path();
        let cluster = format!("server: {SERVER}");
        let cert_pair = || KubeconfigCredential::ClientCertificate {
            cert_pem: CERT.to_vec(),
            key_pem: KEY.to_vec(),
        };
        let two_contexts = format!(
            "current-context: main\n\
             clusters:\n\
             - name: prod\n  cluster: {{server: {SERVER}}}\n\
             - name: staging\n  cluster: {{server: 'https://[::1]:7443/prefix', tls-server-name: kubernetes.default.svc}}\n\
             users:\n\
             - name: admin\n  user: {{token: admin-token}}\n\
             - name: robot\n  user: {{tokenFile: secrets/token}}\n\
             - name: laptop\n  user: {{exec: {{command: gke-gcloud-auth-plugin, apiVersion: client.authentication.k8s.io/v1}}}}\n\
             contexts:\n\
             - name: main\n  context: {{cluster: prod, user: laptop}}\n\
             - name: ci\n  context: {{cluster: staging, user: robot}}\n"
        );
        let cases: Vec<(&str, String, Option<&str>, Expect)> = vec![
            (
                "inline token, CA via data, tls-server-name",
                config(
                    &format!(
                        "{cluster}, certificate-authority-data: {}, tls-server-name: api.internal",
                        b64(CA)
                    ),
                    "token: abc.def-123_~+/=",
                ),
                None,
                Expect {
                    ca: Some(CA),
                    tls_server_name: Some("api.internal"),
                    ..expect(KubeconfigCredential::Token("abc.def-123_~+/=".into()))
                },
            ),
            (
                "tokenFile relative to the kubeconfig, CA via relative path",
                config(
                    &format!("{cluster}, certificate-authority: ca.crt"),
                    "tokenFile: secrets/token",
                ),
                None,
                Expect {
                    ca: Some(CA),
                    ..expect(KubeconfigCredential::TokenFile(d.join("secrets/token")))
                },
            ),
            (
                "client certificate via data",
                config(
                    &cluster,
                    &format!(
                        "client-certificate-data: {}, client-key-data: {}",
                        b64(CERT),
                        b64(KEY)
                    ),
                ),
                None,
                expect(cert_pair()),
            ),
            (
                "client certificate via relative paths",
                config(
                    &cluster,
                    "client-certificate: certs/client.crt, client-key: certs/client.key",
                ),
                None,
                expect(cert_pair()),
            ),
            (
                "client certificate and key via absolute paths, CA via absolute path",
                config(
                    &format!(
                        "{cluster}, certificate-authority: {}",
                        d.join("ca.crt").display()
                    ),
                    &format!(
                        "client-certificate: {}, client-key-data: {}",
                        d.join("certs/client.crt").display(),
                        b64(KEY)
                    ),
                ),
                None,
                Expect {
                    ca: Some(CA),
                    ..expect(cert_pair())
                },
            ),
            (
                "token and client certificate together",
                config(
                    &cluster,
                    "token: both, client-certificate: certs/client.crt, client-key: certs/client.key",
                ),
                None,
                expect(KubeconfigCredential::TokenAndClientCertificate {
                    token: BearerToken::Token("both".into()),
                    cert_pem: CERT.to_vec(),
                    key_pem: KEY.to_vec(),
                }),
            ),
            (
                "tokenFile and client certificate together",
                config(
                    &cluster,
                    "tokenFile: secrets/token, client-certificate: certs/client.crt, client-key: certs/client.key",
                ),
                None,
                expect(KubeconfigCredential::TokenAndClientCertificate {
                    token: BearerToken::TokenFile(d.join("secrets/token")),
                    cert_pem: CERT.to_vec(),
                    key_pem: KEY.to_vec(),
                }),
            ),
            (
                "user without credentials",
                config(&cluster, ""),
                None,
                expect(KubeconfigCredential::None),
            ),
            (
                "empty and null values count as absent, as in client-go",
                config(
                    &format!(
                        "{cluster}, certificate-authority: '', insecure-skip-tls-verify: false, proxy-url: ''"
                    ),
                    "token: t, tokenFile: '', exec: null, username: '', as-groups: [], as-user-extra: {}",
                ),
                None,
                expect(KubeconfigCredential::Token("t".into())),
            ),
            (
                "unknown keys are tolerated",
                config(
                    &format!(
                        "{cluster}, disable-compression: true, extensions: [{{name: x, extension: {{}}}}], future-key: 1"
                    ),
                    "token: t, extensions: [], token-typo: x",
                ),
                None,
                expect(KubeconfigCredential::Token("t".into())),
            ),
            (
                "explicit context overrides current-context; other users' exec is not our business",
                two_contexts.clone(),
                Some("ci"),
                Expect {
                    context: "ci",
                    server: "https://[::1]:7443/prefix",
                    tls_server_name: Some("kubernetes.default.svc"),
                    ..expect(KubeconfigCredential::TokenFile(d.join("secrets/token")))
                },
            ),
            (
                "apiVersion and kind may be absent",
                format!(
                    "current-context: c\nclusters: [{{name: k, cluster: {{server: {SERVER}}}}}]\n\
                     users: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: c, context: {{cluster: k, user: u}}}}]\n"
                ),
                None,
                Expect {
                    context: "c",
                    ..expect(KubeconfigCredential::Token("t".into()))
                },
            ),
        ];
        for (i, (name, yaml, context, want)) in cases.into_iter().enumerate() {
            let path = write(d, &format!("case-{i}.yaml"), &yaml);
            let got = load(&path, context).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got.context, want.context, "{name}: context");
            assert_eq!(
                got.server.as_str(),
                url::Url::parse(want.server).expect("url").as_str(),
                "{name}: server"
            );
            assert_eq!(got.ca_pem.as_deref(), want.ca, "{name}: ca_pem");
            assert_eq!(
                got.tls_server_name.as_deref(),
                want.tls_server_name,
                "{name}: tls_server_name"
            );
            assert!(
                !got.insecure_skip_tls_verify,
                "{name}: insecure_skip_tls_verify"
            );
            assert_eq!(got.credential, want.credential, "{name}: credential");
        }
    }

    #[test]
    fn relative_paths_follow_the_kubeconfig_directory() {
        let dir = fixture();
        let path = write(
            dir.path(),
            "nested/deeper/config",
            &config(
                &format!("server: {SERVER}, certificate-authority: ../../ca.crt"),
                "tokenFile: ../../secrets/token",
            ),
        );
        let got = load(&path, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.ca_pem.as_deref(), Some(CA));
        let want = dir.path().join("nested/deeper/../../secrets/token");
        assert_eq!(got.credential, KubeconfigCredential::TokenFile(want));
        assert!(
            matches!(got.credential, KubeconfigCredential::TokenFile(ref p) if p.is_absolute())
        );
    }

    #[test]
    fn names_selected_entries() {
        let dir = fixture();
        let path = write(
            dir.path(),
            "config",
            &config(&format!("server: {SERVER}"), "token: t"),
        );
        let got = load(&path, Some("main")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (
                got.context.as_str(),
                got.cluster.as_str(),
                got.user.as_str()
            ),
            ("main", "prod", "admin")
        );
    }

    #[test]
    fn refuses_unsupported_or_broken_configs() {
        let dir = fixture();
        let d = dir.path();
        let ok = format!("server: {SERVER}");
        let user = |u: &str| config(&ok, u);
        let cluster = |c: &str| config(c, "token: t");
        let contexts = |current: &str, ctx: &str| {
            format!(
                "current-context: {current}\n\
                 clusters: [{{name: prod, cluster: {{server: {SERVER}}}}}]\n\
                 users: [{{name: admin, user: {{token: t}}}}]\n\
                 contexts: [{ctx}]\n"
            )
        };
        // (case, kubeconfig, explicit context, key the error must name, words it must contain)
        let cases: Vec<(&str, String, Option<&str>, &str, &str)> = vec![
            (
                "exec",
                user("exec: {command: aws, apiVersion: client.authentication.k8s.io/v1beta1}"),
                None,
                "users[0].user.exec",
                "exec credential plugins are not supported; use token, tokenFile or client-certificate",
            ),
            (
                "empty exec is still exec",
                user("exec: {}"),
                None,
                "users[0].user.exec",
                "not supported",
            ),
            (
                "auth-provider",
                user("auth-provider: {name: oidc, config: {}}"),
                None,
                "users[0].user.auth-provider",
                "not supported",
            ),
            (
                "username",
                user("username: admin"),
                None,
                "users[0].user.username",
                "basic authentication",
            ),
            (
                "password",
                user("password: hunter2"),
                None,
                "users[0].user.password",
                "basic authentication",
            ),
            (
                "as",
                user("token: t, as: bob"),
                None,
                "users[0].user.as",
                "impersonation",
            ),
            (
                "as-uid",
                user("token: t, as-uid: '1'"),
                None,
                "users[0].user.as-uid",
                "impersonation",
            ),
            (
                "as-groups",
                user("token: t, as-groups: [admins]"),
                None,
                "users[0].user.as-groups",
                "impersonation",
            ),
            (
                "as-user-extra",
                user("token: t, as-user-extra: {team: [a]}"),
                None,
                "users[0].user.as-user-extra",
                "impersonation",
            ),
            (
                "insecure-skip-tls-verify",
                cluster(&format!("{ok}, insecure-skip-tls-verify: true")),
                None,
                "clusters[0].cluster.insecure-skip-tls-verify",
                "never skips",
            ),
            (
                "proxy-url",
                cluster(&format!("{ok}, proxy-url: 'http://proxy:3128'")),
                None,
                "clusters[0].cluster.proxy-url",
                "directly",
            ),
            (
                "http server",
                cluster("server: 'http://127.0.0.1:8080'"),
                None,
                "clusters[0].cluster.server",
                "not https",
            ),
            (
                "server without scheme",
                cluster("server: '127.0.0.1:6443'"),
                None,
                "clusters[0].cluster.server",
                "https",
            ),
            (
                "server hostname without scheme",
                cluster("server: 'example.com:6443'"),
                None,
                "clusters[0].cluster.server",
                "not https",
            ),
            (
                "server with credentials",
                cluster("server: 'https://u:p@example.com'"),
                None,
                "clusters[0].cluster.server",
                "credentials",
            ),
            (
                "server with query",
                cluster("server: 'https://example.com/?x=1'"),
                None,
                "clusters[0].cluster.server",
                "query",
            ),
            (
                "no server",
                cluster("certificate-authority: ca.crt"),
                None,
                "clusters[0].cluster.server",
                "not set",
            ),
            (
                "bad tls-server-name",
                cluster(&format!("{ok}, tls-server-name: 'not a name'")),
                None,
                "clusters[0].cluster.tls-server-name",
                "not a DNS name",
            ),
            (
                "CA path and data",
                cluster(&format!(
                    "{ok}, certificate-authority: ca.crt, certificate-authority-data: {}",
                    b64(CA)
                )),
                None,
                "clusters[0].cluster.certificate-authority-data",
                "both certificate-authority and certificate-authority-data",
            ),
            (
                "CA bad base64",
                cluster(&format!(
                    "{ok}, certificate-authority-data: '-----BEGIN CERTIFICATE-----'"
                )),
                None,
                "clusters[0].cluster.certificate-authority-data",
                "invalid base64",
            ),
            (
                "CA file missing",
                cluster(&format!("{ok}, certificate-authority: missing-ca.crt")),
                None,
                "clusters[0].cluster.certificate-authority",
                "missing-ca.crt: No such file",
            ),
            (
                "CA is a directory",
                cluster(&format!("{ok}, certificate-authority: certs")),
                None,
                "clusters[0].cluster.certificate-authority",
                "not a regular file",
            ),
            (
                "CA file empty",
                cluster(&format!("{ok}, certificate-authority: secrets/empty")),
                None,
                "clusters[0].cluster.certificate-authority",
                "secrets/empty: the file is empty",
            ),
            (
                "cert path and data",
                user(&format!(
                    "client-certificate: certs/client.crt, client-certificate-data: {}, client-key: certs/client.key",
                    b64(CERT)
                )),
                None,
                "users[0].user.client-certificate-data",
                "both client-certificate and client-certificate-data",
            ),
            (
                "key path and data",
                user(&format!(
                    "client-certificate: certs/client.crt, client-key: certs/client.key, client-key-data: {}",
                    b64(KEY)
                )),
                None,
                "users[0].user.client-key-data",
                "both client-key and client-key-data",
            ),
            (
                "cert bad base64",
                user("client-certificate-data: 'not base64!', client-key: certs/client.key"),
                None,
                "users[0].user.client-certificate-data",
                "invalid base64",
            ),
            (
                "key bad base64",
                user("client-certificate: certs/client.crt, client-key-data: 'QUJD='"),
                None,
                "users[0].user.client-key-data",
                "invalid base64",
            ),
            (
                "cert file missing",
                user("client-certificate: certs/nope.crt, client-key: certs/client.key"),
                None,
                "users[0].user.client-certificate",
                "certs/nope.crt: No such file",
            ),
            (
                "key file missing",
                user("client-certificate: certs/client.crt, client-key: certs/nope.key"),
                None,
                "users[0].user.client-key",
                "certs/nope.key: No such file",
            ),
            (
                "cert without key",
                user("client-certificate: certs/client.crt"),
                None,
                "users[0].user.client-key",
                "neither client-key nor client-key-data",
            ),
            (
                "key without cert",
                user(&format!("client-key-data: {}", b64(KEY))),
                None,
                "users[0].user.client-certificate",
                "neither client-certificate nor client-certificate-data",
            ),
            (
                "token and tokenFile",
                user("token: t, tokenFile: secrets/token"),
                None,
                "users[0].user.tokenFile",
                "both token and tokenFile",
            ),
            (
                "tokenFile missing",
                user("tokenFile: secrets/nope"),
                None,
                "users[0].user.tokenFile",
                "secrets/nope: No such file",
            ),
            (
                "tokenFile empty",
                user("tokenFile: secrets/empty"),
                None,
                "users[0].user.tokenFile",
                "the file is empty",
            ),
            (
                "tokenFile blank",
                user("tokenFile: secrets/blank"),
                None,
                "users[0].user.tokenFile",
                "holds no token",
            ),
            (
                "tokenFile with a space",
                user("tokenFile: secrets/two-words"),
                None,
                "users[0].user.tokenFile",
                "whitespace",
            ),
            (
                "token with a space",
                user("token: 'two words'"),
                None,
                "users[0].user.token",
                "whitespace",
            ),
            (
                "token with a newline",
                user("token: \"t\\n\""),
                None,
                "users[0].user.token",
                "whitespace",
            ),
            (
                "token of the wrong type",
                user("token: [a]"),
                None,
                "users[0].user.token",
                "value not shown",
            ),
            (
                "user body not a mapping",
                config(&ok, "").replace("user: {}", "user: just-a-string"),
                None,
                "users[0].user",
                "value not shown",
            ),
            (
                "cluster body not a mapping",
                config(&format!("server: {SERVER}"), "token: t")
                    .replace(&format!("cluster: {{server: {SERVER}}}"), "cluster: [a]"),
                None,
                "clusters[0].cluster",
                "invalid type: sequence, expected a cluster mapping",
            ),
            (
                "named context missing",
                user("token: t"),
                Some("nope"),
                "contexts",
                "no context named 'nope' (contexts: 'main')",
            ),
            (
                "current-context missing",
                contexts(
                    "gone",
                    "{name: main, context: {cluster: prod, user: admin}}",
                ),
                None,
                "current-context",
                "no context named 'gone'",
            ),
            (
                "current-context unset",
                contexts("''", "{name: main, context: {cluster: prod, user: admin}}"),
                None,
                "current-context",
                "not set",
            ),
            (
                "context names a missing cluster",
                contexts("main", "{name: main, context: {cluster: dev, user: admin}}"),
                None,
                "contexts[0].context.cluster",
                "no cluster named 'dev' (clusters: 'prod')",
            ),
            (
                "context names a missing user",
                contexts("main", "{name: main, context: {cluster: prod, user: root}}"),
                None,
                "contexts[0].context.user",
                "no user named 'root' (users: 'admin')",
            ),
            (
                "context without user",
                contexts("main", "{name: main, context: {cluster: prod}}"),
                None,
                "contexts[0].context.user",
                "not set",
            ),
            (
                "context without cluster",
                contexts("main", "{name: main, context: {user: admin}}"),
                None,
                "contexts[0].context.cluster",
                "not set",
            ),
            (
                "context without body",
                contexts("main", "{name: main}"),
                None,
                "contexts[0].context",
                "not set",
            ),
            (
                "cluster without body",
                config(&ok, "token: t").replace(&format!("cluster: {{{ok}}}"), "cluster: null"),
                None,
                "clusters[0].cluster",
                "not set",
            ),
            (
                "duplicate context",
                contexts(
                    "main",
                    "{name: main, context: {cluster: prod, user: admin}}, {name: main, context: {}}",
                ),
                None,
                "contexts[1].name",
                "duplicate name 'main' (also contexts[0])",
            ),
            (
                "entry without name",
                contexts("main", "{context: {cluster: prod, user: admin}}"),
                None,
                "contexts[0]",
                "missing field `name`",
            ),
            (
                "wrong apiVersion",
                user("token: t").replace("apiVersion: v1", "apiVersion: v2"),
                None,
                "apiVersion",
                "expected v1",
            ),
            (
                "wrong kind",
                user("token: t").replace("kind: Config", "kind: Pod"),
                None,
                "kind",
                "expected Config",
            ),
            (
                "yaml syntax error",
                "clusters: [\n".to_owned(),
                None,
                "clusters",
                "line 2",
            ),
            (
                "yaml syntax error at the top",
                "kind: Config\n- item\n".to_owned(),
                None,
                "(top level)",
                "line 2",
            ),
            (
                "not a mapping",
                "- a\n".to_owned(),
                None,
                "(top level)",
                "invalid type",
            ),
            ("empty file", "\n".to_owned(), None, "(file)", "empty"),
        ];
        for (i, (name, yaml, context, key, words)) in cases.into_iter().enumerate() {
            let path = write(d, &format!("bad-{i}.yaml"), &yaml);
            let err = match load(&path, context) {
                Ok(got) => panic!("{name}: loaded {got:?}, expected an error naming {key}"),
                Err(e) => e.to_string(),
            };
            let prefix = format!("kubeconfig {}: {key}", path.display());
            assert!(
                err.starts_with(&prefix),
                "{name}: error should start with {prefix:?}: {err}"
            );
            assert!(
                err.contains(words),
                "{name}: error should contain {words:?}: {err}"
            );
            assert!(
                !err.contains(&format!("{key}: {key}")),
                "{name}: key repeated: {err}"
            );
        }
    }

    #[test]
    fn names_an_unreadable_kubeconfig() {
        let dir = fixture();
        let cases = [
            (dir.path().join("no-such-config"), "No such file"),
            (dir.path().join("certs"), "not a regular file"),
        ];
        for (path, words) in cases {
            let err = load(&path, None)
                .map(|_| ())
                .expect_err("must fail")
                .to_string();
            let prefix = format!("kubeconfig {}: ", path.display());
            assert!(err.starts_with(&prefix) && err.contains(words), "{err}");
        }
        let binary = dir.path().join("binary");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).expect("write");
        let err = load(&binary, None)
            .map(|_| ())
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("not UTF-8"), "{err}");
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let dir = fixture();
        let path = write(
            dir.path(),
            "config",
            &config(
                &format!("server: {SERVER}"),
                "token: sekrit-token, client-certificate: certs/client.crt, client-key: certs/client.key",
            ),
        );
        let got = load(&path, None).unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{got:?}");
        assert!(
            !shown.contains("sekrit") && !shown.contains("PRIVATE KEY"),
            "{shown}"
        );
        assert!(
            shown.contains("redacted") && shown.contains("127.0.0.1"),
            "{shown}"
        );
        assert_eq!(
            got.credential.bearer(),
            Some(BearerToken::Token("sekrit-token".into()))
        );
        assert_eq!(got.credential.client_certificate(), Some((CERT, KEY)));
        // A token YAML reads as a number must not be echoed by the type error either.
        let numeric = write(
            dir.path(),
            "numeric",
            &config(&format!("server: {SERVER}"), "token: 98765432"),
        );
        let err = load(&numeric, None)
            .map(|_| ())
            .expect_err("numeric token")
            .to_string();
        assert!(
            err.contains("users[0].user.token") && !err.contains("98765432"),
            "{err}"
        );
        let token_only = KubeconfigCredential::Token("sekrit".into());
        assert!(!format!("{token_only:?}").contains("sekrit"));
        assert_eq!(token_only.client_certificate(), None);
    }
}
