//! The in-memory object store: one global, monotonically increasing resourceVersion (as
//! etcd's revision), objects keyed like etcd keys (so lists come out sorted by namespace
//! then name), a bounded history of change events for watches resuming from a
//! resourceVersion, and a broadcast of new events for live watches.
//!
//! Simplifications, each a documented departure from the real API server:
//! * no admission, defaulting beyond a few fields (namespace phase/finalizers/label, pod
//!   phase, secret type, generation and `spec.replicas` of the apps/v1 kinds), no
//!   managedFields;
//! * deletes are immediate: no graceful pod deletion, no finalizers; deleting a namespace
//!   removes its objects and the namespace at once (the real server sets
//!   `status.phase: Terminating` and the namespace controller removes them later; the
//!   delete response and the DELETED event carry that Terminating state);
//! * a list continuation reads the current state after the token's key, not a snapshot
//!   at the token's resourceVersion;
//! * watch filters apply to each event's object as it is: an object that stops matching a
//!   label selector yields no synthetic DELETED event.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};

use http::StatusCode;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::discovery::{self, ResourceDef};
use gateway_userspace::status::{Status, StatusDetails};

/// Events kept for watches that resume from a resourceVersion; older ones are "compacted".
const HISTORY: usize = 10_000;
/// First resourceVersion handed out; the bootstrap namespaces are created below it and
/// then compacted, so a watch from resourceVersion "1" is Expired as on a long-lived cluster.
const FIRST_RV: u64 = 100;

/// A watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    /// Object created (or, for a watch starting "now", already there).
    Added,
    /// Object changed.
    Modified,
    /// Object deleted; carries its last state.
    Deleted,
}

impl EventType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change to one object.
#[derive(Debug)]
pub(crate) struct Event {
    /// What happened.
    pub kind: EventType,
    /// Which resource.
    pub res: &'static ResourceDef,
    /// The object after the change (for DELETED: its last state with the deletion's RV).
    pub object: Value,
    /// The resourceVersion of the change.
    pub rv: u64,
}

type Key = (&'static str, &'static str, String, String);

fn key(res: &'static ResourceDef, namespace: &str, name: &str) -> Key {
    (res.group, res.plural, namespace.to_owned(), name.to_owned())
}

struct Inner {
    rv: u64,
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Event>>,
}

/// The store shared by every connection.
pub(crate) struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<Event>>,
    /// What is served: built-in resources and those of registered definitions.
    pub catalog: discovery::Catalog,
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WatchFrom {
    /// resourceVersion unset or "0": synthetic ADDED events for existing objects first.
    Now,
    /// Only changes after this resourceVersion.
    After(u64),
}

/// A registered watch: what to send first, then live events.
pub(crate) struct Subscription {
    /// Events to send before live ones (synthetic ADDED or replayed history).
    pub initial: Vec<Arc<Event>>,
    /// Live events (unfiltered: apply [`Scope::matches`]).
    pub live: broadcast::Receiver<Arc<Event>>,
    /// Set when the requested resourceVersion is compacted: send one ERROR and end.
    pub expired: Option<String>,
    /// The store's resourceVersion when the watch started.
    pub rv: u64,
}

/// Which objects a list, watch or deletecollection addresses.
#[derive(Debug, Clone)]
pub(crate) struct Scope {
    /// The resource.
    pub res: &'static ResourceDef,
    /// `None` for all namespaces (or a cluster-scoped resource).
    pub namespace: Option<String>,
    /// Exact name (legacy single-object watch path).
    pub name: Option<String>,
    /// Label and field selectors.
    pub selector: Selector,
}

impl Scope {
    /// Whether an object of `res` is in scope.
    pub fn matches(&self, res: &ResourceDef, obj: &Value) -> bool {
        std::ptr::eq(res, self.res)
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| str_at(obj, "/metadata/namespace") == ns)
            && self
                .name
                .as_deref()
                .is_none_or(|n| str_at(obj, "/metadata/name") == n)
            && self.selector.matches(res, obj)
    }
}

fn str_at<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// The object's metadata map, creating it (and making `obj` an object) if needed.
fn ensure_meta(obj: &mut Value) -> Option<&mut Map<String, Value>> {
    if !obj.is_object() {
        *obj = json!({});
    }
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj.get_mut("metadata").and_then(Value::as_object_mut)
}

fn set_meta(obj: &mut Value, field: &str, value: Value) {
    if let Some(m) = ensure_meta(obj) {
        m.insert(field.to_owned(), value);
    }
}

fn remove_meta(obj: &mut Value, field: &str) {
    if let Some(m) = ensure_meta(obj) {
        m.remove(field);
    }
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn invalid(res: &ResourceDef, name: &str, message: String) -> Status {
    Status::failure(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        format!("{} \"{name}\" is invalid: {message}", kind_qualified(res)),
    )
    .with_details(StatusDetails {
        name: name.to_owned(),
        group: res.group.to_owned(),
        kind: res.kind.to_owned(),
        retry_after_seconds: None,
    })
}

fn kind_qualified(res: &ResourceDef) -> String {
    if res.group.is_empty() {
        res.kind.to_owned()
    } else {
        format!("{}.{}", res.kind, res.group)
    }
}

/// RFC 1123 label (namespaces) or subdomain (everything else) name validation, with the
/// API server's wording.
fn validate_name(res: &ResourceDef, name: &str) -> Result<(), Status> {
    let label_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    if res.plural == "namespaces" {
        if name.len() > 63 {
            return Err(invalid(
                res,
                name,
                format!(
                    "metadata.name: Invalid value: \"{name}\": must be no more than 63 characters"
                ),
            ));
        }
        if !label_ok(name) {
            return Err(invalid(
                res,
                name,
                format!(
                    "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
                ),
            ));
        }
        return Ok(());
    }
    if name.len() > 253 {
        return Err(invalid(
            res,
            name,
            format!(
                "metadata.name: Invalid value: \"{name}\": must be no more than 253 characters"
            ),
        ));
    }
    if !name.split('.').all(label_ok) {
        return Err(invalid(
            res,
            name,
            format!(
                "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
            ),
        ));
    }
    Ok(())
}

/// Type checks the JSON decoder would fail on for the typed objects served here, worded
/// like Go's `encoding/json` errors the API server returns as 400s.
pub(crate) fn check_types(res: &ResourceDef, obj: &mut Value) -> Result<(), String> {
    if !obj.is_object() {
        return Err(format!(
            "json: cannot unmarshal {} into Go value of type v1.{}",
            json_type(obj),
            res.kind
        ));
    }
    if let Some(meta) = obj
        .get("metadata")
        .filter(|m| !m.is_object() && !m.is_null())
    {
        return Err(format!(
            "json: cannot unmarshal {} into Go struct field {}.metadata of type v1.ObjectMeta",
            json_type(meta),
            res.kind
        ));
    }
    for field in ["labels", "annotations"] {
        if let Some(map) = obj
            .pointer(&format!("/metadata/{field}"))
            .filter(|v| !v.is_null())
        {
            let ok = map
                .as_object()
                .is_some_and(|m| m.values().all(Value::is_string));
            if !ok {
                return Err(format!(
                    "json: cannot unmarshal {} into Go struct field ObjectMeta.metadata.{field} of type map[string]string",
                    json_type(map)
                ));
            }
        }
    }
    let string_maps: &[&str] = match res.plural {
        "configmaps" => &["data"],
        "secrets" => &["data", "stringData"],
        _ => &[],
    };
    for field in string_maps {
        let Some(map) = obj.get(*field).filter(|v| !v.is_null()) else {
            continue;
        };
        let Some(map) = map.as_object() else {
            return Err(format!(
                "json: cannot unmarshal {} into Go struct field {}.{field} of type map[string]string",
                json_type(map),
                res.kind
            ));
        };
        for (k, v) in map {
            let Some(s) = v.as_str() else {
                return Err(format!(
                    "json: cannot unmarshal {} into Go struct field {}.{field} of type string",
                    json_type(v),
                    res.kind
                ));
            };
            if res.plural == "secrets" && *field == "data" {
                base64_decode(s).map_err(|e| format!("json: error decoding data[{k:?}]: {e}"))?;
            }
        }
    }
    if res.plural == "secrets" {
        // Like the v1 conversion: stringData is merged into data and never stored.
        if let Some(Value::Object(string_data)) =
            obj.as_object_mut().and_then(|m| m.remove("stringData"))
        {
            if !obj.get("data").is_some_and(Value::is_object) {
                obj["data"] = json!({});
            }
            for (k, v) in string_data {
                obj["data"][k] = Value::from(base64_encode(v.as_str().unwrap_or("").as_bytes()));
            }
        }
    }
    Ok(())
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (Go's `encoding/base64.StdEncoding`).
pub(crate) fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard padded base64, with Go's error wording.
pub(crate) fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    let bytes = s.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return Err(format!(
            "illegal base64 data at input byte {}",
            bytes.len() - bytes.len() % 4
        ));
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for (ci, chunk) in bytes.chunks(4).enumerate() {
        let mut n = 0u32;
        let mut pad = 0;
        for (i, &c) in chunk.iter().enumerate() {
            let v = if c == b'=' && i >= 2 && ci == bytes.len() / 4 - 1 {
                pad += 1;
                0
            } else if pad > 0 {
                return Err(format!("illegal base64 data at input byte {}", ci * 4 + i));
            } else {
                B64.iter()
                    .position(|&b| b == c)
                    .ok_or_else(|| format!("illegal base64 data at input byte {}", ci * 4 + i))?
                    as u32
            };
            n = (n << 6) | v;
        }
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&decoded[..3 - pad]);
    }
    Ok(out)
}

/// Names the API server tries for one `generateName` create before it answers
/// AlreadyExists (`maxNameGenerationCreateAttempts` in the apiserver's generic registry).
const GENERATE_NAME_ATTEMPTS: u32 = 8;

/// Five characters from the alphabet `generateName` suffixes use (no vowels, no
/// look-alikes), drawn from a v7 UUID's random bits.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = uuid::Uuid::now_v7().into_bytes();
    bytes[11..16]
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect()
}

/// A label selector requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelOp {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
}

/// Parsed `labelSelector` and `fieldSelector`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Selector {
    labels: Vec<(String, LabelOp)>,
    fields: Vec<(String, String, bool)>,
}

/// Fields a `fieldSelector` may use, per resource (the API server's field label
/// conversion functions).
fn supported_fields(res: &ResourceDef) -> &'static [&'static str] {
    match res.plural {
        "pods" => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        "secrets" => &["type"],
        "namespaces" => &["status.phase"],
        _ => &[],
    }
}

fn field_value(obj: &Value, field: &str) -> String {
    let pointer = format!("/{}", field.replace('.', "/"));
    match obj.pointer(&pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ if field == "spec.hostNetwork" => "false".into(),
        _ => String::new(),
    }
}

/// Splits on commas that are not inside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    terms
}

fn parse_label_term(term: &str) -> Result<(String, LabelOp), String> {
    let t = term.trim();
    let bad = || format!("unable to parse requirement: invalid label selector term \"{t}\"");
    if let Some(key) = t.strip_prefix('!') {
        let key = key.trim();
        return if valid_key(key) {
            Ok((key.to_owned(), LabelOp::NotExists))
        } else {
            Err(bad())
        };
    }
    for (op, ctor) in [
        ("!=", LabelOp::NotEq as fn(String) -> LabelOp),
        ("==", LabelOp::Eq),
        ("=", LabelOp::Eq),
    ] {
        if let Some((k, v)) = t.split_once(op) {
            let (k, v) = (k.trim(), v.trim());
            if !valid_key(k) || v.contains(['=', '!', '(', ')', ' ']) {
                return Err(bad());
            }
            return Ok((k.to_owned(), ctor(v.to_owned())));
        }
    }
    for (word, is_in) in [(" notin ", false), (" in ", true)] {
        if let Some((k, rest)) = t.split_once(word) {
            let k = k.trim();
            let list = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(bad)?;
            let values: Vec<String> = list.split(',').map(|v| v.trim().to_owned()).collect();
            if !valid_key(k) {
                return Err(bad());
            }
            return Ok((
                k.to_owned(),
                if is_in {
                    LabelOp::In(values)
                } else {
                    LabelOp::NotIn(values)
                },
            ));
        }
    }
    if valid_key(t) {
        Ok((t.to_owned(), LabelOp::Exists))
    } else {
        Err(bad())
    }
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 316
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

impl Selector {
    /// Parses both selectors; errors are the API server's 400 BadRequest texts.
    pub fn parse(
        res: &ResourceDef,
        labels: Option<&str>,
        fields: Option<&str>,
    ) -> Result<Self, Status> {
        let mut sel = Selector::default();
        for term in labels
            .filter(|s| !s.trim().is_empty())
            .map(split_terms)
            .unwrap_or_default()
        {
            sel.labels
                .push(parse_label_term(term).map_err(Status::bad_request)?);
        }
        for term in fields
            .filter(|s| !s.trim().is_empty())
            .map(split_terms)
            .unwrap_or_default()
        {
            let (field, value, negate) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, false)
            } else {
                return Err(Status::bad_request(format!(
                    "invalid selector: '{term}'; can't understand '{term}'"
                )));
            };
            let field = field.trim();
            if field != "metadata.name"
                && field != "metadata.namespace"
                && !supported_fields(res).contains(&field)
            {
                return Err(Status::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            sel.fields
                .push((field.to_owned(), value.trim().to_owned(), negate));
        }
        Ok(sel)
    }

    /// The name an equality `metadata.name=X` term pins, if any.
    pub fn name(&self) -> Option<&str> {
        self.fields
            .iter()
            .find(|(f, _, neg)| f == "metadata.name" && !neg)
            .map(|(_, v, _)| v.as_str())
    }

    /// Whether `obj` satisfies every requirement.
    pub fn matches(&self, _res: &ResourceDef, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|(k, op)| match op {
            LabelOp::Eq(v) => label(k) == Some(v.as_str()),
            LabelOp::NotEq(v) => label(k) != Some(v.as_str()),
            LabelOp::In(vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelOp::NotIn(vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            LabelOp::Exists => label(k).is_some(),
            LabelOp::NotExists => label(k).is_none(),
        });
        labels_ok
            && self
                .fields
                .iter()
                .all(|(f, v, negate)| (field_value(obj, f) == *v) != *negate)
    }
}

/// A decoded `continue` token: `{"v":"meta.k8s.io/v1","rv":N,"start":"<ns>/<name>\u0000"}`
/// in base64, the same shape as the API server's.
fn encode_continue(rv: u64, namespace: &str, name: &str) -> String {
    let start = format!("{namespace}/{name}\u{0}");
    base64_encode(
        json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start})
            .to_string()
            .as_bytes(),
    )
}

fn decode_continue(token: &str) -> Result<(u64, String, String), Status> {
    let bad = |why: &str| Status::bad_request(format!("continue key is not valid: {why}"));
    let raw = base64_decode(token).map_err(|e| bad(&e))?;
    let v: Value = serde_json::from_slice(&raw).map_err(|e| bad(&e.to_string()))?;
    let rv = v["rv"].as_u64().ok_or_else(|| bad("no resource version"))?;
    let start = v["start"]
        .as_str()
        .ok_or_else(|| bad("no start key"))?
        .trim_end_matches('\u{0}');
    let (ns, name) = start
        .split_once('/')
        .ok_or_else(|| bad("malformed start key"))?;
    Ok((rv, ns.to_owned(), name.to_owned()))
}

/// Preconditions of a delete (`DeleteOptions.preconditions`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Preconditions {
    /// Required UID.
    pub uid: Option<String>,
    /// Required resourceVersion.
    pub resource_version: Option<String>,
}

/// What a write should do to `status` for resources with a status subresource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// The main resource: the stored status is kept.
    Main,
    /// The `status` subresource: only the status changes.
    Status,
}

impl Store {
    /// A store holding the `default`, `kube-system`, `kube-public` and `kube-node-lease`
    /// namespaces, as a fresh cluster does.
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(4096);
        let store = Store {
            inner: Mutex::new(Inner {
                rv: FIRST_RV - 10,
                compacted: 0,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
            }),
            events,
            catalog: discovery::Catalog::new(),
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            // Seeding a well-formed namespace cannot fail.
            let _ = store
                .seed(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
        }
        let mut inner = store.lock();
        inner.rv = inner.rv.max(FIRST_RV);
        inner.history.clear();
        inner.compacted = inner.rv;
        drop(inner);
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every mutation is a
        // single insert/remove), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Drops the watch history, so watches from any earlier resourceVersion get 410.
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.history.clear();
        inner.compacted = inner.rv;
    }

    fn commit(
        &self,
        inner: &mut Inner,
        res: &'static ResourceDef,
        mut obj: Value,
        kind: EventType,
    ) -> Value {
        inner.rv += 1;
        let rv = inner.rv;
        set_meta(&mut obj, "resourceVersion", Value::from(rv.to_string()));
        let k = key(
            res,
            str_at(&obj, "/metadata/namespace"),
            str_at(&obj, "/metadata/name"),
        );
        if kind == EventType::Deleted {
            inner.objects.remove(&k);
        } else {
            inner.objects.insert(k, obj.clone());
        }
        let event = Arc::new(Event {
            kind,
            res,
            object: obj.clone(),
            rv,
        });
        inner.history.push_back(event.clone());
        while inner.history.len() > HISTORY {
            if let Some(old) = inner.history.pop_front() {
                inner.compacted = old.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(event);
        obj
    }

    fn namespace_exists(inner: &Inner, ns: &str) -> bool {
        discovery::find("", "v1", "namespaces")
            .is_some_and(|nsres| inner.objects.contains_key(&key(nsres, "", ns)))
    }

    /// One object.
    pub fn get(
        &self,
        res: &'static ResourceDef,
        namespace: &str,
        name: &str,
    ) -> Result<Value, Status> {
        self.lock()
            .objects
            .get(&key(res, namespace, name))
            .cloned()
            .ok_or_else(|| Status::not_found(res.group, res.plural, name))
    }

    /// Objects in scope, sorted by namespace then name, with limit/continue; returns the
    /// items, the list's resourceVersion and the next continue token (empty at the end).
    pub fn list(
        &self,
        scope: &Scope,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<(Vec<Value>, u64, String), Status> {
        let inner = self.lock();
        let (list_rv, start) = match continue_token.filter(|t| !t.is_empty()) {
            Some(token) => {
                let (rv, ns, name) = decode_continue(token)?;
                if rv < inner.compacted {
                    return Err(Status::failure(
                        StatusCode::GONE,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ));
                }
                (rv, Some((ns, name)))
            }
            None => (inner.rv, None),
        };
        let mut items = Vec::new();
        let mut next = String::new();
        for ((group, plural, ns, name), obj) in &inner.objects {
            if *group != scope.res.group || *plural != scope.res.plural {
                continue;
            }
            if let Some((sns, sname)) = &start
                && (ns, name) <= (sns, sname)
            {
                continue;
            }
            if !scope.matches(scope.res, obj) {
                continue;
            }
            if limit.is_some_and(|l| l > 0 && items.len() == l) {
                // There is at least one more item: hand out a token after the last one.
                let last: &Value = &items[items.len() - 1];
                next = encode_continue(
                    list_rv,
                    str_at(last, "/metadata/namespace"),
                    str_at(last, "/metadata/name"),
                );
                break;
            }
            items.push(obj.clone());
        }
        Ok((items, list_rv, next))
    }

    /// Creates an object (already decoded and type-checked) in `namespace` (`""` for
    /// cluster-scoped resources).
    pub fn create(
        &self,
        res: &'static ResourceDef,
        namespace: &str,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Value, Status> {
        let mut name = str_at(&obj, "/metadata/name").to_owned();
        let mut generate_from = None;
        if name.is_empty() {
            let prefix = str_at(&obj, "/metadata/generateName").to_owned();
            if prefix.is_empty() {
                return Err(invalid(
                    res,
                    "",
                    "metadata.name: Required value: name or generateName is required".into(),
                ));
            }
            name = format!("{prefix}{}", random_suffix());
            set_meta(&mut obj, "name", Value::from(name.clone()));
            generate_from = Some(prefix);
        }
        if !str_at(&obj, "/metadata/resourceVersion").is_empty() {
            return Err(Status::failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "Internal error occurred: resourceVersion should not be set on objects to be created",
            ));
        }
        if res.namespaced {
            set_meta(&mut obj, "namespace", Value::from(namespace));
        } else {
            remove_meta(&mut obj, "namespace");
        }
        validate_name(res, &name)?;
        let mut inner = self.lock();
        if res.namespaced && !Self::namespace_exists(&inner, namespace) {
            return Err(Status::not_found("", "namespaces", namespace));
        }
        // A generated name that is taken is generated again, up to eight names in all
        // (the API server's RetryGenerateName, GA in Kubernetes 1.32); a name the client
        // chose is AlreadyExists at once.
        let mut attempts = 1;
        while inner.objects.contains_key(&key(res, namespace, &name)) {
            match &generate_from {
                Some(prefix) if attempts < GENERATE_NAME_ATTEMPTS => {
                    name = format!("{prefix}{}", random_suffix());
                    set_meta(&mut obj, "name", Value::from(name.clone()));
                    attempts += 1;
                }
                _ => return Err(Status::already_exists(res.group, res.plural, &name)),
            }
        }
        set_meta(
            &mut obj,
            "uid",
            Value::from(uuid::Uuid::now_v7().to_string()),
        );
        set_meta(&mut obj, "creationTimestamp", Value::from(now_rfc3339()));
        for field in [
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
        ] {
            remove_meta(&mut obj, field);
        }
        prepare_for_create(res, &mut obj);
        if dry_run {
            return Ok(obj);
        }
        Ok(self.commit(&mut inner, res, obj, EventType::Added))
    }

    /// Replaces an object (PUT).
    pub fn update(
        &self,
        res: &'static ResourceDef,
        namespace: &str,
        name: &str,
        new: Value,
        part: Part,
        dry_run: bool,
    ) -> Result<Value, Status> {
        let mut inner = self.lock();
        let old = inner
            .objects
            .get(&key(res, namespace, name))
            .cloned()
            .ok_or_else(|| Status::not_found(res.group, res.plural, name))?;
        self.finish_update(&mut inner, res, namespace, name, old, new, part, dry_run)
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "internal helper shared by update and patch"
    )]
    fn finish_update(
        &self,
        inner: &mut Inner,
        res: &'static ResourceDef,
        namespace: &str,
        name: &str,
        old: Value,
        mut new: Value,
        part: Part,
        dry_run: bool,
    ) -> Result<Value, Status> {
        let body_name = str_at(&new, "/metadata/name");
        if !body_name.is_empty() && body_name != name {
            return Err(Status::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let body_ns = str_at(&new, "/metadata/namespace");
        if res.namespaced && !body_ns.is_empty() && body_ns != namespace {
            return Err(Status::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let old_rv = str_at(&old, "/metadata/resourceVersion").to_owned();
        let new_rv = str_at(&new, "/metadata/resourceVersion");
        if !new_rv.is_empty() && new_rv != old_rv {
            return Err(Status::conflict(
                res.group,
                res.plural,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        let new_uid = str_at(&new, "/metadata/uid");
        let old_uid = str_at(&old, "/metadata/uid");
        if !new_uid.is_empty() && new_uid != old_uid {
            return Err(Status::conflict(
                res.group,
                res.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {new_uid}, UID in object meta: {old_uid}"
                ),
            ));
        }
        if part == Part::Status {
            let status = new.get("status").cloned();
            new = old.clone();
            match status {
                Some(s) => new["status"] = s,
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        } else if res.has_status {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        if let Some(m) = new.as_object_mut() {
            m.insert("kind".into(), res.kind.into());
            m.insert("apiVersion".into(), res.api_version().into());
        }
        set_meta(&mut new, "name", Value::from(name));
        if res.namespaced {
            set_meta(&mut new, "namespace", Value::from(namespace));
        }
        set_meta(&mut new, "resourceVersion", Value::from(old_rv));
        for immutable in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "generation",
        ] {
            match old.pointer(&format!("/metadata/{immutable}")) {
                Some(v) => set_meta(&mut new, immutable, v.clone()),
                None => remove_meta(&mut new, immutable),
            }
        }
        if is_replicated(res) && part == Part::Main {
            default_replicas(&mut new);
        }
        if (is_replicated(res) && new.get("spec") != old.get("spec"))
            || (res.custom && content(&new) != content(&old))
        {
            let generation = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            set_meta(&mut new, "generation", Value::from(generation + 1));
        }
        // A write that changes nothing keeps the resourceVersion and sends no event.
        if new == old || dry_run {
            return Ok(new);
        }
        Ok(self.commit(inner, res, new, EventType::Modified))
    }

    /// Applies a patch function to an object; `apply` creates a missing object (server-side
    /// apply) and then returns `created == true`.
    #[expect(clippy::too_many_arguments, reason = "internal API with one caller")]
    pub fn patch(
        &self,
        res: &'static ResourceDef,
        namespace: &str,
        name: &str,
        part: Part,
        dry_run: bool,
        apply_create: Option<Value>,
        patch: impl FnOnce(Value) -> Result<Value, Status>,
    ) -> Result<(Value, bool), Status> {
        let mut inner = self.lock();
        let Some(old) = inner.objects.get(&key(res, namespace, name)).cloned() else {
            return match apply_create {
                // patch.go: an apply naming a uid is for an existing object, not a create.
                Some(obj) if !str_at(&obj, "/metadata/uid").is_empty() => Err(Status::conflict(
                    res.group,
                    res.plural,
                    name,
                    &format!(
                        "uid mismatch: the provided object specified uid {}, and no existing object was found",
                        str_at(&obj, "/metadata/uid")
                    ),
                )),
                Some(obj) if part == Part::Main => {
                    drop(inner);
                    self.create(res, namespace, obj, dry_run).map(|o| (o, true))
                }
                _ => Err(Status::not_found(res.group, res.plural, name)),
            };
        };
        let new = patch(old.clone())?;
        if str_at(&new, "/kind") != res.kind || str_at(&new, "/apiVersion") != res.api_version() {
            return Err(Status::bad_request(format!(
                "the patched object's kind/apiVersion ({}/{}) must stay {}/{}",
                str_at(&new, "/apiVersion"),
                str_at(&new, "/kind"),
                res.api_version(),
                res.kind
            )));
        }
        let mut new = new;
        check_types(res, &mut new).map_err(Status::bad_request)?;
        self.finish_update(&mut inner, res, namespace, name, old, new, part, dry_run)
            .map(|o| (o, false))
    }

    /// Deletes one object, returning its last state with the deletion's resourceVersion.
    pub fn delete(
        &self,
        res: &'static ResourceDef,
        namespace: &str,
        name: &str,
        pre: &Preconditions,
        dry_run: bool,
    ) -> Result<Value, Status> {
        let mut inner = self.lock();
        let mut obj = inner
            .objects
            .get(&key(res, namespace, name))
            .cloned()
            .ok_or_else(|| Status::not_found(res.group, res.plural, name))?;
        let uid = str_at(&obj, "/metadata/uid").to_owned();
        if let Some(want) = pre.uid.as_deref().filter(|u| *u != uid) {
            return Err(Status::conflict(
                res.group,
                res.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"
                ),
            ));
        }
        let rv = str_at(&obj, "/metadata/resourceVersion").to_owned();
        if let Some(want) = pre.resource_version.as_deref().filter(|r| *r != rv) {
            return Err(Status::conflict(
                res.group,
                res.plural,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {rv}"
                ),
            ));
        }
        if res.plural == "namespaces" {
            set_meta(&mut obj, "deletionTimestamp", Value::from(now_rfc3339()));
            obj["status"] = json!({"phase": "Terminating"});
        }
        if dry_run {
            return Ok(obj);
        }
        if res.plural == "namespaces" {
            let contained: Vec<(Key, Value)> = inner
                .objects
                .iter()
                .filter(|((_, _, ns, _), _)| ns == name)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for ((group, plural, _, _), o) in contained {
                if let Some(r) = self.catalog.find_group_plural(group, plural) {
                    self.commit(&mut inner, r, o, EventType::Deleted);
                }
            }
        }
        Ok(self.commit(&mut inner, res, obj, EventType::Deleted))
    }

    /// Deletes every object in scope, returning what was deleted.
    pub fn delete_collection(&self, scope: &Scope, dry_run: bool) -> Vec<Value> {
        let (items, _, _) = match self.list(scope, None, None) {
            Ok(listed) => listed,
            Err(_) => return Vec::new(),
        };
        let mut deleted = Vec::new();
        for item in items {
            let ns = str_at(&item, "/metadata/namespace").to_owned();
            let name = str_at(&item, "/metadata/name").to_owned();
            // An object deleted concurrently is simply not in the result.
            if let Ok(obj) = self.delete(scope.res, &ns, &name, &Preconditions::default(), dry_run)
            {
                deleted.push(obj);
            }
        }
        deleted
    }

    /// Registers a watch. Registration and the snapshot happen under the store lock, so no
    /// event falls between the initial events and the live ones.
    pub fn watch(&self, scope: &Scope, from: WatchFrom) -> Subscription {
        let inner = self.lock();
        let live = self.events.subscribe();
        let mut initial = Vec::new();
        let mut expired = None;
        match from {
            WatchFrom::Now => {
                for ((group, plural, _, _), obj) in &inner.objects {
                    if *group == scope.res.group
                        && *plural == scope.res.plural
                        && scope.matches(scope.res, obj)
                    {
                        let rv = str_at(obj, "/metadata/resourceVersion")
                            .parse()
                            .unwrap_or(0);
                        initial.push(Arc::new(Event {
                            kind: EventType::Added,
                            res: scope.res,
                            object: obj.clone(),
                            rv,
                        }));
                    }
                }
            }
            WatchFrom::After(rv) if rv < inner.compacted => {
                expired = Some(format!(
                    "too old resource version: {rv} ({})",
                    inner.compacted + 1
                ));
            }
            WatchFrom::After(rv) => {
                initial.extend(
                    inner
                        .history
                        .iter()
                        .filter(|e| e.rv > rv && scope.matches(e.res, &e.object))
                        .cloned(),
                );
            }
        }
        Subscription {
            initial,
            live,
            expired,
            rv: inner.rv,
        }
    }

    /// Inserts or replaces an object directly, bypassing validation (tests, the demo).
    /// Missing namespaces are created; uid and creationTimestamp are filled in if absent.
    pub fn seed(&self, mut obj: Value) -> Result<Value, String> {
        let api_version = str_at(&obj, "/apiVersion").to_owned();
        let kind = str_at(&obj, "/kind").to_owned();
        let res = self.catalog.find_kind(&api_version, &kind).ok_or_else(|| {
            format!("seed: no served resource has apiVersion {api_version:?} and kind {kind:?}")
        })?;
        check_types(res, &mut obj).map_err(|e| format!("seed {kind}: {e}"))?;
        let name = str_at(&obj, "/metadata/name").to_owned();
        if name.is_empty() {
            return Err(format!("seed {kind}: metadata.name is required"));
        }
        let namespace = if res.namespaced {
            let ns = str_at(&obj, "/metadata/namespace");
            if ns.is_empty() {
                "default".to_owned()
            } else {
                ns.to_owned()
            }
        } else {
            String::new()
        };
        if res.namespaced {
            let exists = Self::namespace_exists(&self.lock(), &namespace);
            if !exists {
                self.seed(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}))?;
            }
        }
        if res.namespaced {
            set_meta(&mut obj, "namespace", Value::from(namespace.clone()));
        }
        if str_at(&obj, "/metadata/uid").is_empty() {
            set_meta(
                &mut obj,
                "uid",
                Value::from(uuid::Uuid::now_v7().to_string()),
            );
        }
        if str_at(&obj, "/metadata/creationTimestamp").is_empty() {
            set_meta(&mut obj, "creationTimestamp", Value::from(now_rfc3339()));
        }
        // As a create would: the kinds whose generation counts spec changes start at 1.
        if (res.custom || is_replicated(res)) && obj.pointer("/metadata/generation").is_none() {
            set_meta(&mut obj, "generation", Value::from(1));
        }
        if std::ptr::eq(res, &discovery::CRDS) {
            self.catalog
                .register(&obj)
                .map_err(|e| format!("seed CustomResourceDefinition {name}: {e}"))?;
            if obj.get("status").is_none() {
                obj["status"] = super::crd::established_status(&obj, &now_rfc3339());
            }
        }
        if res.plural == "namespaces" {
            add_label(&mut obj, "kubernetes.io/metadata.name", &name);
            if obj.pointer("/status/phase").is_none() {
                obj["status"] = json!({"phase": "Active"});
            }
            if obj.pointer("/spec/finalizers").is_none() {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
            }
        }
        let mut inner = self.lock();
        let kind = if inner.objects.contains_key(&key(res, &namespace, &name)) {
            EventType::Modified
        } else {
            EventType::Added
        };
        Ok(self.commit(&mut inner, res, obj, kind))
    }

    /// A stored object, if present.
    pub fn object(&self, res: &'static ResourceDef, namespace: &str, name: &str) -> Option<Value> {
        self.get(res, namespace, name).ok()
    }
}

fn add_label(obj: &mut Value, label: &str, value: &str) {
    if let Some(meta) = ensure_meta(obj) {
        let labels = meta.entry("labels").or_insert_with(|| json!({}));
        if !labels.is_object() {
            *labels = json!({});
        }
        if let Some(l) = labels.as_object_mut() {
            l.insert(label.to_owned(), Value::from(value));
        }
    }
}

/// The few defaults the real strategies set on create.
fn prepare_for_create(res: &ResourceDef, obj: &mut Value) {
    if let Some(m) = obj.as_object_mut() {
        m.insert("kind".into(), res.kind.into());
        m.insert("apiVersion".into(), res.api_version().into());
    }
    match res.plural {
        "namespaces" => {
            let name = str_at(obj, "/metadata/name").to_owned();
            add_label(obj, "kubernetes.io/metadata.name", &name);
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
        }
        "pods" => {
            obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
        }
        "secrets" if str_at(obj, "/type").is_empty() => {
            obj["type"] = Value::from("Opaque");
        }
        "customresourcedefinitions" if res.group == "apiextensions.k8s.io" => {
            let status = super::crd::established_status(obj, &now_rfc3339());
            obj["status"] = status;
        }
        _ if res.custom => {
            set_meta(obj, "generation", Value::from(1));
            // With the status subresource, a create cannot set the status.
            if res.has_status
                && let Some(m) = obj.as_object_mut()
            {
                m.remove("status");
            }
        }
        _ if is_replicated(res) => {
            set_meta(obj, "generation", Value::from(1));
            default_replicas(obj);
            // The zero status as Go marshals it: every Deployment field is omitempty;
            // ReplicaSet and StatefulSet always carry `replicas` (StatefulSet also
            // `availableReplicas`).
            let status = match res.plural {
                "replicasets" => json!({"replicas": 0}),
                "statefulsets" => json!({"replicas": 0, "availableReplicas": 0}),
                _ => json!({}),
            };
            if let Some(m) = obj.as_object_mut() {
                m.insert("status".into(), status);
            }
        }
        _ => {}
    }
}

/// What `metadata.generation` of a custom object counts: everything but metadata and
/// status (and the type fields).
fn content(obj: &Value) -> Map<String, Value> {
    let mut m = obj.as_object().cloned().unwrap_or_default();
    for field in ["metadata", "status", "kind", "apiVersion"] {
        m.remove(field);
    }
    m
}

/// The apps/v1 kinds with replicas (and a `scale` subresource): their generation counts
/// spec changes, and `spec.replicas` defaults to 1.
fn is_replicated(res: &ResourceDef) -> bool {
    res.group == "apps" && matches!(res.plural, "deployments" | "replicasets" | "statefulsets")
}

/// `SetDefaults_Deployment` (and the ReplicaSet and StatefulSet ones) for `spec.replicas`.
fn default_replicas(obj: &mut Value) {
    if !obj.get("spec").is_some_and(Value::is_object) {
        obj["spec"] = json!({});
    }
    if obj.pointer("/spec/replicas").is_none_or(Value::is_null) {
        obj["spec"]["replicas"] = Value::from(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(plural: &str) -> &'static ResourceDef {
        discovery::RESOURCES
            .iter()
            .find(|r| r.plural == plural)
            .unwrap_or_else(|| panic!("no {plural}"))
    }

    fn cm(name: &str, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": {"k": "v"}})
    }

    fn scope(plural: &str, ns: Option<&str>, labels: Option<&str>, fields: Option<&str>) -> Scope {
        let r = res(plural);
        Scope {
            res: r,
            namespace: ns.map(str::to_owned),
            name: None,
            selector: Selector::parse(r, labels, fields)
                .unwrap_or_else(|e| panic!("selector: {}", e.message())),
        }
    }

    #[test]
    fn resource_versions_increase_and_conflicts_are_detected() {
        let store = Store::new();
        let start = store.resource_version();
        let created = store
            .create(res("configmaps"), "default", cm("a", json!({})), false)
            .expect("create");
        let rv1: u64 = created["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("rv");
        assert!(rv1 > start);
        assert!(
            created["metadata"]["uid"]
                .as_str()
                .is_some_and(|u| !u.is_empty())
        );
        assert!(created["metadata"]["creationTimestamp"].is_string());

        let mut changed = created.clone();
        changed["data"]["k"] = json!("w");
        let updated = store
            .update(
                res("configmaps"),
                "default",
                "a",
                changed.clone(),
                Part::Main,
                false,
            )
            .expect("update");
        let rv2: u64 = updated["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("rv");
        assert!(rv2 > rv1);
        assert_eq!(updated["metadata"]["uid"], created["metadata"]["uid"]);

        // Same body again, now stale.
        let err = store
            .update(
                res("configmaps"),
                "default",
                "a",
                changed,
                Part::Main,
                false,
            )
            .expect_err("stale");
        assert_eq!((err.code().as_u16(), err.reason()), (409, "Conflict"));
        assert_eq!(
            err.message(),
            "Operation cannot be fulfilled on configmaps \"a\": the object has been modified; please apply your changes to the latest version and try again"
        );

        // A no-op write keeps the resourceVersion.
        let same = store
            .update(
                res("configmaps"),
                "default",
                "a",
                updated.clone(),
                Part::Main,
                false,
            )
            .expect("noop");
        assert_eq!(
            same["metadata"]["resourceVersion"],
            updated["metadata"]["resourceVersion"]
        );
        assert_eq!(store.resource_version(), rv2);
    }

    #[test]
    fn create_errors() {
        let store = Store::new();
        let cases: Vec<(&str, &str, Value, u16, &str, &str)> = vec![
            (
                "configmaps",
                "nope",
                cm("a", json!({})),
                404,
                "NotFound",
                "namespaces \"nope\" not found",
            ),
            (
                "configmaps",
                "default",
                json!({"metadata": {}}),
                422,
                "Invalid",
                "ConfigMap \"\" is invalid: metadata.name: Required value: name or generateName is required",
            ),
            (
                "configmaps",
                "default",
                cm("Bad_Name", json!({})),
                422,
                "Invalid",
                "ConfigMap \"Bad_Name\" is invalid: metadata.name: Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain",
            ),
            (
                "namespaces",
                "",
                json!({"metadata": {"name": "a.b"}}),
                422,
                "Invalid",
                "Namespace \"a.b\" is invalid: metadata.name: Invalid value: \"a.b\": a lowercase RFC 1123 label",
            ),
            (
                "configmaps",
                "default",
                json!({"metadata": {"name": "x", "resourceVersion": "5"}}),
                500,
                "InternalError",
                "Internal error occurred: resourceVersion should not be set",
            ),
        ];
        for (plural, ns, body, code, reason, message) in cases {
            let err = store
                .create(res(plural), ns, body.clone(), false)
                .expect_err("must fail");
            assert_eq!(
                (err.code().as_u16(), err.reason()),
                (code, reason),
                "{body}"
            );
            assert!(
                err.message().starts_with(message),
                "{body}: {}",
                err.message()
            );
        }
        store
            .create(res("configmaps"), "default", cm("dup", json!({})), false)
            .expect("first");
        let err = store
            .create(res("configmaps"), "default", cm("dup", json!({})), false)
            .expect_err("second");
        assert_eq!(err.message(), "configmaps \"dup\" already exists");
        let generated = store
            .create(
                res("configmaps"),
                "default",
                json!({"metadata": {"generateName": "gen-"}}),
                false,
            )
            .expect("generateName");
        let name = generated["metadata"]["name"].as_str().unwrap_or("");
        assert!(name.starts_with("gen-") && name.len() == 9, "{name}");
    }

    /// 20,000 creates from one prefix meet about 14 taken names among the 27^5 suffixes
    /// (the birthday bound); each must be generated again, not refused.
    #[test]
    fn generate_name_tries_again_when_the_name_is_taken() {
        let store = Store::new();
        let mut names = std::collections::HashSet::new();
        for i in 0..20_000 {
            let created = store
                .create(
                    res("configmaps"),
                    "default",
                    json!({"metadata": {"generateName": "bench-"}}),
                    false,
                )
                .unwrap_or_else(|e| panic!("create {i}: {}", e.message()));
            let name = created["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            assert!(names.insert(name.clone()), "{name} handed out twice");
        }
    }

    #[test]
    fn secrets_string_data_and_base64_checks() {
        let store = Store::new();
        let mut body = json!({"metadata": {"name": "s"}, "stringData": {"password": "hunter2"}});
        check_types(res("secrets"), &mut body).expect("valid");
        let created = store
            .create(res("secrets"), "default", body, false)
            .expect("create");
        assert_eq!(created["data"]["password"], base64_encode(b"hunter2"));
        assert_eq!(created["type"], "Opaque");
        assert!(created.get("stringData").is_none());
        let mut bad = json!({"metadata": {"name": "s2"}, "data": {"k": "not base64!"}});
        let err = check_types(res("secrets"), &mut bad).expect_err("bad base64");
        assert!(err.contains("illegal base64 data at input byte"), "{err}");
        let mut bad_cm = json!({"metadata": {"name": "c"}, "data": {"k": 1}});
        assert_eq!(
            check_types(res("configmaps"), &mut bad_cm),
            Err(
                "json: cannot unmarshal number into Go struct field ConfigMap.data of type string"
                    .into()
            )
        );
    }

    #[test]
    fn base64_round_trips() {
        for input in ["", "a", "ab", "abc", "abcd", "hunter2"] {
            let encoded = base64_encode(input.as_bytes());
            assert_eq!(
                base64_decode(&encoded),
                Ok(input.as_bytes().to_vec()),
                "{input} -> {encoded}"
            );
        }
        assert_eq!(base64_encode(b"ab"), "YWI=");
        assert!(base64_decode("YW=I").is_err());
    }

    /// namespace, labelSelector, fieldSelector, expected names.
    type SelectorCase = (
        Option<&'static str>,
        Option<&'static str>,
        Option<&'static str>,
        Vec<&'static str>,
    );

    #[test]
    fn selectors() {
        let store = Store::new();
        store
            .seed(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}}))
            .expect("ns");
        for (ns, name, labels) in [
            ("default", "a", json!({"app": "web", "tier": "front"})),
            ("default", "b", json!({"app": "db"})),
            ("other", "c", json!({"app": "web"})),
        ] {
            store
                .create(res("configmaps"), ns, cm(name, labels), false)
                .expect("create");
        }
        let names = |s: Scope| -> Vec<String> {
            let (items, _, _) = store.list(&s, None, None).expect("list");
            items
                .iter()
                .map(|i| str_at(i, "/metadata/name").to_owned())
                .collect()
        };
        let cases: Vec<SelectorCase> = vec![
            (None, None, None, vec!["a", "b", "c"]),
            (Some("default"), None, None, vec!["a", "b"]),
            (None, Some("app=web"), None, vec!["a", "c"]),
            (None, Some("app==web,tier"), None, vec!["a"]),
            (None, Some("app!=web"), None, vec!["b"]),
            (None, Some("!tier"), None, vec!["b", "c"]),
            (
                None,
                Some("app in (db, web),tier notin (back)"),
                None,
                vec!["a", "b", "c"],
            ),
            (None, Some("app notin (web)"), None, vec!["b"]),
            (None, None, Some("metadata.name=b"), vec!["b"]),
            (None, None, Some("metadata.namespace!=default"), vec!["c"]),
            (
                None,
                Some("app=web"),
                Some("metadata.namespace=other"),
                vec!["c"],
            ),
        ];
        for (ns, labels, fields, want) in cases {
            assert_eq!(
                names(scope("configmaps", ns, labels, fields)),
                want,
                "ns={ns:?} l={labels:?} f={fields:?}"
            );
        }
        let err = Selector::parse(res("configmaps"), None, Some("spec.foo=x"))
            .expect_err("unknown field");
        assert_eq!(
            (err.code().as_u16(), err.message()),
            (400, "field label not supported: spec.foo")
        );
        assert!(Selector::parse(res("pods"), None, Some("status.phase=Running")).is_ok());
        assert!(Selector::parse(res("configmaps"), Some("a in b"), None).is_err());
        assert!(Selector::parse(res("configmaps"), Some("=x"), None).is_err());
    }

    #[test]
    fn limit_and_continue() {
        let store = Store::new();
        for name in ["a", "b", "c"] {
            store
                .create(res("configmaps"), "default", cm(name, json!({})), false)
                .expect("create");
        }
        let s = scope("configmaps", Some("default"), None, None);
        let (page1, rv1, token) = store.list(&s, Some(2), None).expect("page 1");
        assert_eq!(page1.len(), 2);
        assert!(!token.is_empty());
        let (page2, rv2, token2) = store.list(&s, Some(2), Some(&token)).expect("page 2");
        assert_eq!(
            page2
                .iter()
                .map(|o| str_at(o, "/metadata/name"))
                .collect::<Vec<_>>(),
            ["c"]
        );
        assert_eq!((rv1, token2.as_str()), (rv2, ""));
        let err = store
            .list(&s, Some(2), Some("garbage"))
            .expect_err("bad token");
        assert_eq!(err.code().as_u16(), 400);
        store
            .create(res("configmaps"), "default", cm("d", json!({})), false)
            .expect("create");
        store.compact();
        let err = store
            .list(&s, Some(2), Some(&token))
            .expect_err("expired token");
        assert_eq!((err.code().as_u16(), err.reason()), (410, "Expired"));
    }

    #[test]
    fn watch_resource_version_rules() {
        let store = Store::new();
        let s = scope("configmaps", Some("default"), None, None);
        store
            .create(res("configmaps"), "default", cm("a", json!({})), false)
            .expect("a");
        let after_a = store.resource_version();
        store
            .create(res("configmaps"), "default", cm("b", json!({})), false)
            .expect("b");

        let from_now = store.watch(&s, WatchFrom::Now);
        let added: Vec<(&str, &str)> = from_now
            .initial
            .iter()
            .map(|e| (e.kind.as_str(), str_at(&e.object, "/metadata/name")))
            .collect();
        assert_eq!(added, [("ADDED", "a"), ("ADDED", "b")]);

        let after = store.watch(&s, WatchFrom::After(after_a));
        let replay: Vec<&str> = after
            .initial
            .iter()
            .map(|e| str_at(&e.object, "/metadata/name"))
            .collect();
        assert_eq!(replay, ["b"]);
        assert!(after.expired.is_none());

        let too_old = store.watch(&s, WatchFrom::After(1));
        assert!(
            too_old
                .expired
                .as_deref()
                .is_some_and(|m| m.starts_with("too old resource version: 1 (")),
            "{:?}",
            too_old.expired
        );

        let mut live = store.watch(&s, WatchFrom::After(store.resource_version()));
        assert!(live.initial.is_empty());
        store
            .delete(
                res("configmaps"),
                "default",
                "a",
                &Preconditions::default(),
                false,
            )
            .expect("delete");
        let event = live.live.try_recv().expect("live event");
        assert_eq!(
            (event.kind, str_at(&event.object, "/metadata/name")),
            (EventType::Deleted, "a")
        );
        assert_eq!(
            event.object["metadata"]["resourceVersion"],
            event.rv.to_string()
        );
    }

    #[test]
    fn delete_preconditions_and_namespace_cascade() {
        let store = Store::new();
        store
            .seed(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "gone"}}))
            .expect("ns");
        store
            .create(res("configmaps"), "gone", cm("a", json!({})), false)
            .expect("cm");
        let pre = Preconditions {
            uid: Some("wrong".into()),
            resource_version: None,
        };
        let err = store
            .delete(res("configmaps"), "gone", "a", &pre, false)
            .expect_err("uid precondition");
        assert_eq!(err.reason(), "Conflict");
        let ns = store
            .delete(
                res("namespaces"),
                "",
                "gone",
                &Preconditions::default(),
                false,
            )
            .expect("delete ns");
        assert_eq!(ns["status"]["phase"], "Terminating");
        assert!(store.object(res("configmaps"), "gone", "a").is_none());
        assert!(store.object(res("namespaces"), "", "gone").is_none());
        let err = store
            .create(res("configmaps"), "gone", cm("b", json!({})), false)
            .expect_err("namespace gone");
        assert_eq!(err.message(), "namespaces \"gone\" not found");
    }

    #[test]
    fn status_subresource_separation() {
        let store = Store::new();
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}, "status": {"phase": "Running"}});
        let created = store
            .create(res("pods"), "default", pod, false)
            .expect("create");
        assert_eq!(
            created["status"]["phase"], "Pending",
            "status is reset on create"
        );
        let mut body = created.clone();
        body["status"]["phase"] = json!("Running");
        body["metadata"]["labels"] = json!({"x": "y"});
        let main = store
            .update(res("pods"), "default", "p", body.clone(), Part::Main, false)
            .expect("main");
        assert_eq!(
            (
                main["status"]["phase"].as_str(),
                main["metadata"]["labels"]["x"].as_str()
            ),
            (Some("Pending"), Some("y"))
        );
        body["metadata"]["resourceVersion"] = main["metadata"]["resourceVersion"].clone();
        body["metadata"]["labels"] = json!({});
        let status = store
            .update(res("pods"), "default", "p", body, Part::Status, false)
            .expect("status");
        assert_eq!(
            (
                status["status"]["phase"].as_str(),
                status["metadata"]["labels"]["x"].as_str()
            ),
            (Some("Running"), Some("y"))
        );
    }

    #[test]
    fn seed_creates_namespaces_and_bootstrap_exists() {
        let store = Store::new();
        for ns in ["default", "kube-system"] {
            let obj = store
                .object(res("namespaces"), "", ns)
                .expect("bootstrap namespace");
            assert_eq!(obj["status"]["phase"], "Active");
        }
        let pod = store
            .seed(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "agents"}, "status": {"phase": "Running"}}))
            .expect("seed");
        assert_eq!(
            pod["status"]["phase"], "Running",
            "seed keeps the given status"
        );
        assert!(store.object(res("namespaces"), "", "agents").is_some());
        assert!(
            store
                .seed(json!({"apiVersion": "v9", "kind": "Pod", "metadata": {"name": "p"}}))
                .is_err()
        );
    }
}
