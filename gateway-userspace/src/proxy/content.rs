//! The content a policy condition reads, fetched only when a rule that could match asks
//! for it (see [`policy::evaluate`]): the object a patch or server-side apply would store,
//! from the same request sent upstream with `dryRun=All`, and the stored object of an
//! update, patch or delete (CEL `oldObject`), both with the gateway's credential. Plain
//! requests, and requests no content rule applies to, pay nothing.
//!
//! What was read is a version of the stored object, and the API server applies the real
//! request moments later to whatever is stored then. A decision therefore also reports
//! the version it read ([`ReadVersion`]), and the request is forwarded bound to it
//! (`bind`): another write landing in between makes the API server answer 409 Conflict,
//! as it does for any client whose view is stale, instead of applying a change nobody
//! judged.

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full};
use serde_json::Value;

use crate::{
    policy::{self, Action, Content, Decision, Evaluation, Policy, RequestContext},
    request::{RequestInfo, Verb},
};

use super::{
    BoxError, Proxy, body,
    handler::{Pending, upstream_uri},
    headers::sanitize_request_headers,
    impersonation::Impersonation,
};

/// Largest fetched object the gateway reads (a dry-run answer or a stored object).
const MAX_FETCHED_BYTES: usize = 8 * 1024 * 1024;

/// At most this many fetch rounds per request (object, then old object).
const MAX_ROUNDS: usize = 3;

/// What a request offers for its content before anything is fetched.
pub(super) struct RequestContent<'a> {
    /// The client's method, URI and headers (for a dry run of the same request).
    pub(super) method: &'a Method,
    pub(super) uri: &'a Uri,
    pub(super) headers: &'a http::HeaderMap,
    /// The body as it will be forwarded, when it was read whole.
    pub(super) body: Option<&'a Bytes>,
    /// The decoded body (create and update send the object itself).
    pub(super) object: Option<&'a Value>,
    /// Why there is no decoded body, when there should be one.
    pub(super) missing: Option<&'a str>,
    /// Why the request must not be tried on the API server as a dry run, when it must not.
    pub(super) no_dry_run: Option<&'a str>,
}

/// What a content decision reads of a request's body. Borrowed from the inspected body for
/// the first decision; kept (owned) past it for the binding and, after an approval, a
/// second decision.
#[derive(Debug, Default)]
pub(super) struct ContentBody<'a> {
    /// The body as forwarded, when read whole.
    pub(super) forwarded: Option<Cow<'a, Bytes>>,
    /// The decoded object (create and update send the object itself).
    object: Option<Cow<'a, Value>>,
    /// The body was larger than the gateway reads.
    pub(super) truncated: bool,
    /// Why the request must not be tried on the API server as a dry run.
    no_dry_run: Option<&'static str>,
}

impl<'a> ContentBody<'a> {
    /// The body of a request as a content decision reads it (nothing for reads, which no
    /// condition reads the content of).
    pub(super) fn of(info: &RequestInfo, inspected: Option<&'a body::Inspected>) -> Self {
        let Some(inspected) = inspected.filter(|_| info.is_mutating()) else {
            return Self::default();
        };
        let no_dry_run = if info.subresource == "proxy" {
            Some("a proxied request has no dry run: the program it reaches ignores dryRun and acts")
        } else {
            // A `test` operation's dry run answers whether a guessed value is the stored
            // one (422 or not), whatever masking then hides.
            body::json_patch_reveals(inspected).map(|_| {
                "a JSON patch that copies, moves or tests values is not tried on the API \
                 server (its answer could reveal values masking hides)"
            })
        };
        Self {
            forwarded: inspected.forwarded.as_ref().map(Cow::Borrowed),
            object: inspected.object.as_ref().map(Cow::Borrowed),
            truncated: inspected.truncated,
            no_dry_run,
        }
    }

    /// What stays once the inspected body is recorded: nothing when the decision read no
    /// stored object; the body for the binding; the object too when an approval will be
    /// followed by a second decision.
    pub(super) fn kept(self, read: &ReadVersion, action: Action) -> ContentBody<'static> {
        if *read == ReadVersion::Nothing {
            return ContentBody::default();
        }
        ContentBody {
            forwarded: self.forwarded.map(|b| Cow::Owned(b.into_owned())),
            object: self
                .object
                .filter(|_| action == Action::Approve)
                .map(|o| Cow::Owned(o.into_owned())),
            truncated: self.truncated,
            no_dry_run: self.no_dry_run,
        }
    }
}

/// A fetched object, or why it could not be.
enum Fetched {
    Object(Value),
    Absent,
    Failed(String),
}

/// The version of the stored object a decision read: the one a patch's dry run was applied
/// to (the API server answers a dry run with the stored `resourceVersion` and `uid`), the
/// one read as `oldObject`, or both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) enum ReadVersion {
    /// The decision read no content of the stored object.
    #[default]
    Nothing,
    /// It read that there is no stored object (a create by apply, a missing `oldObject`):
    /// nothing to bind to, but a held request is decided again when approved.
    Absent,
    /// It read this version.
    Read(ObjectVersion),
    /// The object changed between the two reads (`oldObject`, then the dry run; `None`:
    /// there was none): the decision mixed two states, and no request can be bound to both.
    Moved {
        old_object: Option<ObjectVersion>,
        object: Option<ObjectVersion>,
    },
}

/// One version of one stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ObjectVersion {
    pub(super) resource_version: String,
    /// Empty when the answer had none.
    pub(super) uid: String,
}

impl ReadVersion {
    fn of(object: Option<&Fetched>, old_object: Option<&Fetched>) -> Self {
        // `None`: not read (or the read failed, which denies); `Some(None)`: read, and
        // there was no stored object (or the dry run created one).
        let version = |fetched: Option<&Fetched>| match fetched {
            Some(Fetched::Object(v)) => {
                let text = |field: &str| {
                    v.pointer(field)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                let resource_version = text("/metadata/resourceVersion");
                // A dry run that creates (an apply of a missing object) has no version.
                Some((!resource_version.is_empty()).then(|| ObjectVersion {
                    resource_version,
                    uid: text("/metadata/uid"),
                }))
            }
            Some(Fetched::Absent) => Some(None),
            Some(Fetched::Failed(_)) | None => None,
        };
        match (version(object), version(old_object)) {
            (None, None) => ReadVersion::Nothing,
            (Some(None), None | Some(None)) | (None, Some(None)) => ReadVersion::Absent,
            (Some(Some(v)), None) | (None, Some(Some(v))) => ReadVersion::Read(v),
            (Some(object), Some(old_object)) if object == old_object => {
                object.map_or(ReadVersion::Absent, ReadVersion::Read)
            }
            (Some(object), Some(old_object)) => ReadVersion::Moved { old_object, object },
        }
    }
}

impl Fetched {
    fn content(&self) -> Content<'_> {
        match self {
            Fetched::Object(v) => Content::Known(v),
            Fetched::Absent => Content::Absent,
            Fetched::Failed(why) => Content::Unavailable(why),
        }
    }
}

/// The content variables of a request before fetching: what it carries, and what must
/// be fetched if a condition reads it.
fn initial<'a>(info: &RequestInfo, req: &RequestContent<'a>) -> (Content<'a>, Content<'a>) {
    let body = || match (req.object, req.missing) {
        (Some(v), _) => Content::Known(v),
        (None, Some(why)) => Content::Unavailable(why),
        (None, None) => {
            Content::Unavailable("the request body is not a JSON, YAML or protobuf object")
        }
    };
    match info.verb {
        Verb::Create => (body(), Content::Absent),
        Verb::Update => (body(), Content::Pending),
        Verb::Patch => (Content::Pending, Content::Pending),
        Verb::Delete => (Content::Absent, Content::Pending),
        _ => (Content::Absent, Content::Absent),
    }
}

impl Proxy {
    /// The decision on a mutating request under a policy whose conditions read content,
    /// and the version of the stored object it read.
    pub(super) async fn decide_by_content(
        &self,
        policy: &Policy,
        base: RequestContext<'_>,
        pending: &Pending,
        body: &ContentBody<'_>,
        as_whom: &Result<Option<Impersonation>, String>,
    ) -> (Decision, ReadVersion) {
        let mut extensions = http::Extensions::new();
        extensions.insert(as_whom.clone().unwrap_or(None));
        let content = RequestContent {
            method: pending.method(),
            uri: pending.uri(),
            headers: pending.headers(),
            body: body.forwarded.as_deref(),
            object: body.object.as_deref(),
            missing: body
                .truncated
                .then_some("the request body is larger than the gateway inspects"),
            no_dry_run: body.no_dry_run,
        };
        let (decision, failed, read) = self
            .decide_with_content(policy, base, &content, &extensions)
            .await;
        if failed {
            self.metrics.condition_failures.inc();
        }
        (decision, read)
    }

    /// Evaluates the policy for a request, fetching the content its conditions read.
    /// Returns the decision, whether a condition failed (for the metric) and the version
    /// of the stored object the decision read.
    pub(super) async fn decide_with_content(
        &self,
        policy: &Policy,
        base: RequestContext<'_>,
        req: &RequestContent<'_>,
        extensions: &http::Extensions,
    ) -> (Decision, bool, ReadVersion) {
        let info = base.request;
        let (object, old_object) = initial(info, req);
        let mut fetched_object: Option<Fetched> = None;
        let mut fetched_old: Option<Fetched> = None;
        for _ in 0..MAX_ROUNDS {
            let ctx = base.with_content(
                fetched_object.as_ref().map_or(object, Fetched::content),
                fetched_old.as_ref().map_or(old_object, Fetched::content),
            );
            let read = || ReadVersion::of(fetched_object.as_ref(), fetched_old.as_ref());
            match policy::evaluate(policy, &ctx) {
                Evaluation::Decided(d) => return (d, false, read()),
                Evaluation::ConditionFailed(d) => return (d, true, read()),
                Evaluation::NeedsContent {
                    object: want_object,
                    old_object: want_old,
                    ..
                } => {
                    if want_object && fetched_object.is_none() {
                        fetched_object = Some(self.dry_run(req, extensions).await);
                    }
                    if want_old && fetched_old.is_none() {
                        fetched_old = Some(self.stored_object(info, req, extensions).await);
                    }
                }
            }
        }
        // Cannot happen (each round fetches what was missing); fail closed regardless.
        let ctx = base.with_content(
            Content::Unavailable("not fetched"),
            Content::Unavailable("not fetched"),
        );
        let read = ReadVersion::of(fetched_object.as_ref(), fetched_old.as_ref());
        (policy::decide(policy, &ctx), true, read)
    }

    /// The object a patch would store: the same request upstream with `dryRun=All`.
    async fn dry_run(&self, req: &RequestContent<'_>, extensions: &http::Extensions) -> Fetched {
        if let Some(why) = req.no_dry_run {
            return Fetched::Failed(why.to_owned());
        }
        let Some(body) = req.body else {
            return Fetched::Failed(
                req.missing
                    .unwrap_or("the request body was not read whole")
                    .to_owned(),
            );
        };
        let uri: Uri = match dry_run_uri(req.uri, body::is_apply(req.headers)).parse() {
            Ok(uri) => uri,
            Err(e) => return Fetched::Failed(format!("cannot build the dry-run URL: {e}")),
        };
        let mut headers = req.headers.clone();
        headers.remove(header::CONTENT_LENGTH);
        match self
            .fetch(req.method.clone(), &uri, headers, body.clone(), extensions)
            .await
        {
            Ok((status, v)) if status.is_success() => Fetched::Object(v),
            Ok((status, v)) => Fetched::Failed(format!(
                "the API server refused a dry run of the request ({status}): {}",
                status_summary(&v)
            )),
            Err(why) => Fetched::Failed(format!("the dry run of the request failed: {why}")),
        }
    }

    /// The stored object an update, patch or delete applies to; absent when there is none.
    async fn stored_object(
        &self,
        info: &RequestInfo,
        req: &RequestContent<'_>,
        extensions: &http::Extensions,
    ) -> Fetched {
        if info.name.is_empty() || !info.subresource.is_empty() && info.subresource != "status" {
            return Fetched::Absent;
        }
        let path = req.uri.path();
        let uri: Uri = match path.parse() {
            Ok(uri) => uri,
            Err(e) => return Fetched::Failed(format!("cannot build the object's URL: {e}")),
        };
        let mut headers = http::HeaderMap::new();
        if let Some(ua) = req.headers.get(header::USER_AGENT) {
            headers.insert(header::USER_AGENT, ua.clone());
        }
        match self
            .fetch(Method::GET, &uri, headers, Bytes::new(), extensions)
            .await
        {
            Ok((status, _)) if status == StatusCode::NOT_FOUND => Fetched::Absent,
            Ok((status, v)) if status.is_success() => Fetched::Object(v),
            Ok((status, v)) => Fetched::Failed(format!(
                "the stored object could not be read ({status}): {}",
                status_message(&v)
            )),
            Err(why) => Fetched::Failed(format!("the stored object could not be read: {why}")),
        }
    }

    /// One JSON request upstream with the gateway's credential (and impersonation, as the
    /// real request would carry); the answer's status and JSON body.
    async fn fetch(
        &self,
        method: Method,
        uri: &Uri,
        mut headers: http::HeaderMap,
        body: Bytes,
        extensions: &http::Extensions,
    ) -> Result<(StatusCode, Value), String> {
        let target = upstream_uri(&self.upstream_base, uri).map_err(|e| e.to_string())?;
        sanitize_request_headers(&mut headers);
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        headers.remove(header::ACCEPT_ENCODING);
        self.upstream_credentials(&mut headers, extensions)
            .map_err(|why| format!("the gateway's credential is unavailable: {why}"))?;
        let mut request = Request::new(Full::new(body).map_err(|never| match never {}).boxed());
        *request.method_mut() = method;
        *request.uri_mut() = target;
        *request.headers_mut() = headers;
        let response = tokio::time::timeout(
            self.limits.body_read_timeout,
            self.upstream().request(request),
        )
        .await
        .map_err(|_| "the API server did not answer in time".to_owned())?
        .map_err(|e| crate::error_chain(&e))?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), MAX_FETCHED_BYTES);
        let bytes = tokio::time::timeout(self.limits.body_read_timeout, body.collect())
            .await
            .map_err(|_| "the API server's answer did not arrive in time".to_owned())?
            .map_err(|e: BoxError| format!("cannot read the API server's answer: {e}"))?
            .to_bytes();
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("the API server's answer is not JSON: {e}"))?;
        Ok((status, value))
    }
}

/// The URI of a request's dry run. A server-side apply's is forced: without `force` the
/// API server answers 409 when the apply sets a field another manager owns to another
/// value and 200 when the value is the same, which would tell (through the decision)
/// whether a guess equals a value masking hides. Forced, the dry run answers with what
/// the apply would store; the real apply, unforced, then stores exactly that or nothing.
fn dry_run_uri(uri: &Uri, apply: bool) -> String {
    let mut query: Vec<&str> = uri
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|kv| !kv.is_empty())
        // Every spelling of `force` (`%66orce=false`): the API server reads the first.
        .filter(|kv| !(apply && crate::request::is_query_key(kv, "force")))
        .collect();
    if apply {
        query.push("force=true");
    }
    query.push("dryRun=All");
    format!("{}?{}", uri.path(), query.join("&"))
}

/// A dry run's refusal without its message: the `reason` and the fields its causes name.
/// The message is the API server's and can quote stored values (a pod update's refusal
/// prints the old and new spec, env values included), and it would reach the agent in the
/// denial's reason, past masking.
fn status_summary(v: &Value) -> String {
    let reason = v
        .get("reason")
        .and_then(Value::as_str)
        .unwrap_or("no reason");
    let fields: Vec<&str> = v
        .pointer("/details/causes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("field").and_then(Value::as_str))
        .collect();
    if fields.is_empty() {
        format!("{reason} (its message is not repeated here: it may quote stored values)")
    } else {
        format!(
            "{reason} at {} (its message is not repeated here: it may quote stored values)",
            fields.join(", ")
        )
    }
}

/// The `message` of a `Status`, or the status itself.
fn status_message(v: &Value) -> String {
    v.get("message")
        .and_then(Value::as_str)
        .map_or_else(|| v.to_string(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dry_run_keeps_the_query_and_an_apply_is_forced() {
        let uri = |s: &str| s.parse::<Uri>().expect("uri");
        assert_eq!(
            dry_run_uri(&uri("/api/v1/namespaces/d/pods/p"), false),
            "/api/v1/namespaces/d/pods/p?dryRun=All"
        );
        assert_eq!(
            dry_run_uri(
                &uri("/api/v1/namespaces/d/pods/p?fieldManager=k&force=false"),
                false
            ),
            "/api/v1/namespaces/d/pods/p?fieldManager=k&force=false&dryRun=All",
            "only an apply takes force"
        );
        assert_eq!(
            dry_run_uri(
                &uri(
                    "/api/v1/namespaces/d/secrets/s?fieldManager=k&force=false&fieldValidation=Strict"
                ),
                true
            ),
            "/api/v1/namespaces/d/secrets/s?fieldManager=k&fieldValidation=Strict&force=true&dryRun=All"
        );
        assert_eq!(
            dry_run_uri(
                &uri("/api/v1/namespaces/d/secrets/s?force&fieldManager=k"),
                true
            ),
            "/api/v1/namespaces/d/secrets/s?fieldManager=k&force=true&dryRun=All"
        );
        assert_eq!(
            dry_run_uri(
                &uri("/api/v1/namespaces/d/secrets/s?%66orce=false&force=true&fieldManager=k"),
                true
            ),
            "/api/v1/namespaces/d/secrets/s?fieldManager=k&force=true&dryRun=All",
            "every spelling of force goes"
        );
    }

    #[test]
    fn a_refused_dry_run_is_summarised_without_its_message() {
        let refusal = serde_json::json!({"kind": "Status", "reason": "Invalid", "code": 422,
            "message": "Pod \"p\" is invalid: spec: Forbidden: pod updates may not change fields\n  Env: {Name: PASSWORD, Value: hunter2}",
            "details": {"causes": [{"field": "spec", "message": "Value: hunter2"}]}});
        let summary = status_summary(&refusal);
        assert!(summary.starts_with("Invalid at spec"), "{summary}");
        assert!(!summary.contains("hunter2"), "{summary}");
        assert!(status_summary(&serde_json::json!({})).starts_with("no reason"));
    }

    #[test]
    fn the_read_version_is_the_one_both_reads_saw_or_a_move() {
        let at = |rv: &str, uid: &str| {
            Fetched::Object(serde_json::json!({"metadata": {"resourceVersion": rv, "uid": uid}}))
        };
        let read = |rv: &str, uid: &str| {
            ReadVersion::Read(ObjectVersion {
                resource_version: rv.into(),
                uid: uid.into(),
            })
        };
        assert_eq!(ReadVersion::of(None, None), ReadVersion::Nothing);
        assert_eq!(ReadVersion::of(Some(&at("7", "u")), None), read("7", "u"));
        assert_eq!(ReadVersion::of(None, Some(&at("9", "u"))), read("9", "u"));
        assert_eq!(
            ReadVersion::of(Some(&at("9", "u")), Some(&at("9", "u"))),
            read("9", "u")
        );
        let moved = ReadVersion::of(Some(&at("10", "u")), Some(&at("9", "u")));
        assert!(matches!(moved, ReadVersion::Moved { .. }), "{moved:?}");
        // Deleted and created again under the same name between the reads.
        let recreated = ReadVersion::of(Some(&at("9", "v")), Some(&at("9", "u")));
        assert!(
            matches!(recreated, ReadVersion::Moved { .. }),
            "{recreated:?}"
        );
        // A dry run that creates (an apply of a missing object) has no version: what was
        // read is that there is none.
        let created = Fetched::Object(serde_json::json!({"metadata": {"name": "n"}}));
        assert_eq!(
            ReadVersion::of(Some(&created), Some(&Fetched::Absent)),
            ReadVersion::Absent
        );
        assert_eq!(
            ReadVersion::of(None, Some(&Fetched::Absent)),
            ReadVersion::Absent
        );
        // ... and when the other read found one, the decision mixed two states.
        let mixed = ReadVersion::of(Some(&created), Some(&at("9", "u")));
        assert!(matches!(mixed, ReadVersion::Moved { .. }), "{mixed:?}");
        let mixed = ReadVersion::of(Some(&at("9", "u")), Some(&Fetched::Absent));
        assert!(matches!(mixed, ReadVersion::Moved { .. }), "{mixed:?}");
        assert_eq!(
            ReadVersion::of(Some(&Fetched::Failed("x".into())), None),
            ReadVersion::Nothing
        );
    }
}
