//! The gateway's own credential: the bearer token it injects upstream (re-read from its
//! file by a control-plane task) and the headers that carry it and the impersonated identity.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderValue, header};

use crate::drain::DrainWatcher;

use super::{
    Proxy, ProxyError,
    impersonation::{Impersonation, impersonation_headers},
};

/// The gateway's own bearer token, re-read by a control-plane task when the file changes so
/// the request path only reads a snapshot.
#[derive(Debug)]
pub struct GatewayToken {
    /// The file it is re-read from; `None` for a token given inline (kubeconfig `token`).
    pub(super) path: Option<std::path::PathBuf>,
    pub(super) header: ArcSwap<HeaderValue>,
}

impl GatewayToken {
    /// Reads the token file once.
    pub fn load(path: &std::path::Path) -> Result<Arc<Self>, ProxyError> {
        let header = Self::read(path)?;
        Ok(Arc::new(Self {
            path: Some(path.to_owned()),
            header: ArcSwap::from_pointee(header),
        }))
    }

    /// A token given inline, which never changes.
    pub fn fixed(token: &str) -> Result<Arc<Self>, ProxyError> {
        let header = Self::header_value(token, "the kubeconfig's inline token")?;
        Ok(Arc::new(Self {
            path: None,
            header: ArcSwap::from_pointee(header),
        }))
    }

    pub(super) fn read(path: &std::path::Path) -> Result<HeaderValue, ProxyError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProxyError::Token {
            path: path.display().to_string(),
            source,
        })?;
        Self::header_value(&text, &path.display().to_string())
    }

    /// `Authorization: Bearer <token>`; `source` names where the token came from in errors.
    pub(super) fn header_value(token: &str, source: &str) -> Result<HeaderValue, ProxyError> {
        let mut value =
            HeaderValue::try_from(format!("Bearer {}", token.trim())).map_err(|_| {
                ProxyError::TokenInvalid {
                    path: source.to_owned(),
                }
            })?;
        // Keeps the credential out of HPACK tables and Debug output.
        value.set_sensitive(true);
        Ok(value)
    }

    /// Re-reads the file every `every` until the drain starts; a failed read keeps the old
    /// token (as client-go does) and logs why.
    pub async fn refresh_loop(self: Arc<Self>, every: Duration, drain: DrainWatcher) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = drain.signaled() => return,
                _ = tick.tick() => {}
            }
            match Self::read(&path) {
                Ok(v) if v != **self.header.load() => {
                    tracing::info!(path = %path.display(), "gateway token changed, using the new one");
                    self.header.store(Arc::new(v));
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "keeping the previous gateway token"),
            }
        }
    }

    pub(super) fn header(&self) -> HeaderValue {
        (**self.header.load()).clone()
    }
}

impl Proxy {
    /// Puts the gateway's credential and, when configured, the impersonation headers on an
    /// upstream request whose client headers were already sanitized.
    pub(crate) fn upstream_credentials(
        &self,
        headers: &mut HeaderMap,
        extensions: &http::Extensions,
    ) {
        if let Some(token) = &self.token {
            headers.insert(header::AUTHORIZATION, token.header());
        }
        if let Some(Some(as_whom)) = extensions.get::<Option<Impersonation>>() {
            impersonation_headers(headers, as_whom);
        }
    }
}
