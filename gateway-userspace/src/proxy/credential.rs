//! The gateway's own credential: the `Authorization` value it injects upstream, obtained from
//! kube-rs's auth machinery, and the headers that carry it and the impersonated identity.
//!
//! kube-rs decides when a credential must be fetched again: a token file is re-read once
//! its copy is about a minute old (keeping the last token if the file is briefly gone), an
//! exec plugin is run again a minute before its token expires. Asking it costs a lock, a
//! `format!` and a header validation per call, and the exec path serialises every caller on
//! one mutex; so the request path does not ask it. A control-plane task asks every second
//! and publishes the answer in an [`ArcSwap`]; the request path only loads that snapshot
//! (docs/benchmarks.md measures both). If kube-rs cannot produce a credential (the exec
//! plugin fails, the token is not a valid header), the snapshot holds the reason and
//! requests are refused with a 503 naming it, never forwarded without the credential.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, header};
use http_body_util::Empty;
use kube::client::ConfigExt as _;
use tower::{Layer as _, ServiceExt as _, util::BoxCloneSyncService};

use crate::drain::DrainWatcher;

use super::{
    BoxError, Proxy,
    impersonation::{Impersonation, impersonation_headers},
};

/// kube-rs's `AuthLayer` over a service that hands back the header it set.
type AuthProbe = BoxCloneSyncService<Request<Empty<Bytes>>, Option<HeaderValue>, BoxError>;

/// What the request path injects: the current header, or why there is none.
#[derive(Debug, Clone)]
enum Current {
    /// No bearer credential (a client certificate alone authenticates the gateway).
    Certificate,
    /// The `Authorization` value to send (marked sensitive).
    Header(HeaderValue),
    /// kube-rs failed to produce the credential: requests get a 503 with this reason.
    Failed(Arc<str>),
}

/// Why the credential could not be obtained at start-up.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {reason}")]
pub struct CredentialError {
    /// Where the credential comes from (the kubeconfig and context, or the setting).
    pub source_name: String,
    /// kube-rs's reason, with its causes.
    pub reason: String,
}

/// The gateway's upstream credential, refreshed through kube-rs by a control-plane task so
/// that the request path only reads a snapshot.
pub struct UpstreamCredential {
    source: String,
    probe: Option<AuthProbe>,
    current: ArcSwap<Current>,
}

impl std::fmt::Debug for UpstreamCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The credential itself never reaches a log line.
        f.debug_struct("UpstreamCredential")
            .field("source", &self.source)
            .field("bearer", &self.probe.is_some())
            .finish_non_exhaustive()
    }
}

impl UpstreamCredential {
    /// Builds kube-rs's auth for `config`'s user and fetches the credential once: a token
    /// file is read, an exec plugin run. Fails, naming `source`, if that does not work.
    pub async fn from_kube(
        config: &kube::Config,
        source: &str,
    ) -> Result<Arc<Self>, CredentialError> {
        let error = |reason: String| CredentialError {
            source_name: source.to_owned(),
            reason,
        };
        let config = config.clone();
        // Building the layer may run an exec plugin, which blocks.
        let layer = tokio::task::spawn_blocking(move || config.auth_layer())
            .await
            .map_err(|e| error(format!("credential task failed: {e}")))?
            .map_err(|e| error(crate::error_chain(&e)))?;
        let probe = layer.map(|layer| {
            let capture = tower::service_fn(|req: Request<Empty<Bytes>>| async move {
                // kube-rs's two auth services must share an error type: its filter's BoxError.
                Ok::<_, BoxError>(http::Response::new(
                    req.headers().get(header::AUTHORIZATION).cloned(),
                ))
            });
            BoxCloneSyncService::new(layer.layer(capture).map_response(http::Response::into_body))
        });
        let credential = Arc::new(Self {
            source: source.to_owned(),
            current: ArcSwap::from_pointee(Current::Certificate),
            probe,
        });
        if let Current::Failed(reason) = credential.fetch().await {
            return Err(error(reason.to_string()));
        }
        credential.refresh().await;
        Ok(credential)
    }

    /// Where the credential comes from (never the credential itself).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Asks kube-rs for the current credential (it re-reads or re-runs only when due).
    async fn fetch(&self) -> Current {
        let Some(probe) = &self.probe else {
            return Current::Certificate;
        };
        let request = Request::new(Empty::new());
        match probe.clone().oneshot(request).await {
            Ok(Some(mut value)) => {
                if let Some(problem) = bearer_problem(&value) {
                    return Current::Failed(Arc::from(format!("{}: {problem}", self.source)));
                }
                // Keeps the credential out of HPACK tables and Debug output.
                value.set_sensitive(true);
                Current::Header(value)
            }
            Ok(None) => Current::Failed(Arc::from(format!(
                "{}: kube-rs produced no Authorization header",
                self.source
            ))),
            Err(e) => {
                let mut reason = crate::error_chain(e.as_ref());
                if reason.contains("invalid bearer token") {
                    // kube-rs sends a token file verbatim (kubectl trims it).
                    reason.push_str(
                        " (the token holds a line break or control character: a token file must hold the token alone, without a trailing newline)",
                    );
                }
                Current::Failed(Arc::from(format!("{}: {reason}", self.source)))
            }
        }
    }

    /// Publishes what kube-rs says now; returns whether the injected value changed.
    pub async fn refresh(&self) -> bool {
        let next = self.fetch().await;
        let previous = self.current.load();
        let changed = match (&**previous, &next) {
            (Current::Header(a), Current::Header(b)) => a != b,
            (Current::Failed(a), Current::Failed(b)) => a != b,
            (Current::Certificate, Current::Certificate) => false,
            _ => true,
        };
        if changed {
            match &next {
                Current::Header(_) => {
                    tracing::info!(source = %self.source, "gateway credential changed, using the new one");
                }
                Current::Failed(reason) => {
                    tracing::error!(%reason, "gateway credential unavailable; upstream requests are refused until it is back");
                }
                Current::Certificate => {}
            }
            self.current.store(Arc::new(next));
        }
        changed
    }

    /// Asks kube-rs every `every` until the drain starts.
    pub async fn refresh_loop(self: Arc<Self>, every: Duration, drain: DrainWatcher) {
        if self.probe.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = drain.signaled() => return,
                _ = tick.tick() => {}
            }
            self.refresh().await;
        }
    }

    /// Puts the current credential on `headers` (the request path: one snapshot load).
    /// `Err` is why there is none; the request must then not be forwarded.
    pub fn apply(&self, headers: &mut HeaderMap) -> Result<(), Arc<str>> {
        match &**self.current.load() {
            Current::Header(value) => {
                headers.insert(header::AUTHORIZATION, value.clone());
                Ok(())
            }
            Current::Certificate => Ok(()),
            Current::Failed(reason) => Err(reason.clone()),
        }
    }

    /// Why there is no credential now, if there is none (requests are refused meanwhile).
    pub fn failure(&self) -> Option<Arc<str>> {
        match &**self.current.load() {
            Current::Failed(reason) => Some(reason.clone()),
            Current::Header(_) | Current::Certificate => None,
        }
    }

    /// What the request path would cost if it asked kube-rs itself (for the benchmark).
    #[doc(hidden)]
    pub async fn apply_through_kube(&self, headers: &mut HeaderMap) -> Result<(), Arc<str>> {
        match self.fetch().await {
            Current::Header(value) => {
                headers.insert(header::AUTHORIZATION, value);
                Ok(())
            }
            Current::Certificate => Ok(()),
            Current::Failed(reason) => Err(reason),
        }
    }
}

/// What is wrong with a bearer header kube-rs produced, if anything: an empty token or one
/// with spaces would only earn a 401 from the API server, so it is named here instead.
fn bearer_problem(value: &HeaderValue) -> Option<&'static str> {
    let token = value.as_bytes().strip_prefix(b"Bearer ")?;
    if token.is_empty() {
        Some("the token is empty")
    } else if !token.iter().all(u8::is_ascii_graphic) {
        Some("the token contains whitespace or characters not allowed in an HTTP header")
    } else {
        None
    }
}

impl Proxy {
    /// Puts the gateway's credential and, when configured, the impersonation headers on an
    /// upstream request whose client headers were already sanitized. `Err` is why the
    /// credential is unavailable: the caller answers 503 instead of forwarding.
    pub(crate) fn upstream_credentials(
        &self,
        headers: &mut HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<(), Arc<str>> {
        if let Some(credential) = &self.credential {
            credential.apply(headers)?;
        }
        if let Some(as_whom) = extensions.get::<Impersonation>() {
            impersonation_headers(headers, as_whom).map_err(Arc::from)?;
        }
        Ok(())
    }
}
