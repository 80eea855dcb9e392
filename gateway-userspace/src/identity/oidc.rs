//! OIDC ID token verification, the way kube-apiserver's `--oidc-*` flags do it.
//!
//! The issuer's discovery document (`<issuer>/.well-known/openid-configuration`) names its
//! JWKS; keys are fetched over HTTPS on first use, kept, and refetched when a token names a
//! `kid` we do not have (the issuer rotated), at most once per `refresh_min_interval` so a
//! stream of tokens with made-up kids cannot turn the gateway into a load generator. Only
//! RS256 and ES256 are accepted: `none` and HMAC algorithms would let anyone who knows the
//! public key (or nothing at all) mint tokens.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse},
};
use serde::{Deserialize, Serialize};

use super::{IdentityError, TokenError};

/// Clock skew tolerated on `exp` and `nbf`.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_DOCUMENT_BYTES: usize = 1 << 20;
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// One trusted OIDC issuer (the equivalent of kube-apiserver's `--oidc-*` flags).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OidcIssuerConfig {
    /// The issuer URL; must be https and equal the tokens' `iss` exactly.
    pub issuer_url: String,
    /// The client id; tokens must carry it in `aud`.
    pub client_id: String,
    /// The claim holding the user name.
    #[serde(default = "default_username_claim")]
    pub username_claim: String,
    /// Prefix for user names; unset means `<issuerUrl>#` unless the claim is `email`, and
    /// `-` means none (kube-apiserver's rule).
    #[serde(default)]
    pub username_prefix: Option<String>,
    /// The claim holding the groups (a string or a list of strings).
    #[serde(default)]
    pub groups_claim: Option<String>,
    /// Prefix for every group.
    #[serde(default)]
    pub groups_prefix: Option<String>,
    /// PEM bundle to verify the issuer's TLS certificate; the system bundle when unset.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_username_claim() -> String {
    "sub".to_owned()
}

impl OidcIssuerConfig {
    /// Checks the fields; `at` names this entry in errors (`identity.oidc[0]`).
    pub fn validate(&self, at: &str) -> Result<(), IdentityError> {
        let invalid = |field: &str, message: String| IdentityError::Config {
            field: format!("{at}.{field}"),
            message,
        };
        let url = url::Url::parse(&self.issuer_url)
            .map_err(|e| invalid("issuerUrl", format!("'{}': {e}", self.issuer_url)))?;
        if url.scheme() != "https" {
            return Err(invalid(
                "issuerUrl",
                format!("'{}' must use https", self.issuer_url),
            ));
        }
        if self.client_id.is_empty() {
            return Err(invalid("clientId", "must not be empty".to_owned()));
        }
        if self.username_claim.is_empty() {
            return Err(invalid("usernameClaim", "must not be empty".to_owned()));
        }
        Ok(())
    }

    fn username_prefix(&self) -> String {
        match self.username_prefix.as_deref() {
            Some("-") => String::new(),
            Some(prefix) => prefix.to_owned(),
            None if self.username_claim == "email" => String::new(),
            None => format!("{}#", self.issuer_url),
        }
    }
}

/// A verified ID token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcUser {
    /// The prefixed user name.
    pub username: String,
    /// The prefixed groups.
    pub groups: Vec<String>,
    /// `exp`, as seconds since the epoch.
    pub expires_at: u64,
}

#[derive(Debug)]
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

#[derive(Debug, Default)]
struct KeySet {
    keys: Vec<Key>,
    fetched_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct FetchState {
    last_attempt: Option<Instant>,
    /// Why the last attempt failed: within the rate limit it is still the news, rather
    /// than a "no key with kid" that hides it.
    last_error: Option<TokenError>,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Verifies ID tokens of one issuer.
pub struct OidcVerifier {
    config: OidcIssuerConfig,
    client: HttpsClient,
    keys: RwLock<Arc<KeySet>>,
    fetch: tokio::sync::Mutex<FetchState>,
    refresh_min_interval: Duration,
    max_key_age: Duration,
    fetches: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("issuer", &self.config.issuer_url)
            .finish_non_exhaustive()
    }
}

impl OidcVerifier {
    /// A verifier for `config`; reads the CA file now, fetches keys on first use.
    pub fn new(config: OidcIssuerConfig) -> Result<Self, IdentityError> {
        config.validate("oidc")?;
        let roots = match &config.ca_file {
            Some(path) => crate::tls::root_store_from_file(path)
                .map_err(|e| IdentityError::Tls(e.to_string()))?,
            None => system_roots()?,
        };
        let tls =
            crate::tls::client_config(roots).map_err(|e| IdentityError::Tls(e.to_string()))?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        Ok(Self {
            config,
            client: Client::builder(TokioExecutor::new()).build(https),
            keys: RwLock::new(Arc::new(KeySet::default())),
            fetch: tokio::sync::Mutex::new(FetchState::default()),
            refresh_min_interval: Duration::from_secs(10),
            max_key_age: Duration::from_secs(3600),
            fetches: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Sets the shortest time between two JWKS fetches (default 10 s).
    pub fn with_refresh_min_interval(mut self, interval: Duration) -> Self {
        self.refresh_min_interval = interval;
        self
    }

    /// The issuer URL (what `iss` must equal).
    pub fn issuer(&self) -> &str {
        &self.config.issuer_url
    }

    /// How many times discovery + JWKS were fetched successfully.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Verifies a token whose `iss` names this issuer.
    pub async fn verify(&self, token: &str) -> Result<OidcUser, TokenError> {
        let header = parse_header(token)?;
        let alg = match header.alg.as_str() {
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            other => {
                return Err(TokenError::Invalid(format!(
                    "signing algorithm '{other}' is not accepted (RS256 or ES256 only)"
                )));
            }
        };

        let mut keys = self.current_keys();
        let stale = keys
            .fetched_at
            .is_none_or(|t| t.elapsed() >= self.max_key_age);
        let mut refresh_error = None;
        if stale || !has_key(&keys, header.kid.as_deref(), alg) {
            // A failed refresh of keys we already hold is not fatal: they may still verify.
            match self.refresh().await {
                Ok(fresh) => keys = fresh,
                Err(e) if keys.fetched_at.is_none() => return Err(e),
                Err(e) => {
                    tracing::warn!(issuer = %self.config.issuer_url, error = %e, "JWKS refresh failed");
                    refresh_error = Some(e);
                }
            }
        }
        let candidates: Vec<&Key> = keys
            .keys
            .iter()
            .filter(|k| k.alg == alg && (header.kid.is_none() || k.kid == header.kid))
            .collect();
        if candidates.is_empty() {
            // Not cached as invalid: the issuer may have rotated while the refresh was
            // rate-limited, and a retry after the interval will find the key.
            let missing = match &header.kid {
                Some(kid) => format!(
                    "no {alg:?} key with kid '{kid}' in the JWKS of {}",
                    self.config.issuer_url
                ),
                None => format!("no {alg:?} key in the JWKS of {}", self.config.issuer_url),
            };
            return Err(TokenError::Unavailable(match refresh_error {
                Some(cause) => format!("{missing}, and fetching a newer one failed: {cause}"),
                None => missing,
            }));
        }

        let mut validation = Validation::new(alg);
        validation.leeway = CLOCK_SKEW.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.config.issuer_url]);
        validation.set_audience(&[&self.config.client_id]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let mut last_error = None;
        for key in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                &key.key,
                &validation,
            ) {
                Ok(data) => return self.user(&data.claims),
                Err(e) => last_error = Some(e),
            }
        }
        Err(TokenError::Invalid(last_error.map_or_else(
            || "no key verified the token".to_owned(),
            |e| describe(&e),
        )))
    }

    fn user(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<OidcUser, TokenError> {
        let claim = &self.config.username_claim;
        let username = claims
            .get(claim)
            .and_then(serde_json::Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                TokenError::Invalid(format!(
                    "username claim '{claim}' is missing or not a string"
                ))
            })?;
        if claim == "email"
            && let Some(verified) = claims.get("email_verified")
            && verified.as_bool() != Some(true)
        {
            return Err(TokenError::Invalid("email is not verified".to_owned()));
        }
        let mut groups = Vec::new();
        if let Some(groups_claim) = &self.config.groups_claim {
            let prefix = self.config.groups_prefix.as_deref().unwrap_or("");
            match claims.get(groups_claim) {
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::String(g)) => groups.push(format!("{prefix}{g}")),
                Some(serde_json::Value::Array(items)) => {
                    for item in items {
                        let g = item.as_str().ok_or_else(|| {
                            TokenError::Invalid(format!(
                                "groups claim '{groups_claim}' holds a non-string"
                            ))
                        })?;
                        groups.push(format!("{prefix}{g}"));
                    }
                }
                Some(_) => {
                    return Err(TokenError::Invalid(format!(
                        "groups claim '{groups_claim}' is neither a string nor a list"
                    )));
                }
            }
        }
        Ok(OidcUser {
            username: format!("{}{username}", self.config.username_prefix()),
            groups,
            expires_at: claims
                .get("exp")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
        })
    }

    fn current_keys(&self) -> Arc<KeySet> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Fetches discovery + JWKS unless another task just did, or the rate limit says no.
    async fn refresh(&self) -> Result<Arc<KeySet>, TokenError> {
        let before = self.current_keys().fetched_at;
        let mut state = self.fetch.lock().await;
        let now_keys = self.current_keys();
        if now_keys.fetched_at != before {
            // Someone refreshed while we waited for the lock.
            return Ok(now_keys);
        }
        if let Some(last) = state.last_attempt
            && last.elapsed() < self.refresh_min_interval
        {
            return match &state.last_error {
                Some(error) => Err(error.clone()),
                None => Ok(now_keys),
            };
        }
        state.last_attempt = Some(Instant::now());
        let keys = match self.fetch_keys().await {
            Ok(keys) => Arc::new(keys),
            Err(error) => {
                state.last_error = Some(error.clone());
                return Err(error);
            }
        };
        state.last_error = None;
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keys.clone();
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(keys)
    }

    async fn fetch_keys(&self) -> Result<KeySet, TokenError> {
        #[derive(Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: String,
        }
        #[derive(Deserialize)]
        struct Jwks {
            keys: Vec<serde_json::Value>,
        }
        let issuer = self.config.issuer_url.trim_end_matches('/');
        let discovery_url = format!("{issuer}/.well-known/openid-configuration");
        let discovery: Discovery = serde_json::from_slice(&self.get(&discovery_url).await?)
            .map_err(|e| TokenError::Unavailable(format!("{discovery_url}: {e}")))?;
        if discovery.issuer != self.config.issuer_url {
            return Err(TokenError::Unavailable(format!(
                "{discovery_url}: issuer '{}' does not match '{}'",
                discovery.issuer, self.config.issuer_url
            )));
        }
        if !discovery.jwks_uri.starts_with("https://") {
            return Err(TokenError::Unavailable(format!(
                "{discovery_url}: jwks_uri '{}' is not https",
                discovery.jwks_uri
            )));
        }
        let jwks: Jwks = serde_json::from_slice(&self.get(&discovery.jwks_uri).await?)
            .map_err(|e| TokenError::Unavailable(format!("{}: {e}", discovery.jwks_uri)))?;
        let keys: Vec<Key> = jwks.keys.into_iter().filter_map(usable_key).collect();
        tracing::debug!(issuer = %self.config.issuer_url, keys = keys.len(), "JWKS fetched");
        Ok(KeySet {
            keys,
            fetched_at: Some(Instant::now()),
        })
    }

    async fn get(&self, url: &str) -> Result<Bytes, TokenError> {
        let unavailable = |m: String| TokenError::Unavailable(format!("GET {url}: {m}"));
        let uri: http::Uri = url.parse().map_err(|e| unavailable(format!("{e}")))?;
        let request = http::Request::get(uri)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| unavailable(e.to_string()))?;
        let response = tokio::time::timeout(FETCH_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| unavailable("timed out".to_owned()))?
            .map_err(|e| unavailable(format!("{e:#}")))?;
        if !response.status().is_success() {
            return Err(unavailable(format!("status {}", response.status())));
        }
        let body = tokio::time::timeout(
            FETCH_TIMEOUT,
            Limited::new(response.into_body(), MAX_DOCUMENT_BYTES).collect(),
        )
        .await
        .map_err(|_| unavailable("timed out reading the body".to_owned()))?
        .map_err(|e| unavailable(e.to_string()))?;
        Ok(body.to_bytes())
    }
}

fn system_roots() -> Result<rustls::RootCertStore, IdentityError> {
    for path in SYSTEM_CA_BUNDLES {
        let path = std::path::Path::new(path);
        if path.exists() {
            return crate::tls::root_store_from_file(path)
                .map_err(|e| IdentityError::Tls(e.to_string()));
        }
    }
    Err(IdentityError::Tls(format!(
        "no caFile configured and no system CA bundle found (tried {})",
        SYSTEM_CA_BUNDLES.join(", ")
    )))
}

fn has_key(keys: &KeySet, kid: Option<&str>, alg: Algorithm) -> bool {
    keys.keys
        .iter()
        .any(|k| k.alg == alg && (kid.is_none() || k.kid.as_deref() == kid))
}

/// Turns one JWKS entry into a verification key, skipping encryption keys and key types or
/// curves we do not accept.
fn usable_key(value: serde_json::Value) -> Option<Key> {
    let jwk: Jwk = serde_json::from_value(value).ok()?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        _ => return None,
    };
    // A key published for a different algorithm must not verify this one.
    if let Some(declared) = jwk.common.key_algorithm
        && declared.to_string() != format!("{alg:?}")
    {
        return None;
    }
    Some(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        key: DecodingKey::from_jwk(&jwk).ok()?,
    })
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// Reads the JOSE header without trusting it, so `none` and HS* get a clear reason.
fn parse_header(token: &str) -> Result<RawHeader, TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Invalid(
            "not a JWT (expected three dot-separated parts)".to_owned(),
        ));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|e| TokenError::Invalid(format!("token header is not base64url: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| TokenError::Invalid(format!("token header is not valid JSON: {e}")))
}

/// The `iss` claim of a JWT, read without verification (to pick the verifier), if the
/// token is a JWT at all.
pub fn unverified_issuer(token: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Iss {
        iss: Option<String>,
    }
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice::<Iss>(&bytes).ok()?.iss
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => "token has expired".to_owned(),
        ErrorKind::ImmatureSignature => "token is not valid yet (nbf)".to_owned(),
        ErrorKind::InvalidAudience => "token audience does not include the client id".to_owned(),
        ErrorKind::InvalidIssuer => "token issuer does not match".to_owned(),
        ErrorKind::InvalidSignature => "signature does not verify".to_owned(),
        ErrorKind::MissingRequiredClaim(claim) => format!("required claim '{claim}' is missing"),
        _ => format!("invalid token: {e}"),
    }
}
