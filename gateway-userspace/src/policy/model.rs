//! The policy document as written: serde types that reject unknown keys.

use super::*;
use crate::masking::objects::MaskingSpec;

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a policy: a mapping with apiVersion, kind, default and rules"
)]
pub(super) struct RawPolicy {
    pub(super) api_version: String,
    pub(super) kind: String,
    pub(super) default: Action,
    #[serde(default)]
    pub(super) identity: Option<RawGuards>,
    #[serde(default)]
    pub(super) rules: Vec<RawRule>,
    #[serde(default)]
    pub(super) masking: Option<MaskingSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "identity guards: a mapping with denyInvalidTokens and denyServiceAccountMismatch"
)]
pub(super) struct RawGuards {
    #[serde(default)]
    pub(super) deny_invalid_tokens: bool,
    #[serde(default)]
    pub(super) deny_service_account_mismatch: bool,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a rule: a mapping with name, action, verbs and resources or nonResourceURLs"
)]
pub(super) struct RawRule {
    pub(super) name: String,
    pub(super) action: Action,
    #[serde(default)]
    pub(super) message: Option<String>,
    pub(super) verbs: Vec<String>,
    #[serde(default)]
    pub(super) api_groups: Option<Vec<String>>,
    #[serde(default)]
    pub(super) resources: Option<Vec<String>>,
    #[serde(default)]
    pub(super) namespaces: Option<Vec<String>>,
    #[serde(default)]
    pub(super) resource_names: Option<Vec<String>>,
    #[serde(default, rename = "nonResourceURLs")]
    pub(super) non_resource_urls: Option<Vec<String>>,
    #[serde(default)]
    pub(super) workloads: Option<RawWorkloads>,
    #[serde(default)]
    pub(super) principals: Option<RawPrincipals>,
    #[serde(default)]
    pub(super) masking: Option<MaskingSpec>,
    /// CEL conditions, every one of which must hold.
    #[serde(default)]
    pub(super) when: Option<Vec<String>>,
    /// Conditions on an exec or attach request.
    #[serde(default)]
    pub(super) exec: Option<RawExec>,
    /// Who approves, and how, for `action: approve`.
    #[serde(default)]
    pub(super) approval: Option<RawApproval>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "an approval: a mapping with approvers, timeout, grant and mode"
)]
pub(super) struct RawApproval {
    #[serde(default)]
    pub(super) approvers: Option<RawApprovers>,
    #[serde(default)]
    pub(super) timeout: Option<String>,
    #[serde(default)]
    pub(super) grant: Option<RawGrant>,
    #[serde(default)]
    pub(super) mode: Option<ApprovalMode>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "approvers: a mapping with groups and users"
)]
pub(super) struct RawApprovers {
    #[serde(default)]
    pub(super) groups: Vec<String>,
    #[serde(default)]
    pub(super) users: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a grant: `once`, or a mapping with `for` (a duration such as 15m) and `scope` (identical or rule)"
)]
pub(super) enum RawGrant {
    Word(String),
    Lasting(RawLasting),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawLasting {
    #[serde(rename = "for")]
    pub(super) duration: String,
    #[serde(default)]
    pub(super) scope: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "an exec selector: a mapping with commands, programs, commandRegexes, interactive, containers or stdinLines"
)]
pub(super) struct RawExec {
    #[serde(default)]
    pub(super) commands: Option<Vec<String>>,
    #[serde(default)]
    pub(super) programs: Option<Vec<String>>,
    #[serde(default)]
    pub(super) command_regexes: Option<Vec<String>>,
    #[serde(default)]
    pub(super) interactive: Option<bool>,
    #[serde(default)]
    pub(super) containers: Option<Vec<String>>,
    /// Line rules over what an allowed session types on stdin.
    #[serde(default)]
    pub(super) stdin_lines: Option<RawStdinLines>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "stdin line rules: a mapping with deny (a list of regexes) and an optional message"
)]
pub(super) struct RawStdinLines {
    pub(super) deny: Vec<String>,
    #[serde(default)]
    pub(super) message: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a workload selector: a mapping with namespaces, serviceAccounts, pods, labels or unknown"
)]
pub(super) struct RawWorkloads {
    #[serde(default)]
    pub(super) namespaces: Option<Vec<String>>,
    #[serde(default)]
    pub(super) service_accounts: Option<Vec<String>>,
    #[serde(default)]
    pub(super) pods: Option<Vec<String>>,
    #[serde(default)]
    pub(super) labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub(super) unknown: bool,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a principal selector: a mapping with kinds, subjects or groups"
)]
pub(super) struct RawPrincipals {
    #[serde(default)]
    pub(super) kinds: Option<Vec<String>>,
    #[serde(default)]
    pub(super) subjects: Option<Vec<String>>,
    #[serde(default)]
    pub(super) groups: Option<Vec<String>>,
}
