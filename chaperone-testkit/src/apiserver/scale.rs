//! The `scale` subresource of deployments, replicasets and statefulsets, as the real
//! registries serve it (`pkg/registry/apps/<kind>/storage/storage.go`, `ScaleREST`).
//!
//! Reads answer an `autoscaling/v1` `Scale` built from the parent: its name, namespace, uid,
//! resourceVersion and creationTimestamp, `spec.replicas`, `status.replicas` and
//! `status.selector` as a label-selector string. Writes (PUT of a `Scale`, or any patch the
//! server supports, applied to the current `Scale`) move `spec.replicas` and
//! `metadata.resourceVersion` onto the parent and update it like any other write: the
//! resourceVersion is a precondition (409 Conflict on `deployments.apps`), the generation
//! goes up when the spec changes, and the answer is the parent's new `Scale`. A missing
//! parent is the parent's NotFound (`deployments.apps "x" not found`).
//!
//! Scale requests are authorized: the [`Authorizer`](super::Authorizer) decides `get`,
//! `update` or `patch` of `<resource>/scale` for the (possibly impersonated) user, and a
//! denial is the API server's 403. Other requests are not authorized (see the module docs of
//! `apiserver`).
//!
//! Simplified: no managedFields (so no field ownership moves between the parent and the
//! Scale), and a parent stored without
//! `spec.replicas` (only possible through `seed`) reads as 1, the default the real server
//! would have stored.

use http::{Method, Response, StatusCode, header};
use serde_json::{Map, Value, json};

use super::{
    Body, Output, PatchFn, ResourceRequest, Sub, Target,
    auth::{self, Access, Decision},
    check_gvk,
    discovery::{ResourceDef, SCALE_GROUP, SCALE_KIND, SCALE_VERSION},
    encode, header_str, invalid, json_response, negotiate,
    reviews::{ReviewCall, impersonation_error},
    status_response,
    store::Part,
    table,
};
use gateway_userspace::status::Status;

/// `autoscaling/v1`.
fn scale_api_version() -> String {
    format!("{SCALE_GROUP}/{SCALE_VERSION}")
}

/// The parent's label selector (`spec.selector`) as `labels.Selector.String()` prints it
/// after `metav1.LabelSelectorAsSelector`: requirements sorted by key, `k=v`, `k in (a,b)`,
/// `k notin (a,b)` (values sorted), `k`, `!k`, joined by commas. No selector, or an empty
/// one, is `""`.
pub(crate) fn selector_string(selector: Option<&Value>) -> Result<String, String> {
    let Some(selector) = selector.filter(|s| !s.is_null()) else {
        return Ok(String::new());
    };
    let mut requirements: Vec<(String, String)> = Vec::new();
    if let Some(labels) = selector.get("matchLabels").and_then(Value::as_object) {
        for (key, value) in labels {
            let value = value.as_str().unwrap_or_default();
            requirements.push((key.clone(), format!("{key}={value}")));
        }
    }
    for expr in selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = expr["key"].as_str().unwrap_or_default();
        let operator = expr["operator"].as_str().unwrap_or_default();
        let mut values: Vec<&str> = expr["values"]
            .as_array()
            .map(|vs| vs.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        values.sort_unstable();
        let text = match operator {
            "In" | "NotIn" if values.is_empty() => {
                return Err(
                    "values: Invalid value: []string{}: for 'in', 'notin' operators, values set can't be empty"
                        .to_owned(),
                );
            }
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(
                    "values: Invalid value: values set must be empty for exists and does not exist"
                        .to_owned(),
                );
            }
            "Exists" => key.to_owned(),
            "DoesNotExist" => format!("!{key}"),
            other => return Err(format!("{other:?} is not a valid label selector operator")),
        };
        requirements.push((key.to_owned(), text));
    }
    // Go sorts by key only; requirements on the same key keep no particular order there, and
    // keep their given order here.
    requirements.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(requirements
        .into_iter()
        .map(|(_, text)| text)
        .collect::<Vec<_>>()
        .join(","))
}

/// The `Scale` of a stored parent (`scaleFromDeployment` and its siblings). An invalid
/// selector is a 400, as in the real registries.
pub(crate) fn scale_of(parent: &Value) -> Result<Value, Status> {
    let selector = selector_string(parent.pointer("/spec/selector"))
        .map_err(|e| Status::bad_request(e.to_string()))?;
    let mut metadata = Map::new();
    for field in ["name", "namespace", "uid", "resourceVersion"] {
        if let Some(value) = parent
            .pointer(&format!("/metadata/{field}"))
            .filter(|v| v.as_str().is_some_and(|s| !s.is_empty()))
        {
            metadata.insert(field.to_owned(), value.clone());
        }
    }
    // metav1.Time has no omitempty effect: a zero time is null.
    metadata.insert(
        "creationTimestamp".to_owned(),
        parent
            .pointer("/metadata/creationTimestamp")
            .cloned()
            .unwrap_or(Value::Null),
    );
    let replicas = parent
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    // ScaleSpec.replicas is omitempty; ScaleStatus.replicas is not, its selector is.
    let spec = if replicas == 0 {
        json!({})
    } else {
        json!({"replicas": replicas})
    };
    let mut status = json!({
        "replicas": parent.pointer("/status/replicas").and_then(Value::as_i64).unwrap_or(0),
    });
    if !selector.is_empty() {
        status["selector"] = Value::from(selector);
    }
    Ok(json!({
        "kind": SCALE_KIND,
        "apiVersion": scale_api_version(),
        "metadata": metadata,
        "spec": spec,
        "status": status,
    }))
}

/// What the JSON decoder would refuse in a `Scale`, worded like Go's `encoding/json`.
fn check_scale_types(scale: &Value) -> Result<(), Status> {
    let type_error = |what: &str, go_type: &str, v: &Value| {
        Status::bad_request(format!(
            "json: cannot unmarshal {} into Go {what} of type {go_type}",
            json_kind(v)
        ))
    };
    if !scale.is_object() {
        return Err(type_error("value", "v1.Scale", scale));
    }
    for (field, go_type) in [("metadata", "v1.ObjectMeta"), ("spec", "v1.ScaleSpec")] {
        if let Some(v) = scale.get(field).filter(|v| !v.is_null() && !v.is_object()) {
            return Err(type_error(
                &format!("struct field Scale.{field}"),
                go_type,
                v,
            ));
        }
    }
    if let Some(v) = scale.pointer("/spec/replicas").filter(|v| !v.is_null()) {
        let in_range = v.as_i64().is_some_and(|n| i32::try_from(n).is_ok());
        if !in_range {
            return Err(type_error(
                "struct field ScaleSpec.spec.replicas",
                "int32",
                v,
            ));
        }
    }
    Ok(())
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `scaleUpdatedObjectInfo.UpdatedObject`: the parent with the new Scale's replicas and
/// resourceVersion (the storage layer then checks that resourceVersion), after the Scale's
/// validation and uid precondition.
fn with_scale(
    res: &ResourceDef,
    name: &str,
    mut parent: Value,
    scale: &Value,
) -> Result<Value, Status> {
    check_gvk(&scale_api_version(), SCALE_KIND, scale)?;
    check_scale_types(scale)?;
    let str_at = |v: &Value, p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let scale_name = str_at(scale, "/metadata/name");
    if !scale_name.is_empty() && scale_name != name {
        return Err(Status::bad_request(format!(
            "the name of the object ({scale_name}) does not match the name on the URL ({name})"
        )));
    }
    let replicas = scale
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if replicas < 0 {
        return Err(invalid(
            SCALE_KIND,
            SCALE_GROUP,
            name,
            &format!(
                "spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0"
            ),
        ));
    }
    let scale_uid = str_at(scale, "/metadata/uid");
    let parent_uid = str_at(&parent, "/metadata/uid");
    if !scale_uid.is_empty() && scale_uid != parent_uid {
        return Err(Status::conflict(
            res.group,
            &format!("{}/scale", res.plural),
            name,
            &format!(
                "Precondition failed: UID in precondition: {scale_uid}, UID in object meta: {parent_uid}"
            ),
        ));
    }
    if !parent.get("spec").is_some_and(Value::is_object) {
        parent["spec"] = json!({});
    }
    parent["spec"]["replicas"] = Value::from(replicas);
    let scale_rv = str_at(scale, "/metadata/resourceVersion");
    if let Some(meta) = parent.get_mut("metadata").and_then(Value::as_object_mut) {
        // No resourceVersion in the Scale: an unconditional update.
        meta.insert("resourceVersion".to_owned(), Value::from(scale_rv));
    }
    Ok(parent)
}

impl ResourceRequest<'_> {
    fn scale_names<'t>(&self, target: &'t Target) -> (&'static ResourceDef, &'t str, String) {
        (
            target.res,
            target.namespace.as_str(),
            target.name.clone().unwrap_or_default(),
        )
    }

    /// `GET .../<resource>/<name>/scale`.
    pub(super) fn get_scale(&self, target: &Target) -> Result<Response<Body>, Status> {
        let output = negotiate(header_str(self.headers, header::ACCEPT), self.query, true)?;
        let (res, namespace, name) = self.scale_names(target);
        let parent = self.state.store.get(res, namespace, &name)?;
        let scale = scale_of(&parent)?;
        Ok(match output {
            Output::Table(opts) => json_response(StatusCode::OK, &table::scale_table(&scale, opts)),
            other => encode(other, StatusCode::OK, &scale),
        })
    }

    /// `PUT .../<resource>/<name>/scale` with a `Scale`.
    pub(super) fn update_scale(&self, target: &Target) -> Result<Response<Body>, Status> {
        let dry_run = self.dry_run()?;
        let scale = self.decode_body()?;
        check_gvk(&scale_api_version(), SCALE_KIND, &scale)?;
        check_scale_types(&scale)?;
        let (res, namespace, name) = self.scale_names(target);
        let body_ns = scale
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !body_ns.is_empty() && body_ns != namespace {
            return Err(Status::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let url_name = name.clone();
        let (updated, _) = self.state.store.patch(
            res,
            namespace,
            &name,
            Part::Main,
            dry_run,
            None,
            move |parent| with_scale(res, &url_name, parent, &scale),
        )?;
        Ok(json_response(StatusCode::OK, &scale_of(&updated)?))
    }

    /// `PATCH .../<resource>/<name>/scale`: the patch applies to the current `Scale`.
    pub(super) fn patch_scale(&self, target: &Target) -> Result<Response<Body>, Status> {
        let dry_run = self.dry_run()?;
        let (res, namespace, name) = self.scale_names(target);
        // Server-side apply cannot create a parent through its scale, so the applied
        // configuration is only merged.
        let (_, patch_scale): (Option<Value>, PatchFn) =
            self.patch_function(&name, &scale_api_version(), SCALE_KIND, &|applied| {
                check_scale_types(applied)
            })?;
        let url_name = name.clone();
        let (updated, _) = self.state.store.patch(
            res,
            namespace,
            &name,
            Part::Main,
            dry_run,
            None,
            move |parent| {
                let patched = patch_scale(scale_of(&parent)?)?;
                with_scale(res, &url_name, parent, &patched)
            },
        )?;
        Ok(json_response(StatusCode::OK, &scale_of(&updated)?))
    }
}

/// Authorizes a request to a `scale` subresource as the API server's authorization filter
/// would, before the handler runs: `None` to go on, or the response that refuses it (403
/// Forbidden, or the impersonation filter's 500).
pub(super) fn authorize(call: &ReviewCall<'_>, target: &Target) -> Option<Response<Body>> {
    debug_assert_eq!(target.sub, Sub::Scale);
    let verb = match *call.method {
        Method::GET => "get",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::POST => "create",
        Method::DELETE => "delete",
        _ => return None,
    };
    let user = match auth::effective_user(call.headers, call.user) {
        Ok(user) => user,
        Err(message) => return Some(impersonation_error(call.request_uri, &message)),
    };
    let res = target.res;
    let name = target.name.as_deref().unwrap_or("");
    let access = Access::Resource {
        verb,
        api_group: res.group,
        resource: res.plural,
        subresource: "scale",
        namespace: &target.namespace,
        name,
    };
    let Decision::Deny(reason) = call.state.authorizer().decide(&user, &access) else {
        return None;
    };
    // responsewriters.Forbidden: the attributes, then the authorizer's reason if any.
    let mut why = format!(
        "User \"{}\" cannot {verb} resource \"{}/scale\" in API group \"{}\" in the namespace \"{}\"",
        user.username, res.plural, res.group, target.namespace
    );
    if !reason.is_empty() {
        why = format!("{why}: {reason}");
    }
    Some(status_response(Status::forbidden(
        res.group, res.plural, name, &why,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_print_like_labels_selector_string() {
        let cases: Vec<(Value, Result<&str, &str>)> = vec![
            (Value::Null, Ok("")),
            (json!({}), Ok("")),
            (json!({"matchLabels": {"app": "web"}}), Ok("app=web")),
            (
                json!({"matchLabels": {"tier": "front", "app": "web"}}),
                Ok("app=web,tier=front"),
            ),
            (
                json!({"matchLabels": {"app": "web"}, "matchExpressions": [
                    {"key": "env", "operator": "In", "values": ["prod", "dev"]},
                    {"key": "zone", "operator": "NotIn", "values": ["b", "a"]},
                    {"key": "canary", "operator": "DoesNotExist"},
                    {"key": "b", "operator": "Exists"},
                ]}),
                Ok("app=web,b,!canary,env in (dev,prod),zone notin (a,b)"),
            ),
            (
                json!({"matchExpressions": [{"key": "env", "operator": "In", "values": []}]}),
                Err("values set can't be empty"),
            ),
            (
                json!({"matchExpressions": [{"key": "env", "operator": "Exists", "values": ["x"]}]}),
                Err("values set must be empty"),
            ),
            (
                json!({"matchExpressions": [{"key": "env", "operator": "Equals", "values": ["x"]}]}),
                Err("\"Equals\" is not a valid label selector operator"),
            ),
        ];
        for (selector, want) in cases {
            let got = selector_string(Some(&selector));
            match (&got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{selector}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{selector}: {got}"),
                _ => panic!("{selector}: got {got:?}, want {want:?}"),
            }
        }
        assert_eq!(selector_string(None), Ok(String::new()));
    }

    #[test]
    fn scale_of_copies_what_the_registry_copies() {
        let parent = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "d", "uid": "u1", "resourceVersion": "7",
                         "creationTimestamp": "2026-01-01T00:00:00Z", "generation": 3,
                         "labels": {"x": "y"}},
            "spec": {"replicas": 4, "selector": {"matchLabels": {"app": "web"}}},
            "status": {"replicas": 2, "readyReplicas": 1},
        });
        assert_eq!(
            scale_of(&parent).unwrap_or_else(|e| panic!("{}", e.message())),
            json!({
                "kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": "web", "namespace": "d", "uid": "u1", "resourceVersion": "7",
                             "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"replicas": 4},
                "status": {"replicas": 2, "selector": "app=web"},
            })
        );
        // Zero replicas: ScaleSpec.replicas is omitempty, ScaleStatus.replicas is not.
        let zero = json!({"metadata": {"name": "z"}, "spec": {"replicas": 0}});
        let scale = scale_of(&zero).unwrap_or_else(|e| panic!("{}", e.message()));
        assert_eq!(scale["spec"], json!({}), "{scale}");
        assert_eq!(scale["status"], json!({"replicas": 0}), "{scale}");
        assert_eq!(
            scale["metadata"]["creationTimestamp"],
            Value::Null,
            "{scale}"
        );
        let bad = json!({"metadata": {"name": "b"}, "spec": {"selector": {"matchExpressions": [{"key": "k", "operator": "Nope"}]}}});
        assert_eq!(scale_of(&bad).map_err(|s| s.code().as_u16()), Err(400));
    }
}
