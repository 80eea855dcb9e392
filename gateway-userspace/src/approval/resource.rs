//! The `AccessRequest` custom resource: one held request waiting for a human decision.
//!
//! Generated from these types with kube-rs's `CustomResource` derive; `chaperone crd`
//! prints the definition shipped in deploy/. Timestamps are RFC 3339 strings (as
//! `metav1.Time` serialises), so the schema needs nothing from k8s-openapi's schema
//! support, which the released binary leaves out.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of Chaperone's own resources.
pub const GROUP: &str = "chaperone.dev";
/// The served (and stored) version.
pub const VERSION: &str = "v1alpha1";
/// The plural resource name.
pub const PLURAL: &str = "accessrequests";

/// What an agent asked for and who asked: the part of an `AccessRequest` the gateway
/// writes once, at creation.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "chaperone.dev",
    version = "v1alpha1",
    kind = "AccessRequest",
    plural = "accessrequests",
    singular = "accessrequest",
    shortname = "ar",
    namespaced,
    status = "AccessRequestStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Workload","type":"string","jsonPath":".spec.requester.workload.pod"}"#,
    printcolumn = r#"{"name":"Summary","type":"string","jsonPath":".spec.request.summary"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".spec.expiresAt"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AccessRequestSpec {
    /// Who asked: the calling pod (from the kernel) and the principal behind its token.
    pub requester: Requester,
    /// What was asked.
    pub request: RequestedAction,
    /// Hex SHA-256 over the requester's workload, the method, path and (masked) body: two
    /// requests with the same fingerprint are "the identical request" (reuse while
    /// pending, `grant.scope: identical`).
    pub fingerprint: String,
    /// The policy rule that asked for approval (its name, or `file:line`).
    pub rule: String,
    /// Who may decide, copied from the rule when the request was created.
    pub approvers: Approvers,
    /// What an approval grants.
    pub grant: Grant,
    /// The node whose gateway holds the request.
    pub node: String,
    /// When the request was held (RFC 3339).
    pub created_at: String,
    /// When silence becomes a denial (RFC 3339).
    pub expires_at: String,
}

/// The requesting workload and principal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct Requester {
    /// The calling pod, as the kernel attributed the connection.
    pub workload: WorkloadRef,
    /// The principal behind the bearer token the agent presented, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
}

/// A pod and its service account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The pod's UID (`metadata.uid`), from its cgroup: a pod deleted and created again
    /// under the same name is another pod, and an approval given to one does not carry
    /// over to the other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// The request held for approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct RequestedAction {
    /// The Kubernetes verb (`create`, `patch`, `delete`, ...).
    pub verb: String,
    /// `group/resource` (`apps/deployments`), or the resource alone for the core group.
    pub resource: String,
    /// The subresource (`scale`, `exec`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subresource: Option<String>,
    /// The target namespace, if namespaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The target object's name, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The request path with its query.
    pub path: String,
    /// One line a person can decide on: the exec argv, the changed image or
    /// securityContext, the replica count. Masked like every response.
    pub summary: String,
}

/// Who may decide on a request: any listed user, or any member of a listed group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct Approvers {
    /// Groups whose members may decide.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Users who may decide.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
}

/// What an approval lets through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    /// How long the approval lasts (`15m`); absent = this request only (`once`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// What a lasting approval covers.
    #[serde(default)]
    pub scope: GrantScope,
}

/// What a lasting approval covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub enum GrantScope {
    /// The identical request (same fingerprint) from the same workload.
    #[default]
    Identical,
    /// Any request the same rule matches from the same workload.
    Rule,
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
pub enum Phase {
    /// Waiting for a decision.
    #[default]
    Pending,
    /// Approved by an authorized approver.
    Approved,
    /// Denied by an authorized approver.
    Denied,
    /// Nobody decided before `expiresAt`.
    Expired,
}

impl Phase {
    /// The phase as the resource spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Approved => "Approved",
            Phase::Denied => "Denied",
            Phase::Expired => "Expired",
        }
    }

    /// Whether the phase is final.
    pub fn is_decided(self) -> bool {
        self != Phase::Pending
    }
}

/// The decision, written by a gateway (its approvals API, or the holder on expiry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AccessRequestStatus {
    /// Where the request stands.
    #[serde(default)]
    pub phase: Phase,
    /// The authenticated approver (user name) who decided; `chaperone` for an expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// When the decision was taken (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
    /// The approver's comment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Until when an approval with a lasting grant lets matching requests through (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_until: Option<String>,
    /// The seal over the decision (see [`super::seal`]); a decision without a valid seal
    /// is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<String>,
    /// Conditions, in the Kubernetes style.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<StatusCondition>,
}

/// A condition in the shape of `metav1.Condition`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct StatusCondition {
    /// The condition's type (`Decided`).
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase reason.
    pub reason: String,
    /// A readable message.
    #[serde(default)]
    pub message: String,
    /// When the status last changed (RFC 3339).
    pub last_transition_time: String,
}

/// The `CustomResourceDefinition` shipped in deploy/, as YAML.
pub fn crd_yaml() -> anyhow::Result<String> {
    use kube::CustomResourceExt as _;
    Ok(serde_norway::to_string(&AccessRequest::crd())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_ships_the_generated_definition() {
        let shipped = include_str!("../../../deploy/crds/accessrequests.chaperone.dev.yaml");
        let generated = crd_yaml().unwrap();
        assert_eq!(
            shipped.trim_end(),
            generated.trim_end(),
            "deploy/crds/accessrequests.chaperone.dev.yaml is stale: regenerate it with `chaperone crd > deploy/crds/accessrequests.chaperone.dev.yaml`"
        );
    }

    #[test]
    fn the_names_match_the_derive() {
        use kube::Resource as _;
        assert_eq!(AccessRequest::group(&()), GROUP);
        assert_eq!(AccessRequest::version(&()), VERSION);
        assert_eq!(AccessRequest::plural(&()), PLURAL);
    }
}
