//! Request understanding: the Kubernetes request attributes of an HTTP request, derived
//! exactly as the API server's `RequestInfoFactory` derives them
//! (`apiserver/pkg/endpoints/request/requestinfo.go`, release 1.32; summarised in
//! `shared/k8s-wire-reference.md` section 1).
//!
//! Policy is only sound if the gateway and the API server agree on what a request *is*:
//! a path the gateway reads as `get pods` must not be a `delete secrets` upstream. So the
//! derivation follows the Go code step by step, including its odd corners (a namespace's
//! `status`/`finalize` subresources, `/watch/` and `/proxy/` path verbs, `watch` parsed as a
//! Go query boolean, `fieldSelector=metadata.name=x` naming the object of a list/watch).
//! Where the two parsers could disagree on malformed input (bad percent-encoding, NUL bytes,
//! dot segments, empty segments, `;` in the query, over-long paths), the request is refused
//! with a [`RequestError`] instead: no legitimate client sends those.

use std::borrow::Cow;

use compact_str::CompactString;
use http::{Method, Uri};
use smallvec::SmallVec;

/// Longest accepted request path, in bytes as sent (before percent-decoding).
pub const MAX_PATH_BYTES: usize = 8 * 1024;

/// Longest excerpt of client input quoted in an error message.
const MAX_QUOTED: usize = 64;

/// Why a request's method and URI cannot be turned into request attributes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The path is longer than [`MAX_PATH_BYTES`].
    #[error("request path is {len} bytes long; the limit is {MAX_PATH_BYTES} bytes")]
    PathTooLong {
        /// Length of the path as sent.
        len: usize,
    },
    /// The request target is not an origin-form path (`/...`) or `*`.
    #[error("request target {target:?} is not a path starting with '/'")]
    NotAPath {
        /// The offending target (truncated).
        target: String,
    },
    /// A `%` is not followed by two hexadecimal digits.
    #[error("{part}: invalid percent-encoding {sequence:?}")]
    InvalidPercentEncoding {
        /// Which part of the URI (`request path`, `query parameter "watch"`, ...).
        part: String,
        /// The malformed escape as sent.
        sequence: String,
    },
    /// The percent-decoded bytes are not UTF-8.
    #[error("{part}: percent-decoded bytes are not valid UTF-8")]
    InvalidUtf8 {
        /// Which part of the URI.
        part: String,
    },
    /// A decoded NUL byte (`%00`).
    #[error("{part}: contains a NUL byte")]
    NulByte {
        /// Which part of the URI.
        part: String,
    },
    /// A decoded control character other than NUL in the path.
    #[error("request path: contains control character 0x{byte:02x}")]
    ControlCharacter {
        /// The byte value.
        byte: u8,
    },
    /// A `.` or `..` path segment, which servers and proxies may resolve differently.
    #[error("request path {path:?}: contains a {segment:?} segment")]
    DotSegment {
        /// The decoded path (truncated).
        path: String,
        /// `.` or `..`.
        segment: &'static str,
    },
    /// An empty segment inside the path (`//`).
    #[error("request path {path:?}: contains an empty segment ('//')")]
    EmptySegment {
        /// The decoded path (truncated).
        path: String,
    },
    /// A `;` in the query: Go's query parser drops such pairs, other parsers split on it.
    #[error("query: contains ';', which the API server does not accept as a separator")]
    Semicolon,
    /// `/watch` or `/proxy` with nothing after it (the API server answers 500).
    #[error("request path {path:?}: nothing follows the '{verb}' path verb")]
    NothingAfterPathVerb {
        /// The decoded path (truncated).
        path: String,
        /// `watch` or `proxy`.
        verb: &'static str,
    },
}

/// A request's verb as the API server derives it: the Kubernetes verb of a resource request
/// (`get list watch create update patch delete deletecollection proxy`), or the lowercase
/// HTTP method of a non-resource request. Typed from the parser to the recorder; a string
/// only at the edges (Parquet, logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Verb {
    /// `get` (GET or HEAD of a named resource; GET of a non-resource URL).
    Get,
    /// `list`.
    List,
    /// `watch` (`?watch=true` or the legacy `/watch/` path).
    Watch,
    /// `create` (POST).
    Create,
    /// `update` (PUT).
    Update,
    /// `patch`.
    Patch,
    /// `delete` of a named resource.
    Delete,
    /// `deletecollection` (DELETE without a name).
    DeleteCollection,
    /// `proxy` (the legacy `/proxy/` path verb).
    Proxy,
    /// `head`: a non-resource HEAD.
    Head,
    /// `post`: a non-resource POST.
    Post,
    /// `put`: a non-resource PUT.
    Put,
    /// `options`: a non-resource OPTIONS.
    Options,
    /// A method the API server has no verb for (recorded as `""`, as the API server does).
    #[default]
    Unknown,
    /// `approve`: a decision taken through the approvals API (never a proxied request).
    Approve,
    /// `deny`: a denial taken through the approvals API (never a proxied request).
    Deny,
}

impl Verb {
    /// Every verb, for parsers and tests.
    pub const ALL: [Verb; 16] = [
        Verb::Get,
        Verb::List,
        Verb::Watch,
        Verb::Create,
        Verb::Update,
        Verb::Patch,
        Verb::Delete,
        Verb::DeleteCollection,
        Verb::Proxy,
        Verb::Head,
        Verb::Post,
        Verb::Put,
        Verb::Options,
        Verb::Unknown,
        Verb::Approve,
        Verb::Deny,
    ];

    /// The verb as Kubernetes spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
            Verb::Proxy => "proxy",
            Verb::Head => "head",
            Verb::Post => "post",
            Verb::Put => "put",
            Verb::Options => "options",
            Verb::Unknown => "",
            Verb::Approve => "approve",
            Verb::Deny => "deny",
        }
    }

    /// The verb of a non-resource request: its lowercase method.
    pub fn of_method(method: &Method) -> Verb {
        match *method {
            Method::GET => Verb::Get,
            Method::HEAD => Verb::Head,
            Method::POST => Verb::Post,
            Method::PUT => Verb::Put,
            Method::PATCH => Verb::Patch,
            Method::DELETE => Verb::Delete,
            Method::OPTIONS => Verb::Options,
            _ => Verb::Unknown,
        }
    }

    /// Parses what [`Verb::as_str`] wrote (recordings, policy files).
    pub fn parse(text: &str) -> Option<Verb> {
        Verb::ALL.into_iter().find(|v| v.as_str() == text)
    }
}

impl std::fmt::Display for Verb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Verb {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Kubernetes request attributes, field for field the API server's `RequestInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestInfo {
    /// Whether the request addresses an API resource (vs a non-resource URL like `/healthz`).
    pub is_resource_request: bool,
    /// The percent-decoded URL path.
    pub path: String,
    /// Kubernetes verb (`list`, `watch`, `deletecollection`, ...) or, for non-resource
    /// requests, the lowercase HTTP method.
    pub verb: Verb,
    /// `api` or `apis` (empty for non-resource requests).
    pub api_prefix: CompactString,
    /// API group (`""` for the core group).
    pub api_group: CompactString,
    /// API version, e.g. `v1`.
    pub api_version: CompactString,
    /// Namespace (empty for cluster-scoped requests).
    pub namespace: CompactString,
    /// Resource, e.g. `pods`.
    pub resource: CompactString,
    /// Subresource, e.g. `exec`.
    pub subresource: CompactString,
    /// Object name, from the path or from a `metadata.name` field selector on list/watch.
    pub name: CompactString,
    /// Where [`RequestInfo::parts`] starts among the path's segments (kept as an index:
    /// the parts are slices of `path`, not copies).
    pub parts_from: usize,
    /// First raw `fieldSelector` of a list/watch/deletecollection (not for `/watch/` paths).
    pub field_selector: Option<String>,
    /// First raw `labelSelector` of a list/watch/deletecollection (not for `/watch/` paths).
    pub label_selector: Option<String>,
}

impl RequestInfo {
    /// Derives the request attributes of `method` + `uri` as the API server would.
    pub fn parse(method: &Method, uri: &Uri) -> Result<RequestInfo, RequestError> {
        let raw_path = uri.path();
        if raw_path.len() > MAX_PATH_BYTES {
            return Err(RequestError::PathTooLong {
                len: raw_path.len(),
            });
        }
        if !raw_path.starts_with('/') && raw_path != "*" {
            return Err(RequestError::NotAPath {
                target: quote(raw_path),
            });
        }
        let path = decode_path(raw_path)?;
        let query = Query::parse(uri.query().unwrap_or(""))?;

        let segments = split_path(&path);
        for segment in &segments {
            match *segment {
                "." => return Err(dot_segment(&path, ".")),
                ".." => return Err(dot_segment(&path, "..")),
                "" => return Err(RequestError::EmptySegment { path: quote(&path) }),
                _ => {}
            }
        }

        let mut info = RequestInfo {
            verb: Verb::of_method(method),
            ..RequestInfo::default()
        };
        let is_resource = derive(&mut info, method, &segments, &path, &query)?;
        info.is_resource_request = is_resource;
        drop(segments);
        info.path = path;
        Ok(info)
    }

    /// Whether the request can change cluster or workload state, so must be durably recorded
    /// before it is forwarded: write verbs, plus exec/attach/portforward/proxy, which act on
    /// a workload even when they arrive as a WebSocket `GET`.
    pub fn is_mutating(&self) -> bool {
        if !self.is_resource_request {
            return matches!(
                self.verb,
                Verb::Post | Verb::Put | Verb::Patch | Verb::Delete
            );
        }
        matches!(
            self.verb,
            Verb::Create
                | Verb::Update
                | Verb::Patch
                | Verb::Delete
                | Verb::DeleteCollection
                | Verb::Proxy
        ) || matches!(
            self.subresource.as_str(),
            "exec" | "attach" | "portforward" | "proxy"
        )
    }

    /// Path segments from the resource on: `[resource, name, subresource, ...]`, the API
    /// server's `RequestInfo.Parts`; none for a non-resource request.
    pub fn parts(&self) -> impl Iterator<Item = &str> {
        let from = if self.is_resource_request {
            self.parts_from
        } else {
            usize::MAX
        };
        self.path.trim_matches('/').split('/').skip(from)
    }

    /// The resource as RBAC spells it: `pods`, or `pods/exec` with a subresource.
    pub fn resource_with_subresource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.to_string()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

/// Go's query boolean (`runtime.Convert_Slice_string_To_bool`) for a parameter that is
/// present: `0` or `false` in any case is false; anything else, even empty, is true.
pub fn parse_go_bool(v: &str) -> bool {
    !(v == "0" || go_equal_fold_false(v))
}

/// What a `pods/exec` or `pods/attach` request asks for, from its query: the command
/// (exec only), the container and whether it streams stdin or allocates a tty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// The `command` parameters in order (empty for attach).
    pub command: Vec<String>,
    /// The `container` parameter (empty: the pod's only or default container).
    pub container: String,
    /// `stdin=true`.
    pub stdin: bool,
    /// `tty=true`.
    pub tty: bool,
}

impl ExecRequest {
    /// The exec parameters of `uri`, for a request whose subresource is `exec` or `attach`,
    /// read as the API server reads them: every `command`, and of `container`, `stdin` and
    /// `tty` the first value only (`runtime.Convert_Slice_string_To_*` take `(*in)[0]`), so
    /// that `stdin=true&stdin=false` is the interactive session the API server opens.
    pub fn from_uri(uri: &Uri) -> ExecRequest {
        let query = uri.query().unwrap_or("");
        ExecRequest {
            command: exec_command(uri),
            container: first_query_value(query, "container")
                .map(Cow::into_owned)
                .unwrap_or_default(),
            stdin: query_bool(query, "stdin"),
            tty: query_bool(query, "tty"),
        }
    }
}

/// The first value of the query parameter `name`, form-decoded; `None` when it is absent.
/// The API server converts a query into options with the first value of each parameter.
pub fn first_query_value<'q>(query: &'q str, name: &str) -> Option<Cow<'q, str>> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (lossy_form_decode(key) == name).then(|| lossy_form_decode(value))
    })
}

/// Every value of a query parameter, form-decoded, in order (`dryRun=All&dryRun=All`).
pub fn query_values<'q>(query: &'q str, name: &str) -> Vec<Cow<'q, str>> {
    query
        .split('&')
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (lossy_form_decode(key) == name).then(|| lossy_form_decode(value))
        })
        .collect()
}

/// Whether a query parameter's form-decoded name is `name` (`%66orce` is `force`).
pub fn is_query_key(pair: &str, name: &str) -> bool {
    lossy_form_decode(pair.split_once('=').map_or(pair, |(k, _)| k)) == name
}

/// A boolean option of the query (`stdin`, `tty`, `stderr`) as the API server reads it:
/// its first value by [`parse_go_bool`], false when absent.
pub fn query_bool(query: &str, name: &str) -> bool {
    first_query_value(query, name).is_some_and(|v| parse_go_bool(&v))
}

/// The arguments of a `pods/exec` request: its repeated `command` query parameters,
/// form-decoded, in order. Undecodable escapes are kept as sent (`parse` rejects them).
pub fn exec_command(uri: &Uri) -> Vec<String> {
    uri.query()
        .map(|query| {
            query_values(query, "command")
                .into_iter()
                .map(Cow::into_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Steps 2 to 10 of `NewRequestInfo`; returns whether this is a resource request.
fn derive(
    info: &mut RequestInfo,
    method: &Method,
    segments: &[&str],
    path: &str,
    query: &Query<'_>,
) -> Result<bool, RequestError> {
    if segments.len() < 3 || !matches!(segments[0], "api" | "apis") {
        return Ok(false);
    }
    let prefix = segments[0];
    let mut rest = &segments[1..];
    if prefix == "apis" {
        // `/apis/<group>/<version>` is discovery, not a resource.
        if rest.len() < 3 {
            return Ok(false);
        }
        info.api_group = rest[0].into();
        rest = &rest[1..];
    }
    info.api_prefix = prefix.into();
    info.api_version = rest[0].into();
    rest = &rest[1..];

    let mut verb_via_path = false;
    if let Some(verb) = match rest[0] {
        "watch" => Some(Verb::Watch),
        "proxy" => Some(Verb::Proxy),
        _ => None,
    } {
        if rest.len() < 2 {
            return Err(RequestError::NothingAfterPathVerb {
                path: quote(path),
                verb: verb.as_str(),
            });
        }
        info.verb = verb;
        rest = &rest[1..];
        verb_via_path = true;
    } else {
        info.verb = match *method {
            Method::POST => Verb::Create,
            Method::GET | Method::HEAD => Verb::Get,
            Method::PUT => Verb::Update,
            Method::PATCH => Verb::Patch,
            Method::DELETE => Verb::Delete,
            _ => Verb::Unknown,
        };
    }

    if rest[0] == "namespaces" && rest.len() > 1 {
        info.namespace = rest[1].into();
        // `namespaces/<ns>/status` and `/finalize` are subresources of the namespace object;
        // anything else after the name is a namespaced resource.
        if rest.len() > 2 && !matches!(rest[2], "status" | "finalize") {
            rest = &rest[2..];
        }
    }

    info.parts_from = segments.len() - rest.len();
    if rest.len() >= 3 && info.verb != Verb::Proxy {
        info.subresource = rest[2].into();
    }
    if rest.len() >= 2 {
        info.name = rest[1].into();
    }
    info.resource = rest[0].into();

    if info.name.is_empty() && info.verb == Verb::Get {
        let (watch, exact_name) = match query.decode_list_options() {
            Some(opts) => (opts.watch, opts.metadata_name),
            // The API server resets the options on a decode error and only looks at `watch`.
            None => (
                query.watch.as_deref().is_some_and(|v| !is_lower_false(v)),
                None,
            ),
        };
        info.verb = if watch { Verb::Watch } else { Verb::List };
        if let Some(name) = exact_name.filter(|n| is_valid_path_segment_name(n)) {
            info.name = name.into();
        }
    }
    if info.name.is_empty() && info.verb == Verb::Delete {
        info.verb = Verb::DeleteCollection;
    }
    if !verb_via_path && matches!(info.verb, Verb::List | Verb::Watch | Verb::DeleteCollection) {
        info.field_selector = query
            .field_selector
            .as_ref()
            .map(|v| v.clone().into_owned());
        info.label_selector = query
            .label_selector
            .as_ref()
            .map(|v| v.clone().into_owned());
    }
    Ok(true)
}

/// The query parameters request derivation looks at (first value of each, like Go's
/// `url.Values.Get`), after checking that the whole query decodes.
#[derive(Debug, Default)]
struct Query<'a> {
    watch: Option<Cow<'a, str>>,
    field_selector: Option<Cow<'a, str>>,
    label_selector: Option<Cow<'a, str>>,
    limit: Option<Cow<'a, str>>,
    timeout_seconds: Option<Cow<'a, str>>,
}

/// The parts of `metainternalversion.ListOptions` that shape the request attributes.
struct ListOptions {
    watch: bool,
    metadata_name: Option<String>,
}

impl<'a> Query<'a> {
    fn parse(raw: &'a str) -> Result<Self, RequestError> {
        let mut query = Query::default();
        for pair in raw.split('&') {
            if pair.is_empty() {
                continue;
            }
            if pair.contains(';') {
                return Err(RequestError::Semicolon);
            }
            let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = form_decode(raw_key, || "query parameter name".to_owned())?;
            let value = form_decode(raw_value, || format!("query parameter {:?}", quote(&key)))?;
            let slot = match key.as_ref() {
                "watch" => &mut query.watch,
                "fieldSelector" => &mut query.field_selector,
                "labelSelector" => &mut query.label_selector,
                "limit" => &mut query.limit,
                "timeoutSeconds" => &mut query.timeout_seconds,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(value);
            }
        }
        Ok(query)
    }

    /// `ParameterCodec.DecodeParameters` into ListOptions: `None` where Go fails to decode.
    /// Label selectors are not parsed: an invalid one only changes whether `name` is
    /// filled for a request the API server then rejects with 400 anyway.
    fn decode_list_options(&self) -> Option<ListOptions> {
        for int in [&self.limit, &self.timeout_seconds].into_iter().flatten() {
            int.parse::<i64>().ok()?;
        }
        let metadata_name = match &self.field_selector {
            Some(selector) => field_selector_exact_name(selector)?,
            None => None,
        };
        Some(ListOptions {
            watch: self.watch.as_deref().is_some_and(parse_go_bool),
            metadata_name,
        })
    }
}

/// `fields.ParseSelector(s).RequiresExactMatch("metadata.name")`: `None` if the selector
/// does not parse, `Some(None)` if it has no `metadata.name` equality term.
fn field_selector_exact_name(selector: &str) -> Option<Option<String>> {
    let mut terms = split_selector_terms(selector);
    // Go sorts the terms before building the selector, so the first equality term in sorted
    // order is the one `RequiresExactMatch` reports.
    terms.sort_unstable();
    let mut found = None;
    for term in terms.into_iter().filter(|t| !t.is_empty()) {
        let (lhs, op, rhs) = split_selector_term(term)?;
        let value = unescape_selector_value(rhs)?;
        if found.is_none() && op != "!=" && lhs == "metadata.name" {
            found = Some(value);
        }
    }
    Some(found)
}

/// Go `fields.splitTerms`: split on commas not escaped by a backslash.
fn split_selector_terms(selector: &str) -> Vec<&str> {
    if selector.is_empty() {
        return Vec::new();
    }
    let mut terms = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, b) in selector.bytes().enumerate() {
        if escaped {
            escaped = false;
        } else if b == b'\\' {
            escaped = true;
        } else if b == b',' {
            terms.push(&selector[start..i]);
            start = i + 1;
        }
    }
    terms.push(&selector[start..]);
    terms
}

/// Go `fields.splitTerm`: the first position where `!=`, `==` or `=` starts.
fn split_selector_term(term: &str) -> Option<(&str, &'static str, &str)> {
    term.char_indices().find_map(|(i, _)| {
        let rest = &term[i..];
        ["!=", "==", "="]
            .into_iter()
            .find(|op| rest.starts_with(op))
            .map(|op| (&term[..i], op, &rest[op.len()..]))
    })
}

/// Go `fields.UnescapeValue`: `\\`, `\,` and `\=` are the only escapes; bare `,`/`=` fail.
fn unescape_selector_value(value: &str) -> Option<String> {
    let mut out = String::with_capacity(value.len());
    let mut escaped = false;
    for c in value.chars() {
        match (escaped, c) {
            (true, '\\' | ',' | '=') => {
                out.push(c);
                escaped = false;
            }
            (true, _) => return None,
            (false, '\\') => escaped = true,
            (false, ',' | '=') => return None,
            (false, _) => out.push(c),
        }
    }
    (!escaped).then_some(out)
}

/// apimachinery `path.IsValidPathSegmentName`.
fn is_valid_path_segment_name(name: &str) -> bool {
    name != "." && name != ".." && !name.contains(['/', '%'])
}

/// Go `strings.EqualFold(v, "false")`: simple Unicode case folding, under which the long s
/// (U+017F) equals `s`.
fn go_equal_fold_false(v: &str) -> bool {
    let mut chars = v.chars();
    for expected in ['f', 'a', 'l', 's', 'e'] {
        match chars.next() {
            Some(c) if c.to_ascii_lowercase() == expected => {}
            Some('\u{17f}') if expected == 's' => {}
            _ => return false,
        }
    }
    chars.next().is_none()
}

/// The fallback in `NewRequestInfo` after a decode error: `strings.ToLower(v)` compared
/// with `false`/`0` (no Unicode folding here, unlike [`parse_go_bool`]).
fn is_lower_false(v: &str) -> bool {
    v == "0" || v.eq_ignore_ascii_case("false")
}

/// Go `splitPath`: trim slashes at both ends, then split.
/// The path's segments; on the stack for every API path (at most eight segments, the
/// longest being a namespaced subresource of a group's resource), on the heap past that.
fn split_path(path: &str) -> SmallVec<[&str; 8]> {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        SmallVec::new()
    } else {
        trimmed.split('/').collect()
    }
}

fn dot_segment(path: &str, segment: &'static str) -> RequestError {
    RequestError::DotSegment {
        path: quote(path),
        segment,
    }
}

/// Percent-decodes the path as Go's `url.Parse` does (`+` stays `+`), strictly.
fn decode_path(raw: &str) -> Result<String, RequestError> {
    let decoded = strict_decode(raw, false, || "request path".to_owned())?;
    if let Some(&byte) = decoded.as_bytes().iter().find(|b| b.is_ascii_control()) {
        return Err(if byte == 0 {
            RequestError::NulByte {
                part: "request path".to_owned(),
            }
        } else {
            RequestError::ControlCharacter { byte }
        });
    }
    Ok(decoded.into_owned())
}

/// Form-decodes a query key or value (`+` is a space), strictly, rejecting NUL.
fn form_decode<'a>(raw: &'a str, part: impl Fn() -> String) -> Result<Cow<'a, str>, RequestError> {
    let decoded = strict_decode(raw, true, &part)?;
    if decoded.contains('\0') {
        return Err(RequestError::NulByte { part: part() });
    }
    Ok(decoded)
}

fn strict_decode<'a>(
    raw: &'a str,
    plus_is_space: bool,
    part: impl Fn() -> String,
) -> Result<Cow<'a, str>, RequestError> {
    let bytes = raw.as_bytes();
    let needs_decoding = bytes.contains(&b'%') || (plus_is_space && bytes.contains(&b'+'));
    if !needs_decoding {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = |j: usize| bytes.get(j).and_then(|b| (*b as char).to_digit(16));
                let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
                    let end = (i + 3).min(bytes.len());
                    return Err(RequestError::InvalidPercentEncoding {
                        part: part(),
                        sequence: String::from_utf8_lossy(&bytes[i..end]).into_owned(),
                    });
                };
                // Both digits are < 16, so the byte cannot overflow.
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| RequestError::InvalidUtf8 { part: part() })
}

fn lossy_form_decode(raw: &str) -> Cow<'_, str> {
    if !raw.contains(['%', '+']) {
        return Cow::Borrowed(raw);
    }
    let spaced = raw.replace('+', " ");
    Cow::Owned(
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// Client input quoted in an error, cut to a readable length at a character boundary.
fn quote(s: &str) -> String {
    if s.len() <= MAX_QUOTED {
        return s.to_owned();
    }
    let mut end = MAX_QUOTED;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected attributes; `sub`, `name` etc. default to empty.
    #[derive(Default)]
    struct Want {
        resource_request: bool,
        verb: &'static str,
        prefix: &'static str,
        group: &'static str,
        version: &'static str,
        ns: &'static str,
        resource: &'static str,
        sub: &'static str,
        name: &'static str,
        parts: &'static [&'static str],
        field_selector: Option<&'static str>,
        label_selector: Option<&'static str>,
    }

    fn parse(method: &str, uri: &str) -> Result<RequestInfo, RequestError> {
        let method = Method::from_bytes(method.as_bytes())
            .unwrap_or_else(|e| panic!("bad method {method}: {e}"));
        let uri: Uri = uri.parse().unwrap_or_else(|e| panic!("bad uri {uri}: {e}"));
        RequestInfo::parse(&method, &uri)
    }

    fn core(verb: &'static str, ns: &'static str, resource: &'static str) -> Want {
        Want {
            resource_request: true,
            verb,
            prefix: "api",
            version: "v1",
            ns,
            resource,
            ..Want::default()
        }
    }

    fn non_resource(verb: &'static str) -> Want {
        Want {
            verb,
            ..Want::default()
        }
    }

    #[test]
    fn verbs_round_trip_through_their_names_and_methods_map_like_the_api_server() {
        for verb in Verb::ALL {
            assert_eq!(Verb::parse(verb.as_str()), Some(verb), "{verb:?}");
            assert!(verb == verb.as_str());
        }
        assert_eq!(Verb::parse("remove"), None);
        for (method, verb) in [
            (Method::GET, Verb::Get),
            (Method::HEAD, Verb::Head),
            (Method::POST, Verb::Post),
            (Method::PUT, Verb::Put),
            (Method::PATCH, Verb::Patch),
            (Method::DELETE, Verb::Delete),
            (Method::OPTIONS, Verb::Options),
            (Method::TRACE, Verb::Unknown),
        ] {
            assert_eq!(Verb::of_method(&method), verb, "{method}");
        }
        // A resource request with a method the API server has no verb for.
        let info = RequestInfo::parse(&Method::TRACE, &Uri::from_static("/api/v1/pods"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((info.verb, info.verb.as_str()), (Verb::Unknown, ""));
    }

    #[test]
    fn derives_request_info_like_the_api_server() {
        let cases: Vec<(&str, &str, Want)> = vec![
            // The table in k8s-wire-reference.md section 1, row by row.
            (
                "GET",
                "/api/v1/namespaces/d/pods",
                Want {
                    parts: &["pods"],
                    ..core("list", "d", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/namespaces/d/pods?watch=1",
                Want {
                    parts: &["pods"],
                    ..core("watch", "d", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/namespaces/d/pods?watch=true&fieldSelector=metadata.name%3Dp",
                Want {
                    name: "p",
                    parts: &["pods"],
                    field_selector: Some("metadata.name=p"),
                    ..core("watch", "d", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/watch/namespaces/d/pods/p",
                Want {
                    name: "p",
                    parts: &["pods", "p"],
                    ..core("watch", "d", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods",
                Want {
                    parts: &["pods"],
                    ..core("list", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/namespaces/d",
                Want {
                    name: "d",
                    parts: &["namespaces", "d"],
                    ..core("get", "d", "namespaces")
                },
            ),
            (
                "PUT",
                "/api/v1/namespaces/d/finalize",
                Want {
                    name: "d",
                    sub: "finalize",
                    parts: &["namespaces", "d", "finalize"],
                    ..core("update", "d", "namespaces")
                },
            ),
            (
                "POST",
                "/api/v1/namespaces/d/pods/p/exec?command=ls&stdout=true",
                Want {
                    name: "p",
                    sub: "exec",
                    parts: &["pods", "p", "exec"],
                    ..core("create", "d", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/namespaces/d/pods/p/exec?command=ls&stdout=true",
                Want {
                    name: "p",
                    sub: "exec",
                    parts: &["pods", "p", "exec"],
                    ..core("get", "d", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/namespaces/d/pods/p/proxy/a/b",
                Want {
                    name: "p",
                    sub: "proxy",
                    parts: &["pods", "p", "proxy", "a", "b"],
                    ..core("get", "d", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/proxy/namespaces/d/pods/p/x",
                Want {
                    name: "p",
                    parts: &["pods", "p", "x"],
                    ..core("proxy", "d", "pods")
                },
            ),
            (
                "DELETE",
                "/apis/apps/v1/namespaces/d/deployments",
                Want {
                    prefix: "apis",
                    group: "apps",
                    parts: &["deployments"],
                    ..core("deletecollection", "d", "deployments")
                },
            ),
            ("GET", "/apis/apps/v1", non_resource("get")),
            ("GET", "/apis/apps", non_resource("get")),
            ("GET", "/apis", non_resource("get")),
            ("GET", "/api", non_resource("get")),
            ("GET", "/api/v1", non_resource("get")),
            ("GET", "/version", non_resource("get")),
            ("GET", "/healthz", non_resource("get")),
            ("GET", "/", non_resource("get")),
            ("GET", "/openapi/v3/api/v1?hash=abc", non_resource("get")),
            ("HEAD", "/healthz", non_resource("head")),
            ("POST", "/logs/x", non_resource("post")),
            ("OPTIONS", "/readyz", non_resource("options")),
            ("GET", "/foo/bar/baz/qux", non_resource("get")),
            ("GET", "/apiz/v1/pods", non_resource("get")),
            // Legacy watch and proxy path verbs.
            (
                "GET",
                "/api/v1/watch/pods",
                Want {
                    parts: &["pods"],
                    ..core("watch", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/watch/namespaces/d/pods",
                Want {
                    parts: &["pods"],
                    ..core("watch", "d", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/watch/namespaces",
                Want {
                    parts: &["namespaces"],
                    ..core("watch", "", "namespaces")
                },
            ),
            (
                "GET",
                "/api/v1/watch/namespaces/d",
                Want {
                    name: "d",
                    parts: &["namespaces", "d"],
                    ..core("watch", "d", "namespaces")
                },
            ),
            (
                "GET",
                "/apis/apps/v1/watch/namespaces/d/deployments?fieldSelector=a%3Db&labelSelector=x",
                Want {
                    prefix: "apis",
                    group: "apps",
                    parts: &["deployments"],
                    ..core("watch", "d", "deployments")
                },
            ),
            (
                "POST",
                "/api/v1/proxy/nodes/n1/stats",
                Want {
                    name: "n1",
                    parts: &["nodes", "n1", "stats"],
                    ..core("proxy", "", "nodes")
                },
            ),
            (
                "GET",
                "/api/v1/proxy/nodes",
                Want {
                    parts: &["nodes"],
                    ..core("proxy", "", "nodes")
                },
            ),
            // Subresources.
            (
                "POST",
                "/api/v1/namespaces/d/pods/p/attach?stdin=true",
                Want {
                    name: "p",
                    sub: "attach",
                    parts: &["pods", "p", "attach"],
                    ..core("create", "d", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/namespaces/d/pods/p/portforward?ports=8080",
                Want {
                    name: "p",
                    sub: "portforward",
                    parts: &["pods", "p", "portforward"],
                    ..core("get", "d", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/namespaces/d/pods/p/log?follow=true&container=c",
                Want {
                    name: "p",
                    sub: "log",
                    parts: &["pods", "p", "log"],
                    ..core("get", "d", "pods")
                },
            ),
            (
                "POST",
                "/api/v1/namespaces/d/pods/p/eviction",
                Want {
                    name: "p",
                    sub: "eviction",
                    parts: &["pods", "p", "eviction"],
                    ..core("create", "d", "pods")
                },
            ),
            (
                "POST",
                "/api/v1/namespaces/d/serviceaccounts/sa/token",
                Want {
                    name: "sa",
                    sub: "token",
                    parts: &["serviceaccounts", "sa", "token"],
                    ..core("create", "d", "serviceaccounts")
                },
            ),
            (
                "PATCH",
                "/apis/apps/v1/namespaces/d/deployments/web/scale",
                Want {
                    prefix: "apis",
                    group: "apps",
                    name: "web",
                    sub: "scale",
                    parts: &["deployments", "web", "scale"],
                    ..core("patch", "d", "deployments")
                },
            ),
            (
                "PUT",
                "/api/v1/namespaces/d/pods/p/status",
                Want {
                    name: "p",
                    sub: "status",
                    parts: &["pods", "p", "status"],
                    ..core("update", "d", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/namespaces/d/status",
                Want {
                    name: "d",
                    sub: "status",
                    parts: &["namespaces", "d", "status"],
                    ..core("get", "d", "namespaces")
                },
            ),
            // A resource literally called `status` under a namespace is impossible: the
            // namespace subresource wins, as in the API server.
            (
                "GET",
                "/api/v1/namespaces/d/status/x",
                Want {
                    name: "d",
                    sub: "status",
                    parts: &["namespaces", "d", "status", "x"],
                    ..core("get", "d", "namespaces")
                },
            ),
            // Cluster-scoped and namespace objects.
            (
                "GET",
                "/api/v1/namespaces",
                Want {
                    parts: &["namespaces"],
                    ..core("list", "", "namespaces")
                },
            ),
            (
                "DELETE",
                "/api/v1/namespaces/prod",
                Want {
                    name: "prod",
                    parts: &["namespaces", "prod"],
                    ..core("delete", "prod", "namespaces")
                },
            ),
            (
                "POST",
                "/api/v1/namespaces",
                Want {
                    parts: &["namespaces"],
                    ..core("create", "", "namespaces")
                },
            ),
            (
                "GET",
                "/api/v1/nodes/n1",
                Want {
                    name: "n1",
                    parts: &["nodes", "n1"],
                    ..core("get", "", "nodes")
                },
            ),
            (
                "DELETE",
                "/apis/rbac.authorization.k8s.io/v1/clusterroles/admin",
                Want {
                    prefix: "apis",
                    group: "rbac.authorization.k8s.io",
                    name: "admin",
                    parts: &["clusterroles", "admin"],
                    ..core("delete", "", "clusterroles")
                },
            ),
            (
                "DELETE",
                "/api/v1/nodes",
                Want {
                    parts: &["nodes"],
                    ..core("deletecollection", "", "nodes")
                },
            ),
            // Methods.
            (
                "HEAD",
                "/api/v1/namespaces/d/pods/p",
                Want {
                    name: "p",
                    parts: &["pods", "p"],
                    ..core("get", "d", "pods")
                },
            ),
            (
                "HEAD",
                "/api/v1/namespaces/d/pods",
                Want {
                    parts: &["pods"],
                    ..core("list", "d", "pods")
                },
            ),
            (
                "OPTIONS",
                "/api/v1/namespaces/d/pods",
                Want {
                    parts: &["pods"],
                    ..core("", "d", "pods")
                },
            ),
            (
                "PATCH",
                "/api/v1/namespaces/d/configmaps/c",
                Want {
                    name: "c",
                    parts: &["configmaps", "c"],
                    ..core("patch", "d", "configmaps")
                },
            ),
            // Go compares the method case-sensitively.
            (
                "get",
                "/api/v1/namespaces/d/pods",
                Want {
                    parts: &["pods"],
                    ..core("", "d", "pods")
                },
            ),
            // watch booleans, the Go way; Python sends True/False.
            (
                "GET",
                "/api/v1/pods?watch=True",
                Want {
                    parts: &["pods"],
                    ..core("watch", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?watch=False",
                Want {
                    parts: &["pods"],
                    ..core("list", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?watch=FALSE",
                Want {
                    parts: &["pods"],
                    ..core("list", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?watch=0",
                Want {
                    parts: &["pods"],
                    ..core("list", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?watch=",
                Want {
                    parts: &["pods"],
                    ..core("watch", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?watch",
                Want {
                    parts: &["pods"],
                    ..core("watch", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?watch=no",
                Want {
                    parts: &["pods"],
                    ..core("watch", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?watch=00",
                Want {
                    parts: &["pods"],
                    ..core("watch", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?watch=1",
                Want {
                    parts: &["pods"],
                    ..core("watch", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?watch=false&watch=true",
                Want {
                    parts: &["pods"],
                    ..core("list", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?watch=%66alse",
                Want {
                    parts: &["pods"],
                    ..core("list", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?resourceVersion=0&watch=true&allowWatchBookmarks=true",
                Want {
                    parts: &["pods"],
                    ..core("watch", "", "pods")
                },
            ),
            // EqualFold folds the long s; the decode-error fallback (bad limit) does not.
            (
                "GET",
                "/api/v1/pods?watch=fal%C5%BFe",
                Want {
                    parts: &["pods"],
                    ..core("list", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?watch=fal%C5%BFe&limit=x",
                Want {
                    parts: &["pods"],
                    ..core("watch", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?watch=false&limit=x",
                Want {
                    parts: &["pods"],
                    ..core("list", "", "pods")
                },
            ),
            // fieldSelector metadata.name fills the name of a list/watch.
            (
                "GET",
                "/api/v1/namespaces/d/pods?fieldSelector=metadata.name%3Dweb-0&limit=500",
                Want {
                    name: "web-0",
                    parts: &["pods"],
                    field_selector: Some("metadata.name=web-0"),
                    ..core("list", "d", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/namespaces/d/pods?fieldSelector=metadata.name%3D%3Dweb",
                Want {
                    name: "web",
                    parts: &["pods"],
                    field_selector: Some("metadata.name==web"),
                    ..core("list", "d", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/namespaces/d/pods?fieldSelector=status.phase%3DRunning%2Cmetadata.name%3Dweb",
                Want {
                    name: "web",
                    parts: &["pods"],
                    field_selector: Some("status.phase=Running,metadata.name=web"),
                    ..core("list", "d", "pods")
                },
            ),
            // Sorted terms: the first metadata.name term in sort order wins.
            (
                "GET",
                "/api/v1/pods?fieldSelector=metadata.name%3Db%2Cmetadata.name%3Da",
                Want {
                    name: "a",
                    parts: &["pods"],
                    field_selector: Some("metadata.name=b,metadata.name=a"),
                    ..core("list", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?fieldSelector=metadata.name!%3Dweb",
                Want {
                    parts: &["pods"],
                    field_selector: Some("metadata.name!=web"),
                    ..core("list", "", "pods")
                },
            ),
            // Multi-byte characters before the operator (Go's `range` walks runes, as
            // `char_indices` does).
            (
                "GET",
                "/api/v1/pods?fieldSelector=%C3%A9%3D1%2Cmetadata.name%3Dw%C3%A9b",
                Want {
                    name: "wéb",
                    parts: &["pods"],
                    field_selector: Some("é=1,metadata.name=wéb"),
                    ..core("list", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?fieldSelector=metadata.namespace%3Dd",
                Want {
                    parts: &["pods"],
                    field_selector: Some("metadata.namespace=d"),
                    ..core("list", "", "pods")
                },
            ),
            // Not a valid path segment name, a parse failure and a decode failure: no name.
            (
                "GET",
                "/api/v1/pods?fieldSelector=metadata.name%3D..",
                Want {
                    parts: &["pods"],
                    field_selector: Some("metadata.name=.."),
                    ..core("list", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?fieldSelector=metadata.name%3Da%25b",
                Want {
                    parts: &["pods"],
                    field_selector: Some("metadata.name=a%b"),
                    ..core("list", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?fieldSelector=metadata.name%3Da%3Db",
                Want {
                    parts: &["pods"],
                    field_selector: Some("metadata.name=a=b"),
                    ..core("list", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?fieldSelector=metadata.name%3Da%5C%3Db",
                Want {
                    name: "a=b",
                    parts: &["pods"],
                    field_selector: Some("metadata.name=a\\=b"),
                    ..core("list", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?fieldSelector=garbage",
                Want {
                    parts: &["pods"],
                    field_selector: Some("garbage"),
                    ..core("list", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?fieldSelector=metadata.name%3Dweb&limit=ten",
                Want {
                    parts: &["pods"],
                    field_selector: Some("metadata.name=web"),
                    ..core("list", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?fieldSelector=metadata.name%3Dweb&timeoutSeconds=1.5",
                Want {
                    parts: &["pods"],
                    field_selector: Some("metadata.name=web"),
                    ..core("list", "", "pods")
                },
            ),
            // deletecollection copies selectors but never takes a name from them.
            (
                "DELETE",
                "/api/v1/namespaces/d/pods?fieldSelector=metadata.name%3Dweb&labelSelector=app%3Dx",
                Want {
                    parts: &["pods"],
                    field_selector: Some("metadata.name=web"),
                    label_selector: Some("app=x"),
                    ..core("deletecollection", "d", "pods")
                },
            ),
            // labelSelector copy, `+` as a space, first value only; not on a get by name.
            (
                "GET",
                "/api/v1/pods?labelSelector=app+in+(a%2Cb)&labelSelector=ignored",
                Want {
                    parts: &["pods"],
                    label_selector: Some("app in (a,b)"),
                    ..core("list", "", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/namespaces/d/pods/p?labelSelector=app%3Dx",
                Want {
                    name: "p",
                    parts: &["pods", "p"],
                    ..core("get", "d", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/pods?watch=1&labelSelector=",
                Want {
                    parts: &["pods"],
                    label_selector: Some(""),
                    ..core("watch", "", "pods")
                },
            ),
            // Percent-decoded segments, and %2F splitting as Go's decoded URL.Path does.
            (
                "GET",
                "/api/v1/namespaces/d/pods/a%2Db",
                Want {
                    name: "a-b",
                    parts: &["pods", "a-b"],
                    ..core("get", "d", "pods")
                },
            ),
            (
                "GET",
                "/api/v1/namespaces/d/pods/p%2Fexec",
                Want {
                    name: "p",
                    sub: "exec",
                    parts: &["pods", "p", "exec"],
                    ..core("get", "d", "pods")
                },
            ),
            // Trailing slashes are trimmed.
            (
                "GET",
                "/api/v1/pods/",
                Want {
                    parts: &["pods"],
                    ..core("list", "", "pods")
                },
            ),
            // Custom resources.
            (
                "GET",
                "/apis/example.com/v1alpha1/namespaces/d/widgets/w",
                Want {
                    prefix: "apis",
                    group: "example.com",
                    version: "v1alpha1",
                    name: "w",
                    parts: &["widgets", "w"],
                    ..core("get", "d", "widgets")
                },
            ),
        ];
        for (method, uri, want) in cases {
            let got = parse(method, uri).unwrap_or_else(|e| panic!("{method} {uri}: {e}"));
            let expected = RequestInfo {
                is_resource_request: want.resource_request,
                path: got.path.clone(),
                verb: Verb::parse(want.verb)
                    .unwrap_or_else(|| panic!("{method} {uri}: unknown verb {:?}", want.verb)),
                api_prefix: want.prefix.into(),
                api_group: want.group.into(),
                api_version: want.version.into(),
                namespace: want.ns.into(),
                resource: want.resource.into(),
                subresource: want.sub.into(),
                name: want.name.into(),
                parts_from: got.parts_from,
                field_selector: want.field_selector.map(str::to_owned),
                label_selector: want.label_selector.map(str::to_owned),
            };
            assert_eq!(got, expected, "{method} {uri}");
            assert_eq!(
                got.parts().collect::<Vec<_>>(),
                want.parts,
                "{method} {uri}: parts"
            );
        }
    }

    #[test]
    fn path_is_the_decoded_untrimmed_url_path() {
        for (uri, path) in [
            (
                "/api/v1/namespaces/d/pods?watch=1",
                "/api/v1/namespaces/d/pods",
            ),
            ("/healthz/", "/healthz/"),
            (
                "/api/v1/namespaces/d/pods/a%2Db",
                "/api/v1/namespaces/d/pods/a-b",
            ),
            (
                "/api/v1/namespaces/d/pods/a+b",
                "/api/v1/namespaces/d/pods/a+b",
            ),
            ("http://10.0.0.1:6443/version", "/version"),
        ] {
            let got = parse("GET", uri).unwrap_or_else(|e| panic!("{uri}: {e}"));
            assert_eq!(got.path, path, "{uri}");
        }
    }

    #[test]
    fn rejects_garbage_with_an_error_that_names_it() {
        let long = format!("/api/v1/namespaces/{}", "a".repeat(MAX_PATH_BYTES));
        let long_error = format!(
            "request path is {} bytes long; the limit is 8192 bytes",
            long.len()
        );
        let cases: Vec<(String, &str)> = vec![
            (
                "/api/v1/namespaces/d/pods/%zz".into(),
                "request path: invalid percent-encoding \"%zz\"",
            ),
            (
                "/api/v1/pods/%4".into(),
                "request path: invalid percent-encoding \"%4\"",
            ),
            (
                "/api/v1/pods/a%".into(),
                "request path: invalid percent-encoding \"%\"",
            ),
            (
                "/api/v1/pods/%ff".into(),
                "request path: percent-decoded bytes are not valid UTF-8",
            ),
            (
                "/api/v1/pods/a%00b".into(),
                "request path: contains a NUL byte",
            ),
            (
                "/api/v1/pods/a%0Ab".into(),
                "request path: contains control character 0x0a",
            ),
            (
                "/api/v1/namespaces/d/pods/../secrets".into(),
                "contains a \"..\" segment",
            ),
            (
                "/api/v1/namespaces/d/pods/%2e%2e/secrets".into(),
                "contains a \"..\" segment",
            ),
            (
                "/api/v1/namespaces/d/pods/x%2F..%2Fsecrets".into(),
                "contains a \"..\" segment",
            ),
            (
                "/api/v1/namespaces/d/./pods".into(),
                "contains a \".\" segment",
            ),
            ("/..".into(), "contains a \"..\" segment"),
            ("/api/v1//pods".into(), "contains an empty segment ('//')"),
            (
                "/api/v1/watch".into(),
                "nothing follows the 'watch' path verb",
            ),
            (
                "/api/v1/proxy/".into(),
                "nothing follows the 'proxy' path verb",
            ),
            (
                "/api/v1/pods?watch=%zz".into(),
                "query parameter \"watch\": invalid percent-encoding \"%zz\"",
            ),
            (
                "/api/v1/pods?%zz=1".into(),
                "query parameter name: invalid percent-encoding \"%zz\"",
            ),
            (
                "/api/v1/pods?labelSelector=a%00".into(),
                "query parameter \"labelSelector\": contains a NUL byte",
            ),
            ("/api/v1/pods?watch=1;x=2".into(), "query: contains ';'"),
            (
                "/api/v1/pods?x=%C3%28".into(),
                "query parameter \"x\": percent-decoded bytes are not valid UTF-8",
            ),
            (long.clone(), &long_error),
        ];
        for (uri, want) in cases {
            match parse("GET", &uri) {
                Ok(info) => panic!("{uri}: accepted as {info:?}, wanted error containing {want:?}"),
                Err(e) => assert!(
                    e.to_string().contains(want),
                    "{uri}: error {e:?} ({e}) lacks {want:?}"
                ),
            }
        }
        // Exactly at the limit is fine.
        let at_limit = format!(
            "/api/v1/pods/{}",
            "a".repeat(MAX_PATH_BYTES - "/api/v1/pods/".len())
        );
        assert!(
            parse("GET", &at_limit).is_ok(),
            "a path of exactly {MAX_PATH_BYTES} bytes must be accepted"
        );
    }

    #[test]
    fn rejects_non_path_targets() {
        let uri = Uri::from_static("example.com:443");
        let err = RequestInfo::parse(&Method::CONNECT, &uri).expect_err("authority-form must fail");
        assert!(matches!(err, RequestError::NotAPath { .. }), "{err:?}");
        let star = RequestInfo::parse(&Method::OPTIONS, &Uri::from_static("*"))
            .unwrap_or_else(|e| panic!("OPTIONS *: {e}"));
        assert_eq!(
            (star.is_resource_request, star.verb.as_str()),
            (false, "options")
        );
    }

    #[test]
    fn go_booleans() {
        for (v, want) in [
            ("true", true),
            ("True", true),
            ("1", true),
            ("", true),
            ("yes", true),
            ("00", true),
            (" false", true),
            ("falsey", true),
            ("fals", true),
            ("0", false),
            ("false", false),
            ("False", false),
            ("FALSE", false),
            ("fAlSe", false),
            ("fal\u{17f}e", false),
        ] {
            assert_eq!(parse_go_bool(v), want, "{v:?}");
        }
    }

    #[test]
    fn exec_command_is_decoded_in_order() {
        for (uri, want) in [
            (
                "/api/v1/namespaces/d/pods/p/exec?command=sh&command=-c&command=echo+hi%26bye&container=c&stdout=true",
                vec!["sh", "-c", "echo hi&bye"],
            ),
            (
                "/api/v1/namespaces/d/pods/p/exec?stdin=true&command=ls&tty=true&command=%2Ftmp",
                vec!["ls", "/tmp"],
            ),
            ("/api/v1/namespaces/d/pods/p/exec?command=", vec![""]),
            (
                "/api/v1/namespaces/d/pods/p/exec?commands=x&xcommand=y",
                vec![],
            ),
            ("/api/v1/namespaces/d/pods/p/attach?stdin=true", vec![]),
            ("/api/v1/namespaces/d/pods/p/attach", vec![]),
            (
                "/api/v1/namespaces/d/pods/p/exec?command=%E2%9C%93",
                vec!["\u{2713}"],
            ),
        ] {
            let uri: Uri = uri.parse().unwrap_or_else(|e| panic!("{uri}: {e}"));
            assert_eq!(exec_command(&uri), want, "{uri}");
        }
    }

    /// The API server takes the first value of `container`, `stdin` and `tty`; so does the
    /// policy's view, or `stdin=true&stdin=false` would pass a non-interactive rule while
    /// the API server opens an interactive shell.
    #[test]
    fn exec_options_take_the_first_value_as_the_api_server_does() {
        for (query, container, stdin, tty) in [
            ("command=sh&stdin=true&tty=true", "", true, true),
            (
                "command=sh&stdin=true&stdin=false&tty=true&tty=false",
                "",
                true,
                true,
            ),
            (
                "command=sh&stdin=false&stdin=true&tty=0&tty=1",
                "",
                false,
                false,
            ),
            ("command=sh&container=&container=app", "", false, false),
            (
                "container=app&container=debug&stdin=yes&tty=",
                "app",
                true,
                true,
            ),
            ("stdin=FALSE&tty=%30", "", false, false),
            ("command=sh", "", false, false),
        ] {
            let uri: Uri = format!("/api/v1/namespaces/d/pods/p/exec?{query}")
                .parse()
                .unwrap_or_else(|e| panic!("{query}: {e}"));
            let exec = ExecRequest::from_uri(&uri);
            assert_eq!(
                (exec.container.as_str(), exec.stdin, exec.tty),
                (container, stdin, tty),
                "{query}"
            );
        }
        assert_eq!(first_query_value("a=1&b=2&b=3", "b").as_deref(), Some("2"));
        assert_eq!(first_query_value("a=1&b", "b").as_deref(), Some(""));
        assert_eq!(first_query_value("ab=1", "a"), None);
    }

    #[test]
    fn mutating_requests() {
        for (method, uri, want) in [
            ("GET", "/api/v1/pods", false),
            ("GET", "/api/v1/namespaces/d/pods/p", false),
            ("GET", "/api/v1/namespaces/d/pods/p/log", false),
            ("GET", "/api/v1/pods?watch=1", false),
            ("HEAD", "/api/v1/namespaces/d/pods/p", false),
            ("POST", "/api/v1/namespaces/d/pods", true),
            ("PUT", "/api/v1/namespaces/d/pods/p", true),
            ("PATCH", "/api/v1/namespaces/d/pods/p", true),
            ("DELETE", "/api/v1/namespaces/d/pods/p", true),
            ("DELETE", "/api/v1/namespaces/d/pods", true),
            ("GET", "/api/v1/namespaces/d/pods/p/exec?command=ls", true),
            ("GET", "/api/v1/namespaces/d/pods/p/attach", true),
            ("GET", "/api/v1/namespaces/d/pods/p/portforward", true),
            ("GET", "/api/v1/namespaces/d/services/s/proxy/x", true),
            ("GET", "/api/v1/proxy/namespaces/d/pods/p", true),
            ("GET", "/healthz", false),
            ("HEAD", "/healthz", false),
            ("POST", "/apis/authorization.k8s.io", true),
        ] {
            let info = parse(method, uri).unwrap_or_else(|e| panic!("{method} {uri}: {e}"));
            assert_eq!(info.is_mutating(), want, "{method} {uri}");
        }
    }

    #[test]
    fn resource_with_subresource() {
        for (uri, want) in [
            ("/api/v1/namespaces/d/pods/p/exec", "pods/exec"),
            ("/api/v1/namespaces/d/pods/p", "pods"),
            ("/api/v1/namespaces/d/finalize", "namespaces/finalize"),
            ("/healthz", ""),
        ] {
            let info = parse("GET", uri).unwrap_or_else(|e| panic!("{uri}: {e}"));
            assert_eq!(info.resource_with_subresource(), want, "{uri}");
        }
    }

    #[test]
    fn field_selector_parser_matches_go() {
        for (selector, want) in [
            ("", Some(None)),
            ("metadata.name=a", Some(Some("a"))),
            ("metadata.name==a", Some(Some("a"))),
            ("metadata.name!=a", Some(None)),
            ("metadata.name=", Some(Some(""))),
            (",metadata.name=a,", Some(Some("a"))),
            ("metadata.name=a\\,b", Some(Some("a,b"))),
            ("metadata.name=a\\\\", Some(Some("a\\"))),
            ("metadata.name=a\\", None),
            ("metadata.name=a\\x", None),
            ("metadata.name=a,b", None),
            ("spec.nodeName=n1", Some(None)),
            ("metadata.name =a", Some(None)),
        ] {
            assert_eq!(
                field_selector_exact_name(selector),
                want.map(|n| n.map(str::to_owned)),
                "{selector:?}"
            );
        }
    }
}
