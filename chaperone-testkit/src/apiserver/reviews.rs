//! The review APIs: `authorization.k8s.io/v1` (Self)SubjectAccessReview,
//! LocalSubjectAccessReview and SelfSubjectRulesReview, and `authentication.k8s.io/v1`
//! SelfSubjectReview and TokenReview. These are what `kubectl auth can-i [--list]` and
//! `kubectl auth whoami` (and a TokenReview client) call.
//!
//! As in the API server (`pkg/registry/authorization/*/rest.go`,
//! `pkg/registry/authentication/*`): create-only, never stored (other methods get 405
//! MethodNotAllowed, item paths 404), answered with 201 Created. Access reviews echo the
//! request (spec normalised through the Go types, plus the `managedFields` entry the create
//! handler adds) with the status filled in; rules reviews and SelfSubjectReviews answer
//! with a fresh object. Bodies are JSON or YAML; protobuf gets the server's 415 (see the
//! module documentation of `apiserver`).
//!
//! Departures: unknown fields are dropped without a `Warning` header; selector
//! requirements inside `resourceAttributes` are echoed but not validated; the "must be
//! empty" metadata error prints the metadata as JSON where Go prints its `ObjectMeta`.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use serde::{Deserialize, Serialize, de::DeserializeOwned, de::IgnoredAny};
use serde_json::{Map, Value, json};

use super::{
    Body, Query, State,
    auth::{self, Access, Decision, UserInfo},
    check_kind,
    discovery::{self, ResourceDef},
    full, header_str, json_response, not_found_path, status_response, unsupported_media_type,
};
use gateway_userspace::status::{Status, StatusDetails};

const AUTHORIZATION: &str = "authorization.k8s.io";
const AUTHENTICATION: &str = "authentication.k8s.io";
/// The API server's own audience (kubeadm's default service-account issuer), which tokens
/// the test server knows are valid for.
pub(crate) const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// What one review request needs from the connection.
pub(super) struct ReviewCall<'a> {
    /// Shared server state (tokens, authorizer).
    pub state: &'a State,
    /// Who authenticated (before impersonation).
    pub user: &'a UserInfo,
    /// HTTP method.
    pub method: &'a Method,
    /// Request headers (impersonation, content type, user agent).
    pub headers: &'a HeaderMap,
    /// Path and query as sent, for the impersonation error message.
    pub request_uri: &'a str,
    /// Decoded query.
    pub query: &'a Query,
    /// The request body.
    pub body: &'a Bytes,
}

/// Answers requests under the review group versions; `None` for any other path.
pub(super) fn route(call: &ReviewCall<'_>, segs: &[&str]) -> Option<Response<Body>> {
    let (group, rest) = match segs {
        [
            "apis",
            group @ (AUTHORIZATION | AUTHENTICATION),
            "v1",
            rest @ ..,
        ] => (*group, rest),
        _ => return None,
    };
    let (namespace, plural) = match rest {
        [plural] => ("", *plural),
        ["namespaces", namespace, plural] => (*namespace, *plural),
        _ => return Some(status_response(not_found_path())),
    };
    let Some(def) = discovery::find_review(group, "v1", plural)
        .filter(|def| def.namespaced != namespace.is_empty())
    else {
        return Some(status_response(not_found_path()));
    };
    if *call.method != Method::POST {
        // go-restful finds the path but no route for the method; the API server turns
        // that into a Status without naming the resource.
        return Some(status_response(
            Status::failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
            .with_details(StatusDetails::default()),
        ));
    }
    let answer = match def.kind {
        "SelfSubjectAccessReview" => self_subject_access_review(call, def),
        "SubjectAccessReview" => subject_access_review(call, def, None),
        "LocalSubjectAccessReview" => subject_access_review(call, def, Some(namespace)),
        "SelfSubjectRulesReview" => self_subject_rules_review(call, def),
        "SelfSubjectReview" => self_subject_review(call, def),
        "TokenReview" => token_review(call, def),
        _ => Err(Failure::Status(not_found_path())),
    };
    Some(match answer {
        Ok(object) => json_response(StatusCode::CREATED, &object),
        Err(Failure::Status(status)) => status_response(status),
        Err(Failure::Impersonation(message)) => impersonation_error(call.request_uri, &message),
    })
}

/// Why a review got no answer.
enum Failure {
    /// A Status error (400, 415, 422).
    Status(Status),
    /// Impersonation headers without a user: the API server's plain-text 500.
    Impersonation(String),
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Failure::Status(status)
    }
}

/// `responsewriters.InternalError`, as the impersonation filter sends it.
pub(super) fn impersonation_error(request_uri: &str, message: &str) -> Response<Body> {
    let mut response = Response::new(full(format!(
        "Internal Server Error: \"{request_uri}\": {message}\n"
    )));
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

impl ReviewCall<'_> {
    fn effective_user(&self) -> Result<UserInfo, Failure> {
        auth::effective_user(self.headers, self.user).map_err(Failure::Impersonation)
    }

    /// `managerOrUserAgent`: the `fieldManager` parameter, else the User-Agent up to its
    /// first `/`.
    fn field_manager(&self) -> String {
        if let Some(manager) = self.query.get("fieldManager").filter(|m| !m.is_empty()) {
            return manager.to_owned();
        }
        header_str(self.headers, header::USER_AGENT)
            .unwrap_or("")
            .split('/')
            .next()
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_control())
            .take(128)
            .collect()
    }

    /// Decodes the body into the review type, with the API server's errors.
    fn decode<T: DeserializeOwned>(&self, def: &ResourceDef) -> Result<T, Status> {
        let content_type = header_str(self.headers, header::CONTENT_TYPE)
            .and_then(|ct| ct.split(';').next())
            .map(|ct| ct.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let parsed: Result<Value, String> = match content_type.as_str() {
            "" | "application/json" | "*/*" => {
                serde_json::from_slice(self.body).map_err(|e| e.to_string())
            }
            "application/yaml" => serde_norway::from_slice(self.body)
                .map_err(|e| format!("error converting YAML to JSON: {e}")),
            other => {
                return Err(unsupported_media_type(
                    other,
                    "application/json, application/yaml",
                ));
            }
        };
        let mut value = parsed.map_err(|e| unrecognized(def, &e, self.body))?;
        match &value {
            Value::Object(_) => {}
            // encoding/json leaves the kind-sniffing struct empty for `null`; the object
            // then decodes as an empty review.
            Value::Null => value = json!({}),
            other => {
                let found = match other {
                    Value::Array(_) => "array",
                    Value::String(_) => "string",
                    Value::Bool(_) => "bool",
                    _ => "number",
                };
                return Err(unrecognized(
                    def,
                    &format!(
                        "json: cannot unmarshal {found} into Go value of type struct {{ APIVersion string \"json:\\\"apiVersion,omitempty\\\"\"; Kind string \"json:\\\"kind,omitempty\\\"\" }}"
                    ),
                    self.body,
                ));
            }
        }
        check_kind(def, &value)?;
        drop_nulls(&mut value);
        serde_path_to_error::deserialize(value).map_err(|e| {
            Status::bad_request(format!(
                "{kind} in version \"v1\" cannot be handled as a {kind}: {}: {}",
                e.path(),
                e.inner(),
                kind = def.kind
            ))
        })
    }
}

/// `transformDecodeError` when not even the kind could be read.
fn unrecognized(def: &ResourceDef, error: &str, body: &[u8]) -> Status {
    Status::bad_request(format!(
        "the object provided is unrecognized (must be of type {}): couldn't get version/kind; json parse error: {error} ({})",
        def.kind,
        summarize(body)
    ))
}

/// `summarizeData(body, 30)`: JSON-looking bodies as text, anything else as hex.
fn summarize(body: &[u8]) -> String {
    const MAX: usize = 30;
    let head = &body[..body.len().min(MAX)];
    let more = if body.len() > MAX { " ..." } else { "" };
    match body.first() {
        None => "<empty>".to_owned(),
        Some(b'{') => format!("{}{more}", String::from_utf8_lossy(head)),
        Some(_) => {
            let hex: String = head.iter().map(|b| format!("{b:02x}")).collect();
            format!("{hex}{more}")
        }
    }
}

/// Go's `encoding/json` leaves a field at its zero value for `null`, exactly as if it were
/// absent; dropping null members lets the types below default them instead.
fn drop_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// A review as sent: metadata, spec and status.
#[derive(Deserialize)]
#[serde(
    default,
    bound(deserialize = "S: Deserialize<'de> + Default, St: Deserialize<'de> + Default")
)]
struct Incoming<S, St> {
    metadata: Map<String, Value>,
    spec: S,
    status: St,
}

impl<S: Default, St: Default> Default for Incoming<S, St> {
    fn default() -> Self {
        Self {
            metadata: Map::new(),
            spec: S::default(),
            status: St::default(),
        }
    }
}

/// `authorization/v1.ResourceAttributes`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
struct ResourceAttributes {
    #[serde(skip_serializing_if = "String::is_empty")]
    namespace: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    verb: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    group: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    version: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    resource: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    subresource: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field_selector: Option<SelectorAttributes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    label_selector: Option<SelectorAttributes>,
}

/// `FieldSelectorAttributes` and `LabelSelectorAttributes` (same shape).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
struct SelectorAttributes {
    #[serde(skip_serializing_if = "String::is_empty")]
    raw_selector: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    requirements: Vec<SelectorRequirement>,
}

/// `FieldSelectorRequirement` / `LabelSelectorRequirement`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default)]
struct SelectorRequirement {
    key: String,
    operator: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    values: Vec<String>,
}

/// `authorization/v1.NonResourceAttributes`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default)]
struct NonResourceAttributes {
    #[serde(skip_serializing_if = "String::is_empty")]
    path: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    verb: String,
}

/// `SubjectAccessReviewSpec`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
struct SubjectAccessReviewSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    resource_attributes: Option<ResourceAttributes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    non_resource_attributes: Option<NonResourceAttributes>,
    #[serde(skip_serializing_if = "String::is_empty")]
    user: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    groups: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    extra: BTreeMap<String, Vec<String>>,
    #[serde(skip_serializing_if = "String::is_empty")]
    uid: String,
}

/// `SelfSubjectAccessReviewSpec`: only the attributes.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
struct SelfSubjectAccessReviewSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    resource_attributes: Option<ResourceAttributes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    non_resource_attributes: Option<NonResourceAttributes>,
}

/// `SubjectAccessReviewStatus`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
struct AccessStatus {
    allowed: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    denied: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    reason: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    evaluation_error: String,
}

impl AccessStatus {
    fn from_decision(decision: Decision) -> Self {
        match decision {
            Decision::Allow => Self {
                allowed: true,
                ..Self::default()
            },
            Decision::Deny(reason) => Self {
                denied: true,
                reason,
                ..Self::default()
            },
        }
    }
}

/// `SelfSubjectRulesReviewSpec`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RulesReviewSpec {
    namespace: String,
}

/// `authentication/v1.UserInfo`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default)]
struct UserInfoWire {
    #[serde(skip_serializing_if = "String::is_empty")]
    username: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    uid: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    groups: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    extra: BTreeMap<String, Vec<String>>,
}

impl From<&UserInfo> for UserInfoWire {
    fn from(user: &UserInfo) -> Self {
        Self {
            username: user.username.clone(),
            uid: user.uid.clone(),
            groups: user.groups.clone(),
            extra: user.extra.clone(),
        }
    }
}

/// `SelfSubjectReviewStatus`: decoded only so that a wrongly typed body is refused.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SelfSubjectReviewStatus {
    #[serde(rename = "userInfo")]
    _user_info: UserInfoWire,
}

/// `TokenReviewSpec`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default)]
struct TokenReviewSpec {
    #[serde(skip_serializing_if = "String::is_empty")]
    token: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    audiences: Vec<String>,
}

/// `TokenReviewStatus`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default)]
struct TokenReviewStatus {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    authenticated: bool,
    user: UserInfoWire,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    audiences: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
}

fn to_value(value: &impl Serialize) -> Value {
    // Plain structs of strings, lists and maps with string keys always serialize.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// `NewInvalid` for a review. The kind is empty on purpose: the registry passes the kind
/// of the decoded internal object, whose TypeMeta conversion has cleared, so the real
/// message reads `.authorization.k8s.io "" is invalid: ...`.
fn invalid(def: &ResourceDef, errors: &[String]) -> Status {
    let joined = match errors {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    Status::failure(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        format!(".{} \"\" is invalid: {joined}", def.group),
    )
    .with_details(StatusDetails {
        group: def.group.to_owned(),
        ..StatusDetails::default()
    })
}

/// Whether every metadata field except `keep` and `managedFields` is unset, in the sense of
/// `apiequality.Semantic.DeepEqual(metav1.ObjectMeta{}, ...)`.
fn metadata_empty(metadata: &Map<String, Value>, keep: &str) -> bool {
    metadata.iter().all(|(key, value)| {
        key == keep
            || key == "managedFields"
            || match value {
                Value::Null => true,
                Value::Bool(b) => !b,
                Value::Number(n) => n.as_f64() == Some(0.0),
                Value::String(s) => s.is_empty(),
                Value::Array(a) => a.is_empty(),
                Value::Object(o) => o.is_empty(),
            }
    })
}

/// Go's `%q`/`%#v` rendering of a string.
fn quoted(s: &str) -> String {
    format!("{s:?}")
}

/// `ValidateSubjectAccessReviewSpec` / `ValidateSelfSubjectAccessReviewSpec` (1.32): exactly
/// one kind of attributes, and well-formed selectors.
fn validate_attributes(
    resource: Option<&ResourceAttributes>,
    non_resource: Option<&NonResourceAttributes>,
) -> Vec<String> {
    let mut errors = Vec::new();
    match (resource, non_resource) {
        (Some(_), Some(nr)) => errors.push(format!(
            "spec.nonResourceAttributes: Invalid value: authorization.NonResourceAttributes{{Path:{}, Verb:{}}}: cannot be specified in combination with resourceAttributes",
            quoted(&nr.path),
            quoted(&nr.verb)
        )),
        (None, None) => errors.push(
            "spec.resourceAttributes: Invalid value: \"null\": exactly one of nonResourceAttributes or resourceAttributes must be specified"
                .to_owned(),
        ),
        _ => {}
    }
    if let Some(ra) = resource {
        for (field, selector) in [
            ("fieldSelector", &ra.field_selector),
            ("labelSelector", &ra.label_selector),
        ] {
            let Some(selector) = selector else { continue };
            let path = format!("spec.resourceAttributes.{field}");
            match (selector.raw_selector.is_empty(), selector.requirements.is_empty()) {
                (false, false) => errors.push(format!(
                    "{path}.rawSelector: Invalid value: {}: may not specified at the same time as requirements",
                    quoted(&selector.raw_selector)
                )),
                (true, true) => errors.push(format!(
                    "{path}.requirements: Required value: when {path} is specified, requirements or rawSelector is required"
                )),
                _ => {}
            }
        }
    }
    errors
}

fn access<'a>(
    resource: Option<&'a ResourceAttributes>,
    non_resource: Option<&'a NonResourceAttributes>,
) -> Access<'a> {
    match (resource, non_resource) {
        (Some(ra), _) => Access::Resource {
            verb: &ra.verb,
            api_group: &ra.group,
            resource: &ra.resource,
            subresource: &ra.subresource,
            namespace: &ra.namespace,
            name: &ra.name,
        },
        (None, Some(nr)) => Access::NonResource {
            verb: &nr.verb,
            path: &nr.path,
        },
        // Validation refuses a review with neither.
        (None, None) => Access::NonResource { verb: "", path: "" },
    }
}

/// FieldsV1 of what `new` sets beyond the freshly constructed object `live`, as the
/// create handler's field manager computes it: a field the live object lacks is owned
/// (`"."` when it has owned children too), maps and structs are descended, lists are
/// atomic. Keys come out sorted, as in the real encoding.
fn fields_v1(new: &Map<String, Value>, live: Option<&Map<String, Value>>) -> Map<String, Value> {
    let mut owned: BTreeMap<String, Value> = BTreeMap::new();
    for (key, value) in new {
        let live_value = live.and_then(|l| l.get(key));
        match value {
            Value::Object(child) => {
                let children = fields_v1(child, live_value.and_then(Value::as_object));
                if live_value.is_none() {
                    let mut entry: Map<String, Value> = Map::new();
                    if !children.is_empty() {
                        entry.insert(".".to_owned(), json!({}));
                        entry.extend(children);
                    }
                    owned.insert(format!("f:{key}"), Value::Object(entry));
                } else if !children.is_empty() {
                    owned.insert(format!("f:{key}"), Value::Object(children));
                }
            }
            other if live_value != Some(other) => {
                owned.insert(format!("f:{key}"), json!({}));
            }
            _ => {}
        }
    }
    owned.into_iter().collect()
}

/// The metadata an echoed review carries: `creationTimestamp: null` (never stored) and the
/// field manager's entry for the request.
fn echoed_metadata(
    call: &ReviewCall<'_>,
    def: &ResourceDef,
    namespace: &str,
    request: &Value,
    live: &Value,
) -> Value {
    let mut metadata = Map::new();
    if !namespace.is_empty() {
        metadata.insert("namespace".to_owned(), Value::from(namespace));
    }
    metadata.insert("creationTimestamp".to_owned(), Value::Null);
    let fields = match request {
        Value::Object(request) => fields_v1(request, live.as_object()),
        _ => Map::new(),
    };
    let manager = call.field_manager();
    if !fields.is_empty() && !manager.is_empty() {
        metadata.insert(
            "managedFields".to_owned(),
            json!([{
                "manager": manager,
                "operation": "Update",
                "apiVersion": def.api_version(),
                "time": now(),
                "fieldsType": "FieldsV1",
                "fieldsV1": fields,
            }]),
        );
    }
    Value::Object(metadata)
}

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn object(def: &ResourceDef, metadata: Value, spec: Option<Value>, status: Value) -> Value {
    let mut object =
        json!({"kind": def.kind, "apiVersion": def.api_version(), "metadata": metadata});
    if let Some(spec) = spec {
        object["spec"] = spec;
    }
    object["status"] = status;
    object
}

fn self_subject_access_review(call: &ReviewCall<'_>, def: &ResourceDef) -> Result<Value, Failure> {
    // The impersonation filter runs before the handler decodes anything.
    let user = call.effective_user()?;
    let review: Incoming<SelfSubjectAccessReviewSpec, AccessStatus> = call.decode(def)?;
    let spec = &review.spec;
    let mut errors = validate_attributes(
        spec.resource_attributes.as_ref(),
        spec.non_resource_attributes.as_ref(),
    );
    // A cluster-scoped create clears metadata.namespace before validation.
    if !metadata_empty(&review.metadata, "namespace") {
        errors.push(format!(
            "metadata: Invalid value: {}: must be empty",
            Value::Object(review.metadata.clone())
        ));
    }
    if !errors.is_empty() {
        return Err(invalid(def, &errors).into());
    }
    let decision = call.state.authorizer().decide(
        &user,
        &access(
            spec.resource_attributes.as_ref(),
            spec.non_resource_attributes.as_ref(),
        ),
    );
    let spec = to_value(spec);
    let request = json!({"spec": spec, "status": to_value(&review.status)});
    let live = json!({"spec": {}, "status": to_value(&AccessStatus::default())});
    Ok(object(
        def,
        echoed_metadata(call, def, "", &request, &live),
        Some(spec),
        to_value(&AccessStatus::from_decision(decision)),
    ))
}

/// SubjectAccessReview (`namespace` `None`) and LocalSubjectAccessReview (the URL's
/// namespace): the identity comes from the spec, not from the request.
fn subject_access_review(
    call: &ReviewCall<'_>,
    def: &ResourceDef,
    namespace: Option<&str>,
) -> Result<Value, Failure> {
    let review: Incoming<SubjectAccessReviewSpec, AccessStatus> = call.decode(def)?;
    let spec = &review.spec;
    let mut errors = validate_attributes(
        spec.resource_attributes.as_ref(),
        spec.non_resource_attributes.as_ref(),
    );
    if spec.user.is_empty() && spec.groups.is_empty() {
        errors.push(
            "spec.user: Invalid value: \"\": at least one of user or group must be specified"
                .to_owned(),
        );
    }
    let namespace = match namespace {
        None => {
            if !metadata_empty(&review.metadata, "namespace") {
                errors.push(format!(
                    "metadata: Invalid value: {}: must be empty",
                    Value::Object(review.metadata.clone())
                ));
            }
            ""
        }
        Some(url_namespace) => {
            // EnsureObjectNamespaceMatchesRequestNamespace runs before validation.
            let body_namespace = review
                .metadata
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or("");
            if !body_namespace.is_empty() && body_namespace != url_namespace {
                return Err(Status::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
                .into());
            }
            if !metadata_empty(&review.metadata, "namespace") {
                errors.push(format!(
                    "metadata: Invalid value: {}: must be empty except for namespace",
                    Value::Object(review.metadata.clone())
                ));
            }
            if let Some(ra) = &spec.resource_attributes
                && ra.namespace != url_namespace
            {
                errors.push(format!(
                    "spec.resourceAttributes.namespace: Invalid value: {}: must match metadata.namespace",
                    quoted(&ra.namespace)
                ));
            }
            if let Some(nr) = &spec.non_resource_attributes {
                errors.push(format!(
                    "spec.nonResourceAttributes: Invalid value: authorization.NonResourceAttributes{{Path:{}, Verb:{}}}: disallowed on this kind of request",
                    quoted(&nr.path),
                    quoted(&nr.verb)
                ));
            }
            url_namespace
        }
    };
    if !errors.is_empty() {
        return Err(invalid(def, &errors).into());
    }
    let subject = UserInfo {
        username: spec.user.clone(),
        uid: spec.uid.clone(),
        groups: spec.groups.clone(),
        extra: spec.extra.clone(),
    };
    let decision = call.state.authorizer().decide(
        &subject,
        &access(
            spec.resource_attributes.as_ref(),
            spec.non_resource_attributes.as_ref(),
        ),
    );
    let spec = to_value(spec);
    let request = json!({"spec": spec, "status": to_value(&review.status)});
    let live = json!({"spec": {}, "status": to_value(&AccessStatus::default())});
    Ok(object(
        def,
        echoed_metadata(call, def, namespace, &request, &live),
        Some(spec),
        to_value(&AccessStatus::from_decision(decision)),
    ))
}

/// The rules the default authorizer grants: everything.
fn allow_all_rules() -> (Value, Value) {
    (
        json!([{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}]),
        json!([{"verbs": ["*"], "nonResourceURLs": ["*"]}]),
    )
}

fn self_subject_rules_review(call: &ReviewCall<'_>, def: &ResourceDef) -> Result<Value, Failure> {
    let user = call.effective_user()?;
    let review: Incoming<RulesReviewSpec, IgnoredAny> = call.decode(def)?;
    let namespace = review.spec.namespace;
    if namespace.is_empty() {
        return Err(Status::bad_request("no namespace on request").into());
    }
    let (resource_rules, non_resource_rules) = allow_all_rules();
    let mut status = json!({
        "resourceRules": resource_rules,
        "nonResourceRules": non_resource_rules,
        "incomplete": false,
    });
    // Rules only ever grant; what a denial takes away cannot be listed, so the answer
    // says it over-states, as a real server with a deny-capable webhook does.
    if call.state.authorizer().rules_incomplete(&user, &namespace) {
        status["incomplete"] = Value::Bool(true);
        status["evaluationError"] = Value::from(
            "the test API server denies this user some requests, and denials cannot be listed as rules",
        );
    }
    // The registry answers with a new object: an empty spec, no managedFields.
    Ok(object(
        def,
        json!({"creationTimestamp": null}),
        Some(json!({})),
        status,
    ))
}

fn self_subject_review(call: &ReviewCall<'_>, def: &ResourceDef) -> Result<Value, Failure> {
    let user = call.effective_user()?;
    let _review: Incoming<IgnoredAny, SelfSubjectReviewStatus> = call.decode(def)?;
    Ok(object(
        def,
        json!({"creationTimestamp": now()}),
        None,
        json!({"userInfo": to_value(&UserInfoWire::from(&user))}),
    ))
}

fn token_review(call: &ReviewCall<'_>, def: &ResourceDef) -> Result<Value, Failure> {
    let review: Incoming<TokenReviewSpec, TokenReviewStatus> = call.decode(def)?;
    let spec = &review.spec;
    if spec.token.is_empty() {
        return Err(
            Status::bad_request("token is required for TokenReview in authentication").into(),
        );
    }
    // Tokens the server knows are audience-agnostic: valid for the API server's own
    // audience only.
    let audience_ok = spec.audiences.is_empty() || spec.audiences.iter().any(|a| a == API_AUDIENCE);
    let status = match call.state.user_for_token(&spec.token) {
        Some(user) if audience_ok => TokenReviewStatus {
            authenticated: true,
            user: UserInfoWire::from(&user),
            audiences: vec![API_AUDIENCE.to_owned()],
            error: String::new(),
        },
        _ => TokenReviewStatus {
            error: "invalid bearer token".to_owned(),
            ..TokenReviewStatus::default()
        },
    };
    let spec = to_value(spec);
    let request = json!({"spec": spec, "status": to_value(&review.status)});
    let live = json!({"spec": {}, "status": to_value(&TokenReviewStatus::default())});
    Ok(object(
        def,
        echoed_metadata(call, def, "", &request, &live),
        Some(spec),
        to_value(&status),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_v1_lists_what_the_request_set() {
        let live = json!({"spec": {}, "status": {"allowed": false}});
        let cases = [
            (
                json!({"spec": {"resourceAttributes": {"verb": "get", "resource": "pods", "namespace": "d"}}, "status": {"allowed": false}}),
                json!({"f:spec": {"f:resourceAttributes": {".": {}, "f:namespace": {}, "f:resource": {}, "f:verb": {}}}}),
            ),
            (
                json!({"spec": {"user": "u", "groups": ["g"], "extra": {"k": ["v"]}, "nonResourceAttributes": {}}, "status": {"allowed": true}}),
                json!({
                    "f:spec": {"f:user": {}, "f:groups": {}, "f:extra": {".": {}, "f:k": {}}, "f:nonResourceAttributes": {}},
                    "f:status": {"f:allowed": {}},
                }),
            ),
            (json!({"spec": {}, "status": {"allowed": false}}), json!({})),
        ];
        for (request, want) in cases {
            let got = fields_v1(
                request.as_object().unwrap_or_else(|| panic!("object")),
                live.as_object(),
            );
            assert_eq!(Value::Object(got), want, "{request}");
        }
    }

    #[test]
    fn summaries_match_summarize_data() {
        let cases: [(&[u8], &str); 4] = [
            (b"", "<empty>"),
            (b"{\"a\":1}", "{\"a\":1}"),
            (
                b"{\"spec\":{\"resourceAttributes\":{\"verb\":\"get\"}}}",
                "{\"spec\":{\"resourceAttributes\": ...",
            ),
            (b"nope", "6e6f7065"),
        ];
        for (body, want) in cases {
            assert_eq!(summarize(body), want, "{body:?}");
        }
    }

    #[test]
    fn attribute_validation_messages() {
        let ra = ResourceAttributes::default();
        let nr = NonResourceAttributes {
            path: "/x".into(),
            verb: "get".into(),
        };
        let both_selectors = ResourceAttributes {
            field_selector: Some(SelectorAttributes {
                raw_selector: "a=b".into(),
                requirements: vec![SelectorRequirement::default()],
            }),
            label_selector: Some(SelectorAttributes::default()),
            ..ResourceAttributes::default()
        };
        let cases: Vec<(
            Option<&ResourceAttributes>,
            Option<&NonResourceAttributes>,
            Vec<&str>,
        )> = vec![
            (Some(&ra), None, vec![]),
            (None, Some(&nr), vec![]),
            (
                None,
                None,
                vec![
                    "spec.resourceAttributes: Invalid value: \"null\": exactly one of nonResourceAttributes or resourceAttributes must be specified",
                ],
            ),
            (
                Some(&ra),
                Some(&nr),
                vec![
                    "spec.nonResourceAttributes: Invalid value: authorization.NonResourceAttributes{Path:\"/x\", Verb:\"get\"}: cannot be specified in combination with resourceAttributes",
                ],
            ),
            (
                Some(&both_selectors),
                None,
                vec![
                    "spec.resourceAttributes.fieldSelector.rawSelector: Invalid value: \"a=b\": may not specified at the same time as requirements",
                    "spec.resourceAttributes.labelSelector.requirements: Required value: when spec.resourceAttributes.labelSelector is specified, requirements or rawSelector is required",
                ],
            ),
        ];
        for (resource, non_resource, want) in cases {
            assert_eq!(
                validate_attributes(resource, non_resource),
                want,
                "{resource:?} {non_resource:?}"
            );
        }
    }
}
