//! Telling people that a request waits for them: a generic signed webhook and Slack
//! incoming webhooks.
//!
//! Notifying never blocks the request path: [`Notifier::created`] and
//! [`Notifier::decided`] put the event on a bounded queue and return (a full queue drops
//! the event, logs it and counts it). A background task delivers each event to every
//! target, retrying 5xx, 429 and connection failures with exponential backoff up to a cap
//! and a number of attempts; other 4xx answers are not retried.
//!
//! The generic webhook POSTs a JSON summary of the AccessRequest with the header
//! `X-Chaperone-Signature: sha256=<hex HMAC-SHA256 of the body>`, keyed by a configured
//! secret, so the receiver can check it came from a gateway (docs/approver-guide.md has a
//! verification example). The Slack message has the same summary as text and blocks, with
//! the commands that decide.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use hmac::{Hmac, Mac as _};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::resource::AccessRequest;
use crate::drain::DrainWatcher;

/// Events waiting for delivery; beyond this, new ones are dropped (and counted).
const QUEUE: usize = 256;
/// Deliveries in flight at once.
const CONCURRENT_DELIVERIES: usize = 16;
/// The most of a receiver's answer read (and thrown away).
const MAX_REPLY_BYTES: usize = 64 * 1024;
/// The signature header of the generic webhook.
pub const SIGNATURE_HEADER: &str = "x-chaperone-signature";

/// The `approval.notify` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NotifyConfig {
    /// Generic webhooks (signed JSON).
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
    /// Slack-compatible incoming webhooks.
    #[serde(default)]
    pub slack: Vec<SlackConfig>,
    /// A link to decide, shown in messages: `{name}` is replaced by the AccessRequest's
    /// name (e.g. `https://console.example/approvals/{name}`).
    #[serde(default)]
    pub link: Option<String>,
    /// Retries.
    #[serde(default)]
    pub retry: RetryConfig,
}

/// One generic webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where to POST (`https://`, or `http://` inside a trusted network).
    pub url: url::Url,
    /// The HMAC-SHA256 key of the signature header (a trailing newline is ignored).
    pub secret_file: PathBuf,
    /// CA bundle to verify an https receiver; default: the system bundle.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// One Slack-compatible incoming webhook. The URL is itself the credential, so it is best
/// read from a file (a mounted Secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SlackConfig {
    /// The incoming webhook URL.
    #[serde(default)]
    pub url: Option<url::Url>,
    /// A file holding the incoming webhook URL.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// CA bundle to verify the receiver; default: the system bundle.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// Delivery retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per event and target, the first included.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// The wait after the first failure; it doubles after each further one.
    #[serde(default = "default_initial_backoff", with = "crate::config::duration")]
    pub initial_backoff: Duration,
    /// The longest wait between two attempts.
    #[serde(default = "default_max_backoff", with = "crate::config::duration")]
    pub max_backoff: Duration,
    /// How long one attempt may take.
    #[serde(default = "default_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: default_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            timeout: default_timeout(),
        }
    }
}

fn default_attempts() -> u32 {
    6
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

impl RetryConfig {
    /// The wait before attempt `attempt + 1` after `attempt` (1-based) failed.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

impl NotifyConfig {
    /// Checks the values; the error names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.retry.attempts == 0 {
            return Err((
                "approval.notify.retry.attempts",
                "must be at least 1".to_owned(),
            ));
        }
        if self.retry.timeout.is_zero() {
            return Err((
                "approval.notify.retry.timeout",
                "must be longer than 0s".to_owned(),
            ));
        }
        for w in &self.webhooks {
            check_scheme(&w.url, "approval.notify.webhooks.url")?;
            if let Err(e) = std::fs::metadata(&w.secret_file) {
                return Err((
                    "approval.notify.webhooks.secretFile",
                    format!("{}: {e}", w.secret_file.display()),
                ));
            }
        }
        for s in &self.slack {
            match (&s.url, &s.url_file) {
                (Some(url), None) => check_scheme(url, "approval.notify.slack.url")?,
                (None, Some(file)) => {
                    if let Err(e) = std::fs::metadata(file) {
                        return Err((
                            "approval.notify.slack.urlFile",
                            format!("{}: {e}", file.display()),
                        ));
                    }
                }
                _ => {
                    return Err((
                        "approval.notify.slack",
                        "give exactly one of url and urlFile".to_owned(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether any target is configured.
    pub fn is_empty(&self) -> bool {
        self.webhooks.is_empty() && self.slack.is_empty()
    }
}

fn check_scheme(url: &url::Url, key: &'static str) -> Result<(), (&'static str, String)> {
    match url.scheme() {
        "https" | "http" => Ok(()),
        other => Err((key, format!("{url}: scheme {other} is not http(s)"))),
    }
}

/// Why the notifier could not start; names the setting.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// A file could not be read.
    #[error("{key}: {path}: {message}")]
    File {
        /// The config key.
        key: &'static str,
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A value is unusable.
    #[error("{key}: {message}")]
    Invalid {
        /// The config key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// What happened to an AccessRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum EventType {
    /// A request is waiting for a decision.
    Created,
    /// Someone decided.
    Decided,
}

/// One event, as the generic webhook receives it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookPayload {
    /// `AccessRequestEvent`.
    pub kind: &'static str,
    /// `chaperone.dev/v1alpha1`.
    pub api_version: &'static str,
    /// Created or Decided.
    #[serde(rename = "type")]
    pub type_: EventType,
    /// When the gateway queued the event (RFC 3339).
    pub sent_at: String,
    /// The AccessRequest (its spec and status as stored).
    pub access_request: serde_json::Value,
    /// How to decide.
    pub decide: DecideHints,
}

/// The commands (and link) that decide a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DecideHints {
    /// `kubectl chaperone approve <name>`.
    pub approve: String,
    /// `kubectl chaperone deny <name> --comment '...'`.
    pub deny: String,
    /// The configured link, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

impl DecideHints {
    fn of(name: &str, link: Option<&str>) -> Self {
        Self {
            approve: format!("kubectl chaperone approve {name}"),
            deny: format!("kubectl chaperone deny {name} --comment '<why>'"),
            link: link.map(|l| l.replace("{name}", name)),
        }
    }
}

/// The webhook body for `event` on `request`.
pub fn webhook_payload(
    event: EventType,
    request: &AccessRequest,
    link: Option<&str>,
) -> WebhookPayload {
    let name = request.metadata.name.as_deref().unwrap_or("");
    let mut object = serde_json::to_value(request).unwrap_or_default();
    // Only what a person needs: no managedFields.
    if let Some(meta) = object.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
    }
    WebhookPayload {
        kind: "AccessRequestEvent",
        api_version: "chaperone.dev/v1alpha1",
        type_: event,
        sent_at: super::api::rfc3339(jiff::Timestamp::now()),
        access_request: object,
        decide: DecideHints::of(name, link),
    }
}

/// Escapes text for Slack's mrkdwn (`&`, `<`, `>`).
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The Slack incoming-webhook message for `event` on `request`.
pub fn slack_message(
    event: EventType,
    request: &AccessRequest,
    link: Option<&str>,
) -> serde_json::Value {
    let name = request.metadata.name.as_deref().unwrap_or("");
    let spec = &request.spec;
    let who = format!(
        "{}/{}{}",
        spec.requester.workload.namespace,
        spec.requester.workload.pod,
        spec.requester
            .workload
            .service_account
            .as_deref()
            .map(|sa| format!(" (service account {sa})"))
            .unwrap_or_default()
    );
    let what = format!(
        "{} {}{}{}",
        spec.request.verb,
        spec.request.resource,
        spec.request
            .namespace
            .as_deref()
            .map(|n| format!(" in {n}"))
            .unwrap_or_default(),
        spec.request
            .name
            .as_deref()
            .map(|n| format!(" {n}"))
            .unwrap_or_default()
    );
    let hints = DecideHints::of(name, link);
    let (headline, detail) = match event {
        EventType::Created => (
            format!(
                "Agent {} asks: {}",
                slack_escape(&who),
                slack_escape(&spec.request.summary)
            ),
            format!(
                "*Request* `{}` ({}) — rule `{}`, node `{}`, expires {}\nApprove: `{}`\nDeny: `{}`",
                slack_escape(&what),
                slack_escape(name),
                slack_escape(&spec.rule),
                slack_escape(&spec.node),
                slack_escape(&spec.expires_at),
                slack_escape(&hints.approve),
                slack_escape(&hints.deny)
            ),
        ),
        EventType::Decided => {
            let status = request.status.clone().unwrap_or_default();
            (
                format!(
                    "{} {} by {}",
                    slack_escape(name),
                    status.phase.as_str().to_lowercase(),
                    slack_escape(status.decided_by.as_deref().unwrap_or("?"))
                ),
                format!(
                    "*Request* `{}` from {}{}",
                    slack_escape(&what),
                    slack_escape(&who),
                    status
                        .comment
                        .as_deref()
                        .map(|c| format!("\n> {}", slack_escape(c)))
                        .unwrap_or_default()
                ),
            )
        }
    };
    let mut blocks = vec![
        serde_json::json!({"type": "section", "text": {"type": "mrkdwn", "text": format!("*{headline}*")}}),
        serde_json::json!({"type": "section", "text": {"type": "mrkdwn", "text": detail}}),
    ];
    if let Some(link) = &hints.link {
        blocks.push(serde_json::json!({"type": "context", "elements": [
            {"type": "mrkdwn", "text": format!("<{}|Open {}>", link, slack_escape(name))}
        ]}));
    }
    serde_json::json!({"text": headline, "blocks": blocks})
}

/// `sha256=<hex HMAC-SHA256 of body keyed by secret>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for byte in tag {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

type HttpClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// One place events go.
struct Target {
    /// For logs: the URL without its path (a Slack URL's path is its secret).
    label: String,
    url: http::Uri,
    kind: TargetKind,
    client: HttpClient,
}

enum TargetKind {
    Webhook { secret: Vec<u8> },
    Slack,
}

/// Queues events for delivery; cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    queue: tokio::sync::mpsc::Sender<(EventType, Arc<AccessRequest>)>,
    dropped: Counter,
    failed: Counter,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("dropped", &self.dropped.get())
            .finish_non_exhaustive()
    }
}

const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

fn client(ca_file: Option<&PathBuf>, key: &'static str) -> Result<HttpClient, NotifyError> {
    let roots = match ca_file {
        Some(file) => crate::tls::root_store_from_file(file).map_err(|e| NotifyError::File {
            key,
            path: file.display().to_string(),
            message: e.to_string(),
        })?,
        None => SYSTEM_BUNDLES
            .iter()
            .find_map(|p| crate::tls::root_store_from_file(std::path::Path::new(p)).ok())
            .unwrap_or_else(rustls::RootCertStore::empty),
    };
    let tls = crate::tls::client_config(roots).map_err(|e| NotifyError::Invalid {
        key,
        message: e.to_string(),
    })?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

fn uri(url: &url::Url, key: &'static str) -> Result<http::Uri, NotifyError> {
    url.as_str().parse().map_err(|e| NotifyError::Invalid {
        key,
        message: format!("not a usable URL: {e}"),
    })
}

fn read_file(path: &PathBuf, key: &'static str) -> Result<Vec<u8>, NotifyError> {
    let mut bytes = std::fs::read(path).map_err(|e| NotifyError::File {
        key,
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    Ok(bytes)
}

impl Notifier {
    /// Reads the secrets, builds the clients and starts delivering until the drain starts;
    /// `None` when no target is configured.
    pub fn start(config: &NotifyConfig, drain: DrainWatcher) -> Result<Option<Self>, NotifyError> {
        Self::start_counting(config, drain, Counter::default(), Counter::default())
    }

    /// Like [`Notifier::start`], counting dropped and undelivered events in the gateway's
    /// metrics.
    pub fn start_counting(
        config: &NotifyConfig,
        drain: DrainWatcher,
        dropped: Counter,
        failed: Counter,
    ) -> Result<Option<Self>, NotifyError> {
        if config.is_empty() {
            return Ok(None);
        }
        let mut targets = Vec::new();
        for w in &config.webhooks {
            let secret = read_file(&w.secret_file, "approval.notify.webhooks.secretFile")?;
            if secret.is_empty() {
                return Err(NotifyError::Invalid {
                    key: "approval.notify.webhooks.secretFile",
                    message: format!("{} is empty", w.secret_file.display()),
                });
            }
            targets.push(Target {
                label: origin(&w.url),
                url: uri(&w.url, "approval.notify.webhooks.url")?,
                kind: TargetKind::Webhook { secret },
                client: client(w.ca_file.as_ref(), "approval.notify.webhooks.caFile")?,
            });
        }
        for s in &config.slack {
            let url = match (&s.url, &s.url_file) {
                (Some(url), _) => url.clone(),
                (None, Some(file)) => {
                    let text = read_file(file, "approval.notify.slack.urlFile")?;
                    let text = String::from_utf8_lossy(&text).trim().to_owned();
                    url::Url::parse(&text).map_err(|e| NotifyError::Invalid {
                        key: "approval.notify.slack.urlFile",
                        message: format!("{} does not hold a URL: {e}", file.display()),
                    })?
                }
                (None, None) => {
                    return Err(NotifyError::Invalid {
                        key: "approval.notify.slack",
                        message: "give url or urlFile".to_owned(),
                    });
                }
            };
            targets.push(Target {
                label: origin(&url),
                url: uri(&url, "approval.notify.slack.url")?,
                kind: TargetKind::Slack,
                client: client(s.ca_file.as_ref(), "approval.notify.slack.caFile")?,
            });
        }
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let notifier = Self {
            queue: tx,
            dropped,
            failed,
        };
        tokio::spawn(deliver_loop(
            rx,
            Arc::new(targets),
            config.retry.clone(),
            config.link.clone(),
            notifier.failed.clone(),
            drain,
        ));
        Ok(Some(notifier))
    }

    /// A request now waits for a decision.
    pub fn created(&self, request: &AccessRequest) {
        self.enqueue(EventType::Created, request);
    }

    /// A request was decided.
    pub fn decided(&self, request: &AccessRequest) {
        self.enqueue(EventType::Decided, request);
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Deliveries that failed after every attempt.
    pub fn failed(&self) -> u64 {
        self.failed.get()
    }

    fn enqueue(&self, event: EventType, request: &AccessRequest) {
        if self
            .queue
            .try_send((event, Arc::new(request.clone())))
            .is_err()
        {
            self.dropped.inc();
            tracing::warn!(
                accessrequest = request.metadata.name.as_deref().unwrap_or(""),
                "notification queue full or closed; event dropped"
            );
        }
    }
}

fn origin(url: &url::Url) -> String {
    format!("{}://{}", url.scheme(), url.host_str().unwrap_or("?"))
}

async fn deliver_loop(
    mut rx: tokio::sync::mpsc::Receiver<(EventType, Arc<AccessRequest>)>,
    targets: Arc<Vec<Target>>,
    retry: RetryConfig,
    link: Option<String>,
    failed: Counter,
    drain: DrainWatcher,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_DELIVERIES));
    loop {
        let (event, request) = tokio::select! {
            _ = drain.signaled() => return,
            next = rx.recv() => match next {
                Some(e) => e,
                None => return,
            },
        };
        for index in 0..targets.len() {
            let target = &targets[index];
            let body = match target.kind {
                TargetKind::Webhook { .. } => {
                    serde_json::to_vec(&webhook_payload(event, &request, link.as_deref()))
                }
                TargetKind::Slack => {
                    serde_json::to_vec(&slack_message(event, &request, link.as_deref()))
                }
            };
            let Ok(body) = body else { continue };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (targets, retry, failed, drain, request) = (
                targets.clone(),
                retry.clone(),
                failed.clone(),
                drain.clone(),
                request.clone(),
            );
            tokio::spawn(async move {
                let _permit = permit;
                let target = &targets[index];
                let name = request.metadata.name.as_deref().unwrap_or("");
                tokio::select! {
                    _ = drain.signaled() => {}
                    delivered = deliver(target, event, Bytes::from(body), &retry) => {
                        if let Err(e) = delivered {
                            failed.inc();
                            tracing::error!(target = %target.label, accessrequest = name, error = %e, "notification not delivered");
                        }
                    }
                }
            });
        }
    }
}

/// Sends one event to one target, retrying as configured.
async fn deliver(
    target: &Target,
    event: EventType,
    body: Bytes,
    retry: &RetryConfig,
) -> Result<u32, String> {
    let delivery = uuid::Uuid::now_v7().to_string();
    let mut last = String::new();
    for attempt in 1..=retry.attempts {
        let mut request = http::Request::post(target.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "chaperone-notifier")
            .header("x-chaperone-event", format!("{event:?}"))
            .header("x-chaperone-delivery", &delivery);
        if let TargetKind::Webhook { secret } = &target.kind {
            request = request.header(SIGNATURE_HEADER, signature(secret, &body));
        }
        let request = request
            .body(Full::new(body.clone()))
            .map_err(|e| format!("building the request: {e}"))?;
        let retryable = match tokio::time::timeout(retry.timeout, target.client.request(request))
            .await
        {
            Ok(Ok(response)) => {
                let code = response.status();
                // Drain a short answer so the connection can be reused; a long or slow
                // one is dropped with its connection (it must not hold a delivery slot).
                let _ = tokio::time::timeout(
                    retry.timeout,
                    http_body_util::Limited::new(response.into_body(), MAX_REPLY_BYTES).collect(),
                )
                .await;
                if code.is_success() {
                    return Ok(attempt);
                }
                last = format!("answered {code}");
                code.is_server_error() || code == http::StatusCode::TOO_MANY_REQUESTS
            }
            Ok(Err(e)) => {
                last = format!("request failed: {e}");
                true
            }
            Err(_) => {
                last = format!("no answer within {:?}", retry.timeout);
                true
            }
        };
        if !retryable {
            return Err(format!("{last} (not retried)"));
        }
        if attempt < retry.attempts {
            tokio::time::sleep(retry.backoff(attempt)).await;
        }
    }
    Err(format!("{last} after {} attempts", retry.attempts))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::approval::resource::{AccessRequestSpec, RequestedAction, Requester, WorkloadRef};

    fn request() -> AccessRequest {
        let mut r = AccessRequest::new(
            "ar-7",
            AccessRequestSpec {
                requester: Requester {
                    workload: WorkloadRef {
                        namespace: "agents".into(),
                        pod: "agent-0".into(),
                        service_account: Some("cursor".into()),
                        uid: None,
                    },
                    principal: None,
                },
                request: RequestedAction {
                    verb: "patch".into(),
                    resource: "apps/deployments".into(),
                    subresource: Some("scale".into()),
                    namespace: Some("prod".into()),
                    name: Some("web".into()),
                    path: "/apis/apps/v1/namespaces/prod/deployments/web/scale".into(),
                    summary: "scale prod/web to 0 replicas <now>".into(),
                },
                fingerprint: "f".into(),
                rule: "scale-prod".into(),
                approvers: Default::default(),
                grant: Default::default(),
                node: "node-a".into(),
                created_at: "2026-12-03T20:00:00Z".into(),
                expires_at: "2026-12-03T20:05:00Z".into(),
            },
        );
        r.metadata.namespace = Some("chaperone".into());
        r
    }

    #[test]
    fn signature_is_the_hex_hmac_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let r = RetryConfig {
            attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(700),
            timeout: Duration::from_secs(1),
        };
        let waits: Vec<u128> = (1..=5).map(|a| r.backoff(a).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 700, 700]);
        assert_eq!(r.backoff(u32::MAX), Duration::from_millis(700));
    }

    #[test]
    fn messages_carry_the_summary_and_the_commands() {
        let r = request();
        let payload = webhook_payload(EventType::Created, &r, Some("https://c.example/a/{name}"));
        let json = serde_json::to_value(&payload).unwrap();
        assert_eq!(json["type"], "Created");
        assert_eq!(json["accessRequest"]["metadata"]["name"], "ar-7");
        assert_eq!(
            json["accessRequest"]["spec"]["request"]["summary"],
            "scale prod/web to 0 replicas <now>"
        );
        assert_eq!(json["decide"]["approve"], "kubectl chaperone approve ar-7");
        assert_eq!(json["decide"]["link"], "https://c.example/a/ar-7");
        let slack = slack_message(EventType::Created, &r, None);
        let text = slack.to_string();
        assert!(
            slack["text"].as_str().unwrap().contains("&lt;now&gt;"),
            "{text}"
        );
        assert!(text.contains("kubectl chaperone approve ar-7"), "{text}");
        assert!(text.contains("kubectl chaperone deny ar-7"), "{text}");
    }

    #[test]
    fn config_errors_name_the_key() {
        let mut c = NotifyConfig {
            slack: vec![SlackConfig {
                url: None,
                url_file: None,
                ca_file: None,
            }],
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "approval.notify.slack");
        c.slack.clear();
        c.webhooks.push(WebhookConfig {
            url: "https://example.invalid/hook".parse().unwrap(),
            secret_file: "/nonexistent/secret".into(),
            ca_file: None,
        });
        assert_eq!(
            c.validate().unwrap_err().0,
            "approval.notify.webhooks.secretFile"
        );
    }

    /// What the local receiver saw: bodies and whether their signature matched.
    #[derive(Default)]
    struct Seen {
        calls: Vec<(bool, serde_json::Value)>,
    }

    /// A receiver on 127.0.0.1 that checks the signature and answers 500 to the first
    /// `fail_first` calls.
    async fn receiver(secret: &'static [u8], fail_first: usize) -> (url::Url, Arc<Mutex<Seen>>) {
        use hyper::{body::Incoming, service::service_fn};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let seen = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let header = req
                                .headers()
                                .get(SIGNATURE_HEADER)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let valid = header == signature(secret, &body);
                            let value = serde_json::from_slice(&body).unwrap_or_default();
                            let n = {
                                let mut s = seen.lock().unwrap();
                                s.calls.push((valid, value));
                                s.calls.len()
                            };
                            let code = if n <= fail_first { 500 } else { 200 };
                            let mut r = http::Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = http::StatusCode::from_u16(code).unwrap();
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        (format!("http://{addr}/hook").parse().unwrap(), seen)
    }

    #[tokio::test]
    async fn webhook_is_signed_and_retried_after_a_500() {
        let (url, seen) = receiver(b"s3cret", 1).await;
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, "s3cret\n").unwrap();
        let config = NotifyConfig {
            webhooks: vec![WebhookConfig {
                url,
                secret_file,
                ca_file: None,
            }],
            retry: RetryConfig {
                attempts: 3,
                initial_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(50),
                timeout: Duration::from_secs(2),
            },
            ..Default::default()
        };
        let (_trigger, watch) = crate::drain::channel();
        let notifier = Notifier::start(&config, watch).unwrap().unwrap();
        let started = std::time::Instant::now();
        notifier.created(&request());
        let deadline = started + Duration::from_secs(10);
        loop {
            if seen.lock().unwrap().calls.len() >= 2 || std::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let seen = seen.lock().unwrap();
        assert_eq!(seen.calls.len(), 2, "one 500, then the retry succeeds");
        for (valid, body) in &seen.calls {
            assert!(*valid, "signature did not verify for {body}");
            assert_eq!(body["accessRequest"]["metadata"]["name"], "ar-7");
        }
        assert_eq!(notifier.failed(), 0);
    }

    #[tokio::test]
    async fn slack_gets_the_message_from_its_url_file() {
        let (url, seen) = receiver(b"unused", 0).await;
        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("slack-url");
        std::fs::write(&url_file, format!("{url}\n")).unwrap();
        let config = NotifyConfig {
            slack: vec![SlackConfig {
                url: None,
                url_file: Some(url_file),
                ca_file: None,
            }],
            ..Default::default()
        };
        let (_trigger, watch) = crate::drain::channel();
        let notifier = Notifier::start(&config, watch).unwrap().unwrap();
        notifier.created(&request());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while seen.lock().unwrap().calls.is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let seen = seen.lock().unwrap();
        assert_eq!(seen.calls.len(), 1);
        let (signed, body) = &seen.calls[0];
        assert!(!signed, "Slack messages carry no signature header");
        assert!(
            body["text"].as_str().unwrap().contains("agents/agent-0"),
            "{body}"
        );
        assert!(
            body["blocks"]
                .to_string()
                .contains("kubectl chaperone approve ar-7"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn gives_up_after_the_attempts_without_blocking_the_caller() {
        let (url, seen) = receiver(b"other", 100).await;
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, "key").unwrap();
        let config = NotifyConfig {
            webhooks: vec![WebhookConfig {
                url,
                secret_file,
                ca_file: None,
            }],
            retry: RetryConfig {
                attempts: 3,
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(20),
                timeout: Duration::from_secs(2),
            },
            ..Default::default()
        };
        let (_trigger, watch) = crate::drain::channel();
        let notifier = Notifier::start(&config, watch).unwrap().unwrap();
        let started = std::time::Instant::now();
        for _ in 0..QUEUE + 10 {
            notifier.created(&request());
        }
        // Enqueueing is immediate, and beyond the queue events are dropped, not waited on.
        assert!(started.elapsed() < Duration::from_millis(500));
        assert!(notifier.dropped() >= 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while notifier.failed() == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(notifier.failed() >= 1);
        // The receiver's key differs: every signature it saw was wrong.
        assert!(seen.lock().unwrap().calls.iter().all(|(valid, _)| !valid));
    }
}
