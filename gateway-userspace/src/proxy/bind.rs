//! Binds a write to the version of the stored object its decision read.
//!
//! A content condition judges a version of the stored object: the one a patch's dry run
//! was applied to, or the one read as `oldObject`. The API server applies the real request
//! moments later to whatever is stored then, so a write landing in between (another
//! client's, or the agent's own second request) would have the API server apply a change
//! to an object nobody judged: a JSON patch's `/spec/containers/0` naming another
//! container, a delete removing an object that turned protected. Admission control never
//! has this gap because it runs inside the API server's own transaction; the gateway
//! closes it with the API server's own preconditions, so such a request is answered 409
//! Conflict, as any client with a stale view is:
//!
//! * a JSON patch gets a last operation setting `/metadata/resourceVersion`;
//! * a merge, strategic-merge or apply patch, and an update, carry
//!   `metadata.resourceVersion`;
//! * a delete carries `DeleteOptions.preconditions.resourceVersion`.
//!
//! A request that already names the version is forwarded as sent. One that names another
//! version is refused with 409 (the API server would refuse it too, or apply it to a
//! version the policy did not read). Bodies that cannot carry the precondition are refused.

use http::StatusCode;
use serde_json::{Map, Value, json};

use crate::{
    request::{RequestInfo, Verb},
    status::Status,
};

use super::{body::Inspected, content::ReadVersion};

/// The body to forward in place of the client's, bound to the version read.
#[derive(Debug, PartialEq)]
pub(super) struct Rewrite {
    /// The JSON object (or JSON patch) to send.
    pub(super) object: Value,
    /// The `Content-Type` to set, when the request had no body before.
    pub(super) content_type: Option<&'static str>,
}

/// How a request is bound to `read`: `Ok(None)` when it goes as sent (it reads no stored
/// object, or already names the version), `Ok(Some(_))` with the body to send instead, or
/// the refusal.
pub(super) fn to_read_version(
    info: &RequestInfo,
    read: &ReadVersion,
    content_type: Option<&str>,
    inspected: Option<&Inspected>,
) -> Result<Option<Rewrite>, Box<Status>> {
    let version = match read {
        ReadVersion::Nothing => return Ok(None),
        ReadVersion::Version(v) => v.as_str(),
        ReadVersion::Moved { old_object, object } => {
            return Err(conflict(
                info,
                &format!(
                    "chaperone: the object changed while the policy read it (resourceVersion \
                     {old_object} as oldObject, {object} under the dry run), so no decision \
                     covers this request; send it again"
                ),
            ));
        }
    };
    let object = inspected.and_then(|i| i.object.as_ref());
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let unbindable = |what: &str| {
        Box::new(Status::bad_request(format!(
            "chaperone: a policy rule read the stored object at resourceVersion {version}, so \
             this request is sent bound to that version; {what}, which cannot carry that \
             precondition"
        )))
    };
    match info.verb {
        Verb::Patch if media == "application/json-patch+json" => match object {
            Some(Value::Array(ops)) => {
                let mut ops = ops.clone();
                ops.push(
                    json!({"op": "add", "path": "/metadata/resourceVersion", "value": version}),
                );
                Ok(Some(Rewrite {
                    object: Value::Array(ops),
                    content_type: None,
                }))
            }
            _ => Err(unbindable(
                "its JSON patch was not read as a list of operations",
            )),
        },
        Verb::Patch
            if matches!(
                media.as_str(),
                "application/merge-patch+json" | "application/strategic-merge-patch+json"
            ) || media.starts_with("application/apply-patch+") =>
        {
            match object {
                Some(Value::Object(patch)) => in_object(patch, "metadata", version)
                    .map_err(|e| e.status(info, version, &unbindable)),
                _ => Err(unbindable("its patch was not read as a JSON object")),
            }
        }
        Verb::Patch => Err(unbindable(&format!(
            "its patch type {media:?} is not one the gateway binds"
        ))),
        Verb::Update => match object {
            Some(Value::Object(new)) => in_object(new, "metadata", version)
                .map_err(|e| e.status(info, version, &unbindable)),
            _ => Err(unbindable("its body was not read as a JSON object")),
        },
        Verb::Delete => match (object, inspected.and_then(|i| i.whole_len)) {
            (Some(Value::Object(options)), _) => in_object(options, "preconditions", version)
                .map_err(|e| e.status(info, version, &unbindable)),
            // No body: DeleteOptions of its own.
            (None, Some(0)) => Ok(Some(Rewrite {
                object: json!({
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "preconditions": {"resourceVersion": version},
                }),
                content_type: Some("application/json"),
            })),
            _ => Err(unbindable(
                "its DeleteOptions were not read as a JSON object",
            )),
        },
        _ => Ok(None),
    }
}

/// Why `resourceVersion` could not be set under a key of the body.
enum Unset {
    /// The body names another version.
    Names(String),
    /// The key holds something other than an object.
    NotAnObject(&'static str),
}

impl Unset {
    fn status(
        self,
        info: &RequestInfo,
        version: &str,
        unbindable: &dyn Fn(&str) -> Box<Status>,
    ) -> Box<Status> {
        match self {
            Unset::Names(named) => conflict(
                info,
                &format!(
                    "chaperone: this request is for resourceVersion {named}, but the stored \
                     object the policy read is at {version}: the object has been modified; \
                     please apply your changes to the latest version and try again"
                ),
            ),
            Unset::NotAnObject(key) => unbindable(&format!("its `{key}` is not an object")),
        }
    }
}

/// Sets `<key>.resourceVersion` in `body` when it names none; `None` when it names
/// `version` already.
fn in_object(
    body: &Map<String, Value>,
    key: &'static str,
    version: &str,
) -> Result<Option<Rewrite>, Unset> {
    match body.get(key) {
        None | Some(Value::Null) => {}
        Some(Value::Object(inner)) => match inner.get("resourceVersion") {
            None | Some(Value::Null) => {}
            Some(Value::String(named)) if named.is_empty() => {}
            Some(Value::String(named)) if named == version => return Ok(None),
            Some(other) => {
                return Err(Unset::Names(match other {
                    Value::String(s) => s.clone(),
                    v => v.to_string(),
                }));
            }
        },
        Some(_) => return Err(Unset::NotAnObject(key)),
    }
    let mut body = body.clone();
    let inner = body
        .entry(key)
        .and_modify(|v| {
            if v.is_null() {
                *v = Value::Object(Map::new());
            }
        })
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(inner) = inner {
        inner.insert("resourceVersion".to_owned(), Value::from(version));
    }
    Ok(Some(Rewrite {
        object: Value::Object(body),
        content_type: None,
    }))
}

fn conflict(info: &RequestInfo, why: &str) -> Box<Status> {
    Box::new(if info.is_resource_request {
        Status::conflict(
            &info.api_group,
            &info.resource_with_subresource(),
            &info.name,
            why,
        )
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

    fn body(object: Option<Value>) -> Inspected {
        let len = object.as_ref().map_or(0, |o| o.to_string().len() as u64);
        Inspected {
            object,
            whole_len: Some(len),
            ..Inspected::default()
        }
    }

    fn at(rv: &str) -> ReadVersion {
        ReadVersion::Version(rv.to_owned())
    }

    const POD: &str = "/api/v1/namespaces/d/pods/p";

    #[test]
    fn patches_carry_the_version_read() {
        let patch = info("PATCH", POD);
        // A JSON patch ends by setting the version, whatever its operations did to it.
        let ops = json!([{"op": "replace", "path": "/spec/containers/0/image", "value": "x"}]);
        let bound = to_read_version(
            &patch,
            &at("41"),
            Some("application/json-patch+json"),
            Some(&body(Some(ops))),
        )
        .expect("bound")
        .expect("rewritten");
        assert_eq!(
            bound.object,
            json!([
                {"op": "replace", "path": "/spec/containers/0/image", "value": "x"},
                {"op": "add", "path": "/metadata/resourceVersion", "value": "41"},
            ])
        );
        assert_eq!(bound.content_type, None);
        // Merge, strategic and apply patches name it in their metadata.
        for media in [
            "application/merge-patch+json",
            "application/strategic-merge-patch+json; charset=utf-8",
            "application/apply-patch+yaml",
        ] {
            let sent = json!({"metadata": {"labels": {"a": "b"}}, "spec": {"replicas": 3}});
            let bound = to_read_version(&patch, &at("41"), Some(media), Some(&body(Some(sent))))
                .expect("bound")
                .expect("rewritten");
            assert_eq!(
                bound.object,
                json!({"metadata": {"labels": {"a": "b"}, "resourceVersion": "41"}, "spec": {"replicas": 3}}),
                "{media}"
            );
            let bare = to_read_version(
                &patch,
                &at("41"),
                Some(media),
                Some(&body(Some(json!({"spec": {}})))),
            )
            .expect("bound")
            .expect("rewritten");
            assert_eq!(
                bare.object,
                json!({"spec": {}, "metadata": {"resourceVersion": "41"}})
            );
        }
        // One that names the version read goes as sent; another version is a conflict.
        let named = json!({"metadata": {"resourceVersion": "41"}});
        assert_eq!(
            to_read_version(
                &patch,
                &at("41"),
                Some("application/merge-patch+json"),
                Some(&body(Some(named)))
            ),
            Ok(None)
        );
        let stale = json!({"metadata": {"resourceVersion": "40"}});
        let err = to_read_version(
            &patch,
            &at("41"),
            Some("application/merge-patch+json"),
            Some(&body(Some(stale))),
        )
        .expect_err("conflict");
        assert_eq!(err.code(), StatusCode::CONFLICT);
        assert!(
            err.message().contains("resourceVersion 40") && err.message().contains("at 41"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn updates_and_deletes_carry_the_version_read() {
        let update = info("PUT", POD);
        let bound = to_read_version(
            &update,
            &at("7"),
            Some("application/json"),
            Some(&body(Some(
                json!({"kind": "Pod", "metadata": {"name": "p"}}),
            ))),
        )
        .expect("bound")
        .expect("rewritten");
        assert_eq!(
            bound.object,
            json!({"kind": "Pod", "metadata": {"name": "p", "resourceVersion": "7"}})
        );
        let stale = json!({"kind": "Pod", "metadata": {"name": "p", "resourceVersion": "6"}});
        assert_eq!(
            to_read_version(&update, &at("7"), None, Some(&body(Some(stale))))
                .expect_err("conflict")
                .code(),
            StatusCode::CONFLICT
        );

        let delete = info("DELETE", POD);
        // No body: DeleteOptions of the gateway's own.
        let bound = to_read_version(&delete, &at("7"), None, Some(&body(None)))
            .expect("bound")
            .expect("rewritten");
        assert_eq!(
            bound.object,
            json!({"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"resourceVersion": "7"}})
        );
        assert_eq!(bound.content_type, Some("application/json"));
        // kubectl's DeleteOptions keep what they say and gain the precondition.
        let options = json!({"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background", "preconditions": {"uid": "u"}});
        let bound = to_read_version(&delete, &at("7"), None, Some(&body(Some(options))))
            .expect("bound")
            .expect("rewritten");
        assert_eq!(
            bound.object,
            json!({"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background", "preconditions": {"uid": "u", "resourceVersion": "7"}})
        );
        let stale = json!({"preconditions": {"resourceVersion": "5"}});
        assert_eq!(
            to_read_version(&delete, &at("7"), None, Some(&body(Some(stale))))
                .expect_err("conflict")
                .code(),
            StatusCode::CONFLICT
        );
    }

    #[test]
    fn what_cannot_carry_the_version_is_refused() {
        let patch = info("PATCH", POD);
        for (media, sent) in [
            ("application/json-patch+json", Some(json!({"op": "add"}))),
            ("application/merge-patch+json", Some(json!(["x"]))),
            (
                "application/merge-patch+json",
                Some(json!({"metadata": "x"})),
            ),
            ("application/merge-patch+json", None),
            ("application/apply-patch+cbor", None),
            ("text/plain", Some(json!({}))),
        ] {
            let err = to_read_version(&patch, &at("3"), Some(media), Some(&body(sent.clone())))
                .expect_err("refused");
            assert_eq!(err.code(), StatusCode::BAD_REQUEST, "{media} {sent:?}");
            assert!(
                err.message().contains("resourceVersion 3"),
                "{}",
                err.message()
            );
        }
        // A delete whose body was not read (too large, or not JSON).
        let truncated = Inspected {
            truncated: true,
            ..Inspected::default()
        };
        let delete = info("DELETE", POD);
        assert!(to_read_version(&delete, &at("3"), None, Some(&truncated)).is_err());
        // Decisions that mixed two versions cover nothing.
        let moved = ReadVersion::Moved {
            old_object: "3".into(),
            object: "4".into(),
        };
        let err = to_read_version(&patch, &moved, None, None).expect_err("moved");
        assert_eq!(err.code(), StatusCode::CONFLICT);
        // Nothing read, nothing bound; nor are creates and reads.
        assert_eq!(
            to_read_version(&patch, &ReadVersion::Nothing, None, None),
            Ok(None)
        );
        assert_eq!(
            to_read_version(
                &info("POST", "/api/v1/namespaces/d/pods"),
                &at("3"),
                None,
                None
            ),
            Ok(None)
        );
    }
}
