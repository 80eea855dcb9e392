//! Masking of values that must never reach a recording.
//!
//! Applied to every object before it is recorded: Secret `data` and `stringData` values
//! (also in patches to secrets, whose shape is the patch's), and the
//! `kubectl.kubernetes.io/last-applied-configuration` annotation, which repeats a whole
//! object (a Secret's data included) as a string. Keys stay, so an analyst still sees which
//! entries a request touched; values are replaced by [`MASK`].

use std::sync::LazyLock;

use memchr::memmem;
use serde_json::Value;

pub mod detect;
pub mod objects;
#[cfg(test)]
mod objects_tests;
pub mod stream;
mod tree;

/// What a masked value is replaced with.
pub const MASK: &str = "**masked**";

/// The annotation `kubectl apply` stores the applied object in.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Whether [`mask_for_recording`] could replace anything in the JSON text `raw` (a request
/// for `resource`): `false` only when it certainly would not, so the text can be recorded
/// as it is without being parsed. Conservative: a request to `secrets`, any `"Secret"`, the
/// last-applied annotation's name, or a `\u` escape (which could spell either) anywhere in
/// the text says `true`.
pub fn recording_may_mask(resource: &str, raw: &[u8]) -> bool {
    // Searchers built once: building one per call was 40% of the check (160 -> 95 ns on a
    // 1.7 KB pod; one Aho-Corasick pass over the three needles took 700 ns).
    static NEEDLES: LazyLock<[memmem::Finder<'static>; 3]> = LazyLock::new(|| {
        [
            memmem::Finder::new(b"\\u"),
            memmem::Finder::new(b"\"Secret\""),
            memmem::Finder::new(b"last-applied-configuration"),
        ]
    });
    resource == "secrets" || NEEDLES.iter().any(|n| n.find(raw).is_some())
}

/// Masks `object` in place for recording; `resource` is the request's resource (so a
/// patch to `secrets`, which has no `kind`, is recognised). Returns how many values were
/// replaced.
pub fn mask_for_recording(resource: &str, object: &mut Value) -> u32 {
    let mut masked = 0;
    match object {
        // A JSON patch: every value an operation writes into a Secret is secret.
        Value::Array(ops) if resource == "secrets" => {
            for op in ops {
                if let Some(v) = op.get_mut("value") {
                    masked += replace_leaves(v);
                }
            }
        }
        Value::Object(map) => {
            if let Some(Value::Array(items)) = map.get_mut("items") {
                for item in items {
                    masked += mask_for_recording(resource, item);
                }
            }
            // A Table (kubectl get) may carry each row's whole object.
            if let Some(Value::Array(rows)) = map.get_mut("rows") {
                for row in rows {
                    if let Some(object) = row.get_mut("object") {
                        masked += mask_for_recording(resource, object);
                    }
                }
            }
            let is_secret =
                resource == "secrets" || map.get("kind").and_then(Value::as_str) == Some("Secret");
            if is_secret {
                for key in ["data", "stringData"] {
                    if let Some(v) = map.get_mut(key) {
                        masked += replace_leaves(v);
                    }
                }
            }
            if let Some(v) = map
                .get_mut("metadata")
                .and_then(|m| m.get_mut("annotations"))
                .and_then(|a| a.get_mut(LAST_APPLIED))
                .filter(|v| !v.is_null())
            {
                *v = Value::String(MASK.to_owned());
                masked += 1;
            }
        }
        _ => {}
    }
    masked
}

/// Replaces every scalar under `v` (the values of a data map; a whole value in a patch).
fn replace_leaves(v: &mut Value) -> u32 {
    match v {
        Value::Object(map) => map.values_mut().map(replace_leaves).sum(),
        Value::Array(items) => items.iter_mut().map(replace_leaves).sum(),
        // `null` deletes a key in a merge patch; there is nothing secret in it.
        Value::Null => 0,
        other => {
            *other = Value::String(MASK.to_owned());
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The shortcut is taken only where masking would change nothing, and every case that
    /// masks (or could, through an escape) takes the parse.
    #[test]
    fn recording_may_mask_is_false_only_where_masking_changes_nothing() {
        let cases: [(&str, &str, bool); 8] = [
            (
                "pods",
                r#"{"kind":"Pod","metadata":{"name":"web-0"},"spec":{}}"#,
                false,
            ),
            (
                "configmaps",
                r#"{"kind":"ConfigMap","data":{"mode":"fast"}}"#,
                false,
            ),
            ("secrets", r#"{"data":{"password":"eA=="}}"#, true),
            (
                "",
                r#"{"kind":"List","items":[{"kind":"Secret","data":{"k":"dg=="}}]}"#,
                true,
            ),
            (
                "configmaps",
                r#"{"metadata":{"annotations":{"kubectl.kubernetes.io/last-applied-configuration":"{}"}}}"#,
                true,
            ),
            ("", r#"{"kind":"\u0053ecret","data":{"k":"dg=="}}"#, true),
            (
                "pods",
                r#"{"metadata":{"name":"a \"quoted\" name"}}"#,
                false,
            ),
            // A Table's rows carry whole objects.
            (
                "",
                r#"{"kind":"Table","rows":[{"object":{"kind":"Secret","data":{}}}]}"#,
                true,
            ),
        ];
        for (resource, raw, want) in cases {
            assert_eq!(recording_may_mask(resource, raw.as_bytes()), want, "{raw}");
            if !want {
                let mut object: Value = serde_json::from_str(raw).expect("JSON");
                let before = object.clone();
                assert_eq!(mask_for_recording(resource, &mut object), 0, "{raw}");
                assert_eq!(object, before, "{raw}");
            }
        }
    }

    #[test]
    fn masks_secret_values_and_last_applied_everywhere_they_occur() {
        let cases = [
            (
                "secret create",
                "secrets",
                json!({"kind": "Secret", "metadata": {"name": "db"},
                       "data": {"password": "aHVudGVyMg=="}, "stringData": {"user": "admin"}, "type": "Opaque"}),
                json!({"kind": "Secret", "metadata": {"name": "db"},
                       "data": {"password": MASK}, "stringData": {"user": MASK}, "type": "Opaque"}),
                2,
            ),
            (
                "merge patch to a secret (no kind), deleting one key",
                "secrets",
                json!({"data": {"password": "eA==", "old": null}}),
                json!({"data": {"password": MASK, "old": null}}),
                1,
            ),
            (
                "json patch to a secret",
                "secrets",
                json!([{"op": "replace", "path": "/data/password", "value": "eA=="},
                       {"op": "add", "path": "/data", "value": {"a": "b", "c": "d"}},
                       {"op": "remove", "path": "/data/x"}]),
                json!([{"op": "replace", "path": "/data/password", "value": MASK},
                       {"op": "add", "path": "/data", "value": {"a": MASK, "c": MASK}},
                       {"op": "remove", "path": "/data/x"}]),
                3,
            ),
            (
                "configmap data is not secret, but last-applied is masked",
                "configmaps",
                json!({"kind": "ConfigMap", "data": {"mode": "fast"},
                       "metadata": {"annotations": {LAST_APPLIED: "{\"data\":{}}", "team": "x"}}}),
                json!({"kind": "ConfigMap", "data": {"mode": "fast"},
                       "metadata": {"annotations": {LAST_APPLIED: MASK, "team": "x"}}}),
                1,
            ),
            (
                "a list of secrets",
                "",
                json!({"kind": "List", "items": [{"kind": "Secret", "data": {"k": "dg=="}}]}),
                json!({"kind": "List", "items": [{"kind": "Secret", "data": {"k": MASK}}]}),
                1,
            ),
            (
                "a table of secrets with whole objects",
                "secrets",
                json!({"kind": "Table", "rows": [{"cells": ["db"], "object": {"data": {"k": "dg=="}}}]}),
                json!({"kind": "Table", "rows": [{"cells": ["db"], "object": {"data": {"k": MASK}}}]}),
                1,
            ),
            (
                "json patch to a configmap keeps its values",
                "configmaps",
                json!([{"op": "add", "path": "/data/a", "value": "b"}]),
                json!([{"op": "add", "path": "/data/a", "value": "b"}]),
                0,
            ),
        ];
        for (name, resource, mut input, want, count) in cases {
            let n = mask_for_recording(resource, &mut input);
            assert_eq!(input, want, "{name}");
            assert_eq!(n, count, "{name}: masked count");
        }
    }
}
