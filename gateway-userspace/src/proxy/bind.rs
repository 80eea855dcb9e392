//! Binds a write to the version of the stored object its decision read.
//!
//! A content condition judges a version of the stored object: the one a patch's dry run
//! was applied to, or the one read as `oldObject`. The API server applies the real request
//! moments later to whatever is stored then, so a write landing in between (another
//! client's, or the agent's own second request) would have the API server apply a change
//! to an object nobody judged: a JSON patch's `/spec/containers/0` naming another
//! container, a delete removing an object that turned protected, an apply recreating an
//! object deleted meanwhile. Admission control never has this gap because it runs inside
//! the API server's own transaction; the gateway closes it with the API server's own
//! preconditions on the `resourceVersion` and `uid` it read, so such a request is
//! answered 409 Conflict, as any client with a stale view is:
//!
//! * a JSON patch gets last operations setting `/metadata/resourceVersion` and
//!   `/metadata/uid`;
//! * a merge, strategic-merge or apply patch, and an update, carry them in `metadata`
//!   (a patch or update naming a uid that no stored object has is a conflict too, not a
//!   create);
//! * a delete carries them in `DeleteOptions.preconditions`; a delete that had no body
//!   gets one holding the options its query gave, which the API server reads only when
//!   there is no body.
//!
//! The body is edited, not rebuilt: every other value keeps the bytes the dry run
//! judged (a number that `serde_json::Value` would round stays as sent). A request that
//! already names the version goes as sent; one that names another is refused with 409
//! (the API server would refuse it, or apply it to a version the policy did not read).
//! A body that cannot carry the precondition is refused with 400.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt as _;
use serde_json::{Value, json, value::RawValue};

use crate::{
    recorder::RequestRecord,
    request::{self, RequestInfo, Verb},
    status::Status,
};

use super::{
    Proxy,
    content::{ContentBody, ObjectVersion, ReadVersion},
    handler::Pending,
    record::recorded_json,
};

/// The request body as the gateway holds it.
#[derive(Debug, Clone, Copy)]
pub(super) enum SentBody<'a> {
    /// No body at all.
    Empty,
    /// The body as forwarded, read whole.
    Whole(&'a [u8]),
    /// Not read whole (over the inspection limit): it cannot be edited.
    Unread,
}

/// The body to forward in place of the client's.
#[derive(Debug, PartialEq)]
pub(super) struct Rewrite {
    /// The JSON to send.
    pub(super) bytes: Bytes,
    /// The `Content-Type` to set, when the request had no body before.
    pub(super) content_type: Option<&'static str>,
}

/// Why a request cannot go bound.
#[derive(Debug, PartialEq)]
enum BindError {
    /// It names another version (or uid) than the one read.
    Names { field: &'static str, named: String },
    /// Its body is not of a shape that can carry the precondition.
    Shape(String),
}

/// Whether `pending` can be bound to `read` (it would be refused otherwise): checked
/// before a request is held for approval, so that nobody approves what cannot be sent.
pub(super) fn check(
    info: &RequestInfo,
    read: &ReadVersion,
    pending: &Pending,
    body: &ContentBody<'_>,
) -> Result<(), Box<Status>> {
    let Pending::Plain(req, _) = pending else {
        return Ok(());
    };
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    bind_to_read(info, read, req.uri().query(), content_type, sent_body(body)).map(|_| ())
}

/// The body as [`bind_to_read`] reads it.
fn sent_body<'b>(body: &'b ContentBody<'_>) -> SentBody<'b> {
    match &body.forwarded {
        _ if body.truncated => SentBody::Unread,
        Some(bytes) if !bytes.is_empty() => SentBody::Whole(bytes),
        _ => SentBody::Empty,
    }
}

impl Proxy {
    /// Binds `pending` to the version its decision read: its body is replaced when it
    /// must carry the precondition, and the recorded request object follows.
    pub(super) fn bind(
        &self,
        info: &RequestInfo,
        read: &ReadVersion,
        pending: &mut Pending,
        body: &ContentBody<'_>,
        record: &mut RequestRecord,
    ) -> Result<(), Box<Status>> {
        let Pending::Plain(req, _) = pending else {
            // Sessions read no stored object; one that did could not carry its version.
            return Err(Box::new(Status::bad_request(
                "chaperone: a policy rule read the stored object, and a protocol upgrade \
                 cannot be bound to the version it read",
            )));
        };
        let sent = sent_body(body);
        let content_type = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let Some(rewrite) = bind_to_read(info, read, req.uri().query(), content_type, sent)? else {
            return Ok(());
        };
        let headers = req.headers_mut();
        if let Some(media) = rewrite.content_type {
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(media),
            );
            record.request_content_type = Some(media.to_owned());
        }
        headers.remove(http::header::TRANSFER_ENCODING);
        headers.insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(rewrite.bytes.len()),
        );
        if let Ok(object) = serde_json::from_slice(&rewrite.bytes) {
            // The fields the first recording masked are counted once.
            let counted = record.masked_fields;
            record.request_object = recorded_json(record, object, self.max_object_bytes);
            record.request_object_truncated = record.request_object.is_none();
            record.masked_fields = counted;
        }
        *req.body_mut() = http_body_util::Full::new(rewrite.bytes)
            .map_err(|never| match never {})
            .boxed();
        Ok(())
    }
}

/// How a request is bound to what its decision read: `Ok(None)` when it goes as sent (it
/// read no stored object, or the request names its version already), `Ok(Some(_))` with
/// the body to send instead, or the refusal.
pub(super) fn bind_to_read(
    info: &RequestInfo,
    read: &ReadVersion,
    query: Option<&str>,
    content_type: Option<&str>,
    body: SentBody<'_>,
) -> Result<Option<Rewrite>, Box<Status>> {
    let version = match read {
        // Nothing read, or that nothing is stored: no precondition says "must not exist".
        ReadVersion::Nothing | ReadVersion::Absent => return Ok(None),
        ReadVersion::Read(v) => v,
        ReadVersion::Moved { old_object, object } => {
            let rv = |v: &Option<ObjectVersion>| {
                v.as_ref()
                    .map_or("none", |v| v.resource_version.as_str())
                    .to_owned()
            };
            return Err(conflict(
                info,
                &format!(
                    "chaperone: the object changed while the policy read it (resourceVersion \
                     {} as oldObject, {} under the dry run), so no decision covers this \
                     request; send it again",
                    rv(old_object),
                    rv(object)
                ),
            ));
        }
    };
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let bound = match (info.verb, body) {
        (Verb::Patch | Verb::Update | Verb::Delete, SentBody::Unread) => Err(BindError::Shape(
            "its body is larger than the gateway reads".to_owned(),
        )),
        (Verb::Patch, SentBody::Whole(bytes)) if media == "application/json-patch+json" => {
            append_operations(bytes, version).map(Some)
        }
        (Verb::Patch, SentBody::Whole(bytes))
            if matches!(
                media.as_str(),
                "application/merge-patch+json" | "application/strategic-merge-patch+json"
            ) || media.starts_with("application/apply-patch+") =>
        {
            set_in(bytes, "metadata", version)
        }
        (Verb::Patch, _) => Err(BindError::Shape(format!(
            "its patch type {media:?} is not one the gateway can bind"
        ))),
        (Verb::Update, SentBody::Whole(bytes)) => set_in(bytes, "metadata", version),
        (Verb::Delete, SentBody::Whole(bytes)) => set_in(bytes, "preconditions", version),
        (Verb::Delete, SentBody::Empty) => options_of_query(query, version).map(Some),
        (Verb::Update, SentBody::Empty) => Err(BindError::Shape("it has no body".to_owned())),
        _ => return Ok(None),
    };
    match bound {
        Ok(Some(bytes)) => Ok(Some(Rewrite {
            bytes: Bytes::from(bytes),
            content_type: matches!(body, SentBody::Empty).then_some("application/json"),
        })),
        Ok(None) => Ok(None),
        Err(BindError::Names { field, named }) => Err(conflict(
            info,
            &format!(
                "chaperone: this request is for {field} {named}, but the stored object the \
                 policy read has {field} {}: the object has been modified; please apply your \
                 changes to the latest version and try again",
                match field {
                    "uid" => &version.uid,
                    _ => &version.resource_version,
                }
            ),
        )),
        Err(BindError::Shape(what)) => Err(Box::new(Status::bad_request(format!(
            "chaperone: a policy rule read the stored object at resourceVersion {}, so this \
             request is sent bound to that version; {what}, which cannot carry that \
             precondition",
            version.resource_version
        )))),
    }
}

/// The precondition fields and their values (`uid` only when the read object had one).
fn fields(version: &ObjectVersion) -> impl Iterator<Item = (&'static str, &str)> {
    [
        ("resourceVersion", version.resource_version.as_str()),
        ("uid", version.uid.as_str()),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_empty())
}

/// The most operations the API server takes in one JSON patch (`maxJSONPatchOperations`
/// in its patch handler); more are refused with 413.
const MAX_JSON_PATCH_OPERATIONS: usize = 10_000;

/// A JSON patch with operations setting the version read appended, as text. Operations of
/// its own that set the version or uid must set the ones read (they would otherwise be a
/// precondition the appended ones override).
fn append_operations(bytes: &[u8], version: &ObjectVersion) -> Result<Vec<u8>, BindError> {
    let shape = || BindError::Shape("its JSON patch is not a list of operations".to_owned());
    let sent: Vec<Value> = serde_json::from_slice(bytes).map_err(|_| shape())?;
    let added = fields(version).count();
    if sent.len() + added > MAX_JSON_PATCH_OPERATIONS {
        return Err(BindError::Shape(format!(
            "its JSON patch has {} operations, and with the {added} the binding adds it would \
             pass the API server's limit of {MAX_JSON_PATCH_OPERATIONS}",
            sent.len()
        )));
    }
    for op in &sent {
        for (field, want) in fields(version) {
            let path = op.get("path").and_then(Value::as_str);
            if path == Some(&format!("/metadata/{field}"))
                && let Some(value) = op.get("value")
                && value.as_str() != Some(want)
            {
                return Err(BindError::Names {
                    field,
                    named: value
                        .as_str()
                        .map_or_else(|| value.to_string(), str::to_owned),
                });
            }
        }
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| shape())?
        .trim_matches(|c| matches!(c, ' ' | '\t' | '\r' | '\n'));
    let inner = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .ok_or_else(shape)?;
    // An empty list's inner text is whitespace only (it parsed as JSON).
    let ops: Vec<String> = fields(version)
        .map(|(field, value)| {
            json!({"op": "add", "path": format!("/metadata/{field}"), "value": value}).to_string()
        })
        .collect();
    let ops = ops.join(",");
    Ok(if sent.is_empty() {
        format!("[{ops}]")
    } else {
        format!("[{inner},{ops}]")
    }
    .into_bytes())
}

/// An object's members with their values as sent.
type RawObject = BTreeMap<String, Box<RawValue>>;

/// Sets the precondition fields under `key` of a JSON object, keeping every other value's
/// text; `None` when the body names the version read already.
fn set_in(
    bytes: &[u8],
    key: &'static str,
    version: &ObjectVersion,
) -> Result<Option<Vec<u8>>, BindError> {
    let mut body: RawObject = serde_json::from_slice(bytes)
        .map_err(|_| BindError::Shape("its body is not a JSON object".to_owned()))?;
    let mut inner: RawObject = match body.get(key).map(|raw| raw.get()) {
        None | Some("null") => RawObject::new(),
        Some(raw) => serde_json::from_str(raw)
            .map_err(|_| BindError::Shape(format!("its `{key}` is not an object")))?,
    };
    let mut changed = false;
    for (field, want) in fields(version) {
        let named = match inner.get(field).map(|raw| raw.get()) {
            None | Some("null") => None,
            Some(raw) => match serde_json::from_str::<String>(raw) {
                Ok(named) if named.is_empty() => None,
                Ok(named) => Some(named),
                Err(_) => {
                    return Err(BindError::Shape(format!(
                        "its `{key}.{field}` is not a string"
                    )));
                }
            },
        };
        match named {
            Some(named) if named == want => {}
            Some(named) => return Err(BindError::Names { field, named }),
            None => {
                inner.insert(field.to_owned(), raw(&want)?);
                changed = true;
            }
        }
    }
    if !changed {
        return Ok(None);
    }
    body.insert(key.to_owned(), raw(&inner)?);
    serde_json::to_vec(&body)
        .map(Some)
        .map_err(|e| BindError::Shape(format!("its body could not be written again: {e}")))
}

fn raw(value: &impl serde::Serialize) -> Result<Box<RawValue>, BindError> {
    serde_json::value::to_raw_value(value)
        .map_err(|e| BindError::Shape(format!("its body could not be written again: {e}")))
}

/// DeleteOptions for a delete that had no body: the options its query gave (the API
/// server reads the query only when there is no body), and the precondition.
fn options_of_query(query: Option<&str>, version: &ObjectVersion) -> Result<Vec<u8>, BindError> {
    let query = query.unwrap_or("");
    let mut options = serde_json::Map::new();
    options.insert("apiVersion".into(), "meta.k8s.io/v1".into());
    options.insert("kind".into(), "DeleteOptions".into());
    let dry_run = request::query_values(query, "dryRun");
    if !dry_run.is_empty() {
        options.insert("dryRun".into(), json!(dry_run));
    }
    if let Some(v) = request::first_query_value(query, "gracePeriodSeconds") {
        let seconds: i64 = v.parse().map_err(|_| {
            BindError::Shape(format!(
                "its gracePeriodSeconds {v:?} is not a whole number"
            ))
        })?;
        options.insert("gracePeriodSeconds".into(), seconds.into());
    }
    if let Some(v) = request::first_query_value(query, "propagationPolicy") {
        options.insert("propagationPolicy".into(), v.as_ref().into());
    }
    for flag in [
        "orphanDependents",
        "ignoreStoreReadErrorWithClusterBreakingPotential",
    ] {
        if let Some(v) = request::first_query_value(query, flag) {
            options.insert(flag.into(), request::parse_go_bool(&v).into());
        }
    }
    let preconditions: serde_json::Map<String, Value> = fields(version)
        .map(|(field, value)| (field.to_owned(), Value::from(value)))
        .collect();
    options.insert("preconditions".into(), preconditions.into());
    serde_json::to_vec(&options).map_err(|e| BindError::Shape(e.to_string()))
}

fn conflict(info: &RequestInfo, why: &str) -> Box<Status> {
    Box::new(if info.is_resource_request {
        Status::conflict(&info.api_group, &info.resource, &info.name, why)
    } else {
        Status::failure(StatusCode::CONFLICT, "Conflict", why.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use http::{Method, Uri};

    use super::*;

    fn info(method: &str, path: &str) -> RequestInfo {
        let uri: Uri = path.parse().expect("uri");
        RequestInfo::parse(
            &Method::from_bytes(method.as_bytes()).expect("method"),
            &uri,
        )
        .expect("request info")
    }

    fn at(rv: &str, uid: &str) -> ReadVersion {
        ReadVersion::Read(ObjectVersion {
            resource_version: rv.to_owned(),
            uid: uid.to_owned(),
        })
    }

    const POD: &str = "/api/v1/namespaces/d/pods/p";

    /// The body bound to `read`, as JSON, or the refusal's code and message.
    fn bound(
        method: &str,
        read: &ReadVersion,
        query: Option<&str>,
        content_type: Option<&str>,
        body: SentBody<'_>,
    ) -> Result<Option<Value>, (StatusCode, String)> {
        bind_to_read(&info(method, POD), read, query, content_type, body)
            .map(|r| r.map(|r| serde_json::from_slice(&r.bytes).expect("JSON")))
            .map_err(|s| (s.code(), s.message().to_owned()))
    }

    #[test]
    fn patches_carry_the_version_and_uid_read() {
        // A JSON patch ends by setting both, whatever its operations did to them.
        let ops = br#"[{"op": "replace", "path": "/spec/containers/0/image", "value": "x"}]"#;
        assert_eq!(
            bound(
                "PATCH",
                &at("41", "u-1"),
                None,
                Some("application/json-patch+json"),
                SentBody::Whole(ops)
            ),
            Ok(Some(json!([
                {"op": "replace", "path": "/spec/containers/0/image", "value": "x"},
                {"op": "add", "path": "/metadata/resourceVersion", "value": "41"},
                {"op": "add", "path": "/metadata/uid", "value": "u-1"},
            ])))
        );
        assert_eq!(
            bound(
                "PATCH",
                &at("41", ""),
                None,
                Some("application/json-patch+json"),
                SentBody::Whole(b" [ ] ")
            ),
            Ok(Some(
                json!([{"op": "add", "path": "/metadata/resourceVersion", "value": "41"}])
            ))
        );
        // Its own operation setting another version is a conflict, not overridden.
        let own = br#"[{"op": "replace", "path": "/metadata/resourceVersion", "value": "40"}]"#;
        let (code, message) = bound(
            "PATCH",
            &at("41", "u-1"),
            None,
            Some("application/json-patch+json"),
            SentBody::Whole(own),
        )
        .expect_err("conflict");
        assert_eq!(code, StatusCode::CONFLICT, "{message}");
        // The appended operations may not take a patch past the API server's limit, whose
        // refusal would not say why.
        let op = r#"{"op": "add", "path": "/metadata/labels/a", "value": "b"}"#;
        for (count, fits) in [(9_998, true), (9_999, false)] {
            let many = format!("[{}]", vec![op; count].join(","));
            let result = bound(
                "PATCH",
                &at("41", "u-1"),
                None,
                Some("application/json-patch+json"),
                SentBody::Whole(many.as_bytes()),
            );
            match result {
                Ok(Some(Value::Array(ops))) if fits => assert_eq!(ops.len(), 10_000),
                Err((code, message)) if !fits => {
                    assert_eq!(code, StatusCode::BAD_REQUEST, "{message}");
                    assert!(message.contains("limit of 10000"), "{message}");
                }
                other => panic!("{count} operations: {other:?}"),
            }
        }
        // Merge, strategic and apply patches name them in their metadata.
        for media in [
            "application/merge-patch+json",
            "application/strategic-merge-patch+json; charset=utf-8",
            "application/apply-patch+yaml",
        ] {
            let sent = br#"{"metadata": {"labels": {"a": "b"}}, "spec": {"replicas": 3}}"#;
            assert_eq!(
                bound(
                    "PATCH",
                    &at("41", "u-1"),
                    None,
                    Some(media),
                    SentBody::Whole(sent)
                ),
                Ok(Some(json!({
                    "metadata": {"labels": {"a": "b"}, "resourceVersion": "41", "uid": "u-1"},
                    "spec": {"replicas": 3}
                }))),
                "{media}"
            );
            assert_eq!(
                bound(
                    "PATCH",
                    &at("41", "u-1"),
                    None,
                    Some(media),
                    SentBody::Whole(br#"{"spec": {}, "metadata": null}"#)
                ),
                Ok(Some(
                    json!({"spec": {}, "metadata": {"resourceVersion": "41", "uid": "u-1"}})
                ))
            );
        }
        // One that names what was read goes as sent; another version or uid is a conflict.
        let merge = Some("application/merge-patch+json");
        let named = br#"{"metadata": {"resourceVersion": "41", "uid": "u-1"}}"#;
        assert_eq!(
            bound(
                "PATCH",
                &at("41", "u-1"),
                None,
                merge,
                SentBody::Whole(named)
            ),
            Ok(None)
        );
        let (code, _) = bound(
            "PATCH",
            &at("41", "u-1"),
            None,
            merge,
            SentBody::Whole(br#"{"metadata": {"resourceVersion": 41}}"#),
        )
        .expect_err("not a string");
        assert_eq!(code, StatusCode::BAD_REQUEST);
        for stale in [
            &br#"{"metadata": {"resourceVersion": "40"}}"#[..],
            br#"{"metadata": {"uid": "u-0"}}"#,
        ] {
            let (code, message) = bound(
                "PATCH",
                &at("41", "u-1"),
                None,
                merge,
                SentBody::Whole(stale),
            )
            .expect_err("conflict");
            assert_eq!(code, StatusCode::CONFLICT, "{message}");
            assert!(message.contains("has been modified"), "{message}");
        }
    }

    #[test]
    fn every_other_value_keeps_the_text_the_dry_run_judged() {
        // serde_json's Value would turn the first into a float and drop the last digits.
        let sent = br#"{"data": {"big": 123456789012345678901234567890, "f": 1.10, "e": 1e3}}"#;
        let rewrite = bind_to_read(
            &info("PATCH", POD),
            &at("9", ""),
            None,
            Some("application/merge-patch+json"),
            SentBody::Whole(sent),
        )
        .expect("bound")
        .expect("rewritten");
        let text = String::from_utf8(rewrite.bytes.to_vec()).expect("utf-8");
        for kept in ["123456789012345678901234567890", "1.10", "1e3"] {
            assert!(text.contains(kept), "{kept} not kept in {text}");
        }
        assert!(text.contains(r#""resourceVersion":"9""#), "{text}");
    }

    #[test]
    fn updates_and_deletes_carry_the_version_read() {
        let put = Some("application/json");
        assert_eq!(
            bound(
                "PUT",
                &at("7", "u"),
                None,
                put,
                SentBody::Whole(br#"{"kind": "Pod", "metadata": {"name": "p"}}"#)
            ),
            Ok(Some(
                json!({"kind": "Pod", "metadata": {"name": "p", "resourceVersion": "7", "uid": "u"}})
            ))
        );
        let stale = br#"{"kind": "Pod", "metadata": {"name": "p", "resourceVersion": "6"}}"#;
        assert_eq!(
            bound("PUT", &at("7", "u"), None, put, SentBody::Whole(stale)).map_err(|e| e.0),
            Err(StatusCode::CONFLICT)
        );

        // No body: DeleteOptions of the gateway's own, with the options of the query
        // (which the API server stops reading once there is a body).
        let rewrite = bind_to_read(
            &info("DELETE", POD),
            &at("7", "u"),
            Some("dryRun=All&propagationPolicy=Orphan&gracePeriodSeconds=0&pretty=true&orphanDependents=0"),
            None,
            SentBody::Empty,
        )
        .expect("bound")
        .expect("rewritten");
        assert_eq!(rewrite.content_type, Some("application/json"));
        assert_eq!(
            serde_json::from_slice::<Value>(&rewrite.bytes).expect("JSON"),
            json!({
                "apiVersion": "meta.k8s.io/v1", "kind": "DeleteOptions", "dryRun": ["All"],
                "propagationPolicy": "Orphan", "gracePeriodSeconds": 0,
                "orphanDependents": false,
                "preconditions": {"resourceVersion": "7", "uid": "u"},
            })
        );
        assert_eq!(
            bound("DELETE", &at("7", ""), None, None, SentBody::Empty),
            Ok(Some(json!({
                "apiVersion": "meta.k8s.io/v1", "kind": "DeleteOptions",
                "preconditions": {"resourceVersion": "7"},
            })))
        );
        let (code, message) = bound(
            "DELETE",
            &at("7", ""),
            Some("gracePeriodSeconds=soon"),
            None,
            SentBody::Empty,
        )
        .expect_err("not a number");
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(message.contains("gracePeriodSeconds"), "{message}");
        // kubectl's DeleteOptions keep what they say and gain the precondition.
        let options = br#"{"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background", "preconditions": {"uid": "u"}}"#;
        assert_eq!(
            bound("DELETE", &at("7", "u"), None, put, SentBody::Whole(options)),
            Ok(Some(json!({
                "kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background",
                "preconditions": {"uid": "u", "resourceVersion": "7"},
            })))
        );
        let stale = br#"{"preconditions": {"resourceVersion": "5"}}"#;
        assert_eq!(
            bound("DELETE", &at("7", ""), None, put, SentBody::Whole(stale)).map_err(|e| e.0),
            Err(StatusCode::CONFLICT)
        );
    }

    #[test]
    fn what_cannot_carry_the_version_is_refused() {
        for (media, sent) in [
            ("application/json-patch+json", &br#"{"op": "add"}"#[..]),
            ("application/merge-patch+json", br#"["x"]"#),
            ("application/merge-patch+json", br#"{"metadata": "x"}"#),
            ("application/merge-patch+json", b"not json"),
            ("application/apply-patch+cbor", b"\xa1"),
            ("text/plain", b"{}"),
        ] {
            let (code, message) = bound(
                "PATCH",
                &at("3", ""),
                None,
                Some(media),
                SentBody::Whole(sent),
            )
            .expect_err("refused");
            assert_eq!(code, StatusCode::BAD_REQUEST, "{media}: {message}");
            assert!(message.contains("resourceVersion 3"), "{message}");
        }
        for method in ["PATCH", "PUT", "DELETE"] {
            let refused = bound(method, &at("3", ""), None, None, SentBody::Unread);
            assert_eq!(
                refused.map_err(|e| e.0),
                Err(StatusCode::BAD_REQUEST),
                "{method}"
            );
        }
        // Decisions that mixed two versions cover nothing.
        let v = |rv: &str| ObjectVersion {
            resource_version: rv.into(),
            uid: String::new(),
        };
        let moved = ReadVersion::Moved {
            old_object: Some(v("3")),
            object: None,
        };
        assert_eq!(
            bound("PATCH", &moved, None, None, SentBody::Empty).map_err(|e| e.0),
            Err(StatusCode::CONFLICT)
        );
        // Nothing read, nothing bound; nor are creates.
        assert_eq!(
            bound("PATCH", &ReadVersion::Nothing, None, None, SentBody::Unread),
            Ok(None)
        );
        assert_eq!(
            bind_to_read(
                &info("POST", "/api/v1/namespaces/d/pods"),
                &at("3", ""),
                None,
                None,
                SentBody::Empty
            ),
            Ok(None)
        );
    }
}
