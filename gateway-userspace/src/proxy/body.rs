//! Request bodies: read (up to a limit) and decoded so policy and recording see the object.
//!
//! A body up to `limits.maxInspectedBodyBytes` is read whole, then decoded by its
//! `Content-Type`: JSON and the JSON patch types as they are, YAML (server-side apply) into
//! JSON, and Kubernetes protobuf transcoded to JSON, which is also what is forwarded (the
//! API server accepts either; see [`crate::protobuf`]). A larger body is forwarded as it
//! arrives, with what was already read in front, and recorded as truncated: it is never
//! held whole in memory.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{HeaderValue, Uri, header, request::Parts};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::Incoming;
use serde_json::Value;

use super::{BoxError, ProxyBody};
use crate::protobuf;

/// Why a body could not be accepted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// The client did not finish sending the body in time.
    #[error("the request body did not arrive within {0:?}")]
    Timeout(Duration),
    /// The client's stream failed (reset, malformed chunking).
    #[error("reading the request body: {0}")]
    Read(String),
    /// The body is larger than the API server accepts for this request.
    #[error("Request entity too large: limit is {limit}")]
    TooLarge {
        /// `limits.maxRequestBodyBytes`.
        limit: usize,
    },
    /// A protobuf body that cannot be transcoded faithfully.
    #[error("cannot decode the protobuf request body: {0}")]
    Protobuf(#[from] protobuf::ProtobufError),
    /// A JSON body with a key twice in one object: the API server decodes the repeats
    /// into one another (a second `spec` merges into the first), a JSON parser keeps the
    /// last, so what the policy reads could differ from what is stored.
    #[error(
        "the JSON request body has a {0}; the API server would merge the repeats, so the gateway cannot tell what it would store"
    )]
    DuplicateKey(String),
}

/// What inspection learned about a request body.
#[derive(Debug, Default)]
pub(crate) struct Inspected {
    /// The decoded object (unmasked), when the body was read whole and is JSON-shaped.
    pub object: Option<Value>,
    /// The body as it is forwarded (transcoded from protobuf to JSON), when read whole: a
    /// content condition's dry run sends it again.
    pub forwarded: Option<Bytes>,
    /// The body exceeded the inspection limit and went through unread.
    pub truncated: bool,
    /// `Content-Type` as the client sent it.
    pub content_type: Option<String>,
    /// Bytes the client sent, when the body was read whole here (what is forwarded may
    /// differ: a transcoded body); `None` when it streams through and is counted on the way.
    pub whole_len: Option<u64>,
    /// For a body that streams through under a size limit: set when it went past the
    /// limit and was cut off, so the failed upstream request is answered with 413 rather
    /// than 503. `None` for a body read whole (checked here) or with no limit.
    pub exceeded: Option<Arc<AtomicBool>>,
}

/// How a `Content-Type` is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Json,
    Yaml,
    Protobuf,
    Other,
}

/// Server-side apply's media type.
const APPLY_PATCH_YAML: &str = "application/apply-patch+yaml";

fn encoding(content_type: Option<&str>) -> Encoding {
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .unwrap_or_default();
    match media.as_str() {
        // No Content-Type (the Python client sends none) is the API server's first
        // supported type: JSON.
        ""
        | "*/*"
        | "application/json"
        | "application/merge-patch+json"
        | "application/strategic-merge-patch+json"
        | "application/json-patch+json" => Encoding::Json,
        "application/yaml" | APPLY_PATCH_YAML => Encoding::Yaml,
        protobuf::MEDIA_TYPE => Encoding::Protobuf,
        _ => Encoding::Other,
    }
}

/// Decodes a body read whole: the bytes to forward and the object the policy reads. The
/// API server must read the same object the policy decided on, so what it cannot read the
/// same way is forwarded as the JSON of that object (`Content-Type` rewritten):
/// protobuf, and YAML, which the API server reads by YAML 1.1's rules (`sigs.k8s.io/yaml`:
/// `yes` and `on` are booleans, `<<` merges mappings) and this parser by YAML 1.2's.
/// Server-side apply keeps its media type (JSON is YAML). YAML this parser refuses goes as
/// sent, with no object: a policy that reads content then decides without one.
fn decode(
    parts: &mut Parts,
    content_type: Option<&str>,
    bytes: Bytes,
    strict: Strictness,
) -> Result<(Bytes, Option<Value>), BodyError> {
    let json_of = |parts: &mut Parts, object: &Value, media: &'static str| {
        parts
            .headers
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(media));
        Bytes::from(object.to_string())
    };
    Ok(match encoding(content_type) {
        Encoding::Json => {
            let object = match strict {
                Strictness::ApiObject => unique_json(&bytes)?,
                // Another program's JSON (a proxied service's): the API server does not
                // decode it, so neither repeats nor anything else are refused here.
                Strictness::Passthrough => serde_json::from_slice(&bytes).ok(),
            };
            (bytes, object)
        }
        Encoding::Yaml => match serde_norway::from_slice::<Value>(&bytes) {
            Ok(object) => {
                let apply = content_type.is_some_and(|c| {
                    c.split(';')
                        .next()
                        .is_some_and(|m| m.trim().eq_ignore_ascii_case(APPLY_PATCH_YAML))
                });
                let media = if apply {
                    APPLY_PATCH_YAML
                } else {
                    "application/json"
                };
                (json_of(parts, &object, media), Some(object))
            }
            Err(_) => (bytes, None),
        },
        Encoding::Protobuf => {
            let transcoded = protobuf::transcode(&bytes)?;
            let json = json_of(parts, &transcoded.object, "application/json");
            (json, Some(transcoded.object))
        }
        Encoding::Other => (bytes, None),
    })
}

/// Whether a request body is one the API server decodes as an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Strictness {
    /// A Kubernetes object: a JSON body with a repeated key is refused.
    ApiObject,
    /// Passed to another program (a `proxy` subresource).
    Passthrough,
}

/// Parses a JSON body, refusing one that repeats a key within an object (the bytes are
/// forwarded as sent, so the API server must read the object the policy read). Text that
/// is not JSON is `None`, as before: content conditions then fail closed.
fn unique_json(bytes: &[u8]) -> Result<Option<Value>, BodyError> {
    match serde_json::from_slice::<Unique>(bytes) {
        Ok(Unique(value)) => Ok(Some(value)),
        // The one data error `Unique` raises; syntax and end-of-input errors are not JSON.
        Err(e) if e.is_data() => Err(BodyError::DuplicateKey(e.to_string())),
        Err(_) => Ok(None),
    }
}

/// A JSON value whose objects have no key twice.
struct Unique(Value);

impl<'de> serde::Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Unique;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Unique, E> {
                Ok(Unique(Value::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Unique, E> {
                Ok(Unique(Value::from(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Unique, E> {
                Ok(Unique(Value::from(v)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Unique, E> {
                Ok(Unique(Value::from(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Unique, E> {
                Ok(Unique(Value::String(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Unique, E> {
                Ok(Unique(Value::String(v)))
            }
            fn visit_unit<E>(self) -> Result<Unique, E> {
                Ok(Unique(Value::Null))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Unique, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(Unique(item)) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Unique(Value::Array(items)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Unique, A::Error> {
                let mut object = serde_json::Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    let Unique(value) = map.next_value()?;
                    if object.contains_key(&key) {
                        return Err(serde::de::Error::custom(format_args!(
                            "key {key:?} twice in one object"
                        )));
                    }
                    object.insert(key, value);
                }
                Ok(Unique(Value::Object(object)))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// Reads and decodes the body of a request whose head is `parts`, returning the body to
/// forward (rewritten headers included) and what was learned. `limit` is the largest body
/// the request may have at all (`None`: no limit).
pub(crate) async fn inspect(
    parts: &mut Parts,
    mut body: Incoming,
    max_bytes: usize,
    limit: Option<usize>,
    timeout: Duration,
    strict: Strictness,
) -> Result<(ProxyBody, Inspected), BodyError> {
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut inspected = Inspected {
        content_type: content_type.clone(),
        ..Inspected::default()
    };
    if body.is_end_stream() {
        inspected.whole_len = Some(0);
        return Ok((body.map_err(BoxError::from).boxed(), inspected));
    }
    let declared = body.size_hint().exact();
    if let (Some(limit), Some(n)) = (limit, declared)
        && n > limit as u64
    {
        return Err(BodyError::TooLarge { limit });
    }
    if max_bytes == 0 || declared.is_some_and(|n| n > max_bytes as u64) {
        // Known to be too large to inspect: do not read a byte of it here.
        inspected.truncated = true;
        let body = Limited::wrap(body.map_err(BoxError::from).boxed(), limit, &mut inspected);
        return Ok((body, inspected));
    }

    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(BodyError::Timeout(timeout)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(BodyError::Read(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        // Trailers on a request to the API server carry nothing it reads; drop them.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if let Some(limit) = limit
            && buf.len() + data.len() > limit
        {
            return Err(BodyError::TooLarge { limit });
        }
        if buf.len() + data.len() > max_bytes {
            // Too large after all (chunked, no length): forward what was read, then the rest.
            buf.extend_from_slice(&data);
            inspected.truncated = true;
            let head =
                futures_util::stream::once(
                    async move { Ok::<_, BoxError>(Frame::data(buf.freeze())) },
                );
            let rest = BodyStream::new(body.map_err(BoxError::from));
            let body = BodyExt::boxed(StreamBody::new(StreamExt::chain(head, rest)));
            return Ok((Limited::wrap(body, limit, &mut inspected), inspected));
        }
        buf.extend_from_slice(&data);
    }
    let bytes = buf.freeze();
    inspected.whole_len = Some(bytes.len() as u64);
    let (forward, object) = decode(parts, content_type.as_deref(), bytes, strict)?;
    inspected.object = object;
    parts.headers.remove(header::TRANSFER_ENCODING);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(forward.len()));
    inspected.forwarded = Some(forward.clone());
    let body = http_body_util::Full::new(forward)
        .map_err(|never| match never {})
        .boxed();
    Ok((body, inspected))
}

/// A streamed request body cut off with an error once it passes its limit; the shared flag
/// tells the handler that the failed upstream request deserves a 413, not a 503.
struct Limited {
    inner: ProxyBody,
    seen: u64,
    limit: usize,
    exceeded: Arc<AtomicBool>,
}

impl Limited {
    fn wrap(inner: ProxyBody, limit: Option<usize>, inspected: &mut Inspected) -> ProxyBody {
        match limit {
            None => inner,
            Some(limit) => {
                let exceeded = Arc::new(AtomicBool::new(false));
                inspected.exceeded = Some(exceeded.clone());
                Limited {
                    inner,
                    seen: 0,
                    limit,
                    exceeded,
                }
                .boxed()
            }
        }
    }
}

impl http_body::Body for Limited {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            this.seen += data.len() as u64;
            if this.seen > this.limit as u64 {
                this.exceeded.store(true, Ordering::Relaxed);
                let error = BodyError::TooLarge { limit: this.limit };
                return Poll::Ready(Some(Err(error.into())));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The `Accept` header to send upstream when the gateway reads the response: every
/// protobuf alternative becomes JSON with the same parameters (`as=Table;v=v1;g=...`
/// survives), duplicates dropped. `None` when nothing needs to change.
pub(crate) fn accept_json(accept: &HeaderValue) -> Option<HeaderValue> {
    let text = accept.to_str().ok()?;
    // Runs for nearly every request: look without allocating a lowercased copy.
    let wanted = protobuf::MEDIA_TYPE.as_bytes();
    if !text
        .as_bytes()
        .windows(wanted.len())
        .any(|w| w.eq_ignore_ascii_case(wanted))
    {
        return None;
    }
    let mut out: Vec<String> = Vec::new();
    for entry in text.split(',') {
        let entry = entry.trim();
        let (media, params) = entry.split_once(';').unwrap_or((entry, ""));
        let media = if media.trim().eq_ignore_ascii_case(protobuf::MEDIA_TYPE) {
            "application/json"
        } else {
            media.trim()
        };
        let rewritten = if params.is_empty() {
            media.to_owned()
        } else {
            format!("{media};{params}")
        };
        if !out.contains(&rewritten) {
            out.push(rewritten);
        }
    }
    HeaderValue::from_str(&out.join(",")).ok()
}

/// A copy of a response body, kept while it stays within a limit, for recording.
#[derive(Debug)]
pub(crate) struct Capture {
    buf: BytesMut,
    limit: usize,
    overflowed: bool,
}

impl Capture {
    /// Starts a capture of at most `limit` bytes.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            limit,
            overflowed: false,
        }
    }

    /// Appends a frame's data, or gives up (freeing the copy) once past the limit.
    pub(crate) fn push(&mut self, data: &[u8]) {
        if self.overflowed {
            return;
        }
        if self.buf.len() + data.len() > self.limit {
            self.overflowed = true;
            self.buf = BytesMut::new();
        } else {
            self.buf.extend_from_slice(data);
        }
    }

    /// The captured object, or `Err(())` when the body was too large to keep.
    pub(crate) fn finish(self) -> Result<Option<Value>, ()> {
        if self.overflowed {
            return Err(());
        }
        Ok(serde_json::from_slice(&self.buf).ok())
    }

    /// The bytes captured so far.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The captured body as the text it was, when it is one JSON value (checked without
    /// building it), without the trailing newline the API server ends it with; `Err(())`
    /// when the body was too large to keep.
    pub(crate) fn finish_text(self) -> Result<Option<String>, ()> {
        if self.overflowed {
            return Err(());
        }
        if serde_json::from_slice::<serde::de::IgnoredAny>(&self.buf).is_err() {
            return Ok(None);
        }
        let mut text = Vec::from(self.buf);
        let end = text
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        text.truncate(end);
        Ok(String::from_utf8(text).ok())
    }
}

/// Why a JSON patch (`application/json-patch+json`) may not go with a request whose
/// answer is masked, or `None` when the body is no such patch or its operations are only
/// `add`, `remove` and `replace`. `copy` and `move` put a value where masking does not
/// look (a Secret's `data` copied into an annotation would come back in clear, even from
/// a dry run) and `test` tells whether a guessed value is the masked one. A patch the
/// gateway could not read whole is refused too: what it cannot see it cannot vouch for.
pub(crate) fn json_patch_reveals(inspected: &Inspected) -> Option<String> {
    let media = inspected
        .content_type
        .as_deref()
        .and_then(|c| c.split(';').next())
        .map(str::trim)?;
    if !media.eq_ignore_ascii_case("application/json-patch+json") {
        return None;
    }
    let Some(Value::Array(ops)) = &inspected.object else {
        return Some(
            "chaperone: this request's answer is masked, and its JSON patch could not be read \
             whole to check that it only adds, removes or replaces values"
                .to_owned(),
        );
    };
    ops.iter().enumerate().find_map(|(i, op)| {
        let name = op.get("op").and_then(Value::as_str);
        (!matches!(name, Some("add" | "remove" | "replace"))).then(|| {
            format!(
                "chaperone: this request's answer is masked, so its JSON patch may only add, \
                 remove or replace values; operation {i} is {}, which could copy, move or test \
                 a masked value; send a merge patch or only add, remove and replace",
                name.map_or_else(|| "not a named operation".to_owned(), |n| format!("`{n}`"))
            )
        })
    })
}

/// Whether a request is a server-side apply (`application/apply-patch+yaml`, `+json` or
/// `+cbor`).
pub(crate) fn is_apply(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| c.split(';').next())
        .is_some_and(|media| {
            media
                .trim()
                .get(..24)
                .is_some_and(|p| p.eq_ignore_ascii_case("application/apply-patch+"))
        })
}

/// Why a server-side apply may not go with a request whose answer is masked, or `None`
/// when the request is no apply or is forced. Unforced, the API server answers 409 when
/// the apply sets a field another manager owns to a different value and 200 when the
/// value is the same, so an apply of a guessed value tells whether it is the one masking
/// hides. Forced (`force=true`, `kubectl apply --server-side --force-conflicts`), it
/// takes the field either way.
pub(crate) fn unforced_apply_reveals(headers: &http::HeaderMap, uri: &Uri) -> Option<String> {
    if !is_apply(headers) {
        return None;
    }
    // The API server reads the first `force` (its name form-decoded) the Go way: `0` and
    // `false` are false, anything else (even empty) is true.
    let forced = uri
        .query()
        .and_then(|q| crate::request::first_query_value(q, "force"))
        .is_some_and(|v| crate::request::parse_go_bool(&v));
    (!forced).then(|| {
        "chaperone: this request's answer is masked, so a server-side apply must be forced: \
         unforced, its conflict or success would tell whether a value it sets equals one \
         masking hides; send it with force=true (kubectl apply --server-side \
         --force-conflicts) or as a merge patch"
            .to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_apply_under_masking_must_be_forced() {
        let headers = |ct: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_str(ct).expect("value"),
            );
            h
        };
        let apply = headers("application/apply-patch+yaml");
        let uri = |q: &str| {
            format!("/api/v1/namespaces/d/secrets/s?{q}")
                .parse::<Uri>()
                .expect("uri")
        };
        for refused in [
            "fieldManager=k",
            "fieldManager=k&force=false",
            "force=FALSE&fieldManager=k",
            "force=0",
            "force=false&force=true",
            "%66orce=false&force=true",
        ] {
            let why = unforced_apply_reveals(&apply, &uri(refused));
            assert!(
                why.as_deref().is_some_and(|w| w.contains("force=true")),
                "{refused}: {why:?}"
            );
        }
        for forced in [
            "fieldManager=k&force=true",
            "force=1",
            "force=True&fieldManager=k",
            "force",
            "force=yes",
            "force=true&force=false",
            "%66orce=true",
        ] {
            assert_eq!(
                unforced_apply_reveals(&apply, &uri(forced)),
                None,
                "{forced}"
            );
        }
        let merge = headers("application/merge-patch+json");
        assert_eq!(unforced_apply_reveals(&merge, &uri("fieldManager=k")), None);
    }

    #[test]
    fn apply_is_told_by_its_media_type() {
        let with = |ct: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_str(ct).expect("value"),
            );
            is_apply(&h)
        };
        assert!(with("application/apply-patch+yaml"));
        assert!(with("Application/Apply-Patch+JSON; charset=utf-8"));
        assert!(with("application/apply-patch+cbor"));
        assert!(!with("application/merge-patch+json"));
        assert!(!with("application/json"));
        assert!(!is_apply(&http::HeaderMap::new()));
    }

    #[test]
    fn a_json_body_with_a_key_twice_in_one_object_is_refused() {
        // A second `spec` hides a privileged container from a parser that keeps the last.
        let hidden = br#"{"kind":"Pod","spec":{"hostPID":true,"containers":[{"name":"c","securityContext":{"privileged":true}}]},"spec":{"containers":[{"name":"c"}]}}"#;
        let err = unique_json(hidden).expect_err("a repeated key");
        assert!(matches!(err, BodyError::DuplicateKey(_)), "{err:?}");
        assert!(err.to_string().contains(r#"key "spec" twice"#), "{err}");
        let nested = br#"{"a":[{"b":1,"c":{"d":1,"d":2}}]}"#;
        assert!(unique_json(nested).is_err(), "nested objects too");
        // The same key in two different objects is fine, and values are kept exactly.
        let fine = br#"{"a":{"x":1},"b":{"x":[1,2.5,-3,"s",null,true]},"c":18446744073709551615}"#;
        assert_eq!(
            unique_json(fine).expect("unique"),
            serde_json::from_slice::<Value>(fine).ok()
        );
        // A proxied program's JSON is its own business.
        let mut parts = http::Request::post("/")
            .body(())
            .expect("request")
            .into_parts()
            .0;
        let (_, object) = decode(
            &mut parts,
            Some("application/json"),
            Bytes::from_static(hidden),
            Strictness::Passthrough,
        )
        .expect("passed through");
        assert!(object.is_some());
        // Not JSON at all: no object, as before (content conditions then fail closed).
        for garbage in [&b"{"[..], b"{\"a\":}", b"", b"\xff"] {
            assert!(matches!(unique_json(garbage), Ok(None)), "{garbage:?}");
        }
    }

    #[test]
    fn json_patches_that_copy_move_or_test_are_refused_when_masked() {
        let inspected = |content_type: &str, object: Option<Value>| Inspected {
            object,
            forwarded: None,
            truncated: false,
            content_type: Some(content_type.to_owned()),
            whole_len: None,
            exceeded: None,
        };
        let patch = "application/json-patch+json";
        let plain = serde_json::json!([{"op": "add", "path": "/metadata/labels/a", "value": "b"},
            {"op": "replace", "path": "/spec/replicas", "value": 2}, {"op": "remove", "path": "/x"}]);
        assert_eq!(json_patch_reveals(&inspected(patch, Some(plain))), None);
        for op in ["copy", "move", "test", "Copy", "bogus"] {
            let ops = serde_json::json!([{"op": "add", "path": "/metadata/annotations", "value": {}},
                {"op": op, "from": "/data/password", "path": "/metadata/annotations/x"}]);
            let why = json_patch_reveals(&inspected(
                "Application/JSON-Patch+json; charset=utf-8",
                Some(ops),
            ))
            .unwrap_or_else(|| panic!("{op} must be refused"));
            assert!(why.contains(&format!("operation 1 is `{op}`")), "{why}");
        }
        let why = json_patch_reveals(&inspected(patch, Some(serde_json::json!([{"path": "/a"}]))));
        assert!(why.is_some_and(|w| w.contains("not a named operation")));
        // Unread (too large) or not an array: refused.
        assert!(json_patch_reveals(&inspected(patch, None)).is_some());
        assert!(
            json_patch_reveals(&inspected(patch, Some(serde_json::json!({"op": "copy"}))))
                .is_some()
        );
        // Other patch types carry no operations.
        let copy = serde_json::json!([{"op": "copy", "from": "/a", "path": "/b"}]);
        assert_eq!(
            json_patch_reveals(&inspected("application/merge-patch+json", Some(copy))),
            None
        );
    }

    #[test]
    fn accept_asks_for_json_in_place_of_protobuf_keeping_parameters() {
        for (accept, want) in [
            (
                "application/vnd.kubernetes.protobuf, application/json",
                Some("application/json"),
            ),
            (
                "application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
                Some("application/json;as=Table;v=v1;g=meta.k8s.io,application/json"),
            ),
            (
                "application/vnd.kubernetes.protobuf",
                Some("application/json"),
            ),
            ("application/json", None),
            ("application/json;as=Table;v=v1;g=meta.k8s.io", None),
            ("*/*", None),
        ] {
            let got = accept_json(&HeaderValue::from_static(accept));
            assert_eq!(got.as_ref().and_then(|v| v.to_str().ok()), want, "{accept}");
        }
    }

    #[test]
    fn capture_keeps_bodies_within_the_limit_only() {
        let mut c = Capture::new(16);
        c.push(br#"{"a":"#);
        c.push(br#"1}"#);
        assert_eq!(c.finish(), Ok(Some(serde_json::json!({"a": 1}))));
        let mut c = Capture::new(4);
        c.push(b"{}");
        c.push(b"12345");
        c.push(b"{}");
        assert_eq!(c.finish(), Err(()));
        let mut c = Capture::new(64);
        c.push(b"plain text log line");
        assert_eq!(c.finish(), Ok(None));
    }

    #[test]
    fn capture_as_text_keeps_the_json_as_sent_and_rejects_what_is_not_json() {
        let mut c = Capture::new(64);
        c.push(br#"{"a": [1, "#);
        c.push(b"2]}\n");
        assert_eq!(c.finish_text(), Ok(Some(r#"{"a": [1, 2]}"#.to_owned())));
        for not_json in [
            &b"plain text"[..],
            b"{\"a\":",
            b"{} {}",
            b"\"\xff\xfe\"",
            b"",
        ] {
            let mut c = Capture::new(64);
            c.push(not_json);
            assert_eq!(c.finish_text(), Ok(None), "{not_json:?}");
        }
        let mut c = Capture::new(4);
        c.push(b"{\"a\":1}");
        assert_eq!(c.finish_text(), Err(()));
    }

    #[test]
    fn hostile_yaml_and_json_bodies_are_not_expanded_or_recursed_into() {
        // "Billion laughs": nine levels of aliases, each repeating the previous nine times.
        let mut yaml = String::from("a0: &a0 [\"lol\"]\n");
        for i in 1..10 {
            let prev = format!("*a{}", i - 1);
            let list = [prev.as_str(); 9].join(", ");
            yaml.push_str(&format!("a{i}: &a{i} [{list}]\n"));
        }
        let started = std::time::Instant::now();
        let parsed: Result<Value, _> = serde_norway::from_slice(yaml.as_bytes());
        assert!(parsed.is_err(), "alias expansion was not limited");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));

        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let parsed: Result<Value, _> = serde_json::from_slice(deep.as_bytes());
        assert!(parsed.is_err(), "deep JSON must hit the recursion limit");
        let deep_yaml = "[".repeat(100_000);
        let parsed: Result<Value, _> = serde_norway::from_slice(deep_yaml.as_bytes());
        assert!(parsed.is_err(), "deep YAML must hit the recursion limit");
    }

    /// The API server receives the object the policy read: YAML goes as that object's
    /// JSON, so YAML 1.1's `yes` and `<<` cannot mean one thing to the policy and another
    /// to the API server.
    #[test]
    fn yaml_is_forwarded_as_the_json_the_policy_read() {
        let head = |ct: &str| {
            let mut parts = http::Request::new(()).into_parts().0;
            parts
                .headers
                .insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).expect("ct"));
            parts
        };
        let yaml = "kind: Pod\nbase: &b {hostPID: true}\nspec:\n  <<: *b\n  hostNetwork: yes\n";
        let mut parts = head("application/yaml");
        let (forward, object) = decode(
            &mut parts,
            Some("application/yaml"),
            Bytes::from(yaml),
            Strictness::ApiObject,
        )
        .expect("decoded");
        let object = object.expect("an object");
        assert_eq!(object["spec"]["hostNetwork"], "yes", "YAML 1.2: a string");
        assert_eq!(object["spec"]["<<"]["hostPID"], true, "no merge: a key");
        assert_eq!(object["spec"].get("hostPID"), None);
        let sent: Value = serde_json::from_slice(&forward).expect("JSON is forwarded");
        assert_eq!(sent, object, "the API server gets what the policy read");
        assert_eq!(parts.headers[header::CONTENT_TYPE], "application/json");

        let apply = "application/apply-patch+yaml; charset=utf-8";
        let mut parts = head(apply);
        let (forward, object) = decode(
            &mut parts,
            Some(apply),
            Bytes::from("kind: ConfigMap\ndata: {a: on}\n"),
            Strictness::ApiObject,
        )
        .expect("decoded");
        assert_eq!(&forward[..], br#"{"data":{"a":"on"},"kind":"ConfigMap"}"#);
        assert_eq!(object.expect("object")["data"]["a"], "on");
        assert_eq!(
            parts.headers[header::CONTENT_TYPE],
            "application/apply-patch+yaml",
            "server-side apply keeps its media type"
        );

        // What this parser refuses goes as sent, with no object for the policy.
        for (ct, body) in [
            ("application/yaml", "a: [1, 2\n"),
            ("application/yaml", "---\na: 1\n---\nb: 2\n"),
            ("application/json", "{not json"),
        ] {
            let mut parts = head(ct);
            let (forward, object) = decode(
                &mut parts,
                Some(ct),
                Bytes::from(body),
                Strictness::ApiObject,
            )
            .expect("decoded");
            assert_eq!(&forward[..], body.as_bytes(), "{body:?}");
            assert_eq!(object, None, "{body:?}");
            assert_eq!(parts.headers[header::CONTENT_TYPE], ct);
        }
        // JSON goes byte for byte.
        let json = r#"{"b": 1,  "a": [true]}"#;
        let mut parts = head("application/json");
        let (forward, object) = decode(
            &mut parts,
            Some("application/json"),
            Bytes::from(json),
            Strictness::ApiObject,
        )
        .expect("decoded");
        assert_eq!(&forward[..], json.as_bytes());
        assert_eq!(object.expect("object")["a"][0], true);
    }

    #[test]
    fn content_types_map_to_decoders() {
        for (ct, want) in [
            (Some("application/json"), Encoding::Json),
            (Some("application/json; charset=utf-8"), Encoding::Json),
            (Some("Application/JSON"), Encoding::Json),
            (
                Some("application/strategic-merge-patch+json"),
                Encoding::Json,
            ),
            (Some("application/merge-patch+json"), Encoding::Json),
            (Some("application/json-patch+json"), Encoding::Json),
            (Some("application/apply-patch+yaml"), Encoding::Yaml),
            (Some("application/yaml"), Encoding::Yaml),
            (
                Some("application/vnd.kubernetes.protobuf"),
                Encoding::Protobuf,
            ),
            (Some("text/plain"), Encoding::Other),
            // The API server reads a body without Content-Type as JSON.
            (None, Encoding::Json),
            (Some(""), Encoding::Json),
        ] {
            assert_eq!(encoding(ct), want, "{ct:?}");
        }
    }
}
