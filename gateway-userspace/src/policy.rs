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
//! rules:                               # optional; evaluated in order, first match wins
//!   - name: protect-namespaces         # required, unique within the policy
//!     action: deny                     # required: allow | deny
//!     message: agents may not delete namespaces   # optional; shown to the client
//!     verbs: [delete, deletecollection]           # required, non-empty; "*" = any verb
//!     apiGroups: [""]                  # optional; "" = core group; absent or "*" = any
//!     resources: [namespaces]          # "pods", "pods/exec", "pods/*", "*/exec", "*"
//!     namespaces: []                   # optional; absent/empty = any, incl. cluster scope
//!     resourceNames: []                # optional; absent/empty = any name
//!   - name: health
//!     action: allow
//!     verbs: [get]
//!     nonResourceURLs: ["/healthz", "/version", "/apis/*"]   # trailing "*" = prefix
//! ```
//!
//! A rule has either `resources` (a resource rule) or `nonResourceURLs` (a non-resource
//! rule), never both; `apiGroups`, `namespaces` and `resourceNames` only apply to resource
//! rules.
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
//!
//! Resource rules only match resource requests and non-resource rules only non-resource
//! requests. When no rule matches, `default` applies.

use std::{
    collections::HashMap,
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

use crate::request::RequestInfo;

/// The `apiVersion` a policy document must declare.
pub const API_VERSION: &str = "chaperone.dev/v1alpha1";
/// The `kind` a policy document must declare.
pub const KIND: &str = "Policy";
/// Largest policy file [`Policy::from_file`] reads.
pub const MAX_POLICY_BYTES: u64 = 8 * 1024 * 1024;

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

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

/// The outcome of [`decide`]: the action and the rule that chose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allow or deny.
    pub action: Action,
    /// Name of the matching rule; `None` when the policy default applied.
    pub rule: Option<Arc<str>>,
    /// The matching rule's message for the client, if it has one.
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
        match (&self.rule, &self.message) {
            (Some(rule), Some(message)) => {
                format!("{verb} by Chaperone policy rule \"{rule}\": {message}")
            }
            (Some(rule), None) => format!("{verb} by Chaperone policy rule \"{rule}\""),
            (None, _) => format!(
                "{verb} by Chaperone policy: no rule matched and the default action is {}",
                self.action
            ),
        }
    }
}

/// Everything a decision may depend on. Workload and principal identity will join the
/// request here; construct it with [`RequestContext::new`] to stay source-compatible.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext<'a> {
    /// The request's Kubernetes attributes.
    pub request: &'a RequestInfo,
}

impl<'a> RequestContext<'a> {
    /// A context holding only the request attributes.
    pub fn new(request: &'a RequestInfo) -> Self {
        Self { request }
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
            rules: Vec::new(),
        };
        let compiled = compile(raw, "<allow-all>");
        Policy {
            inner: Arc::new(compiled.unwrap_or_else(|_| Compiled::empty("<allow-all>"))),
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

/// Decides a request: the first matching rule's action, else the policy default.
pub fn decide(policy: &Policy, ctx: &RequestContext<'_>) -> Decision {
    let p = &*policy.inner;
    let req = ctx.request;
    let found = if req.is_resource_request {
        p.first_resource_match(req)
    } else {
        p.first_url_match(req)
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
    rules: Vec<RawRule>,
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

/// Candidate rules for one resource key, ascending, split by namespace: a request visits
/// only the rules of its own namespace and those that apply in any namespace.
#[derive(Debug, Default)]
struct Candidates {
    any_namespace: Vec<Entry>,
    by_namespace: FastMap<u32, Vec<Entry>>,
}

impl Candidates {
    fn push(&mut self, entry: Entry, namespaces: &NamespaceSet) {
        match namespaces {
            NamespaceSet::Of(ids) => {
                for id in ids {
                    push_once(self.by_namespace.entry(*id).or_default(), entry);
                }
            }
            NamespaceSet::Any | NamespaceSet::AnyNamespaced => {
                push_once(&mut self.any_namespace, entry);
            }
        }
    }

    /// Appends this key's non-empty lists for namespace id `ns` to `lists[*len..]`.
    fn collect<'a>(&'a self, ns: Option<u32>, lists: &mut [&'a [Entry]; 10], len: &mut usize) {
        let own = ns
            .and_then(|id| self.by_namespace.get(&id))
            .map_or(&[][..], |v| v);
        for list in [&self.any_namespace[..], own] {
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
}

impl Compiled {
    fn empty(source: &str) -> Self {
        Compiled {
            source: source.to_owned(),
            default: Action::Allow,
            ..Compiled::default()
        }
    }

    fn first_resource_match(&self, req: &RequestInfo) -> Option<&Rule> {
        // Namespaces are never empty in a policy, so a cluster-scoped request gets `None`.
        let ns = self.namespaces.get(&req.namespace);
        let mut lists: [&[Entry]; 10] = [&[]; 10];
        let mut len = 0;
        let by_res = self.by_resource.get(req.resource.as_str());
        if req.subresource.is_empty() {
            if let Some(r) = by_res {
                r.plain.collect(ns, &mut lists, &mut len);
            }
        } else {
            let sub = req.subresource.as_str();
            if let Some(r) = by_res {
                if let Some(c) = r.subs.get(sub) {
                    c.collect(ns, &mut lists, &mut len);
                }
                r.any_sub.collect(ns, &mut lists, &mut len);
            }
            if let Some(c) = self.star.subs.get(sub) {
                c.collect(ns, &mut lists, &mut len);
            }
            self.star.any_sub.collect(ns, &mut lists, &mut len);
        }
        self.any_resource.collect(ns, &mut lists, &mut len);

        let verb = verb_bit(&req.verb);
        // Group and name ids are looked up at most once, and only if a candidate needs them.
        let mut group = None;
        let mut name = None;
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
            match rule.names {
                IdSet::Any => true,
                IdSet::Of(_) => {
                    !req.name.is_empty()
                        && rule
                            .names
                            .contains(*name.get_or_insert_with(|| self.names.get(&req.name)))
                }
            }
        };
        first_in_merged(&mut lists[..len], verb, &self.rules, matches)
    }

    fn first_url_match(&self, req: &RequestInfo) -> Option<&Rule> {
        let verb = verb_bit(&req.verb);
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
            if rule.verbs & verb != 0 {
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg {
    Key(&'static str),
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
    let mut out = Compiled {
        source: source.to_owned(),
        default: raw.default,
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
        let compiled = match (&rule.resources, &rule.non_resource_urls) {
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
            (Some(resources), None) => {
                compile_resource_rule(&rule, resources, index, &at, &mut out)?
            }
            (None, Some(urls)) => compile_url_rule(&rule, urls, index, &at, &mut out)?,
        };
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

fn compile_resource_rule(
    rule: &RawRule,
    resources: &[String],
    index: u32,
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
        candidates.push(entry, &namespaces);
    }

    Ok(Rule {
        name: Arc::from(rule.name.as_str()),
        action: rule.action,
        message: rule.message.as_deref().map(Arc::from),
        verbs,
        groups,
        namespaces,
        names,
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
                "policy.yaml:11:5: rules[1]: unknown field 'verb', expected one of 'name', 'action', 'message', 'verbs', 'apiGroups', 'resources', 'namespaces', 'resourceNames', 'nonResourceURLs'",
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
                "policy.yaml:4:1: unknown field 'rule', expected one of 'apiVersion', 'kind', 'default', 'rules'",
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
        ];
        let mut failures = Vec::new();
        for (body, want) in cases {
            let text = if body.starts_with("rules:") {
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
}
