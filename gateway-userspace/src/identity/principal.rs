//! Who the caller claims to be: the bearer token a pod presents, verified, never trusted.
//!
//! The workload identity comes from the kernel and cannot be forged by the pod; the
//! principal is a second, weaker claim on top of it. OIDC ID tokens are verified locally
//! against the issuer's keys; every other token (ServiceAccount tokens in particular) is
//! reviewed by the API server. Results are cached briefly under the token's SHA-256, so
//! the token itself is never kept, and a ServiceAccount token that does not belong to the
//! pod presenting it is flagged.

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, Instant, SystemTime},
};

use http::HeaderValue;
use sha2::{Digest as _, Sha256};

use crate::recorder::PrincipalRecord;

use super::{
    IdentityConfig, IdentityError, TokenError, WorkloadIdentity,
    oidc::{OidcVerifier, unverified_issuer},
    tokenreview::TokenReviewer,
};

const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
const MAX_CACHE_ENTRIES: usize = 10_000;

/// The principal of every request without an `Authorization` header.
static ANONYMOUS: LazyLock<Verified> = LazyLock::new(|| Verified::new(Principal::anonymous()));

/// How the principal was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrincipalKind {
    /// No `Authorization` header.
    Anonymous,
    /// A verified OIDC ID token.
    Oidc,
    /// A ServiceAccount token the API server authenticated.
    ServiceAccount,
    /// A token the API server authenticated as a user that is not a service account.
    User,
    /// A token that was presented but not accepted; `reason` says why.
    Invalid,
}

impl PrincipalKind {
    /// The lowercase name used in recordings and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Anonymous => "anonymous",
            Self::Oidc => "oidc",
            Self::ServiceAccount => "serviceaccount",
            Self::User => "user",
            Self::Invalid => "invalid",
        }
    }
}

/// The verified identity behind a request's bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// How it was established.
    pub kind: PrincipalKind,
    /// The user name (`system:serviceaccount:<ns>:<name>`, `<prefix><claim>`), if any.
    pub subject: Option<String>,
    /// The groups.
    pub groups: Vec<String>,
    /// The user's UID where the authenticator gives one (TokenReview), for `Impersonate-Uid`.
    pub uid: Option<String>,
    /// Why the token was not accepted (kind `Invalid`).
    pub reason: Option<String>,
    /// Set when a ServiceAccount token belongs to a different service account than the pod
    /// the kernel attributed the connection to.
    pub mismatch: Option<String>,
}

impl Principal {
    /// No credentials presented.
    pub fn anonymous() -> Self {
        Self {
            kind: PrincipalKind::Anonymous,
            subject: None,
            groups: Vec::new(),
            uid: None,
            reason: None,
            mismatch: None,
        }
    }

    /// A presented credential that was not accepted.
    pub fn invalid(reason: impl Into<String>) -> Self {
        Self {
            kind: PrincipalKind::Invalid,
            subject: None,
            groups: Vec::new(),
            uid: None,
            reason: Some(reason.into()),
            mismatch: None,
        }
    }

    fn authenticated(kind: PrincipalKind, subject: String, groups: Vec<String>) -> Self {
        Self {
            kind,
            subject: Some(subject),
            groups,
            uid: None,
            reason: None,
            mismatch: None,
        }
    }

    /// `(namespace, name)` for a ServiceAccount principal.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        if self.kind != PrincipalKind::ServiceAccount {
            return None;
        }
        let rest = self
            .subject
            .as_deref()?
            .strip_prefix(SERVICE_ACCOUNT_PREFIX)?;
        let (namespace, name) = rest.split_once(':')?;
        (!namespace.is_empty() && !name.is_empty() && !name.contains(':'))
            .then_some((namespace, name))
    }
}

/// A verified principal as the request path shares it: the cache hands every request with
/// the same token the same principal, and its recording form, without copying the subject
/// and groups into each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    principal: Arc<Principal>,
    record: Arc<PrincipalRecord>,
    /// The token could not be checked now (TokenReview or the issuer's keys unreachable);
    /// the principal says `invalid` with the cause, and is never cached.
    unverifiable: bool,
}

impl Verified {
    /// Shares `principal`.
    pub fn new(principal: Principal) -> Self {
        Self {
            record: Arc::new(PrincipalRecord {
                kind: principal.kind.as_str().to_owned(),
                subject: principal.subject.clone(),
                groups: principal.groups.clone(),
                reason: principal.reason.clone(),
                mismatch: principal.mismatch.clone(),
            }),
            principal: Arc::new(principal),
            unverifiable: false,
        }
    }

    /// A token that could not be checked now, for `reason`.
    fn unverifiable(reason: String) -> Self {
        Self {
            unverifiable: true,
            ..Self::new(Principal::invalid(reason))
        }
    }

    /// Whether the token could not be checked now (not that it was refused): a decision
    /// cannot rest on who presented it.
    pub fn is_unverifiable(&self) -> bool {
        self.unverifiable
    }

    /// The `principal` column of the request's recording.
    pub fn record(&self) -> Arc<PrincipalRecord> {
        Arc::clone(&self.record)
    }

    /// Flags a token that belongs to another service account than the workload's.
    fn set_mismatch(&mut self, mismatch: String) {
        Arc::make_mut(&mut self.record).mismatch = Some(mismatch.clone());
        Arc::make_mut(&mut self.principal).mismatch = Some(mismatch);
    }
}

impl std::ops::Deref for Verified {
    type Target = Principal;

    fn deref(&self) -> &Principal {
        &self.principal
    }
}

/// A connection's last `Authorization` header and the principal it verified to, until the
/// token cache's entry for it expires (see [`PrincipalVerifier::verify_on_connection`]).
#[derive(Debug, Default)]
pub struct TokenMemo(Mutex<Option<Remembered>>);

#[derive(Debug, Clone)]
struct Remembered {
    header: HeaderValue,
    principal: Verified,
    until: Instant,
}

impl Clone for TokenMemo {
    fn clone(&self) -> Self {
        let memo = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        TokenMemo(Mutex::new(memo.clone()))
    }
}

impl TokenMemo {
    fn get(&self, header: &HeaderValue) -> Option<Verified> {
        let memo = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        memo.as_ref()
            .filter(|m| m.header == header && m.until > Instant::now())
            .map(|m| m.principal.clone())
    }

    fn set(&self, header: &HeaderValue, principal: &Verified, until: Instant) {
        // A copy: the request's header may share a buffer with the rest of its frame.
        let Ok(header) = HeaderValue::from_bytes(header.as_bytes()) else {
            return;
        };
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Remembered {
            header,
            principal: principal.clone(),
            until,
        });
    }
}

/// Compares a ServiceAccount principal with the kernel-attributed workload; `Some(reason)`
/// when they disagree. Unknown workloads are not flagged (there is nothing to compare).
pub fn service_account_mismatch(
    principal: &Principal,
    workload: &WorkloadIdentity,
) -> Option<String> {
    let (namespace, name) = principal.service_account()?;
    let (Some(w_namespace), Some(w_sa)) = (&workload.namespace, &workload.service_account) else {
        return None;
    };
    if namespace == w_namespace && name == w_sa {
        return None;
    }
    Some(format!(
        "token is for service account {namespace}/{name}, but the connection comes from pod {w_namespace}/{} which runs as {w_namespace}/{w_sa}",
        workload.pod.as_deref().unwrap_or("?"),
    ))
}

struct CacheEntry {
    principal: Verified,
    expires: Instant,
}

/// Verifies bearer tokens into principals, with a short cache keyed by token hash.
pub struct PrincipalVerifier {
    oidc: Vec<OidcVerifier>,
    reviewer: Option<Arc<dyn TokenReviewer>>,
    ttl: Duration,
    cache: Mutex<HashMap<[u8; 32], CacheEntry>>,
}

impl std::fmt::Debug for PrincipalVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrincipalVerifier")
            .field("oidc", &self.oidc)
            .field("token_review", &self.reviewer.is_some())
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl PrincipalVerifier {
    /// A verifier over these issuers and reviewer, caching verdicts for `ttl`.
    pub fn new(
        oidc: Vec<OidcVerifier>,
        reviewer: Option<Arc<dyn TokenReviewer>>,
        ttl: Duration,
    ) -> Self {
        Self {
            oidc,
            reviewer,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Builds the OIDC verifiers of `config.oidc`; `reviewer` is the TokenReview client
    /// (None when the gateway has no API server access, e.g. standalone).
    pub fn from_config(
        config: &IdentityConfig,
        reviewer: Option<Arc<dyn TokenReviewer>>,
    ) -> Result<Self, IdentityError> {
        let oidc = config
            .oidc
            .iter()
            .enumerate()
            .map(|(i, c)| {
                c.validate(&format!("identity.oidc[{i}]"))?;
                OidcVerifier::new(c.clone())
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(oidc, reviewer, config.token_cache_ttl))
    }

    /// Verifies the request's `Authorization` header (absent: anonymous) and checks a
    /// ServiceAccount principal against `workload`.
    pub async fn verify(
        &self,
        authorization: Option<&HeaderValue>,
        workload: &WorkloadIdentity,
    ) -> Verified {
        match authorization {
            Some(header) => self.verify_header(header, workload).await.0,
            None => ANONYMOUS.clone(),
        }
    }

    /// [`verify`](Self::verify) for a request on a connection whose workload is
    /// `workload`: a request with the same `Authorization` header as the connection's
    /// previous one gets that one's principal while the cache would still hold it, without
    /// hashing the token (a ServiceAccount token is about a kilobyte) or taking the
    /// cache's lock.
    pub async fn verify_on_connection(
        &self,
        authorization: Option<&HeaderValue>,
        workload: &WorkloadIdentity,
        memo: &TokenMemo,
    ) -> Verified {
        let Some(header) = authorization else {
            return ANONYMOUS.clone();
        };
        if let Some(hit) = memo.get(header) {
            return hit;
        }
        let (principal, until) = self.verify_header(header, workload).await;
        if let Some(until) = until {
            memo.set(header, &principal, until);
        }
        principal
    }

    /// The principal behind `header` and until when the cache holds it (`None`: not
    /// cached).
    async fn verify_header(
        &self,
        header: &HeaderValue,
        workload: &WorkloadIdentity,
    ) -> (Verified, Option<Instant>) {
        let token = match bearer_token(header) {
            Ok(token) => token,
            Err(reason) => return (Verified::new(Principal::invalid(reason)), None),
        };
        let (mut principal, until) = self.verify_token_until(token).await;
        if let Some(mismatch) = service_account_mismatch(&principal, workload) {
            principal.set_mismatch(mismatch);
        }
        (principal, until)
    }

    /// Verifies a bare token (no workload check).
    pub async fn verify_token(&self, token: &str) -> Verified {
        self.verify_token_until(token).await.0
    }

    async fn verify_token_until(&self, token: &str) -> (Verified, Option<Instant>) {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(hit) = self.cached(&key) {
            return hit;
        }
        // Boxed: the check (an HTTP call) is rare, and its state would otherwise be part
        // of every request's future.
        let (principal, expires) = match Box::pin(self.check(token)).await {
            Ok((principal, not_after)) => (principal, not_after),
            Err(TokenError::Invalid(reason)) => (Principal::invalid(reason), None),
            Err(TokenError::Unavailable(reason)) => {
                return (Verified::unverifiable(reason), None);
            }
        };
        let principal = Verified::new(principal);
        let mut until = Instant::now() + self.ttl;
        if let Some(not_after) = expires {
            until = until.min(not_after);
        }
        let stored = self.store(key, principal.clone(), until);
        (principal, stored.then_some(until))
    }

    /// Number of cached verdicts (tests, metrics).
    pub fn cached_entries(&self) -> usize {
        self.lock_cache().len()
    }

    async fn check(&self, token: &str) -> Result<(Principal, Option<Instant>), TokenError> {
        let issuer = unverified_issuer(token);
        if let Some(verifier) = issuer
            .as_deref()
            .and_then(|iss| self.oidc.iter().find(|v| v.issuer() == iss))
        {
            let user = verifier.verify(token).await?;
            return Ok((
                Principal::authenticated(PrincipalKind::Oidc, user.username, user.groups),
                instant_of(user.expires_at),
            ));
        }
        let Some(reviewer) = &self.reviewer else {
            return Err(TokenError::Invalid(match issuer {
                Some(iss) => format!(
                    "token issuer '{iss}' is not a configured OIDC issuer and TokenReview is not enabled"
                ),
                None => "token is not from a configured OIDC issuer and TokenReview is not enabled"
                    .to_owned(),
            }));
        };
        let result = reviewer.review(token).await?;
        if !result.authenticated {
            return Err(TokenError::Invalid(result.error.unwrap_or_else(|| {
                "the API server did not authenticate the token".to_owned()
            })));
        }
        let kind = if result.username.starts_with(SERVICE_ACCOUNT_PREFIX) {
            PrincipalKind::ServiceAccount
        } else {
            PrincipalKind::User
        };
        let mut principal = Principal::authenticated(kind, result.username, result.groups);
        principal.uid = result.uid;
        Ok((principal, None))
    }

    fn cached(&self, key: &[u8; 32]) -> Option<(Verified, Option<Instant>)> {
        let mut cache = self.lock_cache();
        match cache.get(key) {
            Some(entry) if entry.expires > Instant::now() => {
                Some((entry.principal.clone(), Some(entry.expires)))
            }
            Some(_) => {
                cache.remove(key);
                None
            }
            None => None,
        }
    }

    /// Caches a verdict; false when the cache is off (`tokenCacheTTL: 0`).
    fn store(&self, key: [u8; 32], principal: Verified, expires: Instant) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let mut cache = self.lock_cache();
        if cache.len() >= MAX_CACHE_ENTRIES {
            let now = Instant::now();
            cache.retain(|_, e| e.expires > now);
            if cache.len() >= MAX_CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(key, CacheEntry { principal, expires });
        true
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], CacheEntry>> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The token of a `Bearer` header, or why there is none.
fn bearer_token(header: &HeaderValue) -> Result<&str, String> {
    let value = header
        .to_str()
        .map_err(|_| "Authorization header is not printable ASCII".to_owned())?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(format!(
            "unsupported Authorization scheme '{scheme}' (only Bearer tokens are verified)"
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err("empty bearer token".to_owned());
    }
    Ok(token)
}

/// An `exp` (seconds since the epoch) as an `Instant`, if it is in the future.
fn instant_of(exp: u64) -> Option<Instant> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_secs();
    // exp may lie up to CLOCK_SKEW in the past for a token that verified; one absurdly
    // far ahead (a signed token may say anything) is as if it had none.
    Instant::now().checked_add(Duration::from_secs(exp.saturating_sub(now)))
}
