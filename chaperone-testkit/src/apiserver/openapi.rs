//! OpenAPI v3 as kubectl 1.32 reads it: `GET /openapi/v3`, an index with one document per
//! served group version, and the documents themselves (`shared/k8s-wire-reference.md` 3.5).
//!
//! A document lists, for every stored resource of its group version, the object path's
//! `get` and `patch` operations tagged with `x-kubernetes-group-version-kind` (how
//! `kubectl explain` finds a resource's kind, and how kubectl's query-parameter verifier
//! finds the `fieldValidation` parameter before leaving validation of `apply -f`/`create -f`
//! to the server), the same for the `scale` subresource, and under `components.schemas`
//! each kind's schema with every type it references: descriptions, types, and `$ref`s
//! wrapped in `allOf` where they carry a description of their own, which is how the real
//! server writes them and what kubectl's explain templates follow. The schemas are
//! k8s-openapi's (its `schemars` support, generated from the Kubernetes 1.32 OpenAPI spec),
//! so `kubectl explain` prints the real field documentation.
//!
//! Departures, on purpose:
//! * the `patch` operations have no `requestBody`, so kubectl never builds a strategic
//!   merge patch from these schemas (`gvkSupportsPatchOpenAPIV3` in kubectl's
//!   `apply/patcher.go` requires one): k8s-openapi's schemas lack the `x-kubernetes-patch-*`
//!   extensions such a patch needs, and kubectl keeps using its compiled-in types instead;
//! * k8s-openapi makes `metadata` required on every kind; the real spec does not (and
//!   `kubectl explain` would print `-required-`), so it is dropped there;
//! * only object paths (no list, watch, create or delete operations), no enums, no
//!   `x-kubernetes-list-*` extensions, no defaults, no `/openapi/v2`, nothing for the review
//!   APIs;
//! * the URL's `hash` is an FNV-1a digest of the document, not the real server's SHA-512.
//!
//! The documents are built once per process and served as bytes: kubectl fetches one for
//! every object it reads from a file.

use std::sync::LazyLock;

use bytes::Bytes;
use k8s_openapi::api::{apps::v1 as apps, autoscaling::v1 as autoscaling, core::v1 as core};
use schemars::{JsonSchema, SchemaGenerator, generate::SchemaSettings};
use serde_json::{Map, Value, json};

use super::discovery::{RESOURCES, ResourceDef, SCALE_GROUP, SCALE_KIND, SCALE_VERSION};

/// One group version's document, serialized.
struct Document {
    /// `api/v1` or `apis/<group>/<version>`: the index key and the URL path after
    /// `/openapi/v3/`.
    key: String,
    /// Digest of `body`, for the index's `serverRelativeURL`.
    hash: String,
    body: Bytes,
}

static DOCUMENTS: LazyLock<Vec<Document>> = LazyLock::new(|| {
    group_versions()
        .into_iter()
        .map(|(group, version)| {
            let body = Bytes::from(
                serde_json::to_vec(&build_document(group, version)).unwrap_or_default(),
            );
            Document {
                key: key(group, version),
                hash: format!("{:016X}", fnv1a(&body)),
                body,
            }
        })
        .collect()
});

/// Group versions with stored resources, in the order of [`RESOURCES`].
fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut gvs: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES {
        if !gvs.contains(&(r.group, r.version)) {
            gvs.push((r.group, r.version));
        }
    }
    gvs
}

fn key(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `GET /openapi/v3`: where each group version's document is.
pub(crate) fn index() -> Value {
    let mut paths = Map::new();
    for doc in DOCUMENTS.iter() {
        paths.insert(
            doc.key.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{}?hash={}", doc.key, doc.hash)}),
        );
    }
    json!({"paths": paths})
}

/// `GET /openapi/v3/<api/v1 | apis/g/v>`: the document (JSON), if the group version is
/// served.
pub(crate) fn document(group: &str, version: &str) -> Option<Bytes> {
    let key = key(group, version);
    DOCUMENTS
        .iter()
        .find(|d| d.key == key)
        .map(|d| d.body.clone())
}

/// Registers `T` (and everything it references) with `generator`; returns its schema name.
fn register<T: JsonSchema>(generator: &mut SchemaGenerator) -> String {
    generator.subschema_for::<T>();
    T::schema_name().into_owned()
}

/// Registers the schema of `res`'s kind; `None` if there is none for it.
fn register_kind(generator: &mut SchemaGenerator, res: &ResourceDef) -> Option<String> {
    Some(match (res.group, res.version, res.kind) {
        ("", "v1", "Namespace") => register::<core::Namespace>(generator),
        ("", "v1", "Pod") => register::<core::Pod>(generator),
        ("", "v1", "Secret") => register::<core::Secret>(generator),
        ("", "v1", "ConfigMap") => register::<core::ConfigMap>(generator),
        ("", "v1", "ServiceAccount") => register::<core::ServiceAccount>(generator),
        ("apps", "v1", "Deployment") => register::<apps::Deployment>(generator),
        ("apps", "v1", "ReplicaSet") => register::<apps::ReplicaSet>(generator),
        ("apps", "v1", "StatefulSet") => register::<apps::StatefulSet>(generator),
        _ => return None,
    })
}

/// `{"group": ..., "version": ..., "kind": ...}`, the shape of the GVK extension.
fn gvk(group: &str, version: &str, kind: &str) -> Value {
    json!({"group": group, "version": version, "kind": kind})
}

/// Tags a kind's schema with its GVK and drops k8s-openapi's `metadata` requirement.
fn mark_kind(schemas: &mut Map<String, Value>, name: &str, gvk: Value) {
    let Some(schema) = schemas.get_mut(name).and_then(Value::as_object_mut) else {
        return;
    };
    schema.insert(
        "x-kubernetes-group-version-kind".into(),
        Value::Array(vec![gvk]),
    );
    if let Some(Value::Array(required)) = schema.get_mut("required") {
        required.retain(|f| f != "metadata");
        if required.is_empty() {
            schema.remove("required");
        }
    }
}

/// `readCoreV1NamespacedPod`, `patchAppsV1NamespacedDeploymentScale`: the real server's
/// operation ids.
fn operation_id(verb: &str, res: &ResourceDef, suffix: &str) -> String {
    let mut group: String = res
        .group
        .split('.')
        .filter(|s| !matches!(*s, "k8s" | "io"))
        .map(capitalize)
        .collect();
    if group.is_empty() {
        group = "Core".to_owned();
    }
    let namespaced = if res.namespaced { "Namespaced" } else { "" };
    format!(
        "{verb}{group}{}{namespaced}{}{suffix}",
        capitalize(res.version),
        res.kind
    )
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_uppercase().chain(chars).collect()
    })
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// The `get` and `patch` operations of one path, returning `schema` as `gvk`.
fn operations(res: &ResourceDef, suffix: &str, gvk: &Value, schema: &str) -> Value {
    let query = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
    let ok = json!({"200": {"description": "OK", "content": {"application/json": {"schema": schema_ref(schema)}}}});
    let mut path_params = vec![
        json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string", "uniqueItems": true}}),
    ];
    if res.namespaced {
        path_params.push(json!({"name": "namespace", "in": "path", "required": true, "schema": {"type": "string", "uniqueItems": true}}));
    }
    json!({
        "get": {
            "operationId": operation_id("read", res, suffix),
            "responses": ok,
            "x-kubernetes-action": "get",
            "x-kubernetes-group-version-kind": gvk,
        },
        "patch": {
            "operationId": operation_id("patch", res, suffix),
            "parameters": [query("dryRun"), query("fieldManager"), query("fieldValidation"), query("force")],
            "responses": {"200": ok["200"], "201": {"description": "Created", "content": {"application/json": {"schema": schema_ref(schema)}}}},
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": gvk,
        },
        "parameters": path_params,
    })
}

fn build_document(group: &str, version: &str) -> Value {
    let prefix = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    let mut generator = SchemaSettings::openapi3().into_generator();
    let mut kinds: Vec<(String, Value)> = Vec::new();
    let mut paths = Map::new();
    let mut scale_schema = None;
    for res in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let Some(name) = register_kind(&mut generator, res) else {
            continue;
        };
        let kind_gvk = gvk(res.group, res.version, res.kind);
        let object_path = if res.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", res.plural)
        } else {
            format!("{prefix}/{}/{{name}}", res.plural)
        };
        paths.insert(object_path.clone(), operations(res, "", &kind_gvk, &name));
        if res.has_scale {
            let scale = scale_schema
                .get_or_insert_with(|| register::<autoscaling::Scale>(&mut generator))
                .clone();
            paths.insert(
                format!("{object_path}/scale"),
                operations(
                    res,
                    "Scale",
                    &gvk(SCALE_GROUP, SCALE_VERSION, SCALE_KIND),
                    &scale,
                ),
            );
        }
        kinds.push((name, kind_gvk));
    }
    let mut schemas = generator.take_definitions(true);
    for (name, kind_gvk) in kinds {
        mark_kind(&mut schemas, &name, kind_gvk);
    }
    if let Some(scale) = scale_schema {
        mark_kind(
            &mut schemas,
            &scale,
            gvk(SCALE_GROUP, SCALE_VERSION, SCALE_KIND),
        );
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::discovery::find;

    fn doc(group: &str, version: &str) -> Value {
        let bytes = document(group, version)
            .unwrap_or_else(|| panic!("no OpenAPI document for {group:?}/{version}"));
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("document for {group:?}/{version} is not JSON: {e}"))
    }

    /// Resolves a `$ref` (bare, or the single entry of an `allOf`) to the schema's name.
    fn ref_name(schema: &Value) -> Option<&str> {
        let reference = schema
            .get("$ref")
            .or_else(|| schema.pointer("/allOf/0/$ref"))?;
        reference.as_str()?.strip_prefix("#/components/schemas/")
    }

    #[test]
    fn every_stored_kind_has_a_tagged_schema_and_operations() {
        for res in RESOURCES {
            let d = doc(res.group, res.version);
            let schemas = d["components"]["schemas"]
                .as_object()
                .unwrap_or_else(|| panic!("no schemas: {d}"));
            let want = gvk(res.group, res.version, res.kind);
            let tagged: Vec<&String> = schemas
                .iter()
                .filter(|(_, s)| {
                    s["x-kubernetes-group-version-kind"]
                        .as_array()
                        .is_some_and(|g| g.contains(&want))
                })
                .map(|(name, _)| name)
                .collect();
            assert_eq!(
                tagged.len(),
                1,
                "{}: schemas tagged {want}: {tagged:?}",
                res.plural
            );
            let schema = &schemas[tagged[0].as_str()];
            assert!(
                schema["description"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{}: no description",
                res.plural
            );
            assert!(
                !schema["required"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|f| f == "metadata")),
                "{}: metadata marked required",
                res.plural
            );
            let meta = ref_name(&schema["properties"]["metadata"]);
            assert_eq!(
                meta,
                Some("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"),
                "{}",
                res.plural
            );
            let path = if res.namespaced {
                format!(
                    "/{}/namespaces/{{namespace}}/{}/{{name}}",
                    key(res.group, res.version),
                    res.plural
                )
            } else {
                format!("/{}/{}/{{name}}", key(res.group, res.version), res.plural)
            };
            for op in ["get", "patch"] {
                assert_eq!(
                    d["paths"][&path][op]["x-kubernetes-group-version-kind"], want,
                    "{path} {op}"
                );
            }
            let params: Vec<&str> = d["paths"][&path]["patch"]["parameters"]
                .as_array()
                .map(|ps| ps.iter().filter_map(|p| p["name"].as_str()).collect())
                .unwrap_or_default();
            assert!(params.contains(&"fieldValidation"), "{path}: {params:?}");
            assert!(
                d["paths"][&path]["patch"].get("requestBody").is_none(),
                "{path}: a requestBody makes kubectl build strategic merge patches from these schemas"
            );
            let scale = &d["paths"][format!("{path}/scale")];
            if res.has_scale {
                assert_eq!(
                    scale["patch"]["x-kubernetes-group-version-kind"],
                    gvk("autoscaling", "v1", "Scale"),
                    "{path}/scale"
                );
            } else {
                assert!(scale.is_null(), "{path}/scale: {scale}");
            }
        }
    }

    #[test]
    fn references_resolve_and_carry_descriptions() {
        for (group, version) in group_versions() {
            let d = doc(group, version);
            let schemas = d["components"]["schemas"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            // Every reference anywhere in the document names a schema in it.
            let text = d.to_string();
            for piece in text.split("\"$ref\":\"").skip(1) {
                let target = piece.split('"').next().unwrap_or_default();
                let name = target
                    .strip_prefix("#/components/schemas/")
                    .unwrap_or_else(|| panic!("{group}/{version}: foreign $ref {target}"));
                assert!(
                    schemas.contains_key(name),
                    "{group}/{version}: dangling $ref {target}"
                );
            }
            // A reference never has siblings: kubectl (like OpenAPI 3.0) ignores them.
            fn walk(v: &Value, at: &str) {
                match v {
                    Value::Object(m) => {
                        if m.contains_key("$ref") {
                            assert_eq!(m.len(), 1, "$ref with siblings at {at}: {v}");
                        }
                        for (k, child) in m {
                            walk(child, &format!("{at}/{k}"));
                        }
                    }
                    Value::Array(items) => {
                        for (i, child) in items.iter().enumerate() {
                            walk(child, &format!("{at}/{i}"));
                        }
                    }
                    _ => {}
                }
            }
            walk(&d, "");
        }
        // The path kubectl explain follows for pods.spec.containers and
        // deployments.spec.replicas.
        let core = doc("", "v1");
        let schemas = &core["components"]["schemas"];
        let spec = &schemas["io.k8s.api.core.v1.Pod"]["properties"]["spec"];
        assert_eq!(ref_name(spec), Some("io.k8s.api.core.v1.PodSpec"), "{spec}");
        assert!(
            spec["description"]
                .as_str()
                .is_some_and(|s| s.starts_with("Specification of the desired behavior of the pod")),
            "{spec}"
        );
        let containers = &schemas["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"];
        assert_eq!(containers["type"], "array", "{containers}");
        assert_eq!(
            ref_name(&containers["items"]),
            Some("io.k8s.api.core.v1.Container")
        );
        assert!(
            schemas["io.k8s.api.core.v1.Container"]["properties"]["image"]["description"]
                .as_str()
                .is_some_and(|s| s.starts_with("Container image name.")),
            "{}",
            schemas["io.k8s.api.core.v1.Container"]
        );
        let apps = doc("apps", "v1");
        let replicas = &apps["components"]["schemas"]["io.k8s.api.apps.v1.DeploymentSpec"]["properties"]
            ["replicas"];
        assert_eq!(
            (replicas["type"].as_str(), replicas["format"].as_str()),
            (Some("integer"), Some("int32")),
            "{replicas}"
        );
    }

    #[test]
    fn index_lists_each_document_by_digest() {
        let index = index();
        let paths = index["paths"].as_object().cloned().unwrap_or_default();
        let keys: Vec<&str> = paths.keys().map(String::as_str).collect();
        assert_eq!(keys, ["api/v1", "apis/apps/v1"], "{index}");
        let mut hashes = Vec::new();
        for (key, entry) in &paths {
            let url = entry["serverRelativeURL"].as_str().unwrap_or_default();
            let (path, hash) = url
                .split_once("?hash=")
                .unwrap_or_else(|| panic!("{key}: no hash in {url}"));
            assert_eq!(path, format!("/openapi/v3/{key}"));
            let (group, version) = match key.split('/').collect::<Vec<_>>()[..] {
                ["api", v] => ("", v),
                ["apis", g, v] => (g, v),
                _ => panic!("odd key {key}"),
            };
            let body = document(group, version).unwrap_or_else(|| panic!("no document {key}"));
            assert_eq!(hash, format!("{:016X}", fnv1a(&body)), "{key}");
            hashes.push(hash.to_owned());
        }
        assert_ne!(hashes[0], hashes[1], "documents share a digest");
        assert!(document("batch", "v1").is_none());
        assert!(document("authorization.k8s.io", "v1").is_none());
        let deployments = find("apps", "v1", "deployments").expect("deployments served");
        let namespaces = find("", "v1", "namespaces").expect("namespaces served");
        assert_eq!(
            operation_id("patch", deployments, "Scale"),
            "patchAppsV1NamespacedDeploymentScale"
        );
        assert_eq!(operation_id("read", namespaces, ""), "readCoreV1Namespace");
    }
}
