//! The policy decision: policy as data plus one pure function, [`decide`].
//!
//! # Policy file format
//!
//! A policy is one YAML document in the vocabulary of Kubernetes RBAC. Unknown keys are
//! errors, and every error names the file, the YAML path and, where known, the line and
//! column (`policy.yaml:14:7: rules[2].verbs[0]: unknown verb 'remove' ...`).
//!
//! ```yaml
//! apiVersion: chaperone.dev/v1alpha1   # required, exactly this
//! kind: Policy                         # required, exactly this
//! default: allow                       # required: allow | deny, when no rule matches
//! identity:                            # optional guards, checked before any rule
//!   denyInvalidTokens: true            # deny a bearer token that was not accepted
//!   denyServiceAccountMismatch: true   # deny a ServiceAccount token of another pod
//! rules:                               # optional; evaluated in order, first match wins
//!   - name: protect-namespaces         # required, unique within the policy
//!     action: deny                     # required: allow | deny
//!     message: agents may not delete namespaces   # optional; shown to the client
//!     verbs: [delete, deletecollection]           # required, non-empty; "*" = any verb
//!     apiGroups: [""]                  # optional; "" = core group; absent or "*" = any
//!     resources: [namespaces]          # "pods", "pods/exec", "pods/*", "*/exec", "*"
//!     namespaces: []                   # optional; absent/empty = any, incl. cluster scope
//!     resourceNames: []                # optional; absent/empty = any name
//!     workloads:                       # optional; who is calling, from the kernel
//!       namespaces: [ai-agents]        # the calling pod's namespace
//!       serviceAccounts: [ai-agents/cursor, "ops/*"]   # "namespace/name" or "namespace/*"
//!       pods: [cursor-0, "batch-*"]    # pod name; trailing "*" = prefix
//!       labels: {app: agent}           # every pair must be on the pod
//!   - name: unidentified
//!     action: deny
//!     verbs: ["*"]
//!     resources: ["*"]
//!     workloads: {unknown: true}       # only requests whose pod could not be identified
//!   - name: health
//!     action: allow
//!     verbs: [get]
//!     nonResourceURLs: ["/healthz", "/version", "/apis/*"]   # trailing "*" = prefix
//!     principals:                      # optional; the verified bearer token
//!       kinds: [anonymous, oidc, serviceAccount, user, invalid]
//!       subjects: [alice@example.com, "system:serviceaccount:ci:*"]  # trailing "*" = prefix
//!       groups: [sre]                  # any one of these groups
//! ```
//!
//! A rule has either `resources` (a resource rule) or `nonResourceURLs` (a non-resource
//! rule), never both; `apiGroups`, `namespaces` and `resourceNames` only apply to resource
//! rules. `workloads` and `principals` apply to both. Lists may not be empty where an
//! empty list could never match (`apiGroups`, and every list under `workloads` and
//! `principals`): omit the key instead.
//!
//! # Matching
//!
//! A rule matches a request when every field it sets matches, as in RBAC:
//!
//! * `verbs`: the request's Kubernetes verb. Resource rules take `get list watch create
//!   update patch delete deletecollection proxy impersonate`; non-resource rules take the
//!   lowercase HTTP method: `get head post put patch delete options`. `"*"` matches any
//!   verb, including ones not listed here.
//! * `apiGroups`: the request's API group (`""` is the core group, `apps`, ...). An explicit
//!   empty list is an error: write `[""]` for the core group or omit the key for any group.
//! * `resources`: `pods` matches requests on pods only, **not** on a subresource such as
//!   `pods/exec`; `pods/exec` matches that subresource; `pods/*` matches every subresource
//!   of pods (but not pods itself); `*/exec` matches the `exec` subresource of any resource;
//!   `*/*` any subresource; `*` everything.
//! * `namespaces`: the request's namespace. A rule that lists namespaces never matches a
//!   cluster-scoped request; `"*"` in the list means "any namespace, but not cluster scope".
//!   Requests on a namespace object itself (`/api/v1/namespaces/prod`) are in namespace
//!   `prod`, as in RBAC.
//! * `resourceNames`: the object name, from the path or, for a list/watch, from a
//!   `fieldSelector=metadata.name=<name>`. A rule with `resourceNames` never matches a
//!   request without a name (a list, a create).
//! * `nonResourceURLs`: the decoded URL path, exactly, or by prefix when the entry ends in
//!   `*` (`/apis/*`); `"*"` alone matches every non-resource URL.
//! * `workloads`: the pod the kernel attributed the connection to (never anything the pod
//!   sends). Every key it sets must match: `namespaces` (`"*"` = any), `serviceAccounts`
//!   (`namespace/name`, or `namespace/*` for every service account of a namespace), `pods`
//!   (exact, or a prefix ending in `*`) and `labels` (every listed pair, as a
//!   `matchLabels`). A rule with `workloads` never matches a request whose pod is unknown
//!   (not found yet, or not a pod at all); `workloads: {}` matches any identified pod.
//!   `workloads: {unknown: true}` matches **only** unidentified callers, e.g. to deny them
//!   everything; it cannot be combined with the other keys.
//! * `principals`: the bearer token, as verified by the gateway (no token = `anonymous`).
//!   `kinds`: `anonymous`, `oidc` (a verified OIDC ID token), `serviceAccount` (a
//!   ServiceAccount token the API server authenticated), `user` (another token the API
//!   server authenticated), `invalid` (a token that was presented but not accepted);
//!   `subjects`: the user name (`system:serviceaccount:<ns>:<name>`, or the OIDC user name
//!   with its prefix), exactly or by a prefix ending in `*`; `groups`: matches when the
//!   principal is in at least one of them.
//!
//! Resource rules only match resource requests and non-resource rules only non-resource
//! requests. When no rule matches, `default` applies.
//!
//! # Identity guards
//!
//! The top-level `identity` guards run before the rules, so no rule can allow what they
//! deny. `denyInvalidTokens` denies a request whose bearer token was presented but not
//! accepted (bad signature, expired, unknown issuer, malformed header; the reason is in
//! the denial); `denyServiceAccountMismatch` denies a request carrying the ServiceAccount
//! token of a different service account than the pod the kernel attributed it to (a stolen
//! or borrowed token). The decision then names the guard, e.g.
//! `identity.denyInvalidTokens`, where a rule decision names the rule; rule names starting
//! with `identity.` are reserved for this.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    hash::{BuildHasherDefault, Hasher},
    io::Read as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{
    Deserialize, Deserializer,
    de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor},
};

use crate::{
    identity::{
        WorkloadIdentity,
        principal::{Principal, PrincipalKind},
    },
    request::{RequestInfo, Verb},
};

/// The `apiVersion` a policy document must declare.
pub const API_VERSION: &str = "chaperone.dev/v1alpha1";
/// The `kind` a policy document must declare.
pub const KIND: &str = "Policy";
/// Largest policy file [`Policy::from_file`] reads.
pub const MAX_POLICY_BYTES: u64 = 8 * 1024 * 1024;
/// [`Decision::rule`] when the `identity.denyInvalidTokens` guard denied the request.
pub const GUARD_INVALID_TOKENS: &str = "identity.denyInvalidTokens";
/// [`Decision::rule`] when the `identity.denyServiceAccountMismatch` guard denied it.
pub const GUARD_SERVICE_ACCOUNT_MISMATCH: &str = "identity.denyServiceAccountMismatch";
/// Rule names with this prefix are reserved for the identity guards.
const GUARD_PREFIX: &str = "identity.";

/// Verbs a resource rule may list (besides `*`).
const RESOURCE_VERBS: &[&str] = &[
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "proxy",
    "impersonate",
];
/// Verbs (lowercase HTTP methods) a non-resource rule may list (besides `*`).
const NON_RESOURCE_VERBS: &[&str] = &["get", "head", "post", "put", "patch", "delete", "options"];

/// Why a policy could not be loaded; the message names the file, YAML path and line.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The policy file is larger than [`MAX_POLICY_BYTES`].
    #[error("{path}: policy file is larger than {MAX_POLICY_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The document is not valid YAML or does not have the policy's shape (unknown key,
    /// wrong type, missing field).
    #[error("{}", located(source_name, *line, *column, yaml_path, message))]
    Syntax {
        /// The file name (or other label) the text came from.
        source_name: String,
        /// 1-based line, if known.
        line: Option<usize>,
        /// 1-based column, if known.
        column: Option<usize>,
        /// YAML path of the offending value, e.g. `rules[1]` (`.` for the document).
        yaml_path: String,
        /// What is wrong.
        message: String,
    },
    /// The document has the right shape but a value is not acceptable (unknown verb,
    /// malformed resource, duplicate rule name, ...).
    #[error("{}", located(source_name, *line, *column, yaml_path, message))]
    Invalid {
        /// The file name (or other label) the text came from.
        source_name: String,
        /// 1-based line, if known.
        line: Option<usize>,
        /// 1-based column, if known.
        column: Option<usize>,
        /// YAML path of the offending value, e.g. `rules[2].verbs[0]`.
        yaml_path: String,
        /// What is wrong.
        message: String,
    },
}

fn located(
    source: &str,
    line: Option<usize>,
    column: Option<usize>,
    path: &str,
    message: &str,
) -> String {
    let mut out = source.to_owned();
    if let Some(line) = line {
        out.push_str(&format!(":{line}"));
        if let Some(column) = column {
            out.push_str(&format!(":{column}"));
        }
    }
    if path.is_empty() || path == "." {
        format!("{out}: {message}")
    } else {
        format!("{out}: {path}: {message}")
    }
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Forward the request.
    Allow,
    /// Refuse it with a Kubernetes `Status` 403 (the default of an empty compiled policy,
    /// so a policy that failed to build fails closed).
    #[default]
    Deny,
}

impl Action {
    /// The action as policy files and recordings spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }

    /// Parses what [`Action::as_str`] wrote.
    pub fn parse(text: &str) -> Option<Action> {
        [Action::Allow, Action::Deny]
            .into_iter()
            .find(|a| a.as_str() == text)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of [`decide`]: the action and the rule (or identity guard) that chose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allow or deny.
    pub action: Action,
    /// Name of the matching rule, or of the identity guard that denied the request
    /// ([`GUARD_INVALID_TOKENS`], [`GUARD_SERVICE_ACCOUNT_MISMATCH`]); `None` when the
    /// policy default applied.
    pub rule: Option<Arc<str>>,
    /// The matching rule's message for the client, if it has one; for a guard, why it
    /// denied the request.
    pub message: Option<Arc<str>>,
}

impl Decision {
    /// Whether the request may go ahead.
    pub fn is_allowed(&self) -> bool {
        self.action == Action::Allow
    }

    /// A sentence for the client and the recording, e.g. `denied by Chaperone policy rule
    /// "protect-namespaces": agents may not delete namespaces`.
    pub fn reason(&self) -> String {
        let verb = match self.action {
            Action::Allow => "allowed",
            Action::Deny => "denied",
        };
        // Rule names cannot carry the guard prefix, so this names guards only.
        let what = match &self.rule {
            Some(rule) if rule.starts_with(GUARD_PREFIX) => "guard",
            _ => "rule",
        };
        match (&self.rule, &self.message) {
            (Some(rule), Some(message)) => {
                format!("{verb} by Chaperone policy {what} \"{rule}\": {message}")
            }
            (Some(rule), None) => format!("{verb} by Chaperone policy {what} \"{rule}\""),
            (None, _) => format!(
                "{verb} by Chaperone policy: no rule matched and the default action is {}",
                self.action
            ),
        }
    }
}

/// Everything a decision may depend on: what is asked, and who asks. Build it with
/// [`RequestContext::new`] and the `with_*` methods, so new inputs do not break callers.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext<'a> {
    /// The request's Kubernetes attributes.
    pub request: &'a RequestInfo,
    /// The workload the kernel attributed the connection to; `None` when there is none
    /// (treated like a workload that is not [`WorkloadIdentity::is_known`]).
    pub workload: Option<&'a WorkloadIdentity>,
    /// The verified principal behind the bearer token; `None` is anonymous.
    pub principal: Option<&'a Principal>,
}

impl<'a> RequestContext<'a> {
    /// A context holding only the request attributes: unknown workload, anonymous.
    pub fn new(request: &'a RequestInfo) -> Self {
        Self {
            request,
            workload: None,
            principal: None,
        }
    }

    /// Sets the workload; takes `&WorkloadIdentity` or `Option<&WorkloadIdentity>`.
    pub fn with_workload(mut self, workload: impl Into<Option<&'a WorkloadIdentity>>) -> Self {
        self.workload = workload.into();
        self
    }

    /// Sets the principal; takes `&Principal` or `Option<&Principal>`.
    pub fn with_principal(mut self, principal: impl Into<Option<&'a Principal>>) -> Self {
        self.principal = principal.into();
        self
    }
}

/// A compiled policy: cheap to clone and share (one `Arc` inside).
#[derive(Clone)]
pub struct Policy {
    inner: Arc<Compiled>,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("source", &self.inner.source)
            .field("default", &self.inner.default)
            .field(
                "rules",
                &self
                    .inner
                    .rules
                    .iter()
                    .map(|r| &*r.name)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Policy {
    /// Parses, validates and compiles a policy document; `source` names it in errors.
    pub fn from_yaml(text: &str, source: &str) -> Result<Policy, PolicyError> {
        // serde_norway reads an empty document as null and reports the first missing field,
        // which would hide the real problem.
        if text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            return Err(PolicyError::Syntax {
                source_name: source.to_owned(),
                line: None,
                column: None,
                yaml_path: ".".to_owned(),
                message: format!(
                    "empty policy document; expected apiVersion: {API_VERSION}, kind: {KIND}, default and rules"
                ),
            });
        }
        let raw: RawPolicy =
            serde_path_to_error::deserialize(serde_norway::Deserializer::from_str(text))
                .map_err(|e| syntax_error(source, e))?;
        let compiled = compile(raw, source).map_err(|invalid| {
            let (line, column) = locate(text, &invalid.path).unzip();
            PolicyError::Invalid {
                source_name: source.to_owned(),
                line,
                column,
                yaml_path: render_path(&invalid.path),
                message: invalid.message,
            }
        })?;
        Ok(Policy {
            inner: Arc::new(compiled),
        })
    }

    /// Reads and compiles a policy file (at most [`MAX_POLICY_BYTES`]).
    pub fn from_file(path: &Path) -> Result<Policy, PolicyError> {
        let read_error = |source| PolicyError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_error)?;
        let mut text = String::new();
        // One byte over the limit tells "exactly at the limit" from "too large" without
        // trusting the file's reported size (a FIFO or /dev/zero has none).
        file.take(MAX_POLICY_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_error)?;
        if text.len() as u64 > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge {
                path: path.to_owned(),
            });
        }
        Policy::from_yaml(&text, &path.display().to_string())
    }

    /// A policy with no rules that allows everything.
    pub fn allow_all() -> Policy {
        let raw = RawPolicy {
            api_version: API_VERSION.to_owned(),
            kind: KIND.to_owned(),
            default: Action::Allow,
            identity: None,
            rules: Vec::new(),
        };
        let compiled = compile(raw, "allowAll");
        Policy {
            inner: Arc::new(compiled.unwrap_or_else(|_| Compiled::empty("allowAll"))),
        }
    }

    /// Number of rules.
    pub fn rule_count(&self) -> usize {
        self.inner.rules.len()
    }

    /// The action when no rule matches.
    pub fn default_action(&self) -> Action {
        self.inner.default
    }

    /// Where the policy came from (file name or label).
    pub fn source(&self) -> &str {
        &self.inner.source
    }
}

/// Decides a request: an identity guard's denial, else the first matching rule's action,
/// else the policy default.
pub fn decide(policy: &Policy, ctx: &RequestContext<'_>) -> Decision {
    let p = &*policy.inner;
    if let Some(denied) = p.guards.check(ctx.principal) {
        return denied;
    }
    let req = ctx.request;
    let found = if req.is_resource_request {
        p.first_resource_match(ctx)
    } else {
        p.first_url_match(ctx)
    };
    match found {
        Some(rule) => Decision {
            action: rule.action,
            rule: Some(rule.name.clone()),
            message: rule.message.clone(),
        },
        None => Decision {
            action: p.default,
            rule: None,
            message: None,
        },
    }
}

// ---------------------------------------------------------------------------------------
// The document as written.

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a policy: a mapping with apiVersion, kind, default and rules"
)]
struct RawPolicy {
    api_version: String,
    kind: String,
    default: Action,
    #[serde(default)]
    identity: Option<RawGuards>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "identity guards: a mapping with denyInvalidTokens and denyServiceAccountMismatch"
)]
struct RawGuards {
    #[serde(default)]
    deny_invalid_tokens: bool,
    #[serde(default)]
    deny_service_account_mismatch: bool,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a rule: a mapping with name, action, verbs and resources or nonResourceURLs"
)]
struct RawRule {
    name: String,
    action: Action,
    #[serde(default)]
    message: Option<String>,
    verbs: Vec<String>,
    #[serde(default)]
    api_groups: Option<Vec<String>>,
    #[serde(default)]
    resources: Option<Vec<String>>,
    #[serde(default)]
    namespaces: Option<Vec<String>>,
    #[serde(default)]
    resource_names: Option<Vec<String>>,
    #[serde(default, rename = "nonResourceURLs")]
    non_resource_urls: Option<Vec<String>>,
    #[serde(default)]
    workloads: Option<RawWorkloads>,
    #[serde(default)]
    principals: Option<RawPrincipals>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a workload selector: a mapping with namespaces, serviceAccounts, pods, labels or unknown"
)]
struct RawWorkloads {
    #[serde(default)]
    namespaces: Option<Vec<String>>,
    #[serde(default)]
    service_accounts: Option<Vec<String>>,
    #[serde(default)]
    pods: Option<Vec<String>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    unknown: bool,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a principal selector: a mapping with kinds, subjects or groups"
)]
struct RawPrincipals {
    #[serde(default)]
    kinds: Option<Vec<String>>,
    #[serde(default)]
    subjects: Option<Vec<String>>,
    #[serde(default)]
    groups: Option<Vec<String>>,
}

// ---------------------------------------------------------------------------------------
// The compiled form.

/// Verb bits; `OTHER` stands for every verb not in the known lists, which only `*` covers.
mod verb_bits {
    pub const GET: u32 = 1 << 0;
    pub const LIST: u32 = 1 << 1;
    pub const WATCH: u32 = 1 << 2;
    pub const CREATE: u32 = 1 << 3;
    pub const UPDATE: u32 = 1 << 4;
    pub const PATCH: u32 = 1 << 5;
    pub const DELETE: u32 = 1 << 6;
    pub const DELETECOLLECTION: u32 = 1 << 7;
    pub const PROXY: u32 = 1 << 8;
    pub const IMPERSONATE: u32 = 1 << 9;
    pub const HEAD: u32 = 1 << 10;
    pub const POST: u32 = 1 << 11;
    pub const PUT: u32 = 1 << 12;
    pub const OPTIONS: u32 = 1 << 13;
    pub const OTHER: u32 = 1 << 31;
    pub const ANY: u32 = u32::MAX;
}

/// The bit of a request's verb: a match on the enum, no string compare per request.
fn request_verb_bit(verb: Verb) -> u32 {
    use verb_bits::*;
    match verb {
        Verb::Get => GET,
        Verb::List => LIST,
        Verb::Watch => WATCH,
        Verb::Create => CREATE,
        Verb::Update => UPDATE,
        Verb::Patch => PATCH,
        Verb::Delete => DELETE,
        Verb::DeleteCollection => DELETECOLLECTION,
        Verb::Proxy => PROXY,
        Verb::Head => HEAD,
        Verb::Post => POST,
        Verb::Put => PUT,
        Verb::Options => OPTIONS,
        Verb::Unknown => OTHER,
    }
}

/// The bit of a verb named in a policy file (RBAC verbs include `impersonate`).
fn verb_bit(verb: &str) -> u32 {
    use verb_bits::*;
    match verb {
        "get" => GET,
        "list" => LIST,
        "watch" => WATCH,
        "create" => CREATE,
        "update" => UPDATE,
        "patch" => PATCH,
        "delete" => DELETE,
        "deletecollection" => DELETECOLLECTION,
        "proxy" => PROXY,
        "impersonate" => IMPERSONATE,
        "head" => HEAD,
        "post" => POST,
        "put" => PUT,
        "options" => OPTIONS,
        _ => OTHER,
    }
}

/// A set of interned strings, or anything.
#[derive(Debug)]
enum IdSet {
    Any,
    Of(Box<[u32]>),
}

impl IdSet {
    fn contains(&self, id: Option<u32>) -> bool {
        match self {
            IdSet::Any => true,
            IdSet::Of(ids) => id.is_some_and(|id| ids.contains(&id)),
        }
    }
}

/// Namespace condition of a resource rule.
#[derive(Debug)]
enum NamespaceSet {
    Any,
    AnyNamespaced,
    Of(Box<[u32]>),
}

#[derive(Debug)]
struct Rule {
    name: Arc<str>,
    action: Action,
    message: Option<Arc<str>>,
    verbs: u32,
    groups: IdSet,
    namespaces: NamespaceSet,
    names: IdSet,
    /// Boxed so rules without identity conditions stay small and skip it with one branch.
    identity: Option<Box<IdentityCond>>,
}

/// A rule's `workloads` and `principals`, checked after its request conditions: they are
/// not part of the index, so first-match order is unaffected.
#[derive(Debug, Default)]
struct IdentityCond {
    workload: Option<WorkloadSel>,
    principal: Option<PrincipalSel>,
}

#[derive(Debug)]
enum WorkloadSel {
    /// `unknown: true`: only callers whose pod was not identified.
    Unknown,
    /// Identified pods with these properties (ids from `Compiled::idents`).
    Known {
        namespaces: IdSet,
        service_accounts: Option<Box<[ServiceAccountSel]>>,
        pods: Option<Patterns>,
        labels: Box<[(Box<str>, Box<str>)]>,
    },
}

/// `(namespace id, name id)` of a `serviceAccounts` entry; name `None` for `namespace/*`.
type ServiceAccountSel = (u32, Option<u32>);

#[derive(Debug)]
struct PrincipalSel {
    /// [`kind_bit`]s.
    kinds: u8,
    subjects: Option<Patterns>,
    groups: Option<Box<[Box<str>]>>,
}

/// Exact values (interned) and prefixes (entries ending in `*`).
#[derive(Debug)]
struct Patterns {
    exact: Box<[u32]>,
    prefixes: Box<[Box<str>]>,
}

impl Patterns {
    fn matches(&self, id: Option<u32>, value: Option<&str>) -> bool {
        id.is_some_and(|id| self.exact.contains(&id))
            || value.is_some_and(|v| self.prefixes.iter().any(|p| v.starts_with(&**p)))
    }
}

/// Principal kinds as `kinds:` spells them, with their bits.
const PRINCIPAL_KINDS: &[(&str, PrincipalKind)] = &[
    ("anonymous", PrincipalKind::Anonymous),
    ("oidc", PrincipalKind::Oidc),
    ("serviceAccount", PrincipalKind::ServiceAccount),
    ("user", PrincipalKind::User),
    ("invalid", PrincipalKind::Invalid),
];

fn kind_bit(kind: PrincipalKind) -> u8 {
    match kind {
        PrincipalKind::Anonymous => 1 << 0,
        PrincipalKind::Oidc => 1 << 1,
        PrincipalKind::ServiceAccount => 1 << 2,
        PrincipalKind::User => 1 << 3,
        PrincipalKind::Invalid => 1 << 4,
    }
}

/// The caller's identity strings as ids of `Compiled::idents`, looked up once per request
/// and only when a candidate rule has identity conditions.
#[derive(Debug, Clone, Copy)]
struct CallerIds {
    namespace: Option<u32>,
    service_account: Option<u32>,
    pod: Option<u32>,
    subject: Option<u32>,
}

/// The policy-level identity guards, with their decision names allocated once.
#[derive(Debug, Default)]
struct Guards {
    invalid_tokens: Option<Arc<str>>,
    service_account_mismatch: Option<Arc<str>>,
}

impl Guards {
    fn check(&self, principal: Option<&Principal>) -> Option<Decision> {
        let principal = principal?;
        let deny = |rule: &Arc<str>, message: String| Decision {
            action: Action::Deny,
            rule: Some(rule.clone()),
            message: Some(Arc::from(message)),
        };
        if let Some(rule) = &self.invalid_tokens
            && principal.kind == PrincipalKind::Invalid
        {
            let why = principal.reason.as_deref().unwrap_or("no reason given");
            return Some(deny(
                rule,
                format!("the request's bearer token was not accepted: {why}"),
            ));
        }
        if let Some(rule) = &self.service_account_mismatch
            && let Some(mismatch) = &principal.mismatch
        {
            return Some(deny(
                rule,
                format!("the bearer token does not belong to the calling pod: {mismatch}"),
            ));
        }
        None
    }
}

/// FxHash (rustc's hasher): a multiply-rotate per word, several times faster than SipHash
/// on short keys. Flooding is not a concern here: every table is filled from the policy,
/// and a request only looks keys up, so it cannot build long collision chains.
#[derive(Debug, Default, Clone, Copy)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        for &b in chunks.remainder() {
            self.add(u64::from(b));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// A candidate rule: its index and verb bits, so most non-matching rules are skipped
/// without touching the rule itself.
type Entry = (u32, u32);

/// Most lists one request can visit: five resource keys, four lists each.
const MAX_LISTS: usize = 20;

/// `Candidates::by_workload` key part for "any request namespace".
const ANY_NS: u32 = u32::MAX;

/// Candidate rules for one resource key, ascending, split by the request's namespace and
/// by the calling workload's namespace: a request visits only the rules of its own
/// namespace and caller and those that apply to any.
#[derive(Debug, Default)]
struct Candidates {
    any_namespace: Vec<Entry>,
    by_namespace: FastMap<u32, Vec<Entry>>,
    /// Rules that only match callers in one workload namespace, keyed by (request
    /// namespace id or [`ANY_NS`], workload namespace id): per-team rules of the same
    /// request shape do not all become candidates of every request.
    by_workload: FastMap<(u32, u32), Vec<Entry>>,
}

impl Candidates {
    fn push(&mut self, entry: Entry, namespaces: &NamespaceSet, callers: Option<&[u32]>) {
        match (namespaces, callers) {
            (NamespaceSet::Of(ids), None) => {
                for id in ids {
                    push_once(self.by_namespace.entry(*id).or_default(), entry);
                }
            }
            (NamespaceSet::Any | NamespaceSet::AnyNamespaced, None) => {
                push_once(&mut self.any_namespace, entry);
            }
            (NamespaceSet::Of(ids), Some(callers)) => {
                for id in ids {
                    for caller in callers {
                        push_once(self.by_workload.entry((*id, *caller)).or_default(), entry);
                    }
                }
            }
            (NamespaceSet::Any | NamespaceSet::AnyNamespaced, Some(callers)) => {
                for caller in callers {
                    push_once(
                        self.by_workload.entry((ANY_NS, *caller)).or_default(),
                        entry,
                    );
                }
            }
        }
    }

    /// Appends this key's non-empty lists for namespace id `ns` and caller namespace id
    /// `caller` to `lists[*len..]`.
    fn collect<'a>(
        &'a self,
        ns: Option<u32>,
        caller: Option<u32>,
        lists: &mut [&'a [Entry]; MAX_LISTS],
        len: &mut usize,
    ) {
        let none = &[][..];
        let own = ns
            .and_then(|id| self.by_namespace.get(&id))
            .map_or(none, |v| v);
        let (caller_any, caller_own) = match caller {
            Some(c) if !self.by_workload.is_empty() => (
                self.by_workload.get(&(ANY_NS, c)).map_or(none, |v| v),
                ns.and_then(|id| self.by_workload.get(&(id, c)))
                    .map_or(none, |v| v),
            ),
            _ => (none, none),
        };
        for list in [&self.any_namespace[..], own, caller_any, caller_own] {
            if !list.is_empty() && *len < lists.len() {
                lists[*len] = list;
                *len += 1;
            }
        }
    }
}

/// Rules are compiled in order, so appending keeps lists ascending; a rule that lists the
/// same entry twice is kept once.
fn push_once(list: &mut Vec<Entry>, entry: Entry) {
    if list.last().is_none_or(|last| last.0 != entry.0) {
        list.push(entry);
    }
}

/// Candidate rules whose resource entries start with one resource part.
#[derive(Debug, Default)]
struct ResourceIndex {
    /// `res`: no subresource.
    plain: Candidates,
    /// `res/sub`.
    subs: FastMap<Box<str>, Candidates>,
    /// `res/*`.
    any_sub: Candidates,
}

#[derive(Debug, Default)]
struct Interner {
    ids: FastMap<Box<str>, u32>,
}

impl Interner {
    fn intern(&mut self, s: &str) -> u32 {
        let next = self.ids.len() as u32;
        *self.ids.entry(s.into()).or_insert(next)
    }

    fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }
}

#[derive(Debug, Default)]
struct Compiled {
    source: String,
    default: Action,
    rules: Vec<Rule>,
    /// Resource rules keyed by the resource part of their entries.
    by_resource: FastMap<Box<str>, ResourceIndex>,
    /// Entries `*/sub` and `*/*`.
    star: ResourceIndex,
    /// Entries `*`.
    any_resource: Candidates,
    /// Non-resource rules by exact URL.
    url_exact: FastMap<Box<str>, Vec<u32>>,
    /// Non-resource rules by URL prefix (`""` for `*`), in rule order.
    url_prefix: Vec<(Box<str>, u32)>,
    groups: Interner,
    namespaces: Interner,
    names: Interner,
    /// Workload namespaces, service account names, pod names and principal subjects named
    /// by `workloads` and `principals` (one table: equal strings get equal ids).
    idents: Interner,
    /// Whether any resource rule is in a `Candidates::by_workload` list.
    caller_indexed: bool,
    guards: Guards,
}

impl Compiled {
    fn empty(source: &str) -> Self {
        Compiled {
            source: source.to_owned(),
            default: Action::Allow,
            ..Compiled::default()
        }
    }

    fn caller_ids(&self, ctx: &RequestContext<'_>) -> CallerIds {
        let workload = ctx.workload.filter(|w| w.is_known());
        let id = |s: Option<&String>| s.and_then(|s| self.idents.get(s));
        CallerIds {
            namespace: id(workload.and_then(|w| w.namespace.as_ref())),
            service_account: id(workload.and_then(|w| w.service_account.as_ref())),
            pod: id(workload.and_then(|w| w.pod.as_ref())),
            subject: id(ctx.principal.and_then(|p| p.subject.as_ref())),
        }
    }

    /// Whether the caller satisfies a rule's identity conditions; `ids` is filled on first
    /// use.
    fn identity_matches(
        &self,
        rule: &Rule,
        ctx: &RequestContext<'_>,
        ids: &mut Option<CallerIds>,
    ) -> bool {
        let Some(cond) = &rule.identity else {
            return true;
        };
        let ids = *ids.get_or_insert_with(|| self.caller_ids(ctx));
        let known = ctx.workload.filter(|w| w.is_known());
        let workload_ok = match (&cond.workload, known) {
            (None, _) => true,
            (Some(WorkloadSel::Unknown), w) => w.is_none(),
            (Some(WorkloadSel::Known { .. }), None) => false,
            (
                Some(WorkloadSel::Known {
                    namespaces,
                    service_accounts,
                    pods,
                    labels,
                }),
                Some(w),
            ) => {
                namespaces.contains(ids.namespace)
                    && service_accounts.as_deref().is_none_or(|sas| {
                        sas.iter().any(|&(ns, name)| {
                            Some(ns) == ids.namespace
                                && name.is_none_or(|n| Some(n) == ids.service_account)
                        })
                    })
                    && pods
                        .as_ref()
                        .is_none_or(|p| p.matches(ids.pod, w.pod.as_deref()))
                    && labels
                        .iter()
                        .all(|(k, v)| w.labels.get(&**k).is_some_and(|have| **have == **v))
            }
        };
        if !workload_ok {
            return false;
        }
        let Some(sel) = &cond.principal else {
            return true;
        };
        let kind = ctx.principal.map_or(PrincipalKind::Anonymous, |p| p.kind);
        if sel.kinds & kind_bit(kind) == 0 {
            return false;
        }
        let subject = ctx.principal.and_then(|p| p.subject.as_deref());
        if let Some(subjects) = &sel.subjects
            && !subjects.matches(ids.subject, subject)
        {
            return false;
        }
        sel.groups.as_deref().is_none_or(|groups| {
            ctx.principal.is_some_and(|p| {
                p.groups
                    .iter()
                    .any(|have| groups.iter().any(|g| **g == **have))
            })
        })
    }

    fn first_resource_match(&self, ctx: &RequestContext<'_>) -> Option<&Rule> {
        let req = ctx.request;
        // Namespaces are never empty in a policy, so a cluster-scoped request gets `None`.
        let ns = self.namespaces.get(&req.namespace);
        // One lookup, and only when some rule is indexed by its callers' namespace.
        let caller = if self.caller_indexed {
            ctx.workload
                .filter(|w| w.is_known())
                .and_then(|w| w.namespace.as_deref())
                .and_then(|n| self.idents.get(n))
        } else {
            None
        };
        let mut lists: [&[Entry]; MAX_LISTS] = [&[]; MAX_LISTS];
        let mut len = 0;
        let by_res = self.by_resource.get(req.resource.as_str());
        if req.subresource.is_empty() {
            if let Some(r) = by_res {
                r.plain.collect(ns, caller, &mut lists, &mut len);
            }
        } else {
            let sub = req.subresource.as_str();
            if let Some(r) = by_res {
                if let Some(c) = r.subs.get(sub) {
                    c.collect(ns, caller, &mut lists, &mut len);
                }
                r.any_sub.collect(ns, caller, &mut lists, &mut len);
            }
            if let Some(c) = self.star.subs.get(sub) {
                c.collect(ns, caller, &mut lists, &mut len);
            }
            self.star.any_sub.collect(ns, caller, &mut lists, &mut len);
        }
        self.any_resource.collect(ns, caller, &mut lists, &mut len);

        let verb = request_verb_bit(req.verb);
        // Group and name ids are looked up at most once, and only if a candidate needs them.
        let mut group = None;
        let mut name = None;
        let mut ids = None;
        let matches = |rule: &Rule| {
            if let IdSet::Of(_) = rule.groups
                && !rule
                    .groups
                    .contains(*group.get_or_insert_with(|| self.groups.get(&req.api_group)))
            {
                return false;
            }
            let ns_ok = match &rule.namespaces {
                NamespaceSet::Any => true,
                NamespaceSet::AnyNamespaced => !req.namespace.is_empty(),
                NamespaceSet::Of(ids) => ns.is_some_and(|id| ids.contains(&id)),
            };
            if !ns_ok {
                return false;
            }
            let names_ok = match rule.names {
                IdSet::Any => true,
                IdSet::Of(_) => {
                    !req.name.is_empty()
                        && rule
                            .names
                            .contains(*name.get_or_insert_with(|| self.names.get(&req.name)))
                }
            };
            names_ok && self.identity_matches(rule, ctx, &mut ids)
        };
        first_in_merged(&mut lists[..len], verb, &self.rules, matches)
    }

    fn first_url_match(&self, ctx: &RequestContext<'_>) -> Option<&Rule> {
        let req = ctx.request;
        let mut ids = None;
        let verb = request_verb_bit(req.verb);
        let exact = self.url_exact.get(req.path.as_str()).map_or(&[][..], |v| v);
        let mut prefixes = self
            .url_prefix
            .iter()
            .filter(|(prefix, _)| req.path.starts_with(&**prefix))
            .map(|(_, idx)| *idx)
            .peekable();
        let mut exact = exact.iter().copied().peekable();
        loop {
            let next = match (exact.peek(), prefixes.peek()) {
                (None, None) => return None,
                (Some(&e), None) => {
                    exact.next();
                    e
                }
                (None, Some(&p)) => {
                    prefixes.next();
                    p
                }
                (Some(&e), Some(&p)) => {
                    if e <= p {
                        exact.next();
                    }
                    if p <= e {
                        prefixes.next();
                    }
                    e.min(p)
                }
            };
            let rule = &self.rules[next as usize];
            if rule.verbs & verb != 0 && self.identity_matches(rule, ctx, &mut ids) {
                return Some(rule);
            }
        }
    }
}

/// Walks the union of ascending candidate lists in ascending order (so the first match in
/// policy order wins) and returns the first rule with the verb that `matches` accepts.
fn first_in_merged<'r>(
    lists: &mut [&[Entry]],
    verb: u32,
    rules: &'r [Rule],
    mut matches: impl FnMut(&Rule) -> bool,
) -> Option<&'r Rule> {
    if let [only] = lists {
        return only
            .iter()
            .filter(|(_, verbs)| verbs & verb != 0)
            .filter_map(|(index, _)| rules.get(*index as usize))
            .find(|rule| matches(rule));
    }
    loop {
        let (next, verbs) = lists.iter().filter_map(|l| l.first()).min().copied()?;
        for list in lists.iter_mut() {
            if list.first().is_some_and(|head| head.0 == next) {
                *list = &list[1..];
            }
        }
        if verbs & verb == 0 {
            continue;
        }
        if let Some(rule) = rules.get(next as usize)
            && matches(rule)
        {
            return Some(rule);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Validation and compilation.

/// One step of a YAML path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(&'static str),
    /// A key chosen by the author (a label key).
    Field(Box<str>),
    Index(usize),
}

/// A semantic error before it is located in the text.
#[derive(Debug)]
struct InvalidAt {
    path: Vec<Seg>,
    message: String,
}

fn invalid(path: Vec<Seg>, message: impl Into<String>) -> InvalidAt {
    InvalidAt {
        path,
        message: message.into(),
    }
}

fn render_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Field(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn compile(raw: RawPolicy, source: &str) -> Result<Compiled, InvalidAt> {
    if raw.api_version != API_VERSION {
        return Err(invalid(
            vec![Seg::Key("apiVersion")],
            format!(
                "unsupported apiVersion '{}', expected '{API_VERSION}'",
                raw.api_version
            ),
        ));
    }
    if raw.kind != KIND {
        return Err(invalid(
            vec![Seg::Key("kind")],
            format!("unsupported kind '{}', expected '{KIND}'", raw.kind),
        ));
    }
    let guards = raw.identity.unwrap_or_default();
    let mut out = Compiled {
        source: source.to_owned(),
        default: raw.default,
        guards: Guards {
            invalid_tokens: guards
                .deny_invalid_tokens
                .then(|| Arc::from(GUARD_INVALID_TOKENS)),
            service_account_mismatch: guards
                .deny_service_account_mismatch
                .then(|| Arc::from(GUARD_SERVICE_ACCOUNT_MISMATCH)),
        },
        ..Compiled::default()
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, rule) in raw.rules.into_iter().enumerate() {
        let at = |rest: &[Seg]| {
            let mut path = vec![Seg::Key("rules"), Seg::Index(i)];
            path.extend_from_slice(rest);
            path
        };
        if rule.name.trim().is_empty() {
            return Err(invalid(
                at(&[Seg::Key("name")]),
                "rule name must not be empty",
            ));
        }
        if rule.name.starts_with(GUARD_PREFIX) {
            return Err(invalid(
                at(&[Seg::Key("name")]),
                format!(
                    "rule name '{}' starts with '{GUARD_PREFIX}', which is reserved for the policy's identity guards",
                    rule.name
                ),
            ));
        }
        if let Some(first) = seen.insert(rule.name.clone(), i) {
            return Err(invalid(
                at(&[Seg::Key("name")]),
                format!(
                    "duplicate rule name '{}' (also used by rules[{first}])",
                    rule.name
                ),
            ));
        }
        if rule.message.as_deref().is_some_and(|m| m.trim().is_empty()) {
            return Err(invalid(
                at(&[Seg::Key("message")]),
                "message must not be empty; omit it for none",
            ));
        }
        let index =
            u32::try_from(i).map_err(|_| invalid(at(&[]), "too many rules (more than 2^32)"))?;
        // Checked before the rule is indexed, so a bad selector leaves no index entry behind.
        let identity = compile_identity(&rule, &at, &mut out.idents)?;
        let mut compiled = match (&rule.resources, &rule.non_resource_urls) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    at(&[Seg::Key("nonResourceURLs")]),
                    "a rule has either 'resources' or 'nonResourceURLs', not both",
                ));
            }
            (None, None) => {
                return Err(invalid(
                    at(&[]),
                    "a rule needs 'resources' (resource rule) or 'nonResourceURLs' (non-resource rule)",
                ));
            }
            (Some(resources), None) => compile_resource_rule(
                &rule,
                resources,
                index,
                caller_namespaces(identity.as_deref()).as_deref(),
                &at,
                &mut out,
            )?,
            (None, Some(urls)) => compile_url_rule(&rule, urls, index, &at, &mut out)?,
        };
        compiled.identity = identity;
        out.rules.push(compiled);
    }
    Ok(out)
}

fn compile_verbs(
    verbs: &[String],
    allowed: &[&str],
    kind: &str,
    at: &dyn Fn(&[Seg]) -> Vec<Seg>,
) -> Result<u32, InvalidAt> {
    if verbs.is_empty() {
        return Err(invalid(
            at(&[Seg::Key("verbs")]),
            "must list at least one verb ('*' for any)",
        ));
    }
    let mut bits = 0;
    for (j, verb) in verbs.iter().enumerate() {
        if verb == "*" {
            bits = verb_bits::ANY;
        } else if allowed.contains(&verb.as_str()) {
            bits |= verb_bit(verb);
        } else {
            return Err(invalid(
                at(&[Seg::Key("verbs"), Seg::Index(j)]),
                format!(
                    "unknown verb '{verb}'; {kind} rules take '*' or one of: {}",
                    allowed.join(", ")
                ),
            ));
        }
    }
    Ok(bits)
}

/// The workload namespaces a rule's callers must be in, if its `workloads` selector
/// implies any (`namespaces`, else the namespaces of `serviceAccounts`): such a rule is
/// indexed under them.
fn caller_namespaces(identity: Option<&IdentityCond>) -> Option<Vec<u32>> {
    match identity?.workload.as_ref()? {
        WorkloadSel::Known {
            namespaces: IdSet::Of(ids),
            ..
        } => Some(ids.to_vec()),
        WorkloadSel::Known {
            namespaces: IdSet::Any,
            service_accounts: Some(sas),
            ..
        } => {
            let mut ids: Vec<u32> = sas.iter().map(|(ns, _)| *ns).collect();
            ids.sort_unstable();
            ids.dedup();
            Some(ids)
        }
        _ => None,
    }
}

fn compile_resource_rule(
    rule: &RawRule,
    resources: &[String],
    index: u32,
    callers: Option<&[u32]>,
    at: &dyn Fn(&[Seg]) -> Vec<Seg>,
    out: &mut Compiled,
) -> Result<Rule, InvalidAt> {
    let verbs = compile_verbs(&rule.verbs, RESOURCE_VERBS, "resource", at)?;

    let groups = match &rule.api_groups {
        None => IdSet::Any,
        Some(groups) if groups.is_empty() => {
            return Err(invalid(
                at(&[Seg::Key("apiGroups")]),
                "lists no API group, so the rule could never match; write [\"\"] for the core group or omit the key for any group",
            ));
        }
        Some(groups) => {
            for (j, group) in groups.iter().enumerate() {
                check_group(group)
                    .map_err(|m| invalid(at(&[Seg::Key("apiGroups"), Seg::Index(j)]), m))?;
            }
            if groups.iter().any(|g| g == "*") {
                IdSet::Any
            } else {
                IdSet::Of(groups.iter().map(|g| out.groups.intern(g)).collect())
            }
        }
    };

    let namespaces = match &rule.namespaces {
        None => NamespaceSet::Any,
        Some(list) if list.is_empty() => NamespaceSet::Any,
        Some(list) => {
            for (j, ns) in list.iter().enumerate() {
                check_namespace(ns)
                    .map_err(|m| invalid(at(&[Seg::Key("namespaces"), Seg::Index(j)]), m))?;
            }
            if list.iter().any(|n| n == "*") {
                NamespaceSet::AnyNamespaced
            } else {
                NamespaceSet::Of(list.iter().map(|n| out.namespaces.intern(n)).collect())
            }
        }
    };

    let names = match &rule.resource_names {
        None => IdSet::Any,
        Some(list) if list.is_empty() => IdSet::Any,
        Some(list) => {
            for (j, name) in list.iter().enumerate() {
                check_resource_name(name)
                    .map_err(|m| invalid(at(&[Seg::Key("resourceNames"), Seg::Index(j)]), m))?;
            }
            IdSet::Of(list.iter().map(|n| out.names.intern(n)).collect())
        }
    };

    if resources.is_empty() {
        return Err(invalid(
            at(&[Seg::Key("resources")]),
            "must list at least one resource ('*' for any)",
        ));
    }
    // Validate all entries first so a bad entry leaves no half-indexed rule behind.
    let mut parsed = Vec::with_capacity(resources.len());
    for (j, entry) in resources.iter().enumerate() {
        parsed.push(
            parse_resource(entry)
                .map_err(|m| invalid(at(&[Seg::Key("resources"), Seg::Index(j)]), m))?,
        );
    }
    let entry = (index, verbs);
    for (resource, sub) in parsed {
        let candidates = match (resource, sub) {
            ("*", None) => &mut out.any_resource,
            ("*", Some("*")) => &mut out.star.any_sub,
            ("*", Some(sub)) => out.star.subs.entry(sub.into()).or_default(),
            (res, None) => &mut out.by_resource.entry(res.into()).or_default().plain,
            (res, Some("*")) => &mut out.by_resource.entry(res.into()).or_default().any_sub,
            (res, Some(sub)) => out
                .by_resource
                .entry(res.into())
                .or_default()
                .subs
                .entry(sub.into())
                .or_default(),
        };
        candidates.push(entry, &namespaces, callers);
    }
    out.caller_indexed |= callers.is_some();

    Ok(Rule {
        name: Arc::from(rule.name.as_str()),
        action: rule.action,
        message: rule.message.as_deref().map(Arc::from),
        verbs,
        groups,
        namespaces,
        names,
        identity: None,
    })
}

fn compile_url_rule(
    rule: &RawRule,
    urls: &[String],
    index: u32,
    at: &dyn Fn(&[Seg]) -> Vec<Seg>,
    out: &mut Compiled,
) -> Result<Rule, InvalidAt> {
    for (key, present) in [
        ("apiGroups", rule.api_groups.is_some()),
        ("namespaces", rule.namespaces.is_some()),
        ("resourceNames", rule.resource_names.is_some()),
    ] {
        if present {
            return Err(invalid(
                at(&[Seg::Key(key)]),
                format!(
                    "'{key}' only applies to resource rules, not to a rule with 'nonResourceURLs'"
                ),
            ));
        }
    }
    let verbs = compile_verbs(&rule.verbs, NON_RESOURCE_VERBS, "non-resource", at)?;
    if urls.is_empty() {
        return Err(invalid(
            at(&[Seg::Key("nonResourceURLs")]),
            "must list at least one URL ('*' for any)",
        ));
    }
    for (j, url) in urls.iter().enumerate() {
        let at_url = || at(&[Seg::Key("nonResourceURLs"), Seg::Index(j)]);
        if url == "*" {
            continue;
        }
        if !url.starts_with('/') {
            return Err(invalid(
                at_url(),
                format!("URL '{url}' must start with '/' (or be '*')"),
            ));
        }
        if url[..url.len() - 1].contains('*') {
            return Err(invalid(
                at_url(),
                format!("URL '{url}' may only have '*' at the end (a prefix match)"),
            ));
        }
    }
    for url in urls {
        if let Some(prefix) = url.strip_suffix('*') {
            if out
                .url_prefix
                .last()
                .is_none_or(|(p, i)| *i != index || **p != *prefix)
            {
                out.url_prefix.push((prefix.into(), index));
            }
        } else {
            let list = out.url_exact.entry(url.as_str().into()).or_default();
            if list.last() != Some(&index) {
                list.push(index);
            }
        }
    }
    Ok(Rule {
        name: Arc::from(rule.name.as_str()),
        action: rule.action,
        message: rule.message.as_deref().map(Arc::from),
        verbs,
        groups: IdSet::Any,
        namespaces: NamespaceSet::Any,
        names: IdSet::Any,
        identity: None,
    })
}

/// Validates and compiles a rule's `workloads` and `principals`.
fn compile_identity(
    rule: &RawRule,
    at: &dyn Fn(&[Seg]) -> Vec<Seg>,
    idents: &mut Interner,
) -> Result<Option<Box<IdentityCond>>, InvalidAt> {
    let workload = match &rule.workloads {
        None => None,
        Some(raw) => Some(compile_workloads(raw, at, idents)?),
    };
    let principal = match &rule.principals {
        None => None,
        Some(raw) => Some(compile_principals(raw, at, idents)?),
    };
    Ok((workload.is_some() || principal.is_some()).then(|| {
        Box::new(IdentityCond {
            workload,
            principal,
        })
    }))
}

/// Checks that an identity list is not empty, then each entry with `check`.
fn check_list<'l>(
    list: &'l Option<Vec<String>>,
    path: &[Seg],
    what: &str,
    at: &dyn Fn(&[Seg]) -> Vec<Seg>,
    check: impl Fn(&str) -> Result<(), String>,
) -> Result<Option<&'l [String]>, InvalidAt> {
    let Some(list) = list else {
        return Ok(None);
    };
    if list.is_empty() {
        return Err(invalid(
            at(path),
            format!(
                "lists no {what}, so the rule could never match; omit the key to match any {what}"
            ),
        ));
    }
    for (j, entry) in list.iter().enumerate() {
        let mut entry_path = path.to_vec();
        entry_path.push(Seg::Index(j));
        check(entry).map_err(|m| invalid(at(&entry_path), m))?;
    }
    Ok(Some(list))
}

fn compile_patterns(list: &[String], idents: &mut Interner) -> Patterns {
    let mut exact = Vec::new();
    let mut prefixes = Vec::new();
    for entry in list {
        match entry.strip_suffix('*') {
            Some(prefix) => prefixes.push(Box::from(prefix)),
            None => exact.push(idents.intern(entry)),
        }
    }
    Patterns {
        exact: exact.into(),
        prefixes: prefixes.into(),
    }
}

fn compile_workloads(
    raw: &RawWorkloads,
    at: &dyn Fn(&[Seg]) -> Vec<Seg>,
    idents: &mut Interner,
) -> Result<WorkloadSel, InvalidAt> {
    const W: Seg = Seg::Key("workloads");
    if raw.unknown {
        let set = [
            raw.namespaces.is_some(),
            raw.service_accounts.is_some(),
            raw.pods.is_some(),
            raw.labels.is_some(),
        ];
        if set.contains(&true) {
            return Err(invalid(
                at(&[W, Seg::Key("unknown")]),
                "'unknown: true' matches only callers whose pod could not be identified, so it cannot be combined with namespaces, serviceAccounts, pods or labels; write two rules",
            ));
        }
        return Ok(WorkloadSel::Unknown);
    }
    let namespaces = check_list(
        &raw.namespaces,
        &[W, Seg::Key("namespaces")],
        "namespace",
        at,
        check_namespace,
    )?;
    let service_accounts = check_list(
        &raw.service_accounts,
        &[W, Seg::Key("serviceAccounts")],
        "service account",
        at,
        check_service_account,
    )?;
    let pods = check_list(
        &raw.pods,
        &[W, Seg::Key("pods")],
        "pod",
        at,
        check_pod_pattern,
    )?;
    let mut labels = Vec::new();
    if let Some(map) = &raw.labels {
        if map.is_empty() {
            return Err(invalid(
                at(&[W, Seg::Key("labels")]),
                "lists no label; omit the key to match any labels",
            ));
        }
        for (key, value) in map {
            let path = at(&[W, Seg::Key("labels"), Seg::Field(key.as_str().into())]);
            check_label_key(key).map_err(|m| invalid(path.clone(), m))?;
            check_label_value(value).map_err(|m| invalid(path, m))?;
            labels.push((Box::from(key.as_str()), Box::from(value.as_str())));
        }
    }
    Ok(WorkloadSel::Known {
        namespaces: match namespaces {
            Some(list) if !list.iter().any(|n| n == "*") => {
                IdSet::Of(list.iter().map(|n| idents.intern(n)).collect())
            }
            _ => IdSet::Any,
        },
        service_accounts: service_accounts.map(|list| {
            list.iter()
                .filter_map(|sa| sa.split_once('/'))
                .map(|(ns, name)| {
                    (
                        idents.intern(ns),
                        (name != "*").then(|| idents.intern(name)),
                    )
                })
                .collect()
        }),
        pods: pods.map(|list| compile_patterns(list, idents)),
        labels: labels.into(),
    })
}

fn compile_principals(
    raw: &RawPrincipals,
    at: &dyn Fn(&[Seg]) -> Vec<Seg>,
    idents: &mut Interner,
) -> Result<PrincipalSel, InvalidAt> {
    const P: Seg = Seg::Key("principals");
    let kind_of = |k: &str| {
        PRINCIPAL_KINDS
            .iter()
            .find(|(name, _)| *name == k)
            .map(|(_, kind)| *kind)
            // The recordings spell it in lowercase; accept what an analyst copies from there.
            .or((k == "serviceaccount").then_some(PrincipalKind::ServiceAccount))
    };
    let kinds = check_list(
        &raw.kinds,
        &[P, Seg::Key("kinds")],
        "kind",
        at,
        |k| match kind_of(k) {
            Some(_) => Ok(()),
            None => Err(format!(
                "unknown principal kind '{k}'; expected one of: {}",
                PRINCIPAL_KINDS
                    .iter()
                    .map(|(name, _)| *name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        },
    )?;
    let subjects = check_list(
        &raw.subjects,
        &[P, Seg::Key("subjects")],
        "subject",
        at,
        |s| check_pattern(s, "subject"),
    )?;
    let groups = check_list(&raw.groups, &[P, Seg::Key("groups")], "group", at, |g| {
        if g.is_empty() {
            Err("group must not be empty".to_owned())
        } else if g.contains('*') {
            Err(format!(
                "groups takes exact group names, not patterns ('{g}')"
            ))
        } else {
            Ok(())
        }
    })?;
    Ok(PrincipalSel {
        kinds: kinds.map_or(u8::MAX, |list| {
            list.iter()
                .filter_map(|k| kind_of(k))
                .fold(0, |bits, kind| bits | kind_bit(kind))
        }),
        subjects: subjects.map(|list| compile_patterns(list, idents)),
        groups: groups.map(|list| list.iter().map(|g| Box::from(g.as_str())).collect()),
    })
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'
}

/// Splits a `resources` entry into resource and optional subresource, checking its form.
fn parse_resource(entry: &str) -> Result<(&str, Option<&str>), String> {
    let (resource, sub) = match entry.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (entry, None),
    };
    let part_ok = |p: &str| p == "*" || (!p.is_empty() && p.chars().all(is_name_char));
    if !part_ok(resource) || !sub.is_none_or(part_ok) {
        return Err(format!(
            "malformed resource '{entry}'; expected 'resource', 'resource/subresource', 'resource/*', '*/subresource' or '*' with lowercase names"
        ));
    }
    Ok((resource, sub))
}

fn check_group(group: &str) -> Result<(), String> {
    if group.contains('/') {
        let bare = group.split('/').next().unwrap_or_default();
        return Err(format!(
            "API group '{group}' includes a version; write the group only ('{bare}', or \"\" for the core group)"
        ));
    }
    if group.is_empty() || group == "*" || group.chars().all(is_name_char) {
        Ok(())
    } else {
        Err(format!(
            "malformed API group '{group}'; expected \"\", '*' or a lowercase DNS name like 'apps'"
        ))
    }
}

fn check_namespace(ns: &str) -> Result<(), String> {
    let label = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !ns.starts_with('-')
        && !ns.ends_with('-');
    if ns == "*" || label {
        Ok(())
    } else {
        Err(format!(
            "malformed namespace '{ns}'; expected a lowercase DNS label or '*'"
        ))
    }
}

/// A DNS subdomain as Kubernetes object names use it (pods, service accounts).
fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(is_name_char)
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn check_service_account(entry: &str) -> Result<(), String> {
    let shape = || {
        format!(
            "service account '{entry}' must be 'namespace/name' or 'namespace/*'{}",
            if entry.starts_with("system:serviceaccount:") {
                " (to match a token's user name, use principals.subjects)"
            } else {
                ""
            }
        )
    };
    let (ns, name) = entry.split_once('/').ok_or_else(shape)?;
    if ns == "*" || check_namespace(ns).is_err() || !(name == "*" || is_object_name(name)) {
        return Err(shape());
    }
    Ok(())
}

fn check_pod_pattern(pod: &str) -> Result<(), String> {
    let stem = pod.strip_suffix('*').unwrap_or(pod);
    let ok = stem.is_empty() && pod == "*"
        || !stem.is_empty()
            && stem.len() <= 253
            && stem.chars().all(is_name_char)
            && (stem.len() < pod.len() || is_object_name(stem));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "malformed pod name '{pod}'; expected a lowercase object name, or a prefix ending in '*'"
        ))
    }
}

/// An exact string, or a prefix ending in `*`.
fn check_pattern(value: &str, what: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if value[..value.len() - 1].contains('*') {
        return Err(format!(
            "{what} '{value}' may only have '*' at the end (a prefix match)"
        ));
    }
    Ok(())
}

/// Label name part or value: alphanumeric at both ends, `-_.` inside, at most 63 chars.
fn is_label_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if prefix.is_none_or(is_object_name) && is_label_token(name) {
        Ok(())
    } else {
        Err(format!(
            "malformed label key '{key}'; expected [prefix/]name, e.g. 'app' or 'app.kubernetes.io/name'"
        ))
    }
}

fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_token(value) {
        Ok(())
    } else {
        Err(format!(
            "malformed label value '{value}'; label values are at most 63 letters, digits, '-', '_' or '.'"
        ))
    }
}

fn check_resource_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        Err("resource name must not be empty".to_owned())
    } else if name == "*" {
        Err("resourceNames takes exact names; omit it to match any name".to_owned())
    } else if name.contains('/') || name == "." || name == ".." {
        Err(format!("'{name}' can never be an object name"))
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Error locations.

/// Turns a serde error into a [`PolicyError::Syntax`] with line, column and YAML path.
fn syntax_error(source: &str, err: serde_path_to_error::Error<serde_norway::Error>) -> PolicyError {
    let mut yaml_path = err.path().to_string();
    let inner = err.into_inner();
    let location = inner.location();
    let mut message = inner.to_string();
    // serde_norway appends the position and prefixes its own path; both are reported
    // separately, in the file:line:column form editors understand.
    if let Some(loc) = &location {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_owned();
        }
    }
    if let Some((prefix, rest)) = message.split_once(": ")
        && !prefix.contains(' ')
        && (prefix == yaml_path || yaml_path.starts_with(prefix) || prefix.starts_with(&yaml_path))
    {
        message = rest.to_owned();
    }
    // For an unknown key the path ends in that key; the error is about its parent mapping.
    if let Some(field) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(field, _)| field)
    {
        if yaml_path == field {
            yaml_path = ".".to_owned();
        } else if let Some(parent) = yaml_path.strip_suffix(&format!(".{field}")) {
            yaml_path = parent.to_owned();
        }
    }
    PolicyError::Syntax {
        source_name: source.to_owned(),
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        yaml_path,
        message: message.replace('`', "'"),
    }
}

/// Sentinel message of the locating pass.
const FOUND: &str = "chaperone-policy-location-marker";

/// Line and column of the node at `path` in `text`. serde_norway stamps an error with the
/// position of the node being deserialized, so a second pass that walks to the node and
/// fails there yields its position. Only runs on the error path.
fn locate(text: &str, path: &[Seg]) -> Option<(usize, usize)> {
    let err = Locate(path)
        .deserialize(serde_norway::Deserializer::from_str(text))
        .err()?;
    if !err.to_string().contains(FOUND) {
        return None;
    }
    err.location().map(|l| (l.line(), l.column()))
}

struct Locate<'p>(&'p [Seg]);

impl<'de> DeserializeSeed<'de> for Locate<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.0.split_first() {
            None => d.deserialize_any(Found),
            Some((Seg::Key(key), rest)) => d.deserialize_map(LocateInMap { key, rest }),
            Some((Seg::Field(key), rest)) => d.deserialize_map(LocateInMap { key, rest }),
            Some((Seg::Index(index), rest)) => d.deserialize_seq(LocateInSeq {
                index: *index,
                rest,
            }),
        }
    }
}

/// Fails on whatever node it is given; serde's default `visit_*` methods all fail.
struct Found;

impl Visitor<'_> for Found {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(FOUND)
    }
}

struct LocateInMap<'p> {
    key: &'p str,
    rest: &'p [Seg],
}

impl<'de> Visitor<'de> for LocateInMap<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<KeyName>()? {
            if key.0.as_deref() == Some(self.key) {
                map.next_value_seed(Locate(self.rest))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// A mapping key: its text if it is a string, else `None`.
struct KeyName(Option<String>);

impl<'de> Deserialize<'de> for KeyName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyName, E> {
                Ok(KeyName(Some(v.to_owned())))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
        }
        d.deserialize_any(V)
    }
}

struct LocateInSeq<'p> {
    index: usize,
    rest: &'p [Seg],
}

impl<'de> Visitor<'de> for LocateInSeq<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            let more = if i == self.index {
                seq.next_element_seed(Locate(self.rest))?.is_some()
            } else {
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            if !more {
                return Ok(());
            }
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, Uri};

    use super::*;

    const HEADER: &str = "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\n";

    fn policy(body: &str) -> Policy {
        let text = format!("{HEADER}{body}");
        Policy::from_yaml(&text, "policy.yaml")
            .unwrap_or_else(|e| panic!("policy must load: {e}\n{text}"))
    }

    fn request(method: &str, uri: &str) -> RequestInfo {
        let method =
            Method::from_bytes(method.as_bytes()).unwrap_or_else(|e| panic!("{method}: {e}"));
        let uri: Uri = uri.parse().unwrap_or_else(|e| panic!("{uri}: {e}"));
        RequestInfo::parse(&method, &uri).unwrap_or_else(|e| panic!("{uri}: {e}"))
    }

    /// Which rule (or `None` = default) decides `method uri`.
    fn decided_by(p: &Policy, method: &str, uri: &str) -> (Action, Option<String>) {
        let info = request(method, uri);
        let d = decide(p, &RequestContext::new(&info));
        (d.action, d.rule.map(|r| r.to_string()))
    }

    /// A policy with one deny rule built from `fields`, default allow: does the rule match?
    fn rule_matches(fields: &str, method: &str, uri: &str) -> bool {
        let p = policy(&format!(
            "default: allow\nrules:\n  - name: r\n    action: deny\n{fields}"
        ));
        decided_by(&p, method, uri).1.is_some()
    }

    #[test]
    fn rbac_matching_semantics() {
        let cases: &[(&str, &str, &str, bool)] = &[
            // verbs
            (
                "verbs: [get]\n    resources: [pods]",
                "GET",
                "/api/v1/namespaces/d/pods/p",
                true,
            ),
            (
                "verbs: [get]\n    resources: [pods]",
                "GET",
                "/api/v1/namespaces/d/pods",
                false,
            ),
            (
                "verbs: [list]\n    resources: [pods]",
                "GET",
                "/api/v1/namespaces/d/pods",
                true,
            ),
            (
                "verbs: [watch]\n    resources: [pods]",
                "GET",
                "/api/v1/namespaces/d/pods?watch=True",
                true,
            ),
            (
                "verbs: [watch]\n    resources: [pods]",
                "GET",
                "/api/v1/watch/namespaces/d/pods/p",
                true,
            ),
            (
                "verbs: [list]\n    resources: [pods]",
                "GET",
                "/api/v1/pods?watch=1",
                false,
            ),
            (
                "verbs: [delete]\n    resources: [pods]",
                "DELETE",
                "/api/v1/namespaces/d/pods",
                false,
            ),
            (
                "verbs: [deletecollection]\n    resources: [pods]",
                "DELETE",
                "/api/v1/namespaces/d/pods",
                true,
            ),
            (
                "verbs: [create]\n    resources: [pods/exec]",
                "POST",
                "/api/v1/namespaces/d/pods/p/exec?command=ls",
                true,
            ),
            (
                "verbs: [create]\n    resources: [pods/exec]",
                "GET",
                "/api/v1/namespaces/d/pods/p/exec?command=ls",
                false,
            ),
            (
                "verbs: [get, create]\n    resources: [pods/exec]",
                "GET",
                "/api/v1/namespaces/d/pods/p/exec?command=ls",
                true,
            ),
            (
                "verbs: [\"*\"]\n    resources: [pods]",
                "OPTIONS",
                "/api/v1/namespaces/d/pods",
                true,
            ),
            (
                "verbs: [get]\n    resources: [pods]",
                "OPTIONS",
                "/api/v1/namespaces/d/pods/p",
                false,
            ),
            (
                "verbs: [proxy]\n    resources: [pods]",
                "GET",
                "/api/v1/proxy/namespaces/d/pods/p",
                true,
            ),
            (
                "verbs: [get]\n    resources: [pods/proxy]",
                "GET",
                "/api/v1/namespaces/d/pods/p/proxy/x",
                true,
            ),
            // resources and subresources
            (
                "verbs: [\"*\"]\n    resources: [pods]",
                "POST",
                "/api/v1/namespaces/d/pods/p/exec",
                false,
            ),
            (
                "verbs: [\"*\"]\n    resources: [pods/*]",
                "POST",
                "/api/v1/namespaces/d/pods/p/exec",
                true,
            ),
            (
                "verbs: [\"*\"]\n    resources: [pods/*]",
                "GET",
                "/api/v1/namespaces/d/pods/p",
                false,
            ),
            (
                "verbs: [\"*\"]\n    resources: [\"*/exec\"]",
                "POST",
                "/api/v1/namespaces/d/pods/p/exec",
                true,
            ),
            (
                "verbs: [\"*\"]\n    resources: [\"*/exec\"]",
                "POST",
                "/api/v1/namespaces/d/pods/p/attach",
                false,
            ),
            (
                "verbs: [\"*\"]\n    resources: [\"*/exec\"]",
                "GET",
                "/api/v1/namespaces/d/pods",
                false,
            ),
            (
                "verbs: [\"*\"]\n    resources: [\"*/*\"]",
                "GET",
                "/api/v1/namespaces/d/pods/p/log",
                true,
            ),
            (
                "verbs: [\"*\"]\n    resources: [\"*/*\"]",
                "GET",
                "/api/v1/namespaces/d/pods/p",
                false,
            ),
            (
                "verbs: [\"*\"]\n    resources: [\"*\"]",
                "GET",
                "/api/v1/namespaces/d/pods/p/log",
                true,
            ),
            (
                "verbs: [\"*\"]\n    resources: [\"*\"]",
                "GET",
                "/api/v1/nodes",
                true,
            ),
            (
                "verbs: [\"*\"]\n    resources: [\"*\"]",
                "GET",
                "/healthz",
                false,
            ),
            (
                "verbs: [\"*\"]\n    resources: [pods/exec]",
                "GET",
                "/api/v1/namespaces/d/pods/p/attach",
                false,
            ),
            (
                "verbs: [\"*\"]\n    resources: [pods/exec]",
                "GET",
                "/api/v1/namespaces/d/services/s/exec",
                false,
            ),
            (
                "verbs: [\"*\"]\n    resources: [services, pods]",
                "GET",
                "/api/v1/namespaces/d/pods/p",
                true,
            ),
            (
                "verbs: [\"*\"]\n    resources: [namespaces/finalize]",
                "PUT",
                "/api/v1/namespaces/d/finalize",
                true,
            ),
            (
                "verbs: [\"*\"]\n    resources: [namespaces]",
                "PUT",
                "/api/v1/namespaces/d/finalize",
                false,
            ),
            // apiGroups
            (
                "verbs: [\"*\"]\n    apiGroups: [\"\"]\n    resources: [pods]",
                "GET",
                "/api/v1/pods",
                true,
            ),
            (
                "verbs: [\"*\"]\n    apiGroups: [apps]\n    resources: [pods]",
                "GET",
                "/api/v1/pods",
                false,
            ),
            (
                "verbs: [\"*\"]\n    apiGroups: [apps]\n    resources: [deployments]",
                "GET",
                "/apis/apps/v1/deployments",
                true,
            ),
            (
                "verbs: [\"*\"]\n    apiGroups: [\"\"]\n    resources: [deployments]",
                "GET",
                "/apis/apps/v1/deployments",
                false,
            ),
            (
                "verbs: [\"*\"]\n    apiGroups: [\"*\"]\n    resources: [deployments]",
                "GET",
                "/apis/apps/v1/deployments",
                true,
            ),
            (
                "verbs: [\"*\"]\n    resources: [deployments]",
                "GET",
                "/apis/extensions/v1beta1/deployments",
                true,
            ),
            (
                "verbs: [\"*\"]\n    apiGroups: [batch, apps]\n    resources: [\"*\"]",
                "DELETE",
                "/apis/apps/v1/namespaces/d/deployments/x",
                true,
            ),
            (
                "verbs: [\"*\"]\n    apiGroups: [batch]\n    resources: [\"*\"]",
                "DELETE",
                "/apis/example.com/v1/namespaces/d/widgets/x",
                false,
            ),
            // namespaces
            (
                "verbs: [\"*\"]\n    resources: [pods]\n    namespaces: [prod]",
                "GET",
                "/api/v1/namespaces/prod/pods",
                true,
            ),
            (
                "verbs: [\"*\"]\n    resources: [pods]\n    namespaces: [prod]",
                "GET",
                "/api/v1/namespaces/dev/pods",
                false,
            ),
            (
                "verbs: [\"*\"]\n    resources: [pods]\n    namespaces: [prod]",
                "GET",
                "/api/v1/pods",
                false,
            ),
            (
                "verbs: [\"*\"]\n    resources: [pods]\n    namespaces: [\"*\"]",
                "GET",
                "/api/v1/namespaces/x/pods",
                true,
            ),
            (
                "verbs: [\"*\"]\n    resources: [pods]\n    namespaces: [\"*\"]",
                "GET",
                "/api/v1/pods",
                false,
            ),
            (
                "verbs: [\"*\"]\n    resources: [pods]\n    namespaces: []",
                "GET",
                "/api/v1/pods",
                true,
            ),
            (
                "verbs: [\"*\"]\n    resources: [pods]",
                "GET",
                "/api/v1/pods",
                true,
            ),
            (
                "verbs: [\"*\"]\n    resources: [nodes]\n    namespaces: [prod]",
                "GET",
                "/api/v1/nodes/n",
                false,
            ),
            (
                "verbs: [delete]\n    resources: [namespaces]\n    namespaces: [prod]",
                "DELETE",
                "/api/v1/namespaces/prod",
                true,
            ),
            (
                "verbs: [delete]\n    resources: [namespaces]\n    namespaces: [prod]",
                "DELETE",
                "/api/v1/namespaces/dev",
                false,
            ),
            // resourceNames
            (
                "verbs: [\"*\"]\n    resources: [secrets]\n    resourceNames: [s1]",
                "GET",
                "/api/v1/namespaces/d/secrets/s1",
                true,
            ),
            (
                "verbs: [\"*\"]\n    resources: [secrets]\n    resourceNames: [s1]",
                "GET",
                "/api/v1/namespaces/d/secrets/s2",
                false,
            ),
            (
                "verbs: [\"*\"]\n    resources: [secrets]\n    resourceNames: [s1]",
                "GET",
                "/api/v1/namespaces/d/secrets",
                false,
            ),
            (
                "verbs: [\"*\"]\n    resources: [secrets]\n    resourceNames: [s1]",
                "POST",
                "/api/v1/namespaces/d/secrets",
                false,
            ),
            (
                "verbs: [\"*\"]\n    resources: [secrets]\n    resourceNames: [s1]",
                "GET",
                "/api/v1/namespaces/d/secrets?fieldSelector=metadata.name%3Ds1",
                true,
            ),
            (
                "verbs: [\"*\"]\n    resources: [secrets]\n    resourceNames: [s1]",
                "GET",
                "/api/v1/namespaces/d/secrets?watch=1&fieldSelector=metadata.name%3Ds1",
                true,
            ),
            (
                "verbs: [\"*\"]\n    resources: [secrets]\n    resourceNames: [s1]",
                "DELETE",
                "/api/v1/namespaces/d/secrets?fieldSelector=metadata.name%3Ds1",
                false,
            ),
            (
                "verbs: [\"*\"]\n    resources: [secrets]\n    resourceNames: []",
                "GET",
                "/api/v1/namespaces/d/secrets",
                true,
            ),
            (
                "verbs: [\"*\"]\n    resources: [pods/exec]\n    resourceNames: [p]",
                "POST",
                "/api/v1/namespaces/d/pods/p/exec",
                true,
            ),
            // nonResourceURLs
            (
                "verbs: [get]\n    nonResourceURLs: [/healthz]",
                "GET",
                "/healthz",
                true,
            ),
            (
                "verbs: [get]\n    nonResourceURLs: [/healthz]",
                "GET",
                "/healthz/etcd",
                false,
            ),
            (
                "verbs: [get]\n    nonResourceURLs: [/healthz]",
                "HEAD",
                "/healthz",
                false,
            ),
            (
                "verbs: [get, head]\n    nonResourceURLs: [/healthz]",
                "HEAD",
                "/healthz",
                true,
            ),
            (
                "verbs: [get]\n    nonResourceURLs: [\"/healthz*\"]",
                "GET",
                "/healthz/etcd",
                true,
            ),
            (
                "verbs: [get]\n    nonResourceURLs: [\"/apis/*\"]",
                "GET",
                "/apis/apps/v1",
                true,
            ),
            (
                "verbs: [get]\n    nonResourceURLs: [\"/apis/*\"]",
                "GET",
                "/apis",
                false,
            ),
            (
                "verbs: [get]\n    nonResourceURLs: [\"/apis/*\"]",
                "GET",
                "/apis/apps/v1/deployments",
                false,
            ),
            (
                "verbs: [get]\n    nonResourceURLs: [\"*\"]",
                "GET",
                "/anything/at/all",
                true,
            ),
            (
                "verbs: [get]\n    nonResourceURLs: [\"*\"]",
                "GET",
                "/api/v1/pods",
                false,
            ),
            (
                "verbs: [\"*\"]\n    nonResourceURLs: [/logs]",
                "POST",
                "/logs",
                true,
            ),
            (
                "verbs: [post]\n    nonResourceURLs: [/version]",
                "GET",
                "/version",
                false,
            ),
        ];
        for (fields, method, uri, want) in cases {
            let fields = format!("    {fields}\n");
            assert_eq!(
                rule_matches(&fields, method, uri),
                *want,
                "rule:\n{fields}request: {method} {uri}"
            );
        }
    }

    #[test]
    fn first_matching_rule_wins_across_index_lists() {
        let p = policy(
            r#"default: deny
rules:
  - name: exec-in-prod
    action: deny
    message: no exec in prod
    verbs: ["*"]
    resources: ["*/exec"]
    namespaces: [prod]
  - name: pods-subresources
    action: allow
    verbs: ["*"]
    resources: [pods/*]
  - name: pod-exec
    action: deny
    verbs: ["*"]
    resources: [pods/exec]
  - name: read-pods
    action: allow
    verbs: [get, list, watch]
    resources: [pods]
  - name: everything-in-sandbox
    action: allow
    verbs: ["*"]
    resources: ["*"]
    namespaces: [sandbox]
  - name: pods-again
    action: deny
    verbs: ["*"]
    resources: [pods, pods, "*"]
  - name: health
    action: allow
    verbs: [get]
    nonResourceURLs: [/healthz, "/healthz/*", /version]
  - name: late-prefix
    action: deny
    verbs: ["*"]
    nonResourceURLs: ["/*"]
"#,
        );
        let allow = Action::Allow;
        let deny = Action::Deny;
        for (method, uri, want) in [
            (
                "POST",
                "/api/v1/namespaces/prod/pods/p/exec",
                (deny, Some("exec-in-prod")),
            ),
            (
                "POST",
                "/api/v1/namespaces/dev/pods/p/exec",
                (allow, Some("pods-subresources")),
            ),
            (
                "GET",
                "/api/v1/namespaces/dev/pods/p/log",
                (allow, Some("pods-subresources")),
            ),
            (
                "GET",
                "/api/v1/namespaces/dev/pods",
                (allow, Some("read-pods")),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/sandbox/pods/p",
                (allow, Some("everything-in-sandbox")),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/dev/pods/p",
                (deny, Some("pods-again")),
            ),
            (
                "DELETE",
                "/apis/apps/v1/namespaces/dev/deployments/x",
                (deny, Some("pods-again")),
            ),
            ("GET", "/healthz", (allow, Some("health"))),
            ("GET", "/healthz/etcd", (allow, Some("health"))),
            ("POST", "/healthz", (deny, Some("late-prefix"))),
            ("GET", "/metrics", (deny, Some("late-prefix"))),
            ("GET", "/version", (allow, Some("health"))),
        ] {
            let got = decided_by(&p, method, uri);
            assert_eq!(got, (want.0, want.1.map(str::to_owned)), "{method} {uri}");
        }
    }

    #[test]
    fn default_applies_when_nothing_matches() {
        for (default, want) in [("allow", Action::Allow), ("deny", Action::Deny)] {
            let p = policy(&format!(
                "default: {default}\nrules:\n  - name: r\n    action: deny\n    verbs: [delete]\n    resources: [pods]\n"
            ));
            assert_eq!(
                decided_by(&p, "GET", "/api/v1/pods"),
                (want, None),
                "default {default}"
            );
            assert_eq!(
                decided_by(&p, "GET", "/healthz"),
                (want, None),
                "default {default}"
            );
            assert_eq!(p.default_action(), want);
        }
        let p = Policy::allow_all();
        assert_eq!(p.rule_count(), 0);
        assert_eq!(
            decided_by(&p, "DELETE", "/api/v1/namespaces/prod"),
            (Action::Allow, None)
        );
    }

    #[test]
    fn decision_reasons() {
        let d = |action, rule: Option<&str>, message: Option<&str>| Decision {
            action,
            rule: rule.map(Arc::from),
            message: message.map(Arc::from),
        };
        for (decision, want) in [
            (
                d(
                    Action::Deny,
                    Some("protect-namespaces"),
                    Some("agents may not delete namespaces"),
                ),
                "denied by Chaperone policy rule \"protect-namespaces\": agents may not delete namespaces",
            ),
            (
                d(Action::Deny, Some("r"), None),
                "denied by Chaperone policy rule \"r\"",
            ),
            (
                d(Action::Deny, None, None),
                "denied by Chaperone policy: no rule matched and the default action is deny",
            ),
            (
                d(Action::Allow, Some("health"), None),
                "allowed by Chaperone policy rule \"health\"",
            ),
            (
                d(Action::Allow, None, None),
                "allowed by Chaperone policy: no rule matched and the default action is allow",
            ),
        ] {
            assert_eq!(decision.reason(), want);
        }
        let p = policy(
            "default: allow\nrules:\n  - name: protect-namespaces\n    action: deny\n    message: agents may not delete namespaces\n    verbs: [delete, deletecollection]\n    apiGroups: [\"\"]\n    resources: [namespaces]\n",
        );
        let info = request("DELETE", "/api/v1/namespaces/prod");
        let got = decide(&p, &RequestContext::new(&info));
        assert!(!got.is_allowed());
        assert_eq!(
            got.reason(),
            "denied by Chaperone policy rule \"protect-namespaces\": agents may not delete namespaces"
        );
    }

    #[test]
    fn load_errors_name_file_path_and_line() {
        let cases: &[(&str, &str)] = &[
            // Shape errors from serde, with serde_norway's position.
            (
                "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n  - name: b\n    action: deny\n    verb: [get]\n",
                "policy.yaml:11:5: rules[1]: unknown field 'verb', expected one of 'name', 'action', 'message', 'verbs', 'apiGroups', 'resources', 'namespaces', 'resourceNames', 'nonResourceURLs', 'workloads', 'principals'",
            ),
            (
                "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: maybe\n",
                "policy.yaml:3:10: default: unknown variant 'maybe', expected 'allow' or 'deny'",
            ),
            (
                "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\n",
                "policy.yaml:1:1: missing field 'default'",
            ),
            (
                "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: deny\nrule: []\n",
                "policy.yaml:4:1: unknown field 'rule', expected one of 'apiVersion', 'kind', 'default', 'identity', 'rules'",
            ),
            (
                "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: deny\nrules:\n  - name: a\n    action: deny\n    resources: [pods]\n",
                "rules[0]: missing field 'verbs'",
            ),
            (
                "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: deny\nrules:\n  - name: a\n    action: deny\n    verbs: get\n    resources: [pods]\n",
                "policy.yaml:7:12: rules[0].verbs: invalid type: string \"get\", expected a sequence",
            ),
            ("default: [", "policy.yaml:"),
            // Semantic errors, located by the second pass.
            (
                "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: deny\nrules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n  - name: b\n    action: deny\n    verbs: [get]\n    resources: [pods]\n  - name: c\n    action: deny\n    verbs: [get, remove]\n    resources: [pods]\n",
                "policy.yaml:15:18: rules[2].verbs[1]: unknown verb 'remove'; resource rules take '*' or one of: get, list, watch, create, update, patch, delete, deletecollection, proxy, impersonate",
            ),
            (
                "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: deny\nrules:\n  - name: a\n    action: deny\n    verbs: [list]\n    nonResourceURLs: [/x]\n",
                "policy.yaml:7:13: rules[0].verbs[0]: unknown verb 'list'; non-resource rules take '*' or one of: get, head, post, put, patch, delete, options",
            ),
            (
                "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: deny\nrules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n  - name: a\n    action: allow\n    verbs: [get]\n    resources: [pods]\n",
                "policy.yaml:9:11: rules[1].name: duplicate rule name 'a' (also used by rules[0])",
            ),
            (
                "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: deny\nrules:\n  - name: a\n    action: deny\n    verbs: []\n    resources: [pods]\n",
                "policy.yaml:7:12: rules[0].verbs: must list at least one verb ('*' for any)",
            ),
            (
                "apiVersion: v1\nkind: Policy\ndefault: deny\n",
                "policy.yaml:1:13: apiVersion: unsupported apiVersion 'v1', expected 'chaperone.dev/v1alpha1'",
            ),
            (
                "apiVersion: chaperone.dev/v1alpha1\nkind: ClusterRole\ndefault: deny\n",
                "policy.yaml:2:7: kind: unsupported kind 'ClusterRole', expected 'Policy'",
            ),
            (
                "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: deny\nrules:\n  - name: a\n    action: deny\n    verbs: [get]\n",
                "policy.yaml:5:5: rules[0]: a rule needs 'resources' (resource rule) or 'nonResourceURLs' (non-resource rule)",
            ),
            (
                "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: deny\nrules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    nonResourceURLs: [/x]\n",
                "policy.yaml:9:22: rules[0].nonResourceURLs: a rule has either 'resources' or 'nonResourceURLs', not both",
            ),
            (
                "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: deny\nrules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods, \"pods/exec/x\"]\n",
                "policy.yaml:8:23: rules[0].resources[1]: malformed resource 'pods/exec/x'",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [Pods]\ndefault: deny\n",
                "rules[0].resources[0]: malformed resource 'Pods'",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [\"pod*\"]\ndefault: deny\n",
                "rules[0].resources[0]: malformed resource 'pod*'",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [\"/exec\"]\ndefault: deny\n",
                "rules[0].resources[0]: malformed resource '/exec'",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: []\ndefault: deny\n",
                "rules[0].resources: must list at least one resource",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    apiGroups: [apps/v1]\n    resources: [deployments]\ndefault: deny\n",
                "rules[0].apiGroups[0]: API group 'apps/v1' includes a version; write the group only ('apps'",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    apiGroups: []\n    resources: [deployments]\ndefault: deny\n",
                "rules[0].apiGroups: lists no API group",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    namespaces: [Prod]\ndefault: deny\n",
                "rules[0].namespaces[0]: malformed namespace 'Prod'",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    resourceNames: [\"*\"]\ndefault: deny\n",
                "rules[0].resourceNames[0]: resourceNames takes exact names",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    namespaces: [x]\n    nonResourceURLs: [/x]\ndefault: deny\n",
                "rules[0].namespaces: 'namespaces' only applies to resource rules",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    nonResourceURLs: [healthz]\ndefault: deny\n",
                "rules[0].nonResourceURLs[0]: URL 'healthz' must start with '/'",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    nonResourceURLs: [\"/a*/b\"]\ndefault: deny\n",
                "rules[0].nonResourceURLs[0]: URL '/a*/b' may only have '*' at the end",
            ),
            (
                "rules:\n  - name: \"\"\n    action: deny\n    verbs: [get]\n    resources: [pods]\ndefault: deny\n",
                "rules[0].name: rule name must not be empty",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    message: \"\"\n    verbs: [get]\n    resources: [pods]\ndefault: deny\n",
                "rules[0].message: message must not be empty",
            ),
            // Identity selectors and guards.
            (
                "default: deny\nrules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    workloads:\n      namespace: [x]\n",
                "policy.yaml:10:7: rules[0].workloads: unknown field 'namespace', expected one of 'namespaces', 'serviceAccounts', 'pods', 'labels', 'unknown'",
            ),
            (
                "default: deny\nrules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    principals:\n      users: [x]\n",
                "policy.yaml:10:7: rules[0].principals: unknown field 'users', expected one of 'kinds', 'subjects', 'groups'",
            ),
            (
                "default: deny\nidentity:\n  denyInvalidToken: true\n",
                "policy.yaml:5:3: identity: unknown field 'denyInvalidToken', expected 'denyInvalidTokens' or 'denyServiceAccountMismatch'",
            ),
            (
                "default: deny\nidentity:\n  denyInvalidTokens: yes\n",
                "policy.yaml:5:22: identity.denyInvalidTokens: invalid type: string \"yes\", expected a boolean",
            ),
            (
                "default: deny\nrules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    workloads:\n      namespaces: []\n",
                "policy.yaml:10:19: rules[0].workloads.namespaces: lists no namespace, so the rule could never match; omit the key to match any namespace",
            ),
            (
                "default: deny\nrules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    workloads:\n      namespaces: [ai-agents, AI]\n",
                "policy.yaml:10:31: rules[0].workloads.namespaces[1]: malformed namespace 'AI'",
            ),
            (
                "default: deny\nrules:\n  - name: a\n    action: deny\n    verbs: [get]\n    nonResourceURLs: [/x]\n    workloads: {serviceAccounts: [cursor]}\n",
                "policy.yaml:9:35: rules[0].workloads.serviceAccounts[0]: service account 'cursor' must be 'namespace/name' or 'namespace/*'",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    workloads: {serviceAccounts: [\"system:serviceaccount:a:b\"]}\ndefault: deny\n",
                "rules[0].workloads.serviceAccounts[0]: service account 'system:serviceaccount:a:b' must be 'namespace/name' or 'namespace/*' (to match a token's user name, use principals.subjects)",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    workloads: {serviceAccounts: [\"*/cursor\"]}\ndefault: deny\n",
                "rules[0].workloads.serviceAccounts[0]: service account '*/cursor' must be",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    workloads: {pods: [Cursor-0]}\ndefault: deny\n",
                "rules[0].workloads.pods[0]: malformed pod name 'Cursor-0'",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    workloads: {pods: [\"a*b\"]}\ndefault: deny\n",
                "rules[0].workloads.pods[0]: malformed pod name 'a*b'",
            ),
            (
                "default: deny\nrules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    workloads:\n      labels:\n        app: \"two words\"\n",
                "policy.yaml:11:14: rules[0].workloads.labels.app: malformed label value 'two words'",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    workloads: {labels: {-x: y}}\ndefault: deny\n",
                "rules[0].workloads.labels.-x: malformed label key '-x'",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    workloads: {labels: {}}\ndefault: deny\n",
                "rules[0].workloads.labels: lists no label",
            ),
            (
                "default: deny\nrules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    workloads:\n      namespaces: [x]\n      unknown: true\n",
                "policy.yaml:11:16: rules[0].workloads.unknown: 'unknown: true' matches only callers whose pod could not be identified, so it cannot be combined with namespaces, serviceAccounts, pods or labels",
            ),
            (
                "default: deny\nrules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    principals:\n      kinds: [oidc, robot]\n",
                "policy.yaml:10:21: rules[0].principals.kinds[1]: unknown principal kind 'robot'; expected one of: anonymous, oidc, serviceAccount, user, invalid",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    principals: {subjects: [\"\"]}\ndefault: deny\n",
                "rules[0].principals.subjects[0]: subject must not be empty",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    principals: {subjects: [\"a*b\"]}\ndefault: deny\n",
                "rules[0].principals.subjects[0]: subject 'a*b' may only have '*' at the end",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    principals: {groups: []}\ndefault: deny\n",
                "rules[0].principals.groups: lists no group, so the rule could never match",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    principals: {groups: [\"*\"]}\ndefault: deny\n",
                "rules[0].principals.groups[0]: groups takes exact group names",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    principals: {kinds: []}\ndefault: deny\n",
                "rules[0].principals.kinds: lists no kind",
            ),
            (
                "default: deny\nrules:\n  - name: identity.denyInvalidTokens\n    action: allow\n    verbs: [get]\n    resources: [pods]\n",
                "policy.yaml:5:11: rules[0].name: rule name 'identity.denyInvalidTokens' starts with 'identity.', which is reserved for the policy's identity guards",
            ),
        ];
        let mut failures = Vec::new();
        for (body, want) in cases {
            let text = if body.starts_with("rules:") || body.starts_with("default: deny") {
                format!("{HEADER}{body}")
            } else {
                (*body).to_owned()
            };
            match Policy::from_yaml(&text, "policy.yaml") {
                Ok(p) => failures.push(format!("accepted {p:?}, wanted {want:?}\n{text}")),
                Err(e) if !e.to_string().contains(want) => {
                    failures.push(format!("error\n  {e}\nlacks\n  {want}\nfor\n{text}"));
                }
                Err(_) => {}
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    }

    #[test]
    fn from_file_reads_and_labels_errors_with_the_path() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let good = dir.path().join("policy.yaml");
        std::fs::write(&good, format!("{HEADER}default: deny\nrules:\n  - name: h\n    action: allow\n    verbs: [get]\n    nonResourceURLs: [/healthz]\n"))
            .unwrap_or_else(|e| panic!("write: {e}"));
        let p = Policy::from_file(&good).unwrap_or_else(|e| panic!("load: {e}"));
        assert_eq!(
            (p.rule_count(), p.source()),
            (1, good.display().to_string().as_str())
        );

        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, format!("{HEADER}default: deny\nrules:\n  - name: h\n    action: allow\n    verbs: [remove]\n    resources: [pods]\n"))
            .unwrap_or_else(|e| panic!("write: {e}"));
        let err = Policy::from_file(&bad)
            .expect_err("unknown verb must fail")
            .to_string();
        assert!(
            err.starts_with(&format!(
                "{}:7:13: rules[0].verbs[0]: unknown verb 'remove'",
                bad.display()
            )),
            "{err}"
        );

        let missing = dir.path().join("missing.yaml");
        let err = Policy::from_file(&missing).expect_err("missing file must fail");
        assert!(
            matches!(err, PolicyError::Read { .. }) && err.to_string().contains("missing.yaml"),
            "{err}"
        );

        let huge = dir.path().join("huge.yaml");
        let file = std::fs::File::create(&huge).unwrap_or_else(|e| panic!("create: {e}"));
        file.set_len(MAX_POLICY_BYTES + 1)
            .unwrap_or_else(|e| panic!("set_len: {e}"));
        let err = Policy::from_file(&huge).expect_err("huge file must fail");
        assert!(matches!(err, PolicyError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn hostile_yaml_fails_cleanly() {
        let bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n";
        let empty = Policy::from_yaml("# nothing\n\n", "policy.yaml").expect_err("empty must fail");
        assert!(
            empty
                .to_string()
                .starts_with("policy.yaml: empty policy document"),
            "{empty}"
        );
        let list = Policy::from_yaml("[1, 2]", "policy.yaml").expect_err("a list must fail");
        assert_eq!(
            list.to_string(),
            "policy.yaml:1:1: invalid type: sequence, expected a policy: a mapping with apiVersion, kind, default and rules"
        );
        for text in ["", "---\n---\n", "[1, 2]", "\0", bomb, &"[".repeat(10_000)] {
            let result = Policy::from_yaml(text, "policy.yaml");
            let err = result.expect_err("hostile input must be rejected");
            assert!(err.to_string().starts_with("policy.yaml"), "{err}");
        }
    }

    #[test]
    fn policy_is_debug_and_cheap_to_clone() {
        let p = policy(
            "default: deny\nrules:\n  - name: only\n    action: allow\n    verbs: [get]\n    resources: [pods]\n",
        );
        let q = p.clone();
        assert!(Arc::ptr_eq(&p.inner, &q.inner));
        let debug = format!("{p:?}");
        assert!(
            debug.contains("\"only\"") && debug.contains("Deny"),
            "{debug}"
        );
    }

    fn workload(namespace: &str, pod: &str, sa: &str, labels: &[(&str, &str)]) -> WorkloadIdentity {
        WorkloadIdentity {
            node: "node-1".to_owned(),
            namespace: Some(namespace.to_owned()),
            pod: Some(pod.to_owned()),
            service_account: Some(sa.to_owned()),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            cgroup_id: 42,
            ..WorkloadIdentity::default()
        }
    }

    fn principal(kind: PrincipalKind, subject: Option<&str>, groups: &[&str]) -> Principal {
        Principal {
            kind,
            subject: subject.map(str::to_owned),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            uid: None,
            reason: None,
            mismatch: None,
        }
    }

    /// The callers the identity tests use.
    struct Callers {
        agent: WorkloadIdentity,
        ops: WorkloadIdentity,
        /// A pod cgroup whose pod is not in the store yet: not known.
        half: WorkloadIdentity,
        alice: Principal,
        sa: Principal,
        admin: Principal,
        bad: Principal,
        anonymous: Principal,
    }

    fn callers() -> Callers {
        Callers {
            agent: workload(
                "ai-agents",
                "cursor-0",
                "cursor",
                &[("app", "agent"), ("team", "ml")],
            ),
            ops: workload("ops", "runner-7", "deployer", &[("app", "runner")]),
            half: WorkloadIdentity {
                pod_uid: Some("1b2c".to_owned()),
                cgroup_id: 7,
                ..WorkloadIdentity::default()
            },
            alice: principal(
                PrincipalKind::Oidc,
                Some("oidc:alice@example.com"),
                &["sre", "dev"],
            ),
            sa: principal(
                PrincipalKind::ServiceAccount,
                Some("system:serviceaccount:ai-agents:cursor"),
                &["system:serviceaccounts"],
            ),
            admin: principal(
                PrincipalKind::User,
                Some("kubernetes-admin"),
                &["system:masters"],
            ),
            bad: Principal::invalid("token expired"),
            anonymous: Principal::anonymous(),
        }
    }

    fn decide_as(
        p: &Policy,
        method: &str,
        uri: &str,
        workload: Option<&WorkloadIdentity>,
        who: Option<&Principal>,
    ) -> Decision {
        let info = request(method, uri);
        let ctx = RequestContext::new(&info)
            .with_workload(workload)
            .with_principal(who);
        decide(p, &ctx)
    }

    #[test]
    fn request_context_builder() {
        let c = callers();
        let info = request("GET", "/api/v1/pods");
        let ctx = RequestContext::new(&info);
        assert!(ctx.workload.is_none() && ctx.principal.is_none());
        let ctx = ctx.with_workload(&c.agent).with_principal(&c.alice);
        assert_eq!(ctx.workload, Some(&c.agent));
        assert_eq!(ctx.principal, Some(&c.alice));
        let ctx = ctx.with_workload(None).with_principal(Some(&c.sa));
        assert_eq!((ctx.workload, ctx.principal), (None, Some(&c.sa)));
    }

    #[test]
    fn identity_matching() {
        let c = callers();
        let (agent, ops, half) = (Some(&c.agent), Some(&c.ops), Some(&c.half));
        let (alice, sa, admin, bad, anon) = (
            Some(&c.alice),
            Some(&c.sa),
            Some(&c.admin),
            Some(&c.bad),
            Some(&c.anonymous),
        );
        type Case<'a> = (
            &'a str,
            Option<&'a WorkloadIdentity>,
            Option<&'a Principal>,
            bool,
        );
        let cases: &[Case<'_>] = &[
            // workloads.namespaces
            ("workloads: {namespaces: [ai-agents]}", agent, None, true),
            ("workloads: {namespaces: [ai-agents]}", ops, None, false),
            ("workloads: {namespaces: [ai-agents]}", half, None, false),
            ("workloads: {namespaces: [ai-agents]}", None, None, false),
            ("workloads: {namespaces: [ops, ai-agents]}", ops, None, true),
            // One interner serves every identity field: a pod name is not a namespace.
            ("workloads: {namespaces: [cursor-0]}", agent, None, false),
            ("workloads: {namespaces: [\"*\"]}", agent, None, true),
            ("workloads: {namespaces: [\"*\"]}", half, None, false),
            // any identified workload / only unidentified ones
            ("workloads: {}", agent, None, true),
            ("workloads: {}", half, None, false),
            ("workloads: {}", None, None, false),
            ("workloads: {unknown: true}", agent, None, false),
            ("workloads: {unknown: true}", half, None, true),
            ("workloads: {unknown: true}", None, None, true),
            ("workloads: {unknown: false}", agent, None, true),
            ("workloads: {unknown: false}", None, None, false),
            // workloads.serviceAccounts
            (
                "workloads: {serviceAccounts: [ai-agents/cursor]}",
                agent,
                None,
                true,
            ),
            (
                "workloads: {serviceAccounts: [ai-agents/cursor]}",
                ops,
                None,
                false,
            ),
            (
                "workloads: {serviceAccounts: [ai-agents/*]}",
                agent,
                None,
                true,
            ),
            (
                "workloads: {serviceAccounts: [ai-agents/*]}",
                ops,
                None,
                false,
            ),
            (
                "workloads: {serviceAccounts: [ops/cursor]}",
                agent,
                None,
                false,
            ),
            (
                "workloads: {serviceAccounts: [ai-agents/deployer, ops/deployer]}",
                ops,
                None,
                true,
            ),
            (
                "workloads: {serviceAccounts: [ai-agents/deployer, ops/deployer]}",
                agent,
                None,
                false,
            ),
            (
                "workloads: {serviceAccounts: [ai-agents/*]}",
                None,
                None,
                false,
            ),
            // workloads.pods
            ("workloads: {pods: [cursor-0]}", agent, None, true),
            ("workloads: {pods: [cursor-1]}", agent, None, false),
            ("workloads: {pods: [\"cursor-*\"]}", agent, None, true),
            ("workloads: {pods: [\"runner-*\"]}", agent, None, false),
            (
                "workloads: {pods: [\"runner-*\", cursor-0]}",
                ops,
                None,
                true,
            ),
            ("workloads: {pods: [\"*\"]}", agent, None, true),
            ("workloads: {pods: [\"*\"]}", half, None, false),
            // workloads.labels: every pair
            ("workloads: {labels: {app: agent}}", agent, None, true),
            (
                "workloads: {labels: {app: agent, team: ml}}",
                agent,
                None,
                true,
            ),
            (
                "workloads: {labels: {app: agent, team: web}}",
                agent,
                None,
                false,
            ),
            ("workloads: {labels: {tier: web}}", agent, None, false),
            ("workloads: {labels: {app: agent}}", ops, None, false),
            ("workloads: {labels: {app: agent}}", None, None, false),
            // keys combine with AND
            (
                "workloads: {namespaces: [ai-agents], labels: {app: runner}}",
                agent,
                None,
                false,
            ),
            (
                "workloads: {namespaces: [ai-agents], serviceAccounts: [ai-agents/cursor], pods: [cursor-0], labels: {team: ml}}",
                agent,
                None,
                true,
            ),
            // principals.kinds; None is anonymous
            ("principals: {kinds: [anonymous]}", agent, None, true),
            ("principals: {kinds: [anonymous]}", agent, anon, true),
            ("principals: {kinds: [anonymous]}", agent, alice, false),
            ("principals: {kinds: [oidc, user]}", agent, alice, true),
            ("principals: {kinds: [oidc, user]}", agent, admin, true),
            ("principals: {kinds: [oidc, user]}", agent, sa, false),
            ("principals: {kinds: [oidc, user]}", agent, bad, false),
            ("principals: {kinds: [oidc, user]}", agent, None, false),
            ("principals: {kinds: [serviceAccount]}", agent, sa, true),
            ("principals: {kinds: [serviceaccount]}", agent, sa, true),
            ("principals: {kinds: [invalid]}", agent, bad, true),
            ("principals: {kinds: [invalid]}", agent, None, false),
            // principals.subjects
            (
                "principals: {subjects: [oidc:alice@example.com]}",
                agent,
                alice,
                true,
            ),
            (
                "principals: {subjects: [oidc:alice@example.com]}",
                agent,
                sa,
                false,
            ),
            (
                "principals: {subjects: [oidc:alice@example.com]}",
                agent,
                None,
                false,
            ),
            (
                "principals: {subjects: [\"system:serviceaccount:ai-agents:*\"]}",
                agent,
                sa,
                true,
            ),
            (
                "principals: {subjects: [\"system:serviceaccount:ai-agents:*\"]}",
                agent,
                alice,
                false,
            ),
            // principals.groups: any one
            ("principals: {groups: [sre]}", agent, alice, true),
            ("principals: {groups: [sre]}", agent, admin, false),
            ("principals: {groups: [sre]}", agent, None, false),
            (
                "principals: {groups: [nobody, system:masters]}",
                agent,
                admin,
                true,
            ),
            (
                "principals: {kinds: [oidc], groups: [system:masters]}",
                agent,
                admin,
                false,
            ),
            // workloads and principals together
            (
                "workloads: {namespaces: [ai-agents]}\n    principals: {kinds: [anonymous]}",
                agent,
                None,
                true,
            ),
            (
                "workloads: {namespaces: [ai-agents]}\n    principals: {kinds: [anonymous]}",
                agent,
                alice,
                false,
            ),
            (
                "workloads: {namespaces: [ai-agents]}\n    principals: {kinds: [anonymous]}",
                ops,
                None,
                false,
            ),
            // no identity conditions: any caller
            ("namespaces: [prod]", None, bad, true),
        ];
        let mut failures = Vec::new();
        for (selector, workload, who, want) in cases {
            for (kind, rule, method, uri) in [
                (
                    "resource",
                    "resources: [\"*\"]",
                    "DELETE",
                    "/api/v1/namespaces/prod/pods/p",
                ),
                (
                    "non-resource",
                    "nonResourceURLs: [\"*\"]",
                    "GET",
                    "/metrics",
                ),
            ] {
                if kind == "non-resource" && selector.starts_with("namespaces") {
                    continue;
                }
                let p = policy(&format!(
                    "default: allow\nrules:\n  - name: r\n    action: deny\n    verbs: [\"*\"]\n    {rule}\n    {selector}\n"
                ));
                let got = decide_as(&p, method, uri, *workload, *who).rule.is_some();
                if got != *want {
                    failures.push(format!(
                        "{kind} rule with {selector}: workload {:?}, principal {:?}: matched {got}, want {want}",
                        workload.and_then(|w| w.pod.as_deref()),
                        who.map(|p| (p.kind, p.subject.as_deref())),
                    ));
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn identity_conditions_keep_first_match_order_across_index_lists() {
        let p = policy(
            r#"default: allow
rules:
  - name: agents-no-delete-in-prod
    action: deny
    message: agents in namespace ai-agents may not delete anything in production
    verbs: [delete, deletecollection]
    resources: ["*"]
    namespaces: [production]
    workloads: {namespaces: [ai-agents]}
  - name: unidentified-exec
    action: deny
    verbs: ["*"]
    resources: ["*/exec"]
    workloads: {unknown: true}
  - name: sre-exec
    action: allow
    verbs: ["*"]
    resources: [pods/exec]
    principals: {groups: [sre]}
  - name: no-pod-subresources
    action: deny
    verbs: ["*"]
    resources: [pods/*]
  - name: cursor-reads-its-secret
    action: allow
    verbs: [get]
    resources: [secrets]
    resourceNames: [cursor-config]
    workloads: {serviceAccounts: [ai-agents/cursor]}
  - name: no-secrets
    action: deny
    verbs: [get, list, watch]
    resources: [secrets]
  - name: metrics-for-people
    action: allow
    verbs: [get]
    nonResourceURLs: [/metrics]
    principals: {kinds: [oidc]}
  - name: no-metrics
    action: deny
    verbs: ["*"]
    nonResourceURLs: ["/metrics*"]
  - name: no-configmap-writes
    action: deny
    verbs: [create, update, patch, delete]
    resources: [configmaps]
  - name: agents-use-configmaps
    action: allow
    verbs: ["*"]
    resources: [configmaps]
    workloads: {namespaces: [ai-agents, ml]}
  - name: prod-deletes
    action: deny
    verbs: [delete]
    resources: ["*"]
    namespaces: [production]
"#,
        );
        let c = callers();
        let (agent, ops) = (Some(&c.agent), Some(&c.ops));
        let alice = Some(&c.alice);
        let (allow, deny) = (Action::Allow, Action::Deny);
        type Case<'a> = (
            &'a str,
            &'a str,
            Option<&'a WorkloadIdentity>,
            Option<&'a Principal>,
            (Action, Option<&'a str>),
        );
        let cases: &[Case<'_>] = &[
            (
                "DELETE",
                "/api/v1/namespaces/production/pods/p",
                agent,
                None,
                (deny, Some("agents-no-delete-in-prod")),
            ),
            (
                "DELETE",
                "/apis/apps/v1/namespaces/production/deployments/web",
                agent,
                alice,
                (deny, Some("agents-no-delete-in-prod")),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/production/configmaps",
                agent,
                None,
                (deny, Some("agents-no-delete-in-prod")),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/production/pods/p",
                ops,
                None,
                (deny, Some("prod-deletes")),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/production/pods/p",
                None,
                None,
                (deny, Some("prod-deletes")),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/production/configmaps/x",
                agent,
                None,
                (deny, Some("agents-no-delete-in-prod")),
            ),
            (
                "PATCH",
                "/api/v1/namespaces/dev/configmaps/x",
                agent,
                None,
                (deny, Some("no-configmap-writes")),
            ),
            (
                "GET",
                "/api/v1/namespaces/dev/configmaps/x",
                agent,
                None,
                (allow, Some("agents-use-configmaps")),
            ),
            (
                "GET",
                "/api/v1/namespaces/dev/configmaps/x",
                ops,
                None,
                (allow, None),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/staging/pods/p",
                agent,
                None,
                (allow, None),
            ),
            (
                "POST",
                "/api/v1/namespaces/dev/pods/p/exec",
                None,
                alice,
                (deny, Some("unidentified-exec")),
            ),
            (
                "POST",
                "/api/v1/namespaces/dev/pods/p/exec",
                Some(&c.half),
                alice,
                (deny, Some("unidentified-exec")),
            ),
            (
                "POST",
                "/api/v1/namespaces/dev/pods/p/exec",
                agent,
                alice,
                (allow, Some("sre-exec")),
            ),
            (
                "POST",
                "/api/v1/namespaces/dev/pods/p/exec",
                agent,
                None,
                (deny, Some("no-pod-subresources")),
            ),
            (
                "GET",
                "/api/v1/namespaces/dev/pods/p/log",
                None,
                alice,
                (deny, Some("no-pod-subresources")),
            ),
            (
                "GET",
                "/api/v1/namespaces/ai-agents/secrets/cursor-config",
                agent,
                None,
                (allow, Some("cursor-reads-its-secret")),
            ),
            (
                "GET",
                "/api/v1/namespaces/ai-agents/secrets/cursor-config",
                ops,
                None,
                (deny, Some("no-secrets")),
            ),
            (
                "GET",
                "/api/v1/namespaces/ai-agents/secrets/other",
                agent,
                None,
                (deny, Some("no-secrets")),
            ),
            (
                "GET",
                "/metrics",
                None,
                alice,
                (allow, Some("metrics-for-people")),
            ),
            ("GET", "/metrics", agent, None, (deny, Some("no-metrics"))),
            (
                "GET",
                "/metrics/x",
                agent,
                alice,
                (deny, Some("no-metrics")),
            ),
        ];
        for (method, uri, workload, who, want) in cases {
            let d = decide_as(&p, method, uri, *workload, *who);
            assert_eq!(
                (d.action, d.rule.as_deref()),
                *want,
                "{method} {uri} from {:?} as {:?}",
                workload.and_then(|w| w.pod.as_deref()),
                who.map(|p| p.kind)
            );
        }
        let d = decide_as(
            &p,
            "DELETE",
            "/api/v1/namespaces/production/pods/p",
            agent,
            None,
        );
        assert_eq!(
            d.reason(),
            "denied by Chaperone policy rule \"agents-no-delete-in-prod\": agents in namespace ai-agents may not delete anything in production"
        );
    }

    #[test]
    fn identity_guards_deny_before_rules() {
        let c = callers();
        let mut stolen = c.sa.clone();
        stolen.mismatch = Some(
            "token is for service account ai-agents/cursor, but the connection comes from pod ops/runner-7 which runs as ops/deployer".to_owned(),
        );
        let mut bad_and_stolen = Principal::invalid("signature invalid");
        bad_and_stolen.mismatch = stolen.mismatch.clone();
        let unexplained = Principal {
            reason: None,
            ..Principal::invalid("x")
        };
        let rules = "rules:\n  - name: everything\n    action: allow\n    verbs: [\"*\"]\n    resources: [\"*\"]\n  - name: urls\n    action: allow\n    verbs: [\"*\"]\n    nonResourceURLs: [\"*\"]\n";
        let both = policy(&format!(
            "default: allow\nidentity:\n  denyInvalidTokens: true\n  denyServiceAccountMismatch: true\n{rules}"
        ));
        let tokens_only = policy(&format!(
            "default: allow\nidentity: {{denyInvalidTokens: true}}\n{rules}"
        ));
        let off = policy(&format!(
            "default: allow\nidentity: {{denyInvalidTokens: false, denyServiceAccountMismatch: false}}\n{rules}"
        ));
        let none = policy(&format!("default: allow\n{rules}"));
        let invalid_reason = "denied by Chaperone policy guard \"identity.denyInvalidTokens\": the request's bearer token was not accepted: token expired";
        let mismatch_reason = "denied by Chaperone policy guard \"identity.denyServiceAccountMismatch\": the bearer token does not belong to the calling pod: token is for service account ai-agents/cursor, but the connection comes from pod ops/runner-7 which runs as ops/deployer";
        type Case<'a> = (&'a Policy, Option<&'a Principal>, &'a str, Option<&'a str>);
        let cases: &[Case<'_>] = &[
            (
                &both,
                Some(&c.bad),
                GUARD_INVALID_TOKENS,
                Some(invalid_reason),
            ),
            (
                &both,
                Some(&stolen),
                GUARD_SERVICE_ACCOUNT_MISMATCH,
                Some(mismatch_reason),
            ),
            (&both, Some(&bad_and_stolen), GUARD_INVALID_TOKENS, None),
            (&both, Some(&unexplained), GUARD_INVALID_TOKENS, None),
            (&both, Some(&c.sa), "everything", None),
            (&both, Some(&c.anonymous), "everything", None),
            (&both, None, "everything", None),
            (
                &tokens_only,
                Some(&c.bad),
                GUARD_INVALID_TOKENS,
                Some(invalid_reason),
            ),
            (&tokens_only, Some(&stolen), "everything", None),
            (&off, Some(&c.bad), "everything", None),
            (&off, Some(&stolen), "everything", None),
            (&none, Some(&c.bad), "everything", None),
        ];
        for (i, (p, who, want_rule, want_reason)) in cases.iter().enumerate() {
            for (method, uri) in [
                ("DELETE", "/api/v1/namespaces/prod/pods/p"),
                ("GET", "/healthz"),
            ] {
                let d = decide_as(p, method, uri, Some(&c.ops), *who);
                let want_action = if want_rule.starts_with(GUARD_PREFIX) {
                    Action::Deny
                } else {
                    Action::Allow
                };
                let want_rule = if *want_rule == "everything" && method == "GET" {
                    "urls"
                } else {
                    want_rule
                };
                assert_eq!(
                    (d.action, d.rule.as_deref()),
                    (want_action, Some(want_rule)),
                    "case {i}: {method} {uri} as {who:?}"
                );
                if let Some(reason) = want_reason {
                    assert_eq!(d.reason(), *reason, "case {i}");
                }
            }
        }
        let d = decide_as(&both, "GET", "/healthz", None, Some(&unexplained));
        assert_eq!(
            d.message.as_deref(),
            Some("the request's bearer token was not accepted: no reason given")
        );
    }

    const REFERENCE: &str = include_str!("../../docs/policy-reference.md");

    /// The YAML blocks of docs/policy-reference.md.
    fn reference_yaml_blocks() -> Vec<String> {
        REFERENCE
            .split("```yaml\n")
            .skip(1)
            .map(|rest| {
                rest.split_once("```")
                    .unwrap_or_else(|| panic!("unterminated yaml block in the reference"))
                    .0
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn reference_matches_the_module_doc_and_its_examples_work() {
        let module_doc: String = include_str!("policy.rs")
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .map(|l| format!("{}\n", l.strip_prefix("//! ").unwrap_or(&l[3..])))
            .collect();
        let from_doc = module_doc
            .split_once("# Policy file format\n")
            .unwrap_or_else(|| panic!("module doc lacks '# Policy file format'"))
            .1
            .replace("\n# ", "\n## ");
        let from_reference = REFERENCE
            .split_once("## File format\n")
            .and_then(|(_, rest)| rest.split_once("## Examples\n"))
            .unwrap_or_else(|| panic!("reference lacks '## File format' .. '## Examples'"))
            .0;
        assert_eq!(
            from_reference.trim_end(),
            from_doc.trim_end(),
            "docs/policy-reference.md and the policy.rs module doc disagree"
        );

        let blocks = reference_yaml_blocks();
        assert_eq!(blocks.len(), 3, "reference yaml blocks");
        let loaded: Vec<Policy> = blocks
            .iter()
            .enumerate()
            .map(|(i, text)| {
                Policy::from_yaml(text, "reference.yaml")
                    .unwrap_or_else(|e| panic!("reference block {i} must load: {e}\n{text}"))
            })
            .collect();
        let identity = &loaded[2];
        let c = callers();
        let (agent, ops) = (Some(&c.agent), Some(&c.ops));
        let bad = Some(&c.bad);
        for (method, uri, workload, who, want) in [
            (
                "DELETE",
                "/api/v1/namespaces/production/pods/web-0",
                agent,
                None,
                Some("agents-no-delete-in-production"),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/production/pods/web-0",
                ops,
                None,
                None,
            ),
            (
                "GET",
                "/api/v1/namespaces/dev/pods",
                None,
                None,
                Some("unidentified-pods"),
            ),
            (
                "GET",
                "/api/v1/namespaces/dev/pods",
                ops,
                bad,
                Some(GUARD_INVALID_TOKENS),
            ),
            (
                "POST",
                "/api/v1/namespaces/dev/pods/p/exec",
                ops,
                Some(&c.alice),
                Some("sre-may-exec"),
            ),
            (
                "POST",
                "/api/v1/namespaces/dev/pods/p/exec",
                ops,
                Some(&c.admin),
                Some("no-exec"),
            ),
        ] {
            let d = decide_as(identity, method, uri, workload, who);
            assert_eq!(d.rule.as_deref(), want, "{method} {uri}");
        }
    }
}
