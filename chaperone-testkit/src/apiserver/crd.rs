//! CustomResourceDefinitions: turning a definition into served resources, and what the
//! real server's apiextensions controllers write into a definition's status.
//!
//! Faithful where clients look (names, scope, served versions, the `status` subresource,
//! `additionalPrinterColumns`, the `Established` condition kubectl waits for); simplified
//! on purpose: no schema validation or pruning of custom objects, no conversion between
//! versions (each served version stores its own objects under one key, so all versions
//! see the same objects unconverted), no `scale` subresource for custom resources.

use serde_json::{Value, json};

use super::discovery::{PrinterColumn, ResourceDef};

/// Verbs of every custom resource.
const CUSTOM_VERBS: &[&str] = &[
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "create",
    "update",
    "watch",
];

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_owned().into_boxed_str())
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn strings_at(v: &Value, pointer: &str) -> Result<Vec<&'static str>, String> {
    match v.pointer(pointer) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(leak)
                    .ok_or_else(|| format!("{pointer}: must be a list of strings"))
            })
            .collect(),
        Some(_) => Err(format!("{pointer}: must be a list of strings")),
    }
}

/// A lowercase RFC 1123 label (DNS-1035 for plurals is stricter; this is enough here).
fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The served resources of a definition, one per served version; the message says what is
/// wrong with an invalid one (worded after the API server's validation).
pub(crate) fn parse(crd: &Value) -> Result<Vec<ResourceDef>, String> {
    let group = str_at(crd, "/spec/group");
    let plural = str_at(crd, "/spec/names/plural");
    let kind = str_at(crd, "/spec/names/kind");
    let name = str_at(crd, "/metadata/name");
    if group.is_empty() || !group.contains('.') {
        return Err(format!(
            "spec.group: Invalid value: \"{group}\": should be a domain with at least one dot"
        ));
    }
    if !dns_label(plural) {
        return Err(format!(
            "spec.names.plural: Invalid value: \"{plural}\": a lowercase RFC 1123 label is required"
        ));
    }
    if kind.is_empty() {
        return Err("spec.names.kind: Required value".into());
    }
    if name != format!("{plural}.{group}") {
        return Err(format!(
            "metadata.name: Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
        ));
    }
    let singular = match str_at(crd, "/spec/names/singular") {
        "" => kind.to_ascii_lowercase(),
        s => s.to_owned(),
    };
    let namespaced = match str_at(crd, "/spec/scope") {
        "Namespaced" => true,
        "Cluster" => false,
        other => {
            return Err(format!(
                "spec.scope: Unsupported value: \"{other}\": supported values: \"Cluster\", \"Namespaced\""
            ));
        }
    };
    let short_names: &'static [&'static str] =
        Box::leak(strings_at(crd, "/spec/names/shortNames")?.into_boxed_slice());
    let categories: &'static [&'static str] =
        Box::leak(strings_at(crd, "/spec/names/categories")?.into_boxed_slice());
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .filter(|v| !v.is_empty())
        .ok_or(
            "spec.versions: Invalid value: must have exactly one version marked as storage version",
        )?;
    let storage = versions
        .iter()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .count();
    if storage != 1 {
        return Err(
            "spec.versions: Invalid value: must have exactly one version marked as storage version"
                .into(),
        );
    }
    let (group, plural, kind, singular) = (leak(group), leak(plural), leak(kind), leak(&singular));
    let mut defs = Vec::new();
    for v in versions {
        let version = str_at(v, "/name");
        if !dns_label(version) {
            return Err(format!(
                "spec.versions.name: Invalid value: \"{version}\": a DNS-1035 label is required"
            ));
        }
        if v.get("served").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        let mut columns = Vec::new();
        if let Some(cols) = v.get("additionalPrinterColumns").and_then(Value::as_array) {
            for c in cols {
                let column = PrinterColumn {
                    name: str_at(c, "/name").to_owned(),
                    type_: str_at(c, "/type").to_owned(),
                    json_path: str_at(c, "/jsonPath").to_owned(),
                    priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                    description: str_at(c, "/description").to_owned(),
                };
                if column.name.is_empty() || !column.json_path.starts_with('.') {
                    return Err(format!(
                        "spec.versions[{version}].additionalPrinterColumns: Invalid value: {c}: name and a jsonPath starting with '.' are required"
                    ));
                }
                columns.push(column);
            }
        }
        defs.push(ResourceDef {
            group,
            version: leak(version),
            plural,
            singular,
            kind,
            namespaced,
            short_names,
            categories,
            verbs: CUSTOM_VERBS,
            has_status: v
                .pointer("/subresources/status")
                .is_some_and(Value::is_object),
            has_scale: false,
            custom: true,
            columns: Box::leak(columns.into_boxed_slice()),
        });
    }
    Ok(defs)
}

/// The status the apiextensions controllers give an accepted definition: names accepted,
/// established, its storage version recorded.
pub(crate) fn established_status(crd: &Value, now: &str) -> Value {
    let storage: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .filter_map(|v| v.get("name").cloned())
                .collect()
        })
        .unwrap_or_default();
    let condition = |type_: &str, reason: &str, message: &str| json!({"type": type_, "status": "True", "lastTransitionTime": now, "reason": reason, "message": message});
    json!({
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "acceptedNames": crd.pointer("/spec/names").cloned().unwrap_or_else(|| json!({})),
        "storedVersions": storage,
    })
}

/// The value at a printer column's simple JSONPath (`.status.phase`, `.spec.items[0]`
/// unsupported: dotted names only), as a Table cell.
pub(crate) fn cell(obj: &Value, json_path: &str) -> Value {
    let pointer = json_path
        .trim_start_matches('.')
        .split('.')
        .fold(String::new(), |acc, part| format!("{acc}/{part}"));
    obj.pointer(&pointer).cloned().unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition() -> Value {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.dev"},
            "spec": {
                "group": "example.dev",
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
                "scope": "Namespaced",
                "versions": [
                    {"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
                     "additionalPrinterColumns": [{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}]},
                    {"name": "v0", "served": false, "storage": false},
                ],
            },
        })
    }

    #[test]
    fn served_versions_become_resources() {
        let defs = parse(&definition()).unwrap();
        assert_eq!(defs.len(), 1);
        let d = &defs[0];
        assert_eq!(
            (d.group, d.version, d.plural, d.kind, d.singular),
            ("example.dev", "v1", "widgets", "Widget", "widget")
        );
        assert!(d.namespaced && d.has_status && d.custom && !d.has_scale);
        assert_eq!(d.short_names, ["wd"]);
        assert_eq!(d.columns[0].json_path, ".status.phase");
    }

    #[test]
    fn invalid_definitions_are_refused_with_the_reason() {
        let cases: [(&str, Value, &str); 4] = [
            ("/spec/group", json!("nodot"), "spec.group"),
            ("/metadata/name", json!("wrong"), "metadata.name"),
            ("/spec/scope", json!("Galaxy"), "spec.scope"),
            ("/spec/versions/0/storage", json!(false), "storage version"),
        ];
        for (pointer, value, expected) in cases {
            let mut crd = definition();
            if let Some(slot) = crd.pointer_mut(pointer) {
                *slot = value;
            }
            let err = parse(&crd).unwrap_err();
            assert!(err.contains(expected), "{pointer}: {err}");
        }
    }

    #[test]
    fn status_and_cells() {
        let status = established_status(&definition(), "2026-12-03T20:00:00Z");
        assert_eq!(status["conditions"][1]["type"], "Established");
        assert_eq!(status["storedVersions"], json!(["v1"]));
        let obj = json!({"status": {"phase": "Pending"}});
        assert_eq!(cell(&obj, ".status.phase"), json!("Pending"));
        assert_eq!(cell(&obj, ".spec.missing"), Value::Null);
    }
}
