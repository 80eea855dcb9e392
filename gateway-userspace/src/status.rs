//! Kubernetes `Status` objects: the error body every Kubernetes client understands.
//!
//! Shapes follow apimachinery's `pkg/api/errors` constructors (see
//! `shared/k8s-wire-reference.md` section 2): kubectl prints `Error from server (<Reason>):
//! <message>` for them, client-go turns them into typed errors, and the Python client
//! raises `ApiException` with this JSON as its body.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

/// A `meta/v1` Status with `"status":"Failure"` (or `"Success"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    kind: &'static str,
    api_version: &'static str,
    metadata: Empty,
    status: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    message: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<StatusDetails>,
    code: u16,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
struct Empty {}

/// `Status.details`: which object the error is about.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusDetails {
    /// Object name, if the request named one.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// API group of the resource.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// The *resource* (e.g. `pods`) for NotFound/AlreadyExists/Conflict/Forbidden.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// Seconds a client should wait before retrying (429/503/504).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u32>,
}

/// Formats a group-qualified resource the way apimachinery's `GroupResource.String()` does:
/// `pods` for the core group, `deployments.apps` otherwise.
pub fn group_resource(group: &str, resource: &str) -> String {
    if group.is_empty() {
        resource.to_owned()
    } else {
        format!("{resource}.{group}")
    }
}

impl Status {
    /// A Failure status with the given HTTP code, machine-readable reason and message.
    pub fn failure(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: "Status",
            api_version: "v1",
            metadata: Empty {},
            status: "Failure",
            message: message.into(),
            reason,
            details: None,
            code: code.as_u16(),
        }
    }

    /// A Success status (used for deletes of whole collections and exec results).
    pub fn success() -> Self {
        Self {
            kind: "Status",
            api_version: "v1",
            metadata: Empty {},
            status: "Success",
            message: String::new(),
            reason: "",
            details: None,
            code: 200,
        }
    }

    /// 403 `Forbidden` for a resource request, worded like the API server's authorizer
    /// denials but carrying Chaperone's own explanation.
    pub fn forbidden(group: &str, resource: &str, name: &str, why: &str) -> Self {
        let gr = group_resource(group, resource);
        let message = if name.is_empty() {
            format!("{gr} is forbidden: {why}")
        } else {
            format!("{gr} \"{name}\" is forbidden: {why}")
        };
        Self::failure(StatusCode::FORBIDDEN, "Forbidden", message).with_details(StatusDetails {
            name: name.to_owned(),
            group: group.to_owned(),
            kind: resource.to_owned(),
            retry_after_seconds: None,
        })
    }

    /// 404 `NotFound`: `<resource>[.<group>] "<name>" not found`.
    pub fn not_found(group: &str, resource: &str, name: &str) -> Self {
        let gr = group_resource(group, resource);
        Self::failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{gr} \"{name}\" not found"),
        )
        .with_details(StatusDetails {
            name: name.to_owned(),
            group: group.to_owned(),
            kind: resource.to_owned(),
            retry_after_seconds: None,
        })
    }

    /// 409 `AlreadyExists`.
    pub fn already_exists(group: &str, resource: &str, name: &str) -> Self {
        let gr = group_resource(group, resource);
        Self::failure(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{gr} \"{name}\" already exists"),
        )
        .with_details(StatusDetails {
            name: name.to_owned(),
            group: group.to_owned(),
            kind: resource.to_owned(),
            retry_after_seconds: None,
        })
    }

    /// 409 `Conflict`: `Operation cannot be fulfilled on <gr> "<name>": <why>`.
    pub fn conflict(group: &str, resource: &str, name: &str, why: &str) -> Self {
        let gr = group_resource(group, resource);
        Self::failure(
            StatusCode::CONFLICT,
            "Conflict",
            format!("Operation cannot be fulfilled on {gr} \"{name}\": {why}"),
        )
        .with_details(StatusDetails {
            name: name.to_owned(),
            group: group.to_owned(),
            kind: resource.to_owned(),
            retry_after_seconds: None,
        })
    }

    /// 400 `BadRequest`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::failure(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    /// 503 `ServiceUnavailable` with a `retryAfterSeconds` hint.
    pub fn service_unavailable(message: impl Into<String>, retry_after_seconds: u32) -> Self {
        Self::failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            message,
        )
        .with_details(StatusDetails {
            retry_after_seconds: Some(retry_after_seconds),
            ..Default::default()
        })
    }

    /// 429 `TooManyRequests` with a `retryAfterSeconds` hint (client-go waits and retries).
    pub fn too_many_requests(message: impl Into<String>, retry_after_seconds: u32) -> Self {
        Self::failure(StatusCode::TOO_MANY_REQUESTS, "TooManyRequests", message).with_details(
            StatusDetails {
                retry_after_seconds: Some(retry_after_seconds),
                ..Default::default()
            },
        )
    }

    /// Replaces the details.
    pub fn with_details(mut self, details: StatusDetails) -> Self {
        self.details = Some(details);
        self
    }

    /// The HTTP status code this Status is sent with.
    pub fn code(&self) -> StatusCode {
        StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The machine-readable reason (`Forbidden`, `NotFound`, ...).
    pub fn reason(&self) -> &str {
        self.reason
    }

    /// The JSON encoding.
    pub fn to_json(&self) -> Bytes {
        // Serializing a struct of strings and integers cannot fail.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// A complete HTTP response: the code, `Content-Type: application/json`, and, for
    /// retryable codes, the integer `Retry-After` header client-go's retry logic reads.
    pub fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let mut response = Response::new(B::from(self.to_json()));
        *response.status_mut() = self.code();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.details.as_ref().and_then(|d| d.retry_after_seconds) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_matches_apiserver_shape() {
        let s = Status::forbidden("", "namespaces", "prod", "denied by rule \"no-ns-delete\"");
        let v: serde_json::Value = serde_json::from_slice(&s.to_json()).unwrap();
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["apiVersion"], "v1");
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "Forbidden");
        assert_eq!(v["code"], 403);
        assert_eq!(v["details"]["kind"], "namespaces");
        assert_eq!(v["details"]["name"], "prod");
        assert_eq!(
            v["message"],
            "namespaces \"prod\" is forbidden: denied by rule \"no-ns-delete\""
        );
        assert!(
            v["details"].get("group").is_none(),
            "empty fields are omitted: {v}"
        );
    }

    #[test]
    fn group_qualified_resources() {
        assert_eq!(group_resource("apps", "deployments"), "deployments.apps");
        let s = Status::not_found("apps", "deployments", "web");
        assert_eq!(s.message(), "deployments.apps \"web\" not found");
        assert_eq!(s.code(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn retryable_status_sets_retry_after() {
        let r: Response<Bytes> = Status::service_unavailable("upstream down", 1).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }
}
