//! Masking of the Kubernetes objects the agent receives: single objects, lists, `Table`s
//! and watch events, as JSON.
//!
//! A [`Masker`] is compiled once per policy (per `mask` rule, and per combination of
//! `mask` rules that match one request) from [`MaskingSpec`]s, the `masking:` settings of
//! a policy. Applied to a response it replaces, in place:
//!
//! * Secret `data` values with [`PLACEHOLDER_BASE64`] (the base64 of
//!   [`PLACEHOLDER_TEXT`], so clients that decode the value still decode it without an
//!   error) and `stringData` values with [`PLACEHOLDER_TEXT`]; keys, `type` and metadata
//!   stay;
//! * the `kubectl.kubernetes.io/last-applied-configuration` annotation, which repeats the
//!   applied object as a string: it is parsed and masked by the same rules (so it stays
//!   usable JSON for `kubectl apply`), or replaced whole when it cannot be parsed;
//! * the `value` of container `env` entries whose name contains one of `envNames`
//!   (case-insensitive) in every pod spec: a Pod's, a workload template's
//!   (`spec.template.spec`: Deployment, StatefulSet, DaemonSet, ReplicaSet, Job,
//!   ReplicationController), a CronJob's (`spec.jobTemplate.spec.template.spec`), a
//!   PodTemplate's (`template.spec`) and a ControllerRevision's
//!   (`data.spec.template.spec`), across `containers`, `initContainers` and
//!   `ephemeralContainers`;
//! * configured `paths` (fields per API group and resource), replaced by
//!   [`PLACEHOLDER_TEXT`];
//! * whatever the credential detectors ([`Detectors`]) find in every other string value,
//!   including `Table` cells.
//!
//! Nothing here logs or returns an original value: [`MaskReport`] counts what was
//! replaced, per rule and kind, and errors name the position, never the content.

use std::{borrow::Cow, fmt, sync::Arc};

use serde::de::{self as de, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use serde::Deserialize;
use serde_json::Value;

use super::{
    LAST_APPLIED,
    detect::{Detectors, DetectorsSpec, Hits},
    tree::{Fields, Node, field, field_mut},
};

/// The text every masked value is replaced with (or, in Secret `data`, the text its
/// base64 placeholder decodes to).
pub const PLACEHOLDER_TEXT: &str = "**masked by chaperone**";

/// Secret `data` placeholder: `base64(PLACEHOLDER_TEXT)`, valid base64 so that clients
/// (client-go, the Python client, `base64 -d`) decode it without an error.
pub const PLACEHOLDER_BASE64: &str = "KiptYXNrZWQgYnkgY2hhcGVyb25lKio=";

/// Environment variable name parts masked when a policy does not set `envNames`.
pub const DEFAULT_ENV_NAMES: &[&str] = &[
    "PASSWORD",
    "PASSWD",
    "SECRET",
    "TOKEN",
    "KEY",
    "CREDENTIAL",
    "PRIVATE",
    "AUTH",
    "CONN_STR",
    "CONNECTION_STRING",
    "DSN",
];

/// Default bound of a response body the gateway reads whole to mask it (decompressed).
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 128 * 1024 * 1024;
/// Default bound of one watch event the gateway holds while it waits for its end.
pub const DEFAULT_MAX_WATCH_EVENT_BYTES: u64 = 16 * 1024 * 1024;
/// How many last-applied annotations nested in each other are parsed before the
/// innermost is replaced whole (each level is a string inside a string).
const MAX_ANNOTATION_DEPTH: u8 = 4;

/// The `masking:` settings of a policy (top level: the defaults) or of a rule (its
/// overrides), as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "masking settings: a mapping with secrets, envNames, paths, detectors, maxResponseBytes or maxWatchEventBytes"
)]
pub struct MaskingSpec {
    /// Mask Secret `data`/`stringData` values (default `true`); a rule's value overrides.
    #[serde(default)]
    pub secrets: Option<bool>,
    /// Case-insensitive parts of env var names whose values are masked (default
    /// [`DEFAULT_ENV_NAMES`]; `[]` masks none); a rule's list replaces the top level's.
    #[serde(default)]
    pub env_names: Option<Vec<String>>,
    /// Fields masked per API group and resource; a rule's entries add to the top level's.
    #[serde(default)]
    pub paths: Option<Vec<PathSpec>>,
    /// Credential detectors over every other string value; a rule's block replaces the top
    /// level's.
    #[serde(default)]
    pub detectors: Option<DetectorsSpec>,
    /// Top level only: largest (decompressed) response body read whole for masking;
    /// a larger one is refused.
    #[serde(default)]
    pub max_response_bytes: Option<u64>,
    /// Top level only: largest single watch event; a larger one ends the watch with an
    /// ERROR event.
    #[serde(default)]
    pub max_watch_event_bytes: Option<u64>,
}

/// One `paths` entry: which fields of which resources are masked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a masked path: a mapping with apiGroups, resources and fields"
)]
pub struct PathSpec {
    /// API groups (`""` core, `"*"` any); absent = any.
    #[serde(default)]
    pub api_groups: Option<Vec<String>>,
    /// Resources (`configmaps`, `"*"` any).
    pub resources: Vec<String>,
    /// Field paths: `.data.password`, `.data["tls.key"]`, `.spec.users[*].password`,
    /// `.data.*` (`*` and `[*]`: every key of a mapping or element of a list).
    pub fields: Vec<String>,
}

/// Where in a [`MaskingSpec`] a compile error is: keys and indexes from the spec's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecPathPart {
    /// A mapping key.
    Key(&'static str),
    /// A list index.
    Index(usize),
}

/// A compile error of masking settings, before the policy locates it in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// Path from the `masking:` key.
    pub path: Vec<SpecPathPart>,
    /// What is wrong.
    pub message: String,
}

fn spec_error(path: Vec<SpecPathPart>, message: impl Into<String>) -> SpecError {
    SpecError {
        path,
        message: message.into(),
    }
}

/// What a masked value was (the `kind` of a [`MaskCount`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MaskKind {
    /// A Secret `data`/`stringData` value.
    SecretData,
    /// A last-applied annotation that could not be parsed, replaced whole.
    LastApplied,
    /// A container env value, by its name.
    Env,
    /// A configured path.
    Path,
    /// What a credential detector found (its id).
    Detector(&'static str),
}

impl MaskKind {
    /// The kind as the recordings spell it (`secretData`, `env`, `detector:<id>`, ...).
    pub fn name(&self) -> Cow<'static, str> {
        match self {
            MaskKind::SecretData => "secretData".into(),
            MaskKind::LastApplied => "lastApplied".into(),
            MaskKind::Env => "env".into(),
            MaskKind::Path => "path".into(),
            MaskKind::Detector(id) => format!("detector:{id}").into(),
        }
    }
}

/// How many values one rule masked of one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskCount {
    /// The `mask` rule whose settings asked for it.
    pub rule: Arc<str>,
    /// What was masked.
    pub kind: MaskKind,
    /// How many values.
    pub count: u32,
}

/// What masking replaced in one response (all its watch events included).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaskReport {
    /// One entry per (rule, kind), in the order first seen.
    pub counts: Vec<MaskCount>,
}

impl MaskReport {
    fn add(&mut self, rule: &Arc<str>, kind: MaskKind, n: u32) {
        if n == 0 {
            return;
        }
        match self
            .counts
            .iter_mut()
            .find(|c| c.kind == kind && Arc::ptr_eq(&c.rule, rule))
        {
            Some(c) => c.count = c.count.saturating_add(n),
            None => self.counts.push(MaskCount {
                rule: rule.clone(),
                kind,
                count: n,
            }),
        }
    }

    /// Adds `other`'s counts, keeping the order in which they were first seen.
    fn merge(&mut self, other: MaskReport) {
        for c in other.counts {
            self.add(&c.rule, c.kind, c.count);
        }
    }

    /// Values replaced in total.
    pub fn total(&self) -> u32 {
        self.counts
            .iter()
            .fold(0u32, |sum, c| sum.saturating_add(c.count))
    }

    /// The report as the `masked` column stores it:
    /// `[{"rule":"mask-secrets","kind":"secretData","count":3}]`; `None` when empty.
    pub fn to_json(&self) -> Option<String> {
        if self.counts.is_empty() {
            return None;
        }
        let list: Vec<Value> = self
            .counts
            .iter()
            .map(|c| serde_json::json!({"rule": &*c.rule, "kind": c.kind.name(), "count": c.count}))
            .collect();
        Some(Value::Array(list).to_string())
    }
}

/// Why a response could not be masked; never carries any of the response's content.
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    /// The body is not JSON (or nests deeper than the parser's limit of 128).
    #[error("the response is not JSON that can be masked: {0}")]
    Parse(serde_json::Error),
    /// The body (or one watch event) is larger than the gateway masks.
    #[error("the {what} is larger than the {limit} bytes the gateway masks")]
    TooLarge {
        /// `response` or `watch event`.
        what: &'static str,
        /// The bound.
        limit: u64,
    },
}

impl From<serde_json::Error> for MaskError {
    fn from(e: serde_json::Error) -> Self {
        // serde_json's message names a line and column, never the text.
        MaskError::Parse(e)
    }
}

/// The resource a response is about (from the request), for lists whose items carry no
/// `kind` and for `paths`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    /// API group (`""` for the core group).
    pub group: &'a str,
    /// Resource (`secrets`).
    pub resource: &'a str,
}

impl Target<'_> {
    fn is_secrets(&self) -> bool {
        self.group.is_empty() && self.resource == "secrets"
    }
}

/// A field path step.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(Box<str>),
    Index(usize),
    /// Every key of a mapping, every element of a list.
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CompiledPath {
    /// `None`: any group.
    groups: Option<Box<[Box<str>]>>,
    /// `None`: any resource.
    resources: Option<Box<[Box<str>]>>,
    steps: Box<[Step]>,
    rule: u16,
}

/// One rule's settings with the top level's applied, before rules are combined.
#[derive(Debug, Clone)]
pub struct RuleMasking {
    secrets: bool,
    env_names: Vec<Box<[u8]>>,
    paths: Vec<CompiledPath>,
    detectors: Detectors,
}

/// Compiled masking: cheap to share, applied to responses. Built by the policy.
#[derive(Debug)]
pub struct Masker {
    /// The `mask` rules it was built from, in policy order.
    rules: Box<[Arc<str>]>,
    /// Index into `rules` of the rule that asked for each feature.
    secrets: Option<u16>,
    env_names: Vec<(Box<[u8]>, u16)>,
    paths: Vec<CompiledPath>,
    detectors: Vec<(Detectors, u16)>,
    limits: MaskLimits,
}

/// Bounds of what the gateway holds to mask it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskLimits {
    /// Largest decompressed response body read whole.
    pub max_response_bytes: u64,
    /// Largest watch event.
    pub max_watch_event_bytes: u64,
}

impl Default for MaskLimits {
    fn default() -> Self {
        Self {
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_watch_event_bytes: DEFAULT_MAX_WATCH_EVENT_BYTES,
        }
    }
}

impl CompiledPath {
    fn applies_to(&self, target: Target<'_>) -> bool {
        let group_ok = self
            .groups
            .as_deref()
            .is_none_or(|g| g.iter().any(|g| **g == *target.group));
        let resource_ok = self
            .resources
            .as_deref()
            .is_none_or(|r| r.iter().any(|r| **r == *target.resource));
        group_ok && resource_ok
    }
}

impl PartialEq for Masker {
    /// Maskers are equal when they mask alike: the same rules with the same settings (a
    /// reloaded policy may keep a rule's name and change what it masks).
    fn eq(&self, other: &Self) -> bool {
        self.rules == other.rules
            && self.secrets == other.secrets
            && self.env_names == other.env_names
            && self.paths == other.paths
            && self.detectors == other.detectors
            && self.limits == other.limits
    }
}

impl Eq for Masker {}

/// The largest `maxResponseBytes` and `maxWatchEventBytes` a policy may set.
const MAX_MASKED_BYTES: u64 = 1 << 30;

/// Validates the top-level settings and returns the response bounds they set.
pub fn compile_limits(top: &MaskingSpec) -> Result<MaskLimits, SpecError> {
    let mut limits = MaskLimits::default();
    for (key, value, slot) in [
        (
            "maxResponseBytes",
            top.max_response_bytes,
            &mut limits.max_response_bytes,
        ),
        (
            "maxWatchEventBytes",
            top.max_watch_event_bytes,
            &mut limits.max_watch_event_bytes,
        ),
    ] {
        if let Some(v) = value {
            if v < 1024 {
                return Err(spec_error(
                    vec![SpecPathPart::Key(key)],
                    format!("{v} is too small to hold a Kubernetes object; give at least 1024"),
                ));
            }
            // A masked answer is held whole in memory.
            if v > MAX_MASKED_BYTES {
                return Err(spec_error(
                    vec![SpecPathPart::Key(key)],
                    format!(
                        "{v} is more than a gateway should hold in memory for one answer; give at most {MAX_MASKED_BYTES} (1 GiB)"
                    ),
                ));
            }
            *slot = v;
        }
    }
    Ok(limits)
}

/// Checks a spec on its own (field paths, names); `top` says whether it is the policy's
/// top-level block (the only place for the response bounds).
pub fn check_spec(spec: &MaskingSpec, top: bool) -> Result<(), SpecError> {
    if !top {
        for (key, set) in [
            ("maxResponseBytes", spec.max_response_bytes.is_some()),
            ("maxWatchEventBytes", spec.max_watch_event_bytes.is_some()),
        ] {
            if set {
                return Err(spec_error(
                    vec![SpecPathPart::Key(key)],
                    format!(
                        "'{key}' is a bound for the whole gateway; set it in the top-level masking block"
                    ),
                ));
            }
        }
    }
    if let Some(names) = &spec.env_names {
        for (i, name) in names.iter().enumerate() {
            if name.trim().is_empty() {
                return Err(spec_error(
                    vec![SpecPathPart::Key("envNames"), SpecPathPart::Index(i)],
                    "env name part must not be empty (it would match every variable)",
                ));
            }
        }
    }
    for (i, path) in spec.paths.iter().flatten().enumerate() {
        let at = |rest: &[SpecPathPart]| {
            let mut p = vec![SpecPathPart::Key("paths"), SpecPathPart::Index(i)];
            p.extend_from_slice(rest);
            p
        };
        if path.api_groups.as_ref().is_some_and(Vec::is_empty) {
            return Err(spec_error(
                at(&[SpecPathPart::Key("apiGroups")]),
                "lists no API group; write [\"\"] for the core group or omit the key for any",
            ));
        }
        if path.resources.is_empty() {
            return Err(spec_error(
                at(&[SpecPathPart::Key("resources")]),
                "must list at least one resource ('*' for any)",
            ));
        }
        for (j, r) in path.resources.iter().enumerate() {
            let ok = r == "*"
                || (!r.is_empty()
                    && r.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'
                    }));
            if !ok {
                return Err(spec_error(
                    at(&[SpecPathPart::Key("resources"), SpecPathPart::Index(j)]),
                    format!(
                        "malformed resource '{r}'; expected a lowercase plural like 'configmaps' or '*'"
                    ),
                ));
            }
        }
        if path.fields.is_empty() {
            return Err(spec_error(
                at(&[SpecPathPart::Key("fields")]),
                "must list at least one field path, e.g. '.data.password'",
            ));
        }
        for (j, f) in path.fields.iter().enumerate() {
            parse_field(f).map_err(|m| {
                spec_error(
                    at(&[SpecPathPart::Key("fields"), SpecPathPart::Index(j)]),
                    m,
                )
            })?;
        }
    }
    Ok(())
}

/// Parses `.a.b`, `.a["x.y"]`, `.a[0]`, `.a[*]`, `.a.*`.
fn parse_field(text: &str) -> Result<Vec<Step>, String> {
    let bad = |why: &str| {
        format!(
            "malformed field path '{text}': {why}; expected e.g. '.data.password', '.data[\"tls.key\"]' or '.spec.users[*].password'"
        )
    };
    let mut steps = Vec::new();
    let mut rest = text;
    if !rest.starts_with('.') {
        return Err(bad("it must start with '.'"));
    }
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            let end = after.find(['.', '[']).unwrap_or(after.len());
            let key = &after[..end];
            if key.is_empty() {
                return Err(bad("empty key"));
            }
            steps.push(if key == "*" {
                Step::Any
            } else {
                Step::Key(key.into())
            });
            rest = &after[end..];
        } else if let Some(after) = rest.strip_prefix('[') {
            let end = after.find(']').ok_or_else(|| bad("'[' without ']'"))?;
            let inner = &after[..end];
            let step = if inner == "*" {
                Step::Any
            } else if let Some(quoted) = inner
                .strip_prefix('"')
                .and_then(|s| s.strip_suffix('"'))
                .filter(|s| !s.is_empty() && !s.contains('"'))
            {
                Step::Key(quoted.into())
            } else if let Ok(i) = inner.parse::<usize>() {
                Step::Index(i)
            } else {
                return Err(bad("brackets take *, an index or a quoted key"));
            };
            steps.push(step);
            rest = &after[end + 1..];
        } else {
            return Err(bad("expected '.' or '['"));
        }
    }
    if steps.is_empty() {
        return Err(bad("no field"));
    }
    Ok(steps)
}

impl RuleMasking {
    /// One rule's effective settings: `rule` over `top` (scalars and lists override, `paths`
    /// add). Both must have passed [`check_spec`]; detectors that fail to compile are an
    /// error naming the `detectors` key.
    pub fn compile(top: &MaskingSpec, rule: &MaskingSpec) -> Result<RuleMasking, SpecError> {
        let secrets = rule.secrets.or(top.secrets).unwrap_or(true);
        let env_names = match rule.env_names.as_ref().or(top.env_names.as_ref()) {
            Some(list) => list
                .iter()
                .map(|n| n.trim().to_ascii_uppercase().into_bytes().into())
                .collect(),
            None => DEFAULT_ENV_NAMES
                .iter()
                .map(|n| n.as_bytes().into())
                .collect(),
        };
        let mut paths = Vec::new();
        for spec in top
            .paths
            .iter()
            .flatten()
            .chain(rule.paths.iter().flatten())
        {
            for field in &spec.fields {
                let steps = parse_field(field)
                    .map_err(|m| spec_error(vec![SpecPathPart::Key("paths")], m))?;
                paths.push(CompiledPath {
                    groups: spec
                        .api_groups
                        .as_ref()
                        .filter(|g| !g.iter().any(|g| g == "*"))
                        .map(|g| g.iter().map(|g| Box::from(g.as_str())).collect()),
                    resources: (!spec.resources.iter().any(|r| r == "*")).then(|| {
                        spec.resources
                            .iter()
                            .map(|r| Box::from(r.as_str()))
                            .collect()
                    }),
                    steps: steps.into(),
                    rule: 0,
                });
            }
        }
        let detectors_spec = rule
            .detectors
            .as_ref()
            .or(top.detectors.as_ref())
            .cloned()
            .unwrap_or_default();
        let detectors = Detectors::compile(&detectors_spec)
            .map_err(|m| spec_error(vec![SpecPathPart::Key("detectors")], m))?;
        Ok(RuleMasking {
            secrets,
            env_names,
            paths,
            detectors,
        })
    }
}

impl Masker {
    /// Combines the settings of the `mask` rules that matched one request (in policy
    /// order); each value masked is counted for the first rule that asked for it.
    pub fn combine<'r>(
        parts: impl IntoIterator<Item = (Arc<str>, &'r RuleMasking)>,
        limits: MaskLimits,
    ) -> Masker {
        let mut m = Masker {
            rules: Box::default(),
            secrets: None,
            env_names: Vec::new(),
            paths: Vec::new(),
            detectors: Vec::new(),
            limits,
        };
        let mut rules = Vec::new();
        for (i, (name, part)) in parts.into_iter().enumerate() {
            let i = u16::try_from(i).unwrap_or(u16::MAX);
            rules.push(name);
            if part.secrets && m.secrets.is_none() {
                m.secrets = Some(i);
            }
            for n in &part.env_names {
                if !m.env_names.iter().any(|(have, _)| have == n) {
                    m.env_names.push((n.clone(), i));
                }
            }
            for p in &part.paths {
                let mut p = p.clone();
                p.rule = i;
                if !m.paths.iter().any(|have| {
                    have.steps == p.steps
                        && have.groups == p.groups
                        && have.resources == p.resources
                }) {
                    m.paths.push(p);
                }
            }
            m.detectors.push((part.detectors.clone(), i));
        }
        m.rules = rules.into();
        m
    }

    /// The detectors that mask this request's streamed output (pod logs, exec and attach
    /// stdout/stderr): those of the first `mask` rule that has any. Rules usually share
    /// the top level's set; when they set different ones, streams use the first rule's.
    pub fn stream_detectors(&self) -> Option<Detectors> {
        self.detectors
            .iter()
            .map(|(d, _)| d)
            .find(|d| !d.is_empty())
            .cloned()
    }

    /// The `mask` rules this masker was built from, in policy order.
    pub fn rules(&self) -> &[Arc<str>] {
        &self.rules
    }

    /// Whether Secret values are masked (then a masked response needs no recording mask).
    pub fn masks_secrets(&self) -> bool {
        self.secrets.is_some()
    }

    /// Bounds of what is held to mask a response.
    /// Whether configured `paths` apply to `target`. A `Table` of such a resource cannot
    /// be masked by them (its cells come from printer columns, and a Table does not say
    /// which field each column shows): the gateway does not ask for one, and masks every
    /// cell of one it gets anyway.
    pub fn paths_apply_to(&self, target: Target<'_>) -> bool {
        self.paths.iter().any(|path| path.applies_to(target))
    }

    pub fn limits(&self) -> MaskLimits {
        self.limits
    }

    fn rule(&self, i: u16) -> &Arc<str> {
        &self.rules[usize::from(i).min(self.rules.len().saturating_sub(1))]
    }

    /// Masks a whole response body (object, list, `Table`, or a watch event) and returns
    /// the masked JSON. Fails on anything that is not JSON or is larger than the bound.
    pub fn mask_body(
        &self,
        target: Target<'_>,
        body: &[u8],
        report: &mut MaskReport,
    ) -> Result<Vec<u8>, MaskError> {
        if body.len() as u64 > self.limits.max_response_bytes {
            return Err(MaskError::TooLarge {
                what: "response",
                limit: self.limits.max_response_bytes,
            });
        }
        if let Some(out) = self.mask_list(target, body, report)? {
            return Ok(out);
        }
        let mut node = Node::parse(body)?;
        self.mask_response(target, &mut node, report, 0);
        let mut out = Vec::with_capacity(body.len());
        node.write(&mut out);
        Ok(out)
    }

    /// A list (`items` an array, `kind` absent or `...List`) masked one item at a time,
    /// in one pass over the body: each item is read, masked as [`Masker::mask_body`]
    /// masks a list's items, and written out before the next is read, so the work stays
    /// in the cache and the tree of a 10 MiB list never exists whole (a Pod list masks 2x
    /// faster than reading it whole). The list's own fields are copied as they came (a
    /// list's metadata is not masked), in the order they came. The output decodes to what
    /// masking the list whole gives. `None`: not a list, or not one this path is sure of (a
    /// duplicate `items`, anything unexpected): masked whole.
    fn mask_list(
        &self,
        target: Target<'_>,
        body: &[u8],
        report: &mut MaskReport,
    ) -> Result<Option<Vec<u8>>, MaskError> {
        use serde::de::DeserializeSeed as _;
        let mut list_report = MaskReport::default();
        // Masked values are rarely longer than the originals; a little slack saves a
        // reallocation (and a copy of the whole list) when they are.
        let mut out = Vec::with_capacity(body.len() + body.len() / 16 + 64);
        let visitor = ListVisitor {
            masker: self,
            target,
            report: &mut list_report,
            out: &mut out,
        };
        let mut de = serde_json::Deserializer::from_slice(body);
        let Ok(Some(kind)) = visitor.deserialize(&mut de) else {
            return Ok(None);
        };
        if de.end().is_err() || !kind.is_none_or(|k| k.ends_with("List")) {
            return Ok(None);
        }
        report.merge(list_report);
        Ok(Some(out))
    }

    /// Masks a decoded response in place, as [`Masker::mask_body`] masks its text: an
    /// object, a list (`items`), a `Table` (rows' objects and cells) or a watch event
    /// (`{"type","object"}`). A value nested deeper than the parser reads (128) is
    /// replaced whole by the placeholder.
    pub fn mask_value(&self, target: Target<'_>, value: &mut Value, report: &mut MaskReport) {
        let text = value.to_string();
        let masked = Node::parse(text.as_bytes()).ok().and_then(|mut node| {
            self.mask_response(target, &mut node, report, 0);
            serde_json::from_str(&node.to_json_string()).ok()
        });
        *value = masked.unwrap_or_else(|| Value::String(PLACEHOLDER_TEXT.to_owned()));
    }

    fn mask_response<'a>(
        &self,
        target: Target<'_>,
        value: &mut Node<'a>,
        report: &mut MaskReport,
        depth: u8,
    ) {
        let Node::Object(map) = value else {
            self.detect_all(value, report);
            return;
        };
        let kind = field(map, "kind").and_then(Node::as_str);
        if kind == Some("Table") && field(map, "rows").is_some_and(Node::is_array) {
            if let Some(Node::Array(rows)) = field_mut(map, "rows") {
                for row in rows {
                    if let Some(object) = row.get_mut("object") {
                        self.mask_response(target, object, report, depth);
                    }
                    if let Some(cells) = row.get_mut("cells") {
                        if self.paths_apply_to(target) {
                            let n = replace_leaves(cells, PLACEHOLDER_TEXT);
                            if let Some(path) = self.paths.iter().find(|p| p.applies_to(target)) {
                                report.add(self.rule(path.rule), MaskKind::Path, n);
                            }
                        } else {
                            self.detect_all(cells, report);
                        }
                    }
                }
            }
            return;
        }
        let is_list = field(map, "items").is_some_and(Node::is_array)
            && kind.is_none_or(|k| k.ends_with("List"));
        if is_list {
            if let Some(Node::Array(items)) = field_mut(map, "items") {
                for item in items {
                    self.mask_response(target, item, report, depth);
                }
            }
            return;
        }
        if kind.is_none()
            && map.len() == 2
            && field(map, "type").is_some_and(Node::is_string)
            && let Some(object) = field_mut(map, "object")
        {
            self.mask_response(target, object, report, depth);
            return;
        }
        self.mask_object(target, map, report, depth);
    }

    /// Masks one Kubernetes object.
    fn mask_object<'a>(
        &self,
        target: Target<'_>,
        map: &mut Fields<'a>,
        report: &mut MaskReport,
        depth: u8,
    ) {
        // Field ownership changes with values: a write (or its dry run) that sets a field
        // another manager owns to the value it has leaves it co-owned, to another value
        // takes it over. The answer's `managedFields` would tell a guess of a masked value
        // from the truth, so a masked answer has none (kubectl hides them anyway).
        if let Some(Node::Object(metadata)) = field_mut(map, "metadata") {
            metadata.retain(|(key, _)| key != "managedFields");
        }
        if field(map, "kind").and_then(Node::as_str) == Some("Status") {
            cut_status_messages(map);
        }
        let kind = field(map, "kind").and_then(Node::as_str);
        if let Some(rule) = self.secrets {
            let is_secret = kind == Some("Secret")
                || (target.is_secrets()
                    && kind.is_none_or(|k| k != "Status" && !k.ends_with("List")));
            if is_secret {
                let mut n = 0;
                if let Some(data) = field_mut(map, "data") {
                    n += replace_leaves(data, PLACEHOLDER_BASE64);
                }
                if let Some(data) = field_mut(map, "stringData") {
                    n += replace_leaves(data, PLACEHOLDER_TEXT);
                }
                report.add(self.rule(rule), MaskKind::SecretData, n);
            }
        }
        if !self.env_names.is_empty() {
            self.mask_pod_specs(map, report);
        }
        if !self.paths.is_empty() {
            for path in &self.paths {
                if path.applies_to(target) {
                    let mut n = 0;
                    if let Some((first, rest)) = path.steps.split_first() {
                        mask_steps_in_map(map, first, rest, &mut n);
                    }
                    report.add(self.rule(path.rule), MaskKind::Path, n);
                }
            }
        }
        // The annotation repeats the applied object: mask it by the same rules.
        let annotation = field_mut(map, "metadata")
            .and_then(|m| m.get_mut("annotations"))
            .and_then(|a| a.get_mut(LAST_APPLIED));
        if let Some(slot) = annotation
            && let Node::String(text) = slot
        {
            let masked: Option<String> = (depth < MAX_ANNOTATION_DEPTH)
                .then(|| Node::parse(text.as_bytes()).ok())
                .flatten()
                .map(|mut inner| {
                    // The inner object is masked as the object it describes.
                    self.mask_response(target, &mut inner, report, depth + 1);
                    inner.to_json_string()
                });
            match masked {
                Some(masked) => *text = Cow::Owned(masked),
                None => {
                    *text = Cow::Borrowed(PLACEHOLDER_TEXT);
                    report.add(&self.rules[0], MaskKind::LastApplied, 1);
                }
            }
            // Already masked, and the detectors must not see the serialized copy again.
            let skip = std::mem::take(slot);
            for (_, v) in map.iter_mut() {
                self.detect_all(v, report);
            }
            if let Some(slot) = field_mut(map, "metadata")
                .and_then(|m| m.get_mut("annotations"))
                .and_then(|a| a.get_mut(LAST_APPLIED))
            {
                *slot = skip;
            }
            return;
        }
        for (_, v) in map.iter_mut() {
            self.detect_all(v, report);
        }
    }

    /// Env values by name in every pod spec the object holds.
    fn mask_pod_specs(&self, map: &mut Fields<'_>, report: &mut MaskReport) {
        const SPEC_PATHS: &[&[&str]] = &[
            &["spec"],
            &["spec", "template", "spec"],
            &["spec", "jobTemplate", "spec", "template", "spec"],
            &["template", "spec"],
            // A ControllerRevision (a StatefulSet's or DaemonSet's history, what `kubectl
            // rollout history --revision` prints) keeps the template it recorded here.
            &["data", "spec", "template", "spec"],
        ];
        for path in SPEC_PATHS {
            let Some((first, rest)) = path.split_first() else {
                continue;
            };
            let mut at = field_mut(map, first);
            for key in rest {
                at = at.and_then(|v| v.get_mut(key));
            }
            let Some(Node::Object(spec)) = at else {
                continue;
            };
            for list in ["containers", "initContainers", "ephemeralContainers"] {
                let Some(Node::Array(containers)) = field_mut(spec, list) else {
                    continue;
                };
                for container in containers {
                    let Some(Node::Array(env)) = container.get_mut("env") else {
                        continue;
                    };
                    for var in env {
                        let Node::Object(var) = var else {
                            continue;
                        };
                        let Some(name) = field(var, "name").and_then(Node::as_str) else {
                            continue;
                        };
                        let Some(rule) = self
                            .env_names
                            .iter()
                            .find(|(part, _)| contains_ignore_case(name.as_bytes(), part))
                            .map(|(_, rule)| *rule)
                        else {
                            continue;
                        };
                        if let Some(value) = field_mut(var, "value")
                            && *value != Node::Null
                        {
                            *value = Node::String(Cow::Borrowed(PLACEHOLDER_TEXT));
                            report.add(self.rule(rule), MaskKind::Env, 1);
                        }
                    }
                }
            }
        }
    }

    /// Runs the detectors over every string under `value`.
    fn detect_all(&self, value: &mut Node<'_>, report: &mut MaskReport) {
        if self.detectors.is_empty() {
            return;
        }
        match value {
            Node::String(text) => {
                for (detectors, rule) in &self.detectors {
                    let mut hits: Vec<Hits> = Vec::new();
                    if let Cow::Owned(redacted) = detectors.redact(text, &mut hits) {
                        *text = Cow::Owned(redacted);
                    }
                    for hit in hits {
                        report.add(
                            self.rule(*rule),
                            MaskKind::Detector(hit.detector),
                            hit.count,
                        );
                    }
                }
            }
            Node::Array(items) => {
                for v in items {
                    self.detect_all(v, report);
                }
            }
            Node::Object(map) => {
                for (_, v) in map.iter_mut() {
                    self.detect_all(v, report);
                }
            }
            _ => {}
        }
    }
}

fn contains_ignore_case(haystack: &[u8], upper_needle: &[u8]) -> bool {
    if upper_needle.is_empty() || haystack.len() < upper_needle.len() {
        return false;
    }
    haystack
        .windows(upper_needle.len())
        .any(|w| w.eq_ignore_ascii_case(upper_needle))
}

/// Replaces every non-null scalar under `v` with `with` (a placeholder: nothing in it is
/// escaped in JSON).
fn replace_leaves(v: &mut Node<'_>, with: &'static str) -> u32 {
    match v {
        Node::Object(map) => map.iter_mut().map(|(_, v)| replace_leaves(v, with)).sum(),
        Node::Array(items) => items.iter_mut().map(|v| replace_leaves(v, with)).sum(),
        Node::Null => 0,
        other => {
            *other = Node::String(Cow::Borrowed(with));
            1
        }
    }
}

fn mask_steps_in_map(map: &mut Fields<'_>, step: &Step, rest: &[Step], n: &mut u32) {
    match step {
        Step::Key(k) => {
            if let Some(v) = field_mut(map, k) {
                mask_steps(v, rest, n);
            }
        }
        Step::Any => {
            for (_, v) in map.iter_mut() {
                mask_steps(v, rest, n);
            }
        }
        Step::Index(_) => {}
    }
}

fn mask_steps(value: &mut Node<'_>, steps: &[Step], n: &mut u32) {
    let Some((step, rest)) = steps.split_first() else {
        *n += replace_leaves(value, PLACEHOLDER_TEXT);
        return;
    };
    match (value, step) {
        (Node::Object(map), step) => mask_steps_in_map(map, step, rest, n),
        (Node::Array(items), Step::Any) => {
            for v in items {
                mask_steps(v, rest, n);
            }
        }
        (Node::Array(items), Step::Index(i)) => {
            if let Some(v) = items.get_mut(*i) {
                mask_steps(v, rest, n);
            }
        }
        _ => {}
    }
}

/// Masks a watch stream event by event as it passes: events are newline-terminated JSON
/// objects that may arrive split across chunks. At most one event is held (bounded by
/// [`MaskLimits::max_watch_event_bytes`]); nothing is buffered beyond it.
#[derive(Debug)]
pub struct WatchMasker {
    masker: Arc<Masker>,
    group: Box<str>,
    resource: Box<str>,
    pending: Vec<u8>,
}

impl WatchMasker {
    /// A masker for one watch stream on `target`.
    pub fn new(masker: Arc<Masker>, target: Target<'_>) -> Self {
        Self {
            masker,
            group: target.group.into(),
            resource: target.resource.into(),
            pending: Vec::new(),
        }
    }

    /// Masks every event that `chunk` completes into `out` (each newline-terminated);
    /// keeps an incomplete tail for the next chunk.
    pub fn push(
        &mut self,
        chunk: &[u8],
        out: &mut Vec<u8>,
        report: &mut MaskReport,
    ) -> Result<(), MaskError> {
        let limit = self.masker.limits.max_watch_event_bytes;
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (line, after) = rest.split_at(nl);
            rest = &after[1..];
            if self.pending.is_empty() {
                self.mask_events(line, out, report)?;
            } else {
                if (self.pending.len() + line.len()) as u64 > limit {
                    return Err(MaskError::TooLarge {
                        what: "watch event",
                        limit,
                    });
                }
                let mut event = std::mem::take(&mut self.pending);
                event.extend_from_slice(line);
                self.mask_events(&event, out, report)?;
                event.clear();
                self.pending = event;
            }
        }
        if (self.pending.len() + rest.len()) as u64 > limit {
            return Err(MaskError::TooLarge {
                what: "watch event",
                limit,
            });
        }
        self.pending.extend_from_slice(rest);
        Ok(())
    }

    /// At the end of the stream: masks a last event that had no newline.
    pub fn finish(&mut self, out: &mut Vec<u8>, report: &mut MaskReport) -> Result<(), MaskError> {
        let event = std::mem::take(&mut self.pending);
        self.mask_events(&event, out, report)
    }

    /// One line: usually one event, but any sequence of JSON values is accepted.
    fn mask_events(
        &self,
        line: &[u8],
        out: &mut Vec<u8>,
        report: &mut MaskReport,
    ) -> Result<(), MaskError> {
        let target = Target {
            group: &self.group,
            resource: &self.resource,
        };
        for value in serde_json::Deserializer::from_slice(line).into_iter::<Node>() {
            let mut value = value?;
            self.masker.mask_response(target, &mut value, report, 0);
            value.write(out);
            out.push(b'\n');
        }
        Ok(())
    }
}

/// A masked dry-run write's answer without `metadata.generation`: the API server bumps it
/// in the answer when the write would change the spec and not when it would not, so a dry
/// run setting a guessed value would tell whether it is the masked one. `None` when the
/// body is not a JSON object (it is sent as masked).
pub fn without_generation(body: &[u8]) -> Option<Vec<u8>> {
    let mut node = Node::parse(body).ok()?;
    let Node::Object(map) = &mut node else {
        return None;
    };
    if let Some(Node::Object(metadata)) = field_mut(map, "metadata") {
        metadata.retain(|(key, _)| key != "generation");
    }
    let mut out = Vec::with_capacity(body.len());
    node.write(&mut out);
    Some(out)
}

/// What a masked request's error keeps of a message: its first line. The API server
/// prints the objects a refused update differs in after it (a pod update's refusal shows
/// the old and new spec, env values included), which no detector reliably finds.
pub(crate) const WITHHELD: &str =
    " [the rest is withheld: on a masked request it may quote masked values]";

/// Cuts a `Status`'s `message`, and its causes' messages, at their first line break.
fn cut_status_messages(map: &mut Fields<'_>) {
    fn cut(node: Option<&mut Node<'_>>) {
        if let Some(Node::String(text)) = node
            && let Some(end) = text.find('\n')
        {
            *text = Cow::Owned(format!("{}{WITHHELD}", &text[..end]));
        }
    }
    cut(field_mut(map, "message"));
    if let Some(Node::Array(causes)) = field_mut(map, "details").and_then(|d| d.get_mut("causes")) {
        for cause in causes {
            cut(cause.get_mut("message"));
        }
    }
}

/// The watch event that ends a stream the gateway could not mask: an `ERROR` event with an
/// InternalError `Status`, as the API server ends a watch it cannot continue.
pub fn watch_error_event(message: &str) -> Vec<u8> {
    let event = serde_json::json!({
        "type": "ERROR",
        "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": "InternalError", "code": 500
        }
    });
    let mut out = event.to_string().into_bytes();
    out.push(b'\n');
    out
}

impl fmt::Display for MaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Reads a top-level object into `out`: its fields copied as they came, `items` masked
/// item by item. `Some(kind)` (the `kind` field, if it is a string) for a list, `None`
/// when there is no `items` (not a list).
struct ListVisitor<'m, 'r> {
    masker: &'m Masker,
    target: Target<'m>,
    report: &'r mut MaskReport,
    out: &'r mut Vec<u8>,
}

impl<'de> de::DeserializeSeed<'de> for ListVisitor<'_, '_> {
    type Value = Option<Option<String>>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ListVisitor<'_, '_> {
    type Value = Option<Option<String>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen_items = false;
        let mut kind = None;
        self.out.push(b'{');
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if self.out.len() > 1 {
                self.out.push(b',');
            }
            serde_json::to_writer(&mut *self.out, &key).map_err(de::Error::custom)?;
            self.out.push(b':');
            if key == "items" {
                if std::mem::replace(&mut seen_items, true) {
                    return Err(de::Error::duplicate_field("items"));
                }
                map.next_value_seed(ItemsSeed {
                    masker: self.masker,
                    target: self.target,
                    report: &mut *self.report,
                    out: &mut *self.out,
                })?;
            } else {
                let raw = map.next_value::<&RawValue>()?;
                if key == "kind" {
                    if kind.is_some() {
                        return Err(de::Error::duplicate_field("kind"));
                    }
                    kind = Some(serde_json::from_str::<String>(raw.get()).ok());
                }
                self.out.extend_from_slice(raw.get().as_bytes());
            }
        }
        self.out.push(b'}');
        Ok(seen_items.then(|| kind.flatten()))
    }
}

/// Masks and writes a list's items one at a time; anything but an array is an error (the
/// caller then masks the body whole).
struct ItemsSeed<'m, 'r> {
    masker: &'m Masker,
    target: Target<'m>,
    report: &'r mut MaskReport,
    out: &'r mut Vec<u8>,
}

impl<'de> de::DeserializeSeed<'de> for ItemsSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of items")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.out.push(b'[');
        let mut first = true;
        while let Some(mut item) = seq.next_element::<Node<'de>>()? {
            if !std::mem::take(&mut first) {
                self.out.push(b',');
            }
            self.masker
                .mask_response(self.target, &mut item, self.report, 0);
            item.write(self.out);
        }
        self.out.push(b']');
        Ok(())
    }
}
